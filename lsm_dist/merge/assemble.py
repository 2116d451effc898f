"""Assembly (contract 5): per-layer merged tensors + the target's untouched tensors → a
Hugging Face checkpoint ``out_dir/model/``.

- The target's config.json (with the plan's changes: layer count of a layer-stacking merge,
  dtype, vocab_size), generation_config.json and tokenizer files are copied (unless the caller
  writes a tokenizer itself: an output vocabulary or chat template, ``lsm_dist.merge.vocab``);
  the model card (README.md + lsm_merge_plan.yaml, ``lsm_dist.merge.card``) is written beside them.
- Tensors keep the output layout's names and order (the target's unless slices renumber
  layers); merged ones come from ``layers/*.safetensors``, the others from the target. Shards (``model-0000i-of-0000n.safetensors``, at most
  ``max_shard_size`` bytes each unless one tensor is larger) are written by a *streaming*
  safetensors writer: the header is computed from shapes and dtypes first, then tensor bytes
  are appended one tensor at a time, so memory is one tensor, never one shard.
- Everything is written into ``out_dir/.model.tmp-<pid>/`` and checked before it counts:
  every tensor is finite (checked as it is written; an error names the tensor), and the
  written headers hold every expected tensor with its shape and dtype. Only then is
  ``MERGE_COMPLETE.json`` written into it and the directory renamed to ``model/``.
  :func:`is_complete` is the one test for a finished merge: no marker, not finished.
- The marker is also the proof that lsm merge wrote a ``model/``: one without it (a user's
  directory) is never replaced, and :func:`foreign_outputs` names it before any work. Temp
  directories of killed assemblies (``.model.tmp-<pid>`` whose process is gone) are removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path

from safetensors import safe_open

from lsm_dist.checkpoint import AUX_FILES, INDEX_NAME, Checkpoint, TensorInfo
from lsm_dist.console import progress
from lsm_dist.merge.decode import META_KEY, is_own_layer_entry
from lsm_dist.merge.io import TensorOrRows, read_meta, release_memory, write_streaming
from lsm_dist.utils import atomic_write_json, fsync_dir, get_logger, read_json, remove_dead_temps

MARKER = "MERGE_COMPLETE.json"
WORK_DIR = ".lsm_merge"  # layout mergekit: the merge's own files inside the model directory (plan.WORK_DIR)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
COPY_FILES = AUX_FILES
log = get_logger("lsm.merge")


class AssemblyError(ValueError):
    """The assembled checkpoint is incomplete or holds bad values (the message names the tensor)."""


def is_complete(model_dir: str | Path, digest: str | None = None) -> bool:
    """True only for a checkpoint whose assembly finished (and, if given, of this plan)."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        rec = read_json(marker)
    except ValueError:
        return False
    return digest is None or rec.get("plan_digest") == digest


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def own_model_files(model_dir: Path) -> set[str] | None:
    """The names in ``model/`` an assembly wrote (its marker lists them; a marker of an older
    version: the shapes of names an assembly writes), or None when ``model/`` is not ours."""
    try:
        rec = read_json(model_dir / MARKER)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    files = rec.get("files")
    if isinstance(files, list):
        return {str(f) for f in files} | {MARKER}
    return {p.name for p in model_dir.iterdir() if p.is_file() and not p.is_symlink() and (
        p.name in (*COPY_FILES, INDEX_NAME, MARKER, "README.md", "lsm_merge_plan.yaml")
        or (p.name.startswith("model-") and p.name.endswith(".safetensors")))}


def foreign_outputs(layers_dir: Path, model_dir: Path) -> list[Path]:
    """What ``layers/`` and ``model/`` hold that lsm merge cannot prove it wrote: a ``model/``
    without ``MERGE_COMPLETE.json``, any entry of a ``model/`` the marker does not list (a
    user's file put beside a merge), files in ``layers/`` that are neither our layer files (our
    safetensors metadata) nor their temp files. Empty directories count as nothing."""
    out: list[Path] = []
    if layers_dir.is_symlink() or (layers_dir.exists() and not layers_dir.is_dir()):
        out.append(layers_dir)
    elif layers_dir.is_dir():
        out += [p for p in sorted(layers_dir.iterdir()) if not is_own_layer_entry(p)]
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        out.append(model_dir)
    elif model_dir.is_dir() and [p for p in model_dir.iterdir() if not _work_dir(p)]:
        own = own_model_files(model_dir)
        if own is None:
            out.append(model_dir)
        else:
            out += [p for p in sorted(model_dir.iterdir()) if not _work_dir(p)
                    and (p.name not in own or p.is_symlink() or not p.is_file())]
    return out


