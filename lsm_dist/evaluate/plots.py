"""The plots of ``lsm eval`` (and the curves experiments draw), made to be read by a merging user.

- :func:`heatmap` (``results.png``): checkpoint × task, the value in every cell, one metric per
  task (:func:`task_metrics`: ``acc``, else ``exact_match``, else ``acc_norm``, ...);
  perplexity tasks (``word_perplexity``, lower is better) in their own panel with their own
  log colour scale; brighter is better in both, the best value of each column in bold;
- :func:`retention_plot` (``results_retention.png``): each other checkpoint's score as a
  fraction of the best expert's score on the accuracy tasks (needs the experts' names); with the
  base's, the share of the best expert's gain over the base kept, on the tasks where it gains
  (the measure of the retention tables);
- :func:`plot_sweep` (``results_lambda.png``, experiments): accuracy vs λ, one panel per
  metric, one line per merge family, reference lines for the originals;
  :func:`lambda_sweeps` finds λ sweeps among scored merges from their resolved plans.

Colours come from :func:`palette` (distinct up to 20 lines); sizes grow with the number of
checkpoints and tasks so that labels never overlap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lsm_dist.evaluate.verdict import gains
from lsm_dist.utils import atomic_open

STDERR = "_stderr"
ACC_PREFERENCE = ("acc", "exact_match", "acc_norm", "f1", "mcc")  # higher is better
PPL_PREFERENCE = ("word_perplexity", "perplexity", "byte_perplexity", "bits_per_byte")  # lower
MARKERS = "osD^vP*Xph<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110, tight: bool = True) -> Path:
    """``fig`` as a PNG at ``path`` (atomically; cropped to what it draws unless ``tight`` is
    false, for a figure laid out in inches), then closed."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    return path


