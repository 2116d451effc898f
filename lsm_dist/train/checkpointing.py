"""Step-numbered, atomic training checkpoints and the plain-VAE export.

Layout under ``run_dir/checkpoints/``::

    step-00000500/              complete: has COMPLETE (written last, before the rename)
        pytorch_model/          DeepSpeed engine state: model, ZeRO optimizer shards, lr scheduler
        latest                  DeepSpeed tag file
        random_states_<rank>.pkl  per-rank Python / NumPy / torch RNG (accelerate)
        trainer_state.json      step, stage, plateau tracker, data position, digests, metrics
        COMPLETE
    step-00000600.tmp/          being written (or killed while written): never resumed from

A save writes everything into ``step-N.tmp/``; after a barrier (every rank finished its
shards) rank 0 writes ``trainer_state.json`` and ``COMPLETE``, fsyncs and renames the
directory to ``step-N/``. ``resume=auto`` takes the newest directory with ``COMPLETE``;
``keep_last_k`` removes older complete ones (rank 0); a run removes the ``step-N.tmp/`` left by
killed saves (only that name, only under ``checkpoints/``).

Training state is unpickled weights-only: DeepSpeed and ``zero_to_fp32`` call ``torch.load``
with ``weights_only=False``, which would run any code a replaced ``*.pt`` / ``*.pkl`` carries.
:func:`weights_only_loads` forces torch's restricted unpickler for every load (resume and
export) and allows only the few DeepSpeed / NumPy types these files hold; every pickle of a
checkpoint is first checked with it, so a file that needs anything else is refused by name.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lsm_dist.config import ConfigError, from_dict
from lsm_dist.model import TransformerVAE, VAEConfig, load_vae, save_vae
from lsm_dist.utils import atomic_write_json, atomic_write_text, fsync_dir, human_bytes, read_json

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
STATE_FORMAT = "lsm_dist.train.v1"
DS_TAG = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag for the first model
_STEP_RE = re.compile(r"^step-(\d{8})$")
_PARTIAL_RE = re.compile(r"^step-\d{8}\.tmp$")  # a save killed before its rename
PICKLE_SUFFIXES = (".pt", ".pkl", ".bin", ".pth")  # what DeepSpeed / accelerate torch.load


class CheckpointError(ValueError):
    """A training checkpoint is missing, incomplete or belongs to another configuration."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}"


def is_complete(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / COMPLETE).is_file() and (p / STATE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first ('.tmp' and unmarked directories are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(f"resume: checkpoint {p} does not exist")
    if not is_complete(p):
        raise CheckpointError(f"resume: {p} is not a complete checkpoint (no {COMPLETE} marker "
                              f"or {STATE}: the save was interrupted)")
    return p


def read_state(path: str | Path) -> dict:
    state = read_json(Path(path) / STATE)
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{Path(path) / STATE}: format {state.get('format')!r} is not "
                              f"{STATE_FORMAT!r}")
    return state


def check_compatible(state: dict, path: Path, model_digest: str, world_size: int) -> None:
    """Refuse a checkpoint of another model configuration or another world size."""
    if state["model_digest"] != model_digest:
        saved = state.get("model", {})
        raise CheckpointError(
            f"resume: checkpoint {path} was trained with another model configuration "
            f"(digest {state['model_digest']}, this run {model_digest}; saved model config "
            f"{saved}). Use another run_dir or resume=none.")
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"resume: checkpoint {path} was written by {state['world_size']} ranks, this run has "
            f"{world_size}: ZeRO optimizer shards and per-rank data positions only resume at the "
            f"same world size")