def _work_dir(p: Path) -> bool:
    """The merge's own work directory inside a mergekit-layout model directory."""
    return p.name == WORK_DIR and p.is_dir() and not p.is_symlink()


def remove_own_outputs(layers_dir: Path, model_dir: Path) -> None:
    """Delete what an earlier merge wrote into ``layers/`` and ``model/``, nothing else
    (``overwrite: true``; call :func:`foreign_outputs` first)."""
    remove_own_layers(layers_dir)
    remove_own_model(model_dir)


def remove_own_layers(layers_dir: Path) -> None:
    """Delete the layer files (and temp files) a merge wrote, then ``layers/`` if left empty."""
    if layers_dir.is_dir() and not layers_dir.is_symlink():
        for p in layers_dir.iterdir():
            if is_own_layer_entry(p):
                p.unlink()
        if _is_empty_dir(layers_dir):
            layers_dir.rmdir()


def remove_own_model(model_dir: Path) -> None:
    """Delete the files an assembly wrote into ``model_dir`` (its marker last), then the directory
    if nothing else is left in it."""
    own = own_model_files(model_dir) if model_dir.is_dir() and not model_dir.is_symlink() else None
    if own is not None:
        for p in model_dir.iterdir():
            if p.name in own and p.is_file() and not p.is_symlink() and p.name != MARKER:
                p.unlink()
        (model_dir / MARKER).unlink(missing_ok=True)  # last: until here the rest is provably ours
    if _is_empty_dir(model_dir):
        model_dir.rmdir()


