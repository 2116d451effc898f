"""The paper's experiments at small scale, each a typed config that writes its table
(``results.md`` + CSV), a PNG plot and ``result.json`` under its ``out_dir``:

- ``noise``        — the model's tolerance to weight error (accuracy / perplexity vs the
  relative MSE of Gaussian noise on its weights): what every reconstruction is read against;
- ``recon_ratio``  — VAE reconstruction vs compression ratio, training vs held-out models,
  attention vs MLP, against PCA at the same ratio (paper Tables 7 & 8);
- ``self_merge``   — base vs VAE reconstruction vs K-sample self-merge (Table 2);
- ``expert_merge`` — two experts merged in latent vs weight space, five operators (Table 3);
- ``cross_arch``   — merging another family both ways: the paper's latent OT and functional
  alignment, accuracy and perplexity vs λ, skill transfer (Table 5, Fig. 4);
- ``blocks``       — merging MLP only / attention only / both (Table 6).

``run_experiment(load_experiment_config("configs/experiments/recon_ratio.yaml"))`` or
``lsm experiment -c configs/experiments/<name>.yaml [--quick] [key=value ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lsm_dist.config import load_config
from lsm_dist.experiments.core import (
    EXPERIMENTS,
    PRESETS,
    Context,
    ExperimentConfig,
    vae_model_config,
)
from lsm_dist.experiments.recon import fit_pca, pca_components_for, pca_reconstruct, relative_error

__all__ = ["EXPERIMENTS", "PRESETS", "ExperimentConfig", "fit_pca", "load_experiment_config",
           "pca_components_for", "pca_reconstruct", "relative_error", "run_experiment", "vae_model_config"]


def load_experiment_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults ← YAML ← dotted overrides (``quick=true`` switches every preset value)."""
    return load_config(ExperimentConfig, path, overrides)


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run experiment ``cfg.name``; returns ``<out_dir>/results.md`` (CSV / PNG / JSON beside)."""
    from lsm_dist.config import save_resolved
    from lsm_dist.experiments import cross_arch, merges, noise, recon

    ctx = Context(cfg)
    save_resolved(cfg, ctx.out / "experiment.resolved.yaml")
    run = {"noise": noise.run, "recon_ratio": recon.run, "self_merge": merges.run_self_merge,
           "expert_merge": merges.run_expert_merge, "cross_arch": cross_arch.run,
           "blocks": merges.run_blocks}[cfg.name]
    return run(ctx)
