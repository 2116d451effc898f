"""Set-up before the first step: corpus checks, the DeepSpeed JSON, accelerate, torch env.

Everything here that can fail on bad input does so before a process group exists (corpora,
sample shapes, DeepSpeed JSON values), with a message naming the field and both values.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from lsm_dist.config import ConfigError
from lsm_dist.corpus.convert import CorpusError
from lsm_dist.corpus.reader import Corpus
from lsm_dist.dist import DistEnv
from lsm_dist.model import VAEConfig, count_parameters
from lsm_dist.train.config import TrainConfig, resolve_path

DEFAULT_DS = "configs/deepspeed/zero2.json"


def open_corpus(path: str, what: str, model: VAEConfig) -> Corpus:
    """Open and check a corpus against the model config (before any process group)."""
    try:
        c = Corpus(path)
    except CorpusError as e:
        raise CorpusError(f"{what}: {e}") from None
    for name in ("tokens", "chunk"):
        if getattr(c, name) != getattr(model, name):
            raise ConfigError(f"model.{name}={getattr(model, name)} but {what} {path} has "
                              f"{name}={getattr(c, name)}: the VAE must match the corpus sample shape")
    if model.cond != "none":
        nroles = len(c.manifest["roles"])
        layers = [t["layer"] for t in c.tensors if t["layer"] is not None]
        if nroles > model.num_roles:
            raise ConfigError(f"model.num_roles={model.num_roles} but {what} {path} has {nroles} roles")
        if layers and max(layers) >= model.max_layers:
            raise ConfigError(f"model.max_layers={model.max_layers} but {what} {path} has layer "
                              f"{max(layers)}")
    return c


def launcher_deepspeed_file() -> str | None:
    """The deepspeed_config_file that `accelerate launch --config_file` passed on (if any)."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> tuple[dict, str]:
    """The DeepSpeed JSON with every 'auto' filled from ``cfg``; a fixed value that disagrees
    with ``cfg`` is an error naming both."""
    src = cfg.deepspeed_config or launcher_deepspeed_file() or DEFAULT_DS
    path = resolve_path(src)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed_config: {path} defines {key!r}; the trainer builds AdamW "
                              f"and the warm-up/cosine schedule itself (set lr, weight_decay, ...)")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"deepspeed_config: {path} enables fp16; use precision=bf16")
    zo = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zo["stage"] = cfg.zero_stage
    elif zo.get("stage", "auto") == "auto":
        zo["stage"] = 2
    if zo["stage"] not in (1, 2, 3):
        raise ConfigError(f"deepspeed_config: {path}: zero_optimization.stage={zo['stage']}; the "
                          f"trainer supports ZeRO stages 1, 2, 3")
    want = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": float(cfg.grad_clip),
    }
    for key, v in want.items():
        cur = ds.get(key, "auto")
        if cur == "auto":
            ds[key] = v
        elif cur != v:
            raise ConfigError(f"deepspeed_config: {path} sets {key}={cur} but the training config "
                              f"gives {v}; set it to \"auto\" in the JSON")
    cur = ds.setdefault("bf16", {}).get("enabled", "auto")
    if cur not in ("auto", bf16):
        raise ConfigError(f"deepspeed_config: {path} sets bf16.enabled={cur} but precision gives "
                          f"{'bf16' if bf16 else 'fp32'}; set it to \"auto\" in the JSON")
    ds["bf16"]["enabled"] = bf16
    # accelerate's d_model**2 buckets suit LLM widths; for a small VAE they mean one collective
    # per parameter. Buckets of the whole model, capped at 5e7 elements, are ~10x faster on CPU.
    d, nparams = cfg.model.d_model, count_parameters(cfg.model)
    bucket = max(d * d, min(nparams, 50_000_000))
    for key, v in (("reduce_bucket_size", bucket), ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
                   ("stage3_param_persistence_threshold", 10 * d)):
        if zo.get(key) == "auto":
            zo[key] = v
    ds.setdefault("steps_per_print", 10**12)
    ds.setdefault("wall_clock_breakdown", False)
    return ds, str(path)


def make_accelerator(cfg: TrainConfig, env: DistEnv, bf16: bool):
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences deepspeed's probe print
    from deepspeed import ops
    from deepspeed.utils import logger as ds_logger

    if not cuda:  # skip the 30-40 s JIT build of the shared-memory comm op (ENVIRONMENT.md)
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_logger.setLevel(logging.WARNING)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if not torch.distributed.is_initialized():
        # a second run in the same process (demo, notebooks, tests) must not inherit the
        # previous Accelerator's singleton state (e.g. one created without DeepSpeed)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    ds, ds_path = deepspeed_config(cfg, env.world_size, bf16)
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                      mixed_precision="bf16" if bf16 else "no",
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers)
    return acc, ds, ds_path


def verify_split(corpus: Corpus, rank: int, world: int) -> None:
    """sha256 of every shard, split across ranks; every rank raises the first failure."""
    names = [s["name"] for s in corpus.shards][rank::world]
    err = ""
    try:
        corpus.verify(names)
    except CorpusError as e:
        err = str(e)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        errs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errs, err)
        err = next((e for e in errs if e), "")
    if err:
        raise CorpusError(f"corpus: {err}")
