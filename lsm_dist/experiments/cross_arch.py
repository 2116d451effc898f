"""``cross_arch`` (paper Table 5 / Fig. 4): merging a model of another width, depth or family
into a target, both ways, with the paper's latent OT and with the functional aligner, and
carrying one family's skills (its experts' task vectors) into the other family's base.

Per direction (target ← source), every variant of ``cfg.variants`` at each of its λ:

- latent OT (``gaussian`` / ``emd`` / ``sinkhorn`` / ``none``): layers paired proportionally,
  the source's latents resampled and mapped onto the target's per tensor pair, then
  ``z = z_t + λ(T(z_s) − z_t)`` decoded with the target's VAE statistics (``delta``:
  ``W_t + D(z) − D(z_t)``; ``direct``: ``D(z)``, the paper's);
- ``activations``: the source's MLPs transported into the target's basis
  (``merge.functional``), then ``W_t + λ(T(W_s) − W_t)`` in weight space, or the same in
  latent space (the transported model encoded by the VAE).

λ = 0 with delta decoding (or in weight space) *is* the target, bit for bit: it is not merged
again, the row says so. Skill transfer (``cfg.transfers``: expert → its base): for each expert
of the source's family, its task vector carried into the target (activations:
``W_t + λ·(T(W_e) − T(W_b))`` on the MLPs; latent OT: ``z_t + λ(T(z_e) − T(z_b))``).

**Verdicts** (``evaluate.verdict``'s rule of noise): a merge *beats its target* on a task only
when it scores above both the target and uniform guessing by more than two standard errors of
the difference -- a task the target does below chance (SmolLM2's 0.01 on reverse) is not
"gained" by damage that moves it towards chance -- and its word perplexity is at most
``max_ppl_increase`` above the target's; a merge whose perplexity is ≥ 10× the target's is
destroyed, whatever its accuracy.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lsm_dist.evaluate.plots import palette
from lsm_dist.evaluate.verdict import versus_target
from lsm_dist.experiments.core import (
    Context,
    HeteroVariant,
    markdown_table,
    plt,
    save_fig,
    write_report,
)

DESTROYED = 10.0  # perplexity ratio to the target at which a merge is destroyed


def _name(*parts) -> str:
    return ".".join(str(p).replace("/", "-") for p in parts)


def variant_plan(ctx: Context, tgt: str, src: str, v: HeteroVariant, lam: float) -> dict:
    """The merge plan of one variant at one λ (target ← source)."""
    cfg = ctx.cfg
    plan = {"models": {tgt: ctx.path(tgt), src: ctx.path(src)}, "target": tgt, "method": "lerp",
            "params": {"lambda": float(lam)}, "space": v.space, "decode": v.decode}
    if v.alignment == "activations":
        return {**plan, "alignment": {"method": "activations", "depth": v.depth}}
    return {**plan, "layer_map": "proportional", "alignment": _latent_ot(cfg, v)}


def _latent_ot(cfg, v: HeteroVariant) -> dict:
    return {"method": v.alignment, "reg": v.reg if v.reg is not None else cfg.alignment_reg,
            "max_samples": v.max_samples or cfg.alignment_max_samples}


def transfer_plan(ctx: Context, tgt: str, expert: str, base: str, v: HeteroVariant, lam: float) -> dict:
    """The plan carrying ``expert``'s task vector (against ``base``, of another family) into ``tgt``."""
    cfg = ctx.cfg
    models = {tgt: ctx.path(tgt), base: ctx.path(base), expert: ctx.path(expert)}
    if v.alignment == "activations":  # the transported expert is W_t + T(W_e) − T(W_b): add λ of it
        return {"models": models, "target": tgt, "base": tgt, "inputs": [expert], "method": "task_arithmetic",
                "params": {"weights": [float(lam)]}, "space": v.space, "decode": v.decode,
                "alignment": {"method": "activations", "source_base": base, "depth": v.depth}}
    # z_b' + (z_t − z_b') + λ(z_e' − z_b') = z_t + λ(T(z_e) − T(z_b))
    return {"models": models, "target": tgt, "base": base, "inputs": [tgt, expert], "method": "task_arithmetic",
            "params": {"weights": [1.0, float(lam)]}, "space": "latent", "decode": v.decode,
            "layer_map": "proportional", "alignment": _latent_ot(cfg, v)}


def is_target(v: HeteroVariant, lam: float) -> bool:
    """λ = 0 gives the target bit for bit (delta decoding, or weight space)."""
    return lam == 0 and (v.space == "weight" or v.decode == "delta")


def verdict(ctx: Context, row: dict, tgt_row: dict, tasks: list[str] | None = None) -> str:
    """A merge against its target (``evaluate.verdict.versus_target``: module doc)."""
    fams = tasks or ctx.families()
    return versus_target(row, tgt_row, fams, {f: ctx.chance_of(f) for f in fams},
                         ctx.cfg.max_ppl_increase if ctx.cfg.ppl else math.inf, DESTROYED)