def plan_shards(infos: list[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in infos:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def merged_files(layers_dir: Path, digest: str, groups: dict[str, list[str]] | None) -> dict[str, Path]:
    """Tensor name → layer file, checking every expected group file belongs to this plan."""
    out: dict[str, Path] = {}
    files = ([layers_dir / f"{g}.safetensors" for g in groups] if groups is not None
             else sorted(layers_dir.glob("*.safetensors")))
    for f in files:
        meta = read_meta(f, META_KEY)
        if meta is None or meta.get("plan_digest") != digest:
            raise AssemblyError(f"{f}: missing or written by another plan (run the merge/decode stage first)")
        want = groups[meta["group"]] if groups is not None else meta["tensors"]
        if sorted(meta["tensors"]) != sorted(want):
            raise AssemblyError(f"{f}: holds {meta['tensors']}, expected {sorted(want)}")
        out |= {n: f for n in meta["tensors"]}
    return out


def assemble(target: str | Path | Checkpoint, layers_dir: str | Path, model_dir: str | Path, digest: str,
             max_shard_size: int = 2 * 10**9, groups: dict[str, list[str]] | None = None,
             extra: dict | None = None, outputs: list[TensorInfo] | None = None,
             config_patch: dict | None = None, write_extra=None, copy_tokenizer: bool = True,
             compute: Callable[[str], TensorOrRows] | None = None, computed: Collection[str] = (),
             bar: bool = False, release: bool = False) -> Path:
    """Build the HF checkpoint ``model_dir`` (see module doc) and mark it complete.

    ``outputs``: the checkpoint's tensors in order (default: the target's); names not in the
    layer files are copied from the target. ``config_patch``: keys set in the copied
    config.json (e.g. ``num_hidden_layers`` of a layer-stacking merge, ``dtype``).
    ``write_extra(tmp_dir)``: writes further files (the model card) before the rename.
    ``compute(name)``: the merged tensor (or its row blocks) of each name in ``computed``, merged
    as it is written (a single-process weight-space merge: no layer files, each tensor written
    once); ``groups`` then names only the layer files already written. ``bar``: a console bar.
    ``release`` (``keep_layers: false``): each layer file is deleted as soon as its last tensor is
    copied into the output, so the disk never holds the merged weights twice (the high-water is
    the output + one layer file, not the output + every layer file); an assembly that fails after
    that finds those layers missing and the merge stage writes them again (it skips only the
    layer files present)."""
    model_dir, layers_dir = Path(model_dir), Path(layers_dir)
    merged = merged_files(layers_dir, digest, groups)
    computed = set(computed) - set(merged)
    foreign = [p for p in foreign_outputs(layers_dir, model_dir) if p == model_dir or model_dir in p.parents]
    if foreign:
        raise AssemblyError(f"{foreign[0]} was not written by lsm merge ({MARKER} does not list it): refusing "
                            "to replace it; move it away or choose another out_dir")
    for p in remove_dead_temps([*model_dir.parent.glob(f".{model_dir.name}.tmp-*"),
                                *model_dir.parent.glob(f".{model_dir.name}.old-*")]):  # fmt: skip
        log.info("assemble: removed %s (left by a killed assembly)", p)
    tmp = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    handles: dict[Path, object] = {}
    try:
        with (target if isinstance(target, Checkpoint) else Checkpoint(target)) as tck:
            infos = list(outputs) if outputs is not None else list(tck.tensors.values())
            expected = {t.name: t for t in infos}
            unknown = sorted(set(merged) - set(expected))
            if unknown:
                raise AssemblyError(f"layer files hold tensors the output lacks: {unknown[:5]}")
            unknown = sorted(computed - set(expected))
            if unknown:
                raise AssemblyError(f"merged tensors the output lacks: {unknown[:5]}")
            copied = sorted(n for n in expected if n not in merged and n not in computed and n not in tck.tensors)
            if copied:
                raise AssemblyError(f"output tensors neither merged nor in the target: {copied[:5]}")
            src = tck.path if tck.path.is_dir() else tck.path.parent
            for name in COPY_FILES:
                if (src / name).is_file() and (copy_tokenizer or name not in TOKENIZER_FILES):
                    shutil.copy2(src / name, tmp / name)
            if config_patch and (tmp / "config.json").is_file():
                cfg = read_json(tmp / "config.json")
                atomic_write_json(tmp / "config.json", {**cfg, **config_patch})

            shards = plan_shards(infos, max_shard_size)
            n = len(shards)
            pbar = progress(total=len(infos), desc="assemble", unit="tensor", disable=not bar)

            left = Counter(merged[t.name] for t in infos if t.name in merged)  # tensors still to copy, per file

            def fetch(name: str) -> TensorOrRows:
                release_memory()
                pbar.update(1)
                if name in computed:
                    return compute(name)
                f = merged.get(name)
                if f is None:
                    x = tck.read(name)
                    tck.close()  # bounded resident memory: drop the mmap after each tensor
                    return x
                if f not in handles:
                    handles.clear()
                    handles[f] = safe_open(str(f), framework="pt")
                x = handles[f].get_tensor(name)  # a copy in memory: the file may go now
                left[f] -= 1
                if release and left[f] == 0:
                    handles.pop(f, None)
                    f.unlink()
                return x

            weight_map, total = {}, 0
            for i, part in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                total += write_streaming(tmp / fname, part, fetch, error=AssemblyError)
                weight_map |= {t.name: fname for t in part}
            handles.clear()
            pbar.close()
            atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
            _verify(tmp, tck, expected)
            num = len(infos)
            if write_extra is not None:
                write_extra(tmp)
        # the marker goes in before the rename: model/ appears complete (and provably ours) at once
        atomic_write_json(tmp / MARKER, {
            "files": sorted(p.name for p in tmp.iterdir()),
            "plan_digest": digest, "tensors": num, "merged_tensors": len(merged) + len(computed),
            "shards": n,
            "total_size": total, "target": str(tck.path), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        })  # fmt: skip
        fsync_dir(tmp)
        trash = model_dir.parent / f".{model_dir.name}.old-{os.getpid()}"
        if (model_dir / WORK_DIR).is_dir() and not (model_dir / WORK_DIR).is_symlink():
            os.replace(model_dir / WORK_DIR, tmp / WORK_DIR)  # layout mergekit: the record and log move along
        if model_dir.exists():  # every entry our own (checked above): out of the way, then replaced
            os.replace(model_dir, trash)
        os.replace(tmp, model_dir)
        fsync_dir(model_dir.parent)
        remove_own_model(trash)  # only what an assembly wrote; anything else stays, named
        if trash.exists():
            log.warning("assemble: %s holds files lsm merge did not write; left there", trash)
    except BaseException:
        handles.clear()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("assemble: %s (%d tensors, %d merged, %d shard(s))", model_dir, num, len(merged) + len(computed), n)
    return model_dir


def _verify(tmp: Path, tck: Checkpoint, expected: dict[str, TensorInfo]) -> None:
    """Headers of the written checkpoint: every expected tensor with its shape and dtype."""
    out = Checkpoint(tmp)
    missing = sorted(set(expected) - set(out.tensors))
    if missing:
        raise AssemblyError(f"assembled checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    for name, t in expected.items():
        o = out.tensors[name]
        if o.shape != t.shape or o.dtype != t.dtype:
            raise AssemblyError(f"tensor {name!r}: written {o.shape} {o.dtype}, expected {t.shape} {t.dtype}")
    if not (tmp / "config.json").is_file():
        raise AssemblyError(f"{tck.path} has no config.json to copy: not a Hugging Face checkpoint")
