"""The merge experiments: ``self_merge`` (Table 2), ``expert_merge`` (Table 3) and ``blocks``
(Table 6); ``cross_arch`` (Table 5 / Fig. 4) has its own module. Each builds merge plans, runs them through
``run_merge``, scores every checkpoint with lm-eval and writes its table, plot and
observations (computed from the numbers; differences within ~2 standard errors of the
difference are reported as noise)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from lsm_dist.evaluate.plots import palette
from lsm_dist.evaluate.verdict import fmt_share
from lsm_dist.experiments.core import (
    Context,
    compare,
    markdown_table,
    mean_se,
    plt,
    save_fig,
    write_report,
)


def _acc_cols(ctx: Context) -> list[str]:
    return ctx.score_cols()


def _space_decodes(ctx: Context, encodings: tuple[str, ...] = ("full",)) -> list[tuple[str, str, str, str]]:
    """(label, space, decode, encoding) of every merge variant compared: latent per encoding
    (``latent``: the weights; ``latent-tv``: the task vectors) and decode, then weight."""
    return ([(f"{'latent' if e == 'full' else 'latent-tv'}/{d}", "latent", d, e) for e in encodings
             for d in (ctx.cfg.decodes if e == "full" else ctx.cfg.tv_decodes)] + [("weight", "weight", "direct", "full")])


def _csv_cols(cols: list[str], ctx: Context) -> list[str]:
    return cols + [f + "_se" for f in ctx.families()]


def _bars(rows: list[dict], label_key: str, fams: list[str], path: Path, title: str) -> None:
    """Grouped bars per family (+ mean) with stderr whiskers. A label ``"<kind>/<variant>"`` (e.g.
    ``ties/latent/delta``, ``MLP only/weight``) is coloured by kind and hatched by variant; a
    label without ``/`` (an original model) is grey. Legends sit outside the axes."""
    from matplotlib.patches import Patch

    pyplot = plt()
    metrics = [*fams, "mean"]
    n = len(rows)
    labels = [str(r[label_key]) for r in rows]
    kinds = list(dict.fromkeys(lab.split("/", 1)[0] for lab in labels if "/" in lab))
    variants = list(dict.fromkeys(lab.split("/", 1)[1] for lab in labels if "/" in lab))
    originals = [lab for lab in labels if "/" not in lab]
    colors = dict(zip(kinds, palette(len(kinds))))
    greys = {o: str(0.25 + 0.5 * i / max(len(originals) - 1, 1)) for i, o in enumerate(originals)}
    hatches = dict(zip(variants, ["", "////", "....", "xxxx", "\\\\", "++++"] * 4))
    fig, ax = pyplot.subplots(figsize=(max(7.0, 0.5 * len(metrics) * (1 + 0.3 * n)), 4.5))
    w = 0.85 / max(n, 1)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        kind, _, var = lab.partition("/")
        xs = [j + (i - (n - 1) / 2) * w for j in range(len(metrics))]
        errs = [r.get(m + "_se", 0.0) if m != "mean" else mean_se(r, fams) for m in metrics]
        ax.bar(xs, [r[m] for m in metrics], w, yerr=[0.0 if math.isnan(e) else e for e in errs],
               color=colors[kind] if var else greys[lab], hatch=hatches.get(var, ""), edgecolor="white",
               linewidth=0.4, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.3"})
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    handles = ([Patch(color=greys[o], label=o) for o in originals] + [Patch(color=colors[k], label=k) for k in kinds]
               + [Patch(facecolor="0.85", hatch=hatches[v], edgecolor="0.4", label=v) for v in variants])
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_fig(fig, path)


# ---- self_merge (Table 2) ------------------------------------------------------------------
def run_self_merge(ctx: Context) -> Path:
    cfg, t0 = ctx.cfg, time.perf_counter()
    ckpts, labels = {}, []
    for m in cfg.self_merge_models:
        one = {"models": {m: ctx.path(m)}, "target": m, "space": "latent"}
        ckpts[m] = ctx.path(m)
        labels.append((m, "original", "", m, None))
        for dec in cfg.decodes:
            if dec == "direct":  # delta-decoded reconstruction is the original, bit for bit
                key = f"self_merge.{m}.recon"
                ckpts[key] = ctx.merge(f"{m}-recon", {**one, "method": "soup", "params": {"weights": [1.0]},
                                                      "decode": "direct"})
                labels.append((m, "VAE recon (decode μ)", dec, key, 0))
            for k in cfg.samples:
                key = f"self_merge.{m}.K{k}" + ("" if dec == "direct" else f".{dec}")
                ckpts[key] = ctx.merge(f"{m}-K{k}" + ("" if dec == "direct" else f"-{dec}"),
                                       {**one, "method": "self_merge", "decode": dec,
                                        "params": {"samples": k, "seed": cfg.seed}})
                labels.append((m, f"self-merge K={k}", dec, key, k))
    sc = ctx.scores(ckpts)
    rows = [{"model": m, "variant": v, "decode": d, "K": k if k is not None else "", **sc[key]}
            for m, v, d, key, k in labels]
    cols = ["model", "variant", "decode", *_acc_cols(ctx)]
    fams = ctx.families()
    panels = ["mean"] + (["ppl"] if cfg.ppl else [])
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    colors = palette(len(cfg.self_merge_models))
    for ax, metric in zip(axes[0], panels):
        for i, m in enumerate(cfg.self_merge_models):  # colour: the model; line style: what
            sub = [r for r in rows if r["model"] == m]
            c = colors[i]
            for dec, style in zip(cfg.decodes, ("-o", "-.s")):
                ks = [r for r in sub if r["variant"].startswith("self-merge") and r["decode"] == dec]
                ax.plot([r["K"] for r in ks], [r[metric] for r in ks], style, color=c, ms=5,
                        label=f"{m}: self-merge ({dec})")
            ax.axhline(sub[0][metric], color=c, ls="--", lw=1.2, label=f"{m}: original")
            rec = [r for r in sub if r["variant"].startswith("VAE recon")]
            if rec:
                ax.axhline(rec[0][metric], color=c, ls=":", lw=1.5, label=f"{m}: VAE recon (direct)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.samples), [str(k) for k in cfg.samples])
        ax.xaxis.set_minor_locator(pyplot.NullLocator())
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("posterior samples K")
        ax.set_ylabel("mean accuracy" if metric == "mean" else "word perplexity (English text)")
        ax.set_title(f"self-merge: {'accuracy' if metric == 'mean' else 'perplexity'} vs K")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
               ncol=min(4, len(names)))
    fig.tight_layout()
    save_fig(fig, ctx.out / "results.png")
    obs = []
    for m in cfg.self_merge_models:
        sub = [r for r in rows if r["model"] == m]
        orig = sub[0]
        se = mean_se(orig, fams)
        kind = "training" if m in cfg.train_models else "held-out"
        rec = [r for r in sub if r["variant"].startswith("VAE recon")]
        line = f"{m} ({kind} model): original {orig['mean']:.3f}" + _ppl_text(orig)
        if rec:
            line += (f", VAE reconstruction (direct) {rec[0]['mean']:.3f}{_ppl_text(rec[0])} "
                     f"({compare(rec[0]['mean'], orig['mean'], se)} the original)")
        obs.append(line + ".")
        for dec in cfg.decodes:
            ks = [r for r in sub if r["variant"].startswith("self-merge") and r["decode"] == dec]
            best = max(ks, key=lambda r: r["mean"])
            obs.append(f"{m}, {dec} decoding: self-merge " + ", ".join(
                f"K={r['K']} {r['mean']:.3f}{_ppl_text(r)}" for r in ks)
                + f"; best K={best['K']} is {compare(best['mean'], orig['mean'], se)} the original"
                + (" — the paper reports self-merging improving on the single model; not reproduced here."
                   if compare(best['mean'], orig['mean'], se) != "above" else " — consistent with the paper's gain."))
            if cfg.ppl and dec == "delta":
                close = min(ks, key=lambda r: abs(r["ppl"] / orig["ppl"] - 1))
                ok = [str(r["K"]) for r in ks if abs(r["ppl"] / orig["ppl"] - 1) <= 0.01]
                obs.append(f"{m}, delta decoding: perplexity within 1% of the original (the project's target) "
                           + (f"at K = {', '.join(ok)}" if ok else "at no K")
                           + f"; closest K={close['K']}: {close['ppl']:.4g} vs {orig['ppl']:.4g} "
                           f"({100 * (close['ppl'] / orig['ppl'] - 1):+.1f}%). The sample mean's distance from μ "
                           "shrinks as 1/√K, so delta self-merge tends to the original as K grows.")
            trend = np.corrcoef([math.log2(r["K"]) for r in ks], [r["mean"] for r in ks])[0, 1] if len(ks) > 2 else math.nan
            if not math.isnan(trend):
                obs.append(f"{m}, {dec}: correlation of mean accuracy with log2 K is {trend:+.2f} "
                           f"({'more samples help' if trend > 0.5 else 'no clear benefit from more samples'}).")
    obs.append(ctx.chance_note([r for r in rows if r["variant"] != "original"],
                               lambda r: f"{r['model']} {r['variant']} ({r['decode']})"))
    return write_report(ctx, "self_merge — self-merging one model with K posterior samples (paper Table 2)",
                        ["## Accuracy\n", "VAE recon = every attention/MLP tensor replaced by decode(μ) (direct "
                         "decoding; with delta decoding the reconstruction is the original bit for bit); "
                         "self-merge K = the mean of K posterior samples z = μ + σ·ε, decoded directly "
                         "(D(z)) or as a delta (W + D(z) − D(μ)).\n",
                         markdown_table(rows, cols)], obs, {"results": (rows, _csv_cols(cols, ctx))}, t0)


def _ppl_text(r: dict) -> str:
    return f" (ppl {r['ppl']:.4g})" if "ppl" in r and not math.isnan(r["ppl"]) else ""


# ---- expert_merge (Table 3) ----------------------------------------------------------------
def _method_plan(ctx: Context, method: str, space: str, blocks: str = "both", decode: str = "delta",
                 encoding: str = "full") -> dict:
    cfg = ctx.cfg
    a, b = cfg.experts
    base = cfg.base
    two = {"models": {a: ctx.path(a), b: ctx.path(b)}, "target": a}
    three = {"models": {base: ctx.path(base), a: ctx.path(a), b: ctx.path(b)}, "target": base,
             "base": base, "inputs": [a, b]}  # the base is the target, as in mergekit
    params = {
        "lerp": {"lambda": cfg.lambda_}, "slerp": {"lambda": cfg.lambda_}, "soup": {"weights": [0.5, 0.5]},
        "task_arithmetic": {}, "ties": {"density": cfg.density}, "dare": {"drop_p": cfg.drop_p, "seed": cfg.seed},
    }[method]
    if method in ("task_arithmetic", "ties", "dare") and cfg.delta_weights:
        params["weights"] = list(cfg.delta_weights)
    plan = three if method in ("task_arithmetic", "ties", "dare") else two
    if encoding == "delta":  # task vectors of the experts against the base, decoded onto it
        plan = {**plan, "models": three["models"], "base": base, "inputs": [a, b], "encoding": "delta",
                "vae": str(ctx.vae(kind="delta"))}
    return {**plan, "method": method, "params": params, "space": space, "blocks": blocks, "decode": decode}


def run_expert_merge(ctx: Context) -> Path:
    cfg, t0 = ctx.cfg, time.perf_counter()
    a, b = cfg.experts
    ckpts = {m: ctx.path(m) for m in (cfg.base, a, b)}
    variants = _space_decodes(ctx, tuple(cfg.encodings))
    for method in cfg.methods:
        for label, space, dec, enc in variants:
            plan = _method_plan(ctx, method, space, decode=dec, encoding=enc)
            ckpts[f"expert_merge.{method}.{label.replace('/', '-')}"] = ctx.merge(
                f"{method}-{label.replace('/', '-')}", plan, vae=plan.pop("vae", None))
    sc = ctx.scores(ckpts)
    fams = ctx.families()
    rows = [{"method": m, "space": "(original)", **sc[m]} for m in (cfg.base, a, b)]
    for method in cfg.methods:
        for label, *_ in variants:
            rows.append({"method": method, "space": label, **sc[f"expert_merge.{method}.{label.replace('/', '-')}"]})
    cols = ["method", "space", *_acc_cols(ctx)]
    for r in rows:
        r["label"] = r["method"] if r["space"] == "(original)" else f"{r['method']}/{r['space']}"
    _bars(rows, "label", fams, ctx.out / "results.png", f"two experts ({a}, {b}): latent vs weight space")
    obs = []
    for lab in [lab for lab, sp, *_ in variants if sp == "latent"]:
        wins, losses, diffs = 0, 0, []
        for method in cfg.methods:
            lat = next(r for r in rows if (r["method"], r["space"]) == (method, lab))
            wgt = next(r for r in rows if (r["method"], r["space"]) == (method, "weight"))
            se = max(mean_se(lat, fams), mean_se(wgt, fams))
            c = compare(lat["mean"], wgt["mean"], se)
            wins, losses = wins + (c == "above"), losses + (c == "below")
            diffs.append(lat["mean"] - wgt["mean"])
            obs.append(f"{method}: {lab} {lat['mean']:.3f}{_ppl_text(lat)} vs weight "
                       f"{wgt['mean']:.3f}{_ppl_text(wgt)} — latent is {c} weight space.")
        n = len(cfg.methods)
        verdict = ("reproduced" if wins > n / 2 else "contradicted here (latent significantly worse for most operators)"
                   if losses > n / 2 else "not confirmed at this scale (most differences within noise)")
        obs.append(f"{lab}: latent space is significantly better for {wins}/{n} and significantly worse "
                   f"for {losses}/{n} operators (mean difference {np.mean(diffs):+.3f}); the paper finds "
                   f"latent-space merging more robust than weight-space merging — {verdict}.")
    keep = [r for r in rows if r["space"] != "(original)"]
    kept = retention(rows[0], sc[a], sc[b], keep, fams, own=[ctx.expert_task(e) for e in (a, b)])
    top = max(kept, key=lambda k: min((x for x in kept[k] if not math.isnan(x)), default=-math.inf))
    obs.append(f"gain retention (merge − base) / (expert − base) on each expert's task: best (highest minimum) "
               f"{top} " + "/".join(map(fmt_share, kept[top])) + "; "
               + ", ".join(f"{k} " + "/".join(map(fmt_share, v)) for k, v in kept.items()) + ".")
    best_w = max((r for r in keep if r["space"] == "weight"), key=lambda r: r["mean"])
    for lab in [lab for lab, sp, *_ in variants if sp == "latent"]:
        best_l = max((r for r in keep if r["space"] == lab), key=lambda r: r["mean"])
        se = max(mean_se(best_l, fams), mean_se(best_w, fams))
        obs.append(f"best {lab} merge {best_l['label']} {best_l['mean']:.3f}{_ppl_text(best_l)} "
                   f"is {compare(best_l['mean'], best_w['mean'], se)} the best weight-space merge "
                   f"{best_w['label']} {best_w['mean']:.3f}{_ppl_text(best_w)}.")
    obs.append(ctx.chance_note(keep, lambda r: r["label"]))
    return write_report(ctx, "expert_merge — two experts merged in latent vs weight space (paper Table 3)",
                        ["## Accuracy\n", f"Experts {a}, {b} fine-tuned from {cfg.base}; lerp/slerp λ={cfg.lambda_}, "
                         f"soup [0.5, 0.5], task arithmetic / TIES (density {cfg.density}) / DARE (p={cfg.drop_p}) on "
                         f"deltas from {cfg.base} with weights {cfg.delta_weights or [1.0, 1.0]}. Latent = the same "
                         "operator on VAE latents (μ), decoded with the VAE: latent/direct = D(z_merged) (the "
                         "paper's), latent/delta = W_target + D(z_merged) − D(z_target); latent-tv = the same "
                         "on the experts' task vectors W − W_base, encoded with a VAE trained on their delta "
                         "corpus and decoded onto the base (lsm_dist.delta).\n", markdown_table(rows, cols)],
                        obs, {"results": (rows, _csv_cols(cols, ctx))}, t0)


def retention(base: dict, ea: dict, eb: dict, rows: list[dict], fams: list[str],
              own: list[str | None] | None = None) -> dict[str, list[float]]:
    """Per merge (``rows`` by ``label``): the share of each expert's gain over the base it keeps
    on that expert's own task (``evaluate.report.own_tasks``: ``own``, the one it was fine-tuned
    on, else the family where it gains most)."""
    from lsm_dist.evaluate.report import gain_retention, own_tasks

    tasks = own_tasks(base, (ea, eb), fams, own)

    def se(r: dict) -> dict:
        return {f: r.get(f + "_se", math.nan) for f in fams}

    return {r["label"]: gain_retention(base, (ea, eb), r, tasks, se(base), (se(ea), se(eb))) for r in rows}


# ---- blocks (Table 6) ----------------------------------------------------------------------
def run_blocks(ctx: Context) -> Path:
    cfg, t0 = ctx.cfg, time.perf_counter()
    a, b = cfg.experts
    ckpts = {a: ctx.path(a), b: ctx.path(b)}
    dec = cfg.decodes[0]
    spaces = (("latent", dec), ("weight", "direct"))
    for blocks in ("mlp", "attn", "both"):
        for space, d in spaces:
            ckpts[f"blocks.{blocks}.{space}"] = ctx.merge(f"lerp-{blocks}-{space}",
                                                          _method_plan(ctx, "lerp", space, blocks, decode=d))
    sc = ctx.scores(ckpts)
    fams = ctx.families()
    rows = [{"merged blocks": "(original)", "space": m, **sc[m]} for m in (a, b)]
    names = {"mlp": "MLP only", "attn": "attention only", "both": "both"}
    for blocks in ("mlp", "attn", "both"):
        for space, _ in spaces:
            rows.append({"merged blocks": names[blocks], "space": space, **sc[f"blocks.{blocks}.{space}"]})
    cols = ["merged blocks", "space", *_acc_cols(ctx)]
    for r in rows:
        r["label"] = r["space"] if r["merged blocks"] == "(original)" else f"{r['merged blocks']}/{r['space']}"
    _bars(rows, "label", fams, ctx.out / "results.png", f"lerp λ={cfg.lambda_} of {a} and {b}: merged blocks")
    lat = [r for r in rows if r["space"] == "latent"]
    best = max(lat, key=lambda r: r["mean"])
    se = mean_se(best, fams)
    obs = ["latent lerp: " + ", ".join(f"{r['merged blocks']} {r['mean']:.3f}" for r in lat)
           + f"; best: {best['merged blocks']}" + "".join(
               f" ({compare(best['mean'], r['mean'], se)} {r['merged blocks']})" for r in lat if r is not best) + "."]
    for blocks in ("mlp", "attn", "both"):
        lr = next(r for r in rows if (r["merged blocks"], r["space"]) == (names[blocks], "latent"))
        wr = next(r for r in rows if (r["merged blocks"], r["space"]) == (names[blocks], "weight"))
        obs.append(f"{names[blocks]}: latent {lr['mean']:.3f} vs weight {wr['mean']:.3f} "
                   f"({compare(lr['mean'], wr['mean'], max(mean_se(lr, fams), mean_se(wr, fams)))}).")
    spec = max(fams, key=lambda f: sc[a][f] - sc[b][f])  # the target expert's specialty
    for space in ("latent", "weight"):
        sub = {r["merged blocks"]: r for r in rows if r["space"] == space}
        part = max(("MLP only", "attention only"), key=lambda k: sub[k]["mean"])
        obs.append(f"{space}: the better partial merge, {part} ({sub[part]['mean']:.3f}), is "
                   f"{compare(sub[part]['mean'], sub['both']['mean'], mean_se(sub['both'], fams))} merging both "
                   f"({sub['both']['mean']:.3f}); {a}'s specialty {spec} ({sc[a][spec]:.3f}) becomes "
                   f"{sub['MLP only'][spec]:.3f} (MLP only) / {sub['attention only'][spec]:.3f} (attention only) / "
                   f"{sub['both'][spec]:.3f} (both), {b}'s specialty "
                   f"{(sb := max(fams, key=lambda f: sc[b][f] - sc[a][f]))} ({sc[b][sb]:.3f}) becomes "
                   f"{sub['MLP only'][sb]:.3f} / {sub['attention only'][sb]:.3f} / {sub['both'][sb]:.3f}.")
    obs.append(ctx.chance_note(rows[2:], lambda r: r["label"]))
    obs.append("the paper's Table 6 values are not available to this code; the ranking above is reported "
               "as measured, without a claim of agreement.")
    return write_report(ctx, "blocks — merging MLP only / attention only / both (paper Table 6)",
                        ["## Accuracy\n", f"lerp λ={cfg.lambda_} of {a} (target) and {b}; only the named blocks are "
                         f"merged, every other tensor is {a}'s original; latent merges decoded with {dec} decoding. "
                         "Weight-space lerp of the same blocks for reference.\n", markdown_table(rows, cols)], obs, {"results": (rows, _csv_cols(cols, ctx))}, t0)