def _shape_difference(a: str, b: str) -> str | None:
    """The first attention / MLP weight whose shape differs between two checkpoints, in words."""
    from lsm_dist.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    try:
        for name, t in ca.tensors.items():
            u = cb.tensors.get(name)
            if t.block in ("attn", "mlp") and u is not None and tuple(u.shape) != tuple(t.shape):
                return f"{name} is {'x'.join(map(str, t.shape))} in {a}, {'x'.join(map(str, u.shape))} in {b}"
        return None
    finally:
        ca.close()
        cb.close()


def run(ctx: Context) -> Path:
    from lsm_dist.config import check

    cfg, t0 = ctx.cfg, time.perf_counter()
    check(bool(cfg.hetero_target) and bool(cfg.hetero_sources), "hetero_target",
          f"cross_arch needs hetero_target and hetero_sources (preset {cfg.preset} has none)")
    pairs = [(cfg.hetero_target, s) for s in cfg.hetero_sources]
    if cfg.reverse:
        pairs += [(s, cfg.hetero_target) for s in cfg.hetero_sources]
    for tgt, src in pairs:  # before any training: a pair "none" cannot merge is refused now
        if any(v.alignment == "none" for v in cfg.variants):
            diff = _shape_difference(ctx.path(tgt), ctx.path(src))
            check(diff is None, "variants.alignment",
                  f"alignment none merges tensors as they are, but {diff}: drop the `none` variant "
                  "for this pair (or use gaussian / emd / sinkhorn / activations)")
    vae = None
    if any(v.space == "latent" for v in [*cfg.variants, *cfg.transfer_variants]):
        vae = ctx.vae(kind="hetero")
    ckpts: dict[str, str] = {}
    merges: list[dict] = []  # {direction, kind, variant, λ, key, expert}
    for tgt, src in pairs:
        ckpts[tgt], ckpts[src] = ctx.path(tgt), ctx.path(src)
        for v in cfg.variants:
            for lam in v.lambdas:
                rec = {"target": tgt, "source": src, "kind": "merge", "variant": v.label, "λ": lam}
                if is_target(v, lam):
                    merges.append({**rec, "key": tgt, "note": "= the target, bit for bit (not merged again)"})
                    continue
                key = _name(tgt, "from", src, v.label, f"l{lam:g}")
                ckpts[key] = ctx.merge(key, variant_plan(ctx, tgt, src, v, lam), vae=vae)
                merges.append({**rec, "key": key})
        for expert, base in (cfg.transfers or {}).items():
            if base != src:
                continue
            ckpts[expert] = ctx.path(expert)
            for v in cfg.transfer_variants:
                for lam in v.lambdas:
                    key = _name(tgt, "skill", expert, v.label, f"l{lam:g}")
                    ckpts[key] = ctx.merge(key, transfer_plan(ctx, tgt, expert, base, v, lam), vae=vae)
                    merges.append({"target": tgt, "source": expert, "kind": "transfer", "variant": v.label,
                                   "λ": lam, "key": key, "expert": expert})
    sc = ctx.scores(ckpts)
    fams = ctx.families()
    rows, obs = [], []
    for tgt, src in pairs:
        d = f"{tgt} ← {src}"
        t = sc[tgt]
        rows.append({"direction": d, "what": f"target {tgt}", "variant": "", "λ": "", **t, "verdict": ""})
        rows.append({"direction": d, "what": f"source {src}", "variant": "", "λ": "", **sc[src], "verdict": ""})
        mine = [m for m in merges if (m["target"], m["source"]) == (tgt, src) and m["kind"] == "merge"]
        for m in mine:
            r = sc[m["key"]]
            rows.append({"direction": d, "what": m.get("note", "merge"), "variant": m["variant"], "λ": m["λ"], **r,
                         "verdict": "" if m["key"] == tgt else verdict(ctx, r, t)})
        for expert in [e for e, b in (cfg.transfers or {}).items() if b == src]:
            own = ctx.expert_task(expert)
            rows.append({"direction": d, "what": f"expert {expert} (source family)", "variant": "", "λ": "",
                         **sc[expert], "verdict": ""})
            for m in [m for m in merges if m["target"] == tgt and m.get("expert") == expert]:
                r = sc[m["key"]]
                rows.append({"direction": d, "what": f"skill of {expert} carried", "variant": m["variant"],
                             "λ": m["λ"], **r, "verdict": verdict(ctx, r, t, [own] if own else None)})
        obs += _observations(ctx, d, tgt, src, rows)
    _plot(ctx, pairs, rows, fams)
    cols = ["direction", "what", "variant", "λ", *fams, *[f + "_se" for f in fams], "mean",
            *(["ppl"] if cfg.ppl else []), "verdict"]
    shown = ["direction", "what", "variant", "λ", *fams, "mean", *(["ppl"] if cfg.ppl else []), "verdict"]
    obs.append(ctx.chance_note([r for r in rows if r["variant"] and r["verdict"]],
                               lambda r: f"{r['direction']} {r['variant']} λ={r['λ']:g}"))
    text = ("Each direction: the target, the source, then every variant at each λ (latent OT: layers paired "
            "proportionally, the source's latents mapped onto the target's per tensor pair, z = z_t + λ(T(z_s) − z_t) "
            "decoded with delta (W_t + D(z) − D(z_t)) or direct (D(z), the paper's) decoding; activations: the source's "
            "MLPs transported into the target's basis by matching units on a calibration text, W_t + λ(T(W_s) − W_t) in "
            "weight space, or that transported model encoded and merged in latent space), then each expert of the "
            "source's family with its task vector carried into the target. A verdict names a gain only above both the "
            f"target and chance beyond two standard errors, at word perplexity ≤ +{cfg.max_ppl_increase:.0%} of the "
            "target's.\n")
    return write_report(ctx, "cross_arch — merging another family, both ways (paper Table 5, Fig. 4)",
                        ["## Accuracy, perplexity and verdicts\n", text, markdown_table(rows, shown)], obs,
                        {"results": (rows, cols)}, t0)