def safe_globals() -> list:
    """The non-tensor types DeepSpeed (ZeRO 1-3, fp32 / bf16 / fp16) and accelerate's RNG state
    pickle into a checkpoint: plain records (an enum, a loss-scale holder, a fragment address)
    and NumPy arrays; none runs code when rebuilt."""
    import numpy as np
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays / dtypes, codecs.encode
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [*TORCH_SAFE_GLOBALS, np.dtype, ZeroStageEnum, LossScaler, DynamicLossScaler,
            fragment_address]  # fmt: skip


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every ``torch.load`` is weights-only, whatever its caller asks
    (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with :func:`safe_globals` allowed."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def check_pickles(ckpt: str | Path) -> None:
    """Open every pickle of a step directory with the restricted unpickler (memory-mapped: the
    tensors are not read); ``CheckpointError`` naming the file that needs anything else."""
    files = sorted(p for p in Path(ckpt).rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    with weights_only_loads():
        for f in files:
            try:
                torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
                raise CheckpointError(
                    f"{f}: refused to unpickle training state ({why[:300]}); only tensors, numbers "
                    "and DeepSpeed's own state records are loaded, never code. The file was "
                    "replaced or is not from `lsm train`: use another checkpoint (resume=PATH) or "
                    "remove this one") from None


def clean_partial(run_dir: str | Path) -> list[Path]:
    """Remove ``checkpoints/step-N.tmp/`` directories left by killed saves (rank 0, before
    training: no save of this run is under way). Returns what was removed."""
    root = Path(run_dir) / CKPT_DIR
    gone = [p for p in root.iterdir() if _PARTIAL_RE.match(p.name) and p.is_dir()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _write_failure(tmp: Path, step: int, err: BaseException) -> CheckpointError:
    """A readable error for a save that failed (disk full shows as torch's 'unexpected pos')."""
    files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    last = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    try:
        free = human_bytes(shutil.disk_usage(tmp if tmp.exists() else tmp.parent).free)
    except OSError:
        free = "unknown"
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    short = ("unexpected pos" in text or "iostream error" in text
             or getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT))
    hint = (" -- the disk is full (or a quota / file-size limit was hit): torch reports such a "
            "short write as 'unexpected pos' or 'iostream error'" if short else "")
    return CheckpointError(
        f"could not write the step-{step} training checkpoint into {tmp}"
        + (f" (while writing {last})" if last else "") + f": {text}{hint}. Free space there: {free}. "
        "The partial directory is never resumed from; free space and rerun (resume=auto)")


def trained_corpus_digest(run_dir: str | Path) -> str | None:
    """The corpus digest the newest complete checkpoint of ``run_dir`` was trained on (None: no
    checkpoint, or one that does not record it). Reads ``trainer_state.json`` only."""
    last = find_resume(run_dir, "auto") if Path(run_dir).is_dir() else None
    return None if last is None else read_state(last).get("data", {}).get("corpus_digest")


def check_same_corpus(state: dict, path: Path, corpus: str | Path, corpus_digest: str) -> None:
    """Refuse to resume a run on another corpus (the checkpoint's data position, held-out set
    and normalization belong to the corpus it was trained on)."""
    data = state.get("data", {})
    old = data.get("corpus_digest")
    if old is not None and old != corpus_digest:
        raise CheckpointError(
            f"resume: checkpoint {path} was trained on corpus {data.get('corpus')} (digest {old}), "
            f"this run's corpus is {corpus} (digest {corpus_digest}): its data position and "
            f"held-out set belong to the other corpus. Set corpus={data.get('corpus')} to continue "
            "it, or use another run_dir (or resume=none) to train on this one")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict,
                    keep_last_k: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed save
        tmp.mkdir(parents=True)
    _barrier()
    try:
        accelerator.save_state(str(tmp))  # DeepSpeed shards + per-rank RNG; every rank
    except (RuntimeError, OSError) as e:
        raise _write_failure(tmp, step, e) from None
    _barrier()
    if main:
        try:
            atomic_write_json(tmp / STATE, state)
            atomic_write_text(tmp / COMPLETE, f"step {step}\n")
        except OSError as e:
            raise _write_failure(tmp, step, e) from None
        fsync_dir(tmp)
        if final.exists():  # a re-run reached the same step: replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if keep_last_k > 0:
            for _s, old in list_checkpoints(run_dir)[:-keep_last_k]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Collective: restore engine (model, optimizer, scheduler) and RNG; return trainer state.
    Pickles are loaded weights-only (see the module doc)."""
    check_pickles(path)
    with weights_only_loads():
        accelerator.load_state(str(path))
    return read_state(path)


def gather_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """fp32 model weights from any ZeRO stage's shards, without DeepSpeed running."""
    import logging

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_pickles(ckpt)
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        with weights_only_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    finally:
        ds_logger.setLevel(level)
    return {k.removeprefix("module."): v.float().contiguous() for k, v in sd.items()}


RUN_MARKER = "lsm_run.json"  # in run_dir: written by lsm train before anything else


def claim_run_dir(run_dir: str | Path) -> None:
    """``run_dir`` is new, empty, or a run directory lsm train made (its marker; from older
    versions: a ``config.yaml`` naming this very run_dir, or its training states under
    ``checkpoints/``): training writes and replaces
    config.yaml, export.json, vae/, metrics.jsonl, tb/, logs/, checkpoints/ and PREEMPTED
    there, so a folder of the user's is refused before anything is written."""
    import yaml

    d = Path(run_dir)
    if (d / RUN_MARKER).is_file() or not d.exists():
        return
    # logs/ is appended to, never replaced (and the Slurm script opens its log there first)
    if d.is_dir() and not [p for p in d.iterdir() if not (p.name == "logs" and p.is_dir() and not p.is_symlink())]:
        return
    ours = any((d / CKPT_DIR).glob(f"step-*/{STATE}"))  # training states only lsm train writes
    try:
        old = yaml.safe_load((d / "config.yaml").read_text())
        ours = ours or (isinstance(old, dict) and Path(str(old.get("run_dir"))).resolve() == d.resolve())
    except (OSError, yaml.YAMLError):
        pass
    if not ours:
        raise ConfigError(f"run_dir: {d} holds files lsm train did not write (no {RUN_MARKER}): training writes "
                          "config.yaml, vae/, export.json, metrics.jsonl, tb/, checkpoints/ there and would "
                          "overwrite them; choose a new or empty run_dir")


def mark_run_dir(run_dir: str | Path) -> None:
    d = Path(run_dir)
    if not (d / RUN_MARKER).is_file():
        atomic_write_json(d / RUN_MARKER, {"written_by": "lsm train"})


def export_vae(run_dir: str | Path, checkpoint: str | Path | None = None,
               out: str | Path | None = None) -> Path:
    """Write the plain VAE checkpoint (config.json + model.safetensors) of a training run.

    ``checkpoint``: a step directory (default: the newest complete one in ``run_dir``);
    ``out``: default ``run_dir/vae``. Loadable with :func:`lsm_dist.model.load_vae`.
    """
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else find_resume(run_dir, "auto")
    if ckpt is None:
        raise CheckpointError(f"export: no complete checkpoint under {run_dir / CKPT_DIR}")
    if not is_complete(ckpt):
        raise CheckpointError(f"export: {ckpt} is not a complete checkpoint")
    state = read_state(ckpt)
    try:
        cfg = from_dict(VAEConfig, state["model"])
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / STATE}: bad model config: {e}") from None
    sd = gather_state_dict(ckpt)
    model = TransformerVAE(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"export: {ckpt} does not match its model config: missing "
                              f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"export: {ckpt} holds non-finite weights in {bad[:6]}")
    dst = Path(out) if out is not None else run_dir / "vae"
    save_vae(model, dst)
    load_vae(dst)  # check what was written
    if out is None:
        atomic_write_json(run_dir / "export.json", {
            "checkpoint": str(ckpt), "step": state["step"], "vae": str(dst),
            "roles": state.get("roles"), "metrics": state.get("metrics", {})})
    return dst
