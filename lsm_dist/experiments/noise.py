"""``noise``: how much weight error a model tolerates, the curve every reconstruction and
decoded merge is read against.

Each model of ``noise_models`` is perturbed at every level of ``noise_levels``: Gaussian noise
of relative MSE ``level`` (std = sqrt(level) · the tensor's std, seeded per tensor) is added to
every attention and MLP weight (the weight-space ``noise`` operator of ``lsm merge``, so the
same probe runs on any checkpoint), then the model is scored (accuracy and perplexity on the
fixed English text). The relative MSE is the one reconstructions are measured in: error energy
over the tensor's variance, i.e. in the per-tensor standardized space.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lsm_dist.experiments.core import (
    Context,
    compare,
    markdown_table,
    mean_se,
    plt,
    save_fig,
    write_report,
)


def run(ctx: Context) -> Path:
    cfg, t0 = ctx.cfg, time.perf_counter()
    ckpts, labels = {}, []
    for m in cfg.noise_models:
        ckpts[m] = ctx.path(m)
        labels.append((m, 0.0, m))
        for lvl in cfg.noise_levels:
            key = f"noise.{m}.{lvl:g}"
            ckpts[key] = ctx.merge(f"{m}-noise{lvl:g}", {
                "models": {m: ctx.path(m)}, "target": m, "method": "noise", "space": "weight",
                "blocks": "both", "params": {"noise": float(lvl), "seed": cfg.seed}})
            labels.append((m, float(lvl), key))
    sc = ctx.scores(ckpts)
    fams = ctx.families()
    rows = [{"model": m, "rel-MSE": lvl, "noise std / tensor std": math.sqrt(lvl), **sc[key]}
            for m, lvl, key in labels]
    cols = ["model", "rel-MSE", "noise std / tensor std", *ctx.score_cols()]
    _plot(rows, cfg, ctx.out / "results.png")
    obs = []
    for m in cfg.noise_models:
        sub = [r for r in rows if r["model"] == m]
        orig, noisy = sub[0], sub[1:]
        se = mean_se(orig, fams)
        keep = [r["rel-MSE"] for r in noisy if compare(r["mean"], orig["mean"], se) != "below"]
        line = (f"{m}: original mean accuracy {orig['mean']:.3f}; accuracy stays within noise of it up to "
                f"rel-MSE {max(keep):g}" if keep else f"{m}: accuracy drops already at rel-MSE {noisy[0]['rel-MSE']:g}")
        obs.append(line + " (" + ", ".join(f"{r['rel-MSE']:g}: {r['mean']:.3f}" for r in noisy) + ").")
        if cfg.ppl:
            base = orig["ppl"]
            for tol in (0.01, 0.10):
                ok = [r["rel-MSE"] for r in noisy if r["ppl"] <= base * (1 + tol)]
                obs.append(f"{m}: perplexity within {tol:.0%} of the original ({base:.4g}) up to rel-MSE "
                           + (f"{max(ok):g}" if ok else f"< {noisy[0]['rel-MSE']:g}") + " ("
                           + ", ".join(f"{r['rel-MSE']:g}: {r['ppl']:.4g}" for r in noisy) + ").")
    return write_report(ctx, "noise — the model's tolerance to weight error",
                        ["## Accuracy and perplexity vs weight noise\n",
                         "Gaussian noise of relative MSE ℓ (std = √ℓ · the tensor's std, seeded per tensor) "
                         "added to every attention and MLP weight; embeddings and norms untouched.\n",
                         markdown_table(rows, cols, digits=4)], obs,
                        {"results": (rows, cols + [f + "_se" for f in fams])}, t0)


def _plot(rows: list[dict], cfg, path: Path) -> None:
    pyplot = plt()
    panels = ["mean"] + (["ppl"] if cfg.ppl else [])
    fig, axes = pyplot.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for i, m in enumerate(cfg.noise_models):
            sub = [r for r in rows if r["model"] == m]
            ax.plot([r["rel-MSE"] for r in sub[1:]], [r[metric] for r in sub[1:]], "-o", color=f"C{i}", label=m)
            ax.axhline(sub[0][metric], color=f"C{i}", ls="--", lw=1, label=f"{m} (no noise)")
        ax.set_xscale("log")
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("relative MSE of the noise (normalized weights)")
        ax.set_ylabel("mean accuracy" if metric == "mean" else "word perplexity (English text)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("tolerance to weight error")
    fig.tight_layout()
    save_fig(fig, path)