def palette(n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, tab20 (dark tones first) up to 20, then turbo."""
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _metric_name(key: str) -> str:
    """``"task/acc_norm[flt]"`` → ``"acc_norm"``."""
    return key.split("/", 1)[1].split("[", 1)[0]


def task_metrics(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """``(task, metric key, lower_is_better)``: the one metric per task a merging user compares
    (accuracy-like in :data:`ACC_PREFERENCE` order, else a perplexity in
    :data:`PPL_PREFERENCE` order, else the task's first metric); accuracy tasks first."""
    keys: dict[str, list[str]] = {}
    for r in rows:
        for k in r["metrics"]:
            if not k.endswith(STDERR) and "/" in k and k not in keys.setdefault(k.split("/")[0], []):
                keys[k.split("/")[0]].append(k)
    out = []
    for task, ks in keys.items():
        pick = next(((k, False) for m in ACC_PREFERENCE for k in ks if _metric_name(k) == m), None)
        pick = pick or next(((k, True) for m in PPL_PREFERENCE for k in ks if _metric_name(k) == m), None)
        out.append((task, *(pick or (ks[0], False))))
    return sorted(out, key=lambda t: t[2])  # stable: accuracy tasks, then perplexities


def _label_width(labels: Sequence[str], fontsize: float = 8.5) -> float:
    """Inches a column of labels needs (about 0.6 em per character)."""
    return 0.6 * fontsize / 72 * max((len(s) for s in labels), default=4) + 0.15


def _ink(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _fmt(v: float, ppl: bool) -> str:
    if math.isnan(v):
        return "–"
    if not ppl:
        return f"{v:.3f}"
    return f"{v:.3g}" if v < 1e4 else f"{v:.1e}".replace("e+0", "e").replace("e+", "e")


def heatmap(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
            roles: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Checkpoint × task heatmap with the values written in the cells (see the module doc).
    ``roles`` (name → "base" / "expert") are written after the names. Cells have a fixed
    size in inches (the figure grows with checkpoints and tasks)."""
    from matplotlib.colors import LogNorm, Normalize

    plt = _plt()
    roles = roles or {}
    cols = task_metrics(rows)
    panels = [p for p in ([c for c in cols if not c[2]], [c for c in cols if c[2]]) if p]
    labels = [r["name"] + (f"  ({roles[r['name']]})" if r["name"] in roles else "") for r in rows]
    n = len(rows)
    cell_h, top, bottom, gap, right = 0.3, 0.95, 0.9, 0.45, 0.25
    widths = [max(0.9, 0.6 * 8 / 72 * max(len(t) for t, _, _ in p) + 0.25) * len(p) for p in panels]
    left = _label_width(labels) + 0.1
    W = left + sum(widths) + gap * (len(panels) - 1) + right
    H = top + cell_h * n + bottom
    fig = plt.figure(figsize=(max(W, 4.0), H))
    x0 = left
    for p_idx, (panel, w) in enumerate(zip(panels, widths)):
        ax = fig.add_axes((x0 / W, bottom / H, w / W, cell_h * n / H))
        cax = fig.add_axes((x0 / W, 0.45 / H, w / W, 0.1 / H))
        x0 += w + gap
        ppl = panel[0][2]
        m = [[_num(r["metrics"].get(k)) for _, k, _ in panel] for r in rows]
        shown = [[v if not math.isnan(v) and (v > 0 or not ppl) else math.nan for v in row] for row in m]
        vals = [v for row in shown for v in row if not math.isnan(v)]
        lo, hi = (min(vals), max(vals)) if vals else (0.1, 1.0)
        if ppl:
            norm, cmap = LogNorm(lo, hi if hi > lo else lo * 10), "viridis_r"
        else:
            norm, cmap = Normalize(lo, hi if hi > lo else lo + 1e-6), "viridis"
        im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for j in range(len(panel)):
            col = [row[j] for row in m if not math.isnan(row[j])]
            best = (min(col) if ppl else max(col)) if col else None
            for i in range(n):
                v = m[i][j]
                ink = "black" if math.isnan(shown[i][j]) else _ink(im.cmap(im.norm(v)))
                ax.text(j, i, _fmt(v, ppl), ha="center", va="center", fontsize=8, color=ink,
                        fontweight="bold" if v == best else "normal")
        ax.set_xticks(range(len(panel)), [f"{t}\n{_metric_name(k)}" for t, k, _ in panel], fontsize=8)
        ax.xaxis.tick_top()
        ax.set_yticks(range(n), labels if p_idx == 0 else [""] * n, fontsize=8.5)
        ax.set_xticks([x - 0.5 for x in range(1, len(panel))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, n)], minor=True)
        ax.grid(which="minor", color="white", lw=1.2)
        ax.tick_params(which="both", length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        cb = fig.colorbar(im, cax=cax, orientation="horizontal")
        cb.set_label("perplexity (log; lower is better)" if ppl else "accuracy (higher is better)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.text(0.5, 1 - 0.18 / H, title or f"{n} checkpoint(s) × {len(cols)} task(s); best of each column in bold",
             ha="center", va="top", fontsize=10)
    return save(fig, path, tight=False)


# --------------------------------------------------------------------------- retention
def retention(rows: Sequence[Mapping[str, Any]], experts: Sequence[str],
              base: str | None = None) -> tuple[list[str], dict[str, dict[str, float]]]:  # fmt: skip
    """``(tasks, {name: {task: share}})`` over the accuracy tasks, for every checkpoint that is
    not an expert. Without a ``base`` the share is score / best expert's score. With one, it is
    the share of the best expert's *gain* kept, (score − base) / (best − base) -- the measure of
    the demo's and the experiments' retention tables (0 = the base, 1 = the best expert) -- on
    the tasks where the best expert beats the base (the experts' own tasks) by more than two
    standard errors of the difference where the rows carry ``<metric>_stderr`` (a gain within
    noise is no skill of the expert's); a task no expert scores above 0 is left out."""
    by = {r["name"]: r["metrics"] for r in rows}
    tasks, best = [], {}
    for _task, k, lower in task_metrics(rows):
        b, who = max(((_num(by[e].get(k)), e) for e in experts if e in by), default=(math.nan, None))
        if base in by and who is not None and not gains(
                b, _num(by[who].get(f"{k}_stderr")), _num(by[base].get(k)), _num(by[base].get(f"{k}_stderr"))):
            continue
        if not lower and b > 0:
            tasks.append(k)
            best[k] = b
    ref = {k: _num(by[base].get(k)) if base in by else 0.0 for k in tasks}
    return tasks, {r["name"]: {k: (_num(r["metrics"].get(k)) - ref[k]) / (best[k] - ref[k]) for k in tasks}
                   for r in rows if r["name"] not in experts}  # fmt: skip


def retention_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, experts: Sequence[str],
                   base: str | None = None) -> Path | None:  # fmt: skip
    """Dot plot: one row per merge (best mean retention on top; the base last, as reference),
    one marker per task at score / best expert's score; a bar from the worst to the best task
    and the mean written on the right. None (nothing written) without experts or tasks."""
    tasks, frac = retention(rows, experts, base)
    if not tasks or not frac:
        return None
    plt = _plt()

    def mean(name: str) -> float:
        vs = [v for v in frac[name].values() if not math.isnan(v)]
        return sum(vs) / len(vs) if vs else math.nan

    names = sorted((n for n in frac if n != base), key=lambda n: -mean(n) if not math.isnan(mean(n)) else 1e9)
    names += [base] if base in frac else []
    n = len(names)
    fig, ax = plt.subplots(figsize=(_label_width(names) + 6.0, 1.5 + 0.3 * n))
    colors = palette(len(tasks))
    for i, name in enumerate(names):
        y = n - 1 - i
        vs = [frac[name][k] for k in tasks if not math.isnan(frac[name][k])]
        if vs:
            ax.plot([min(vs), max(vs)], [y, y], color="0.75", lw=2, zorder=1, solid_capstyle="round")
            ax.annotate(f"{mean(name):.0%}", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    for j, k in enumerate(tasks):
        ys = [n - 1 - i for i, name in enumerate(names) if not math.isnan(frac[name][k])]
        xs = [frac[name][k] for name in names if not math.isnan(frac[name][k])]
        ax.scatter(xs, ys, color=colors[j], marker=MARKERS[j % len(MARKERS)], s=30, zorder=3,
                   label=k.replace("/", " "), edgecolor="white", linewidth=0.5)
    ax.axvline(1.0, color="k", lw=1, ls="--")
    if base in frac:
        ax.axvline(0.0, color="0.4", lw=0.8, ls=":")
    ax.annotate("= best expert", (1.0, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                textcoords="offset points", fontsize=7, ha="left", va="bottom")
    ax.annotate("mean", (1.0, 1.0), xycoords="axes fraction", xytext=(4, 2), textcoords="offset points",
                fontsize=7.5, va="bottom")
    if base in frac:
        ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_yticks(range(n), [f"{name}  (base)" if name == base else name for name in reversed(names)],
                  fontsize=8.5)
    ax.set_ylim(-0.7, n - 0.1)
    hi = max((v for f in frac.values() for v in f.values() if not math.isnan(v)), default=1.0)
    if hi > 1.6:  # one runaway ratio (an expert near 0 on a task) must not squash the rest
        ax.set_xlim(right=1.6)
        for i, name in enumerate(names):
            over = [f"{v:.0%}" for v in frac[name].values() if v > 1.6]
            if over:
                ax.annotate("→ " + ", ".join(over), (1.6, n - 1 - i), xytext=(-2, 5), textcoords="offset points",
                            ha="right", fontsize=6.5)
    what = ("share of the best expert's gain over the base kept, (score − base) / (best − base)" if base in frac
            else "score / best expert's score on the task")
    ax.set_xlabel(f"{what} (experts: {', '.join(experts)}); mean on the right", fontsize=9)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:.0%}"))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("retention per task: 0 % = the base, 100 % = the best expert" if base in frac
                 else "retention: each checkpoint vs the best expert, per task", fontsize=10, loc="left")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.07, 1.0), frameon=False, title="task",
              title_fontsize=8)
    return save(fig, path)


# --------------------------------------------------------------------------- λ curves
def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, x: str = "lambda",
               metrics: Sequence[str] | None = None, group: str | None = None,
               title: str = "", ylabel: str = "accuracy",
               refs: Mapping[str, Mapping[str, float]] | None = None) -> Path:  # fmt: skip
    """Curves of ``metrics`` against ``rows[i][x]`` (e.g. accuracy vs λ): one panel per metric
    (perplexities on a log axis), one line per value of ``rows[i][group]`` (e.g. the merge
    method), stderr bars from ``"<metric>_stderr"``; ``refs`` (label → metrics, e.g. the base
    and the experts) as dashed horizontal lines. ``metrics`` defaults to every numeric key but
    ``x``, ``group`` and stderr keys. Rows may also be ``{"metrics": {...}, x: ...}``."""
    plt = _plt()
    flat = [{**r.get("metrics", {}), **{k: v for k, v in r.items() if k != "metrics"}} for r in rows]
    if metrics is None:
        seen: dict[str, None] = {}
        for r in flat:
            for k, v in r.items():
                if k not in (x, group) and not k.endswith(STDERR) and not math.isnan(_num(v)):
                    seen.setdefault(k, None)
        metrics = list(seen)
    metrics = list(metrics) or ["(none)"]
    groups = list(dict.fromkeys(r.get(group) for r in flat)) if group else [None]
    ncol = 2 if len(metrics) == 4 else min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow + 0.3), squeeze=False)
    colors = palette(len(groups) + len(refs or {}))
    xs_all = [_num(r.get(x)) for r in flat if not math.isnan(_num(r.get(x)))]
    dodge = 0.006 * (max(xs_all) - min(xs_all)) if xs_all else 0.0  # error bars side by side
    for ax, m in zip(axes.flat, metrics):
        ppl = m.split("/")[-1].split("[")[0] in PPL_PREFERENCE
        for i, g in enumerate(groups):
            sub = sorted((r for r in flat if group is None or r.get(group) == g), key=lambda r: _num(r.get(x)))
            pts = [(_num(r[x]), _num(r.get(m)), _num(r.get(m + STDERR))) for r in sub
                   if not math.isnan(_num(r.get(m)))]  # fmt: skip
            if pts:
                xs, ys, es = zip(*pts)
                xs = [v + (i - (len(groups) - 1) / 2) * dodge for v in xs]
                ax.errorbar(xs, ys, yerr=[0.0 if math.isnan(e) else e for e in es], marker=MARKERS[i % len(MARKERS)],
                            ms=4, capsize=2, lw=1.5, color=colors[i], label=str(g) if g is not None else m)
        for j, (label, vals) in enumerate((refs or {}).items()):
            if not math.isnan(_num(vals.get(m))):
                ax.axhline(_num(vals[m]), color=colors[len(groups) + j], ls="--", lw=1, label=label)
        if ppl:
            ax.set_yscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("λ" if x in ("lambda", "lambda_", "λ") else x)
        ax.set_ylabel("perplexity (log)" if ppl else ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    legend: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    labels, handles = list(legend), list(legend.values())
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=min(4, len(labels)),
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title or f"{ylabel} vs {x}", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


SWEEP_IGNORED = ("out_dir", "cache_dir", "zoo_dir", "batch_size", "device", "overwrite", "origin",
                 "max_shard_size", "latent_dtype", "max_padding_fraction")  # do not change a merge


def lambda_sweeps(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The scored merges that form λ sweeps: checkpoints whose resolved plan
    (``<checkpoint>/lsm_merge_plan.yaml``, written by ``lsm merge``; read, never executed)
    differs from at least two others only in ``params.lambda``. Returns rows ``{"metrics",
    "lambda", "merge": "<space>[/<decode>] <method>"}`` (a family with a repeated label gets
    its target appended)."""
    import json

    import yaml

    from lsm_dist.merge.card import PLAN_FILE

    fams: dict[str, list[tuple[float, Mapping]]] = {}
    labels: dict[str, str] = {}
    for r in rows:
        f = Path(str(r.get("path", ""))) / PLAN_FILE
        try:
            plan = yaml.safe_load(f.read_text()) if f.is_file() else None
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(plan, dict) or not isinstance(plan.get("params"), dict):
            continue
        lam = _num(plan["params"].get("lambda"))
        if math.isnan(lam):
            continue
        key = {k: v for k, v in plan.items() if k not in SWEEP_IGNORED}
        key["params"] = {k: v for k, v in plan["params"].items() if k != "lambda"}
        fam = json.dumps(key, sort_keys=True, default=str)
        fams.setdefault(fam, []).append((lam, r))
        space = plan.get("space", "?") + (f"/{plan['decode']}" if plan.get("space") == "latent" else "")
        labels[fam] = f"{space} {plan.get('method', '?')}" + ("" if plan.get("alignment", {}).get("method") in
                                                                (None, "none") else " (aligned)")
    fams = {k: v for k, v in fams.items() if len({lam for lam, _ in v}) >= 3}
    counts: dict[str, int] = {}
    for k in fams:
        counts[labels[k]] = counts.get(labels[k], 0) + 1
    out = []
    for k, pts in fams.items():
        label = labels[k]
        if counts[label] > 1:
            label += f" → {json.loads(k).get('target')}"
        out += [{"metrics": dict(r["metrics"]), "lambda": lam, "merge": label} for lam, r in pts]
    return out