def _observations(ctx: Context, d: str, tgt: str, src: str, rows: list[dict]) -> list[str]:
    cfg = ctx.cfg
    mine = [r for r in rows if r["direction"] == d and r["variant"] and r["verdict"]]
    merged = [r for r in mine if r["what"] == "merge"]
    wins = [r for r in merged if r["verdict"].startswith("gain on") and "too damaged" not in r["verdict"]]
    out = []
    if merged:
        out.append(f"{d}: " + (f"{len(wins)} of {len(merged)} merges beat the target: "
                               + "; ".join(f"{r['variant']} λ={r['λ']:g} ({r['verdict']})" for r in wins)
                               if wins else f"no merge of {len(merged)} beats the target beyond noise at perplexity "
                               f"≤ +{cfg.max_ppl_increase:.0%}")
                   + ". The paper's gain at small λ (0.05–0.2) is "
                   + ("reproduced" if any(r["λ"] <= 0.2 for r in wins) else "not reproduced") + " here.")
        if cfg.ppl:
            t_ppl = next(r["ppl"] for r in rows if r["direction"] == d and r["what"] == f"target {tgt}")
            for lab in dict.fromkeys(r["variant"] for r in merged):
                pts = [(r["λ"], r["ppl"]) for r in merged if r["variant"] == lab]
                out.append(f"{d}, {lab}: word perplexity " + ", ".join(
                    f"λ={lam:g} {p:.4g} ({100 * (p / t_ppl - 1):+.0f}%)" for lam, p in pts) + f" (target {t_ppl:.4g}).")
    carried = [r for r in mine if r["what"].startswith("skill of")]
    if carried:
        good = [r for r in carried if r["verdict"].startswith("gain on") and "too damaged" not in r["verdict"]]
        out.append(f"{d}, skill transfer: " + (f"{len(good)} of {len(carried)} carried task vectors give the target "
                                               "the expert's skill: " + "; ".join(
                                                   f"{r['what'][9:]} {r['variant']} λ={r['λ']:g}" for r in good)
                                               if good else f"none of {len(carried)} carried task vectors gives the "
                                               "target its expert's skill beyond noise") + ".")
    return out


def _plot(ctx: Context, pairs: list[tuple[str, str]], rows: list[dict], fams: list[str]) -> None:
    cfg = ctx.cfg
    metrics = [*fams, *(["ppl"] if cfg.ppl else [])]
    pyplot = plt()
    fig, axes = pyplot.subplots(len(pairs), len(metrics), figsize=(4.2 * len(metrics), 3.3 * len(pairs)),
                                squeeze=False)
    for i, (tgt, src) in enumerate(pairs):
        d = f"{tgt} ← {src}"
        merged = [r for r in rows if r["direction"] == d and r["what"] in ("merge", "= the target, bit for bit "
                                                                           "(not merged again)")]
        labels = list(dict.fromkeys(r["variant"] for r in merged))
        colors = dict(zip(labels, palette(len(labels))))
        t = next(r for r in rows if r["direction"] == d and r["what"] == f"target {tgt}")
        for ax, met in zip(axes[i], metrics):
            for lab in labels:
                pts = sorted((r["λ"], r[met]) for r in merged if r["variant"] == lab)
                ax.plot(*zip(*pts), "-o", ms=3.5, color=colors[lab], label=lab)
            ax.axhline(t[met], color="k", ls="--", lw=1, label=f"target {tgt}")
            if met != "ppl":
                ch = ctx.chance_of(met)
                if not math.isnan(ch):
                    ax.axhline(ch, color="0.6", ls=":", lw=1, label="chance")
            else:
                ax.set_yscale("log")
            ax.set_title(f"{d}: {met}", fontsize=9)
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
        axes[i][-1].legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    save_fig(fig, ctx.out / "results.png")
