"""`TrainConfig`: the typed configuration of VAE training (``lsm train``).

Loaded as defaults ← YAML (``configs/train/*.yaml``) ← dotted overrides by
:func:`load_train_config`. The VAE hyper-parameters come from ``model`` (a mapping of
:class:`~lsm_dist.model.VAEConfig` fields) on top of ``model_config`` (a ``configs/vae``
YAML), so ``model_config=configs/vae/tiny.yaml model.latent_dim=16`` works.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from lsm_dist.config import (
    check,
    check_choice,
    config_data,
    doc,
    from_dict,
    load_config,
    read_yaml_mapping,
    to_dict,
)
from lsm_dist.model import RECON_KINDS, VAEConfig
from lsm_dist.utils import sha256_json

REPO = Path(__file__).resolve().parents[2]
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (for ``configs/...`` defaults)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    q = REPO / p
    return q if q.exists() else p


@dataclass
class PlateauConfig:
    patience: int = doc(
        "end stage 1 early once val/recon has not improved by min_rel_improvement for this many "
        "consecutive validations (0 = off: stage 1 runs stage1_steps)", 0)
    min_rel_improvement: float = doc(
        "relative improvement of val/recon over the best so far that resets the patience", 0.01)

    def __post_init__(self) -> None:
        check(isinstance(self.patience, int) and self.patience >= 0, "stage1_plateau.patience",
              f"must be an integer >= 0, got {self.patience!r}")
        check(0.0 <= self.min_rel_improvement < 1.0, "stage1_plateau.min_rel_improvement",
              f"must be in [0, 1), got {self.min_rel_improvement}")


# TrainConfig fields that change how a run shows itself, not what it trains (left out of the
# keys under which trained VAEs are cached and reused)
PRESENTATION_FIELDS = ("progress",)


@dataclass
class TrainConfig:
    run_dir: str = doc("run directory: config.yaml, checkpoints/, tb/, metrics.jsonl, logs/, vae/",
                       "runs/train")
    corpus: str = doc("training weight corpus directory (lsm convert output)", "runs/corpus")
    heldout_corpus: str | None = doc(
        "optional corpus of models NOT in the training corpus: logged as heldout/recon "
        "(generalization to unseen models)", None)
    verify_corpus: bool = doc("check every shard's sha256 before training (split across ranks)", True)
    model_config: str | None = doc("configs/vae YAML with the VAE hyper-parameters (under model)",
                                   None)
    model: VAEConfig | None = doc(
        "VAE hyper-parameters (lsm_dist.model.VAEConfig fields; over model_config)", None)

    batch_size: int = doc("micro-batch per rank (samples)", 32)
    grad_accum: int = doc("micro-batches accumulated per optimizer step", 1)
    lr: float = doc("peak learning rate (AdamW)", 1e-4)
    weight_decay: float = doc("AdamW weight decay", 1e-5)
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.999])
    warmup_steps: int = doc("linear warm-up steps at the start of each stage", 100)
    min_lr: float = doc("learning rate the cosine decays to at the end of each stage", 0.0)
    grad_clip: float = doc("global gradient-norm clip (0 = off)", 1.0)

    stage1_steps: int = doc(
        "stage 1 optimizer steps: deterministic autoencoder (z = mu, KL off); the schedule "
        "(warm-up + cosine) spans this many steps", 1000)
    stage1_plateau: PlateauConfig = doc("early end of stage 1 on a val/recon plateau",
                                        factory=PlateauConfig)
    stage2_steps: int = doc(
        "stage 2 optimizer steps: beta-VAE (z sampled, loss = recon + beta*KL), with its own "
        "warm-up + cosine schedule", 1000)
    beta: float = doc("KL weight in stage 2 (KL summed over latent numbers, mean over batch)", 1e-4)
    beta_warmup_steps: int = doc("stage-2 steps over which beta rises linearly from 0 (0 = fixed)",
                                 0)
    recon: str = doc(
        f"reconstruction loss: one of {list(RECON_KINDS)}. mse_tail (default): on SmolLM2-135M its "
        "delta-decoded latent merges kept more of the experts' skills than mse's (mean accuracy "
        "0.706 vs 0.645 over lerp / task arithmetic / TIES / DARE) at a higher reconstruction "
        "MSE (0.509 vs 0.497, r = 2); docs/experiments.md", "mse_tail")
    tail_weight: float = doc("alpha of recon=mse_tail (weight grows with |x|)", 1.0)
    huber_delta: float = doc("delta of recon=huber", 1.0)

    precision: str = doc("auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16", "auto")
    zero_stage: int | None = doc(
        "DeepSpeed ZeRO stage 1/2/3 (overrides the DeepSpeed JSON; null = the JSON's)", None)
    deepspeed_config: str | None = doc(
        "DeepSpeed JSON ('auto' values are filled from this config); null = the "
        "deepspeed_config_file of `accelerate launch --config_file`, else "
        "configs/deepspeed/zero2.json", None)

    ckpt_every: int = doc("optimizer steps between checkpoints (0 = only at the end)", 500)
    keep_last_k: int = doc("complete checkpoints kept (older ones are deleted; 0 = keep all)", 3)
    resume: str = doc("auto (newest complete checkpoint in run_dir, if any) | none | PATH", "auto")
    export: bool = doc("write the plain VAE checkpoint run_dir/vae/ at the end", True)

    log_every: int = doc("optimizer steps between train/* and perf/* logs", 10)
    progress: bool = doc("a console progress bar over the steps on rank 0 (count, ETA, loss); "
                         "lsm demo sets it", False)
    val_every: int = doc("optimizer steps between validations (0 = only at the end)", 200)
    val_fraction: float = doc(
        "fraction of the corpus' sample blocks held out of training for val/recon (per block "
        "type, whole tar members, chosen from the manifest by a seeded hash)", 0.02)
    val_max_samples: int = doc("cap on held-out samples evaluated (each of val and heldout)", 512)

    seed: int = doc("seed of model init, data order, holdout choice and posterior samples", 0)
    skip_init: str = doc(
        "how a model with a linear skip path (skip=group|sample) starts: pca (the linear path is the PCA code of "
        "skip_init_samples training samples, so training starts at PCA's reconstruction and the "
        "transformer learns the residual) | random (orthonormal projection)", "pca")
    skip_init_samples: int = doc("training samples the pca skip_init is fitted on", 8192)
    skip_lr_scale: float = doc("learning rate of the linear skip path / lr (small: keep the PCA "
                               "code, let the transformer learn the residual)", 0.1)
    num_workers: int = doc("DataLoader worker processes per rank (0 = read in the main process)",
                           0)
    loader: str = doc(
        "how num_workers > 0 loader workers run: thread (in the trainer process; reads and copies "
        "release the GIL, no shared-memory hand-over: 1.3-2.1x the batches/s of processes with "
        "2 workers on the 2-core dev machine) | process (torch DataLoader worker processes; for the "
        "webdataset backend's Python tar parsing on many cores). Same batches either way", "thread")
    shuffle_buffer: int = doc("samples in the stream's shuffle buffer", 2048)
    cpu_threads: int = doc("torch.set_num_threads per rank on CPU (0 = leave as is; 1 is best "
                           "for tiny models on small VMs)", 0)
    debug_nan_at_step: int | None = doc(
        "DEBUG: make rank 0's input NaN at this optimizer step (tests the divergence stop)", None)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = (load_config(VAEConfig, resolve_path(self.model_config))
                          if self.model_config else VAEConfig())
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "stage1_steps", "stage2_steps", "beta_warmup_steps",
                     "ckpt_every", "keep_last_k", "val_every", "seed", "num_workers",
                     "cpu_threads"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
        check(self.stage1_steps + self.stage2_steps > 0, "stage1_steps",
              "stage1_steps + stage2_steps must be > 0")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check_choice(self.recon, "recon", RECON_KINDS)
        check(self.tail_weight >= 0, "tail_weight", f"must be >= 0, got {self.tail_weight}")
        check(self.huber_delta > 0, "huber_delta", f"must be > 0, got {self.huber_delta}")
        check_choice(self.precision, "precision", PRECISIONS)
        check_choice(self.skip_init, "skip_init", ("pca", "random"))
        check_choice(self.loader, "loader", ("thread", "process"))
        check(self.skip_lr_scale >= 0, "skip_lr_scale", f"must be >= 0, got {self.skip_lr_scale}")
        check(self.skip_init_samples >= 1, "skip_init_samples",
              f"must be >= 1, got {self.skip_init_samples}")
        if self.zero_stage is not None:
            check_choice(self.zero_stage, "zero_stage", (1, 2, 3))
        check(self.resume in ("auto", "none") or bool(self.resume), "resume",
              "must be auto, none or a checkpoint path")
        check(0.0 <= self.val_fraction < 0.5, "val_fraction",
              f"must be in [0, 0.5), got {self.val_fraction}")
        check(self.val_max_samples >= 0, "val_max_samples",
              f"must be >= 0, got {self.val_max_samples}")
        check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(self.debug_nan_at_step is None or self.debug_nan_at_step >= 1, "debug_nan_at_step",
              f"must be >= 1 or null, got {self.debug_nan_at_step}")
        check(bool(self.run_dir), "run_dir", "must not be empty")
        check(bool(self.corpus), "corpus", "must not be empty")

    @property
    def total_steps(self) -> int:
        """Upper bound on optimizer steps (stage 1 may end early on a plateau)."""
        return self.stage1_steps + self.stage2_steps

    def model_digest(self) -> str:
        """Identity of the model architecture: a checkpoint only resumes into the same one."""
        return sha256_json(to_dict(self.model))[:16]


def load_train_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()
                      ) -> TrainConfig:
    """Defaults ← YAML ← overrides; ``model`` fields layer over the ``model_config`` YAML."""
    data = config_data(TrainConfig, path, overrides)
    if data.get("model_config"):
        base = read_yaml_mapping(resolve_path(str(data["model_config"])), "model_config:")
        data["model"] = {**base, **(data.get("model") or {})}
    return from_dict(TrainConfig, data)
