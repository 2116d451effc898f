"""Tables (markdown / CSV) and plots of hidden-state merge runs; every write is atomic."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from lsm_dist.hidden.metrics import METRICS
from lsm_dist.utils import atomic_open, atomic_write_text


def fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    atomic_write_text(path, buf.getvalue())


def _save_fig(fig, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_layer_metrics(report: dict, path: str | Path, title: str = "") -> None:
    """One panel per metric: value per layer, hidden merge (solid) vs weight merge (dashed);
    mixed layers shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("midness",), ("arc_ratio",), ("arc_norm_dev", "off_plane"), ("cka_a", "cka_b"),
              ("cos_a", "cos_b")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    layers = report["layers"]
    for ax, keys in zip(axes, panels):
        for i in report["mixed"]:
            ax.axvspan(int(i) - 0.5, int(i) + 0.5, color="0.92", lw=0)
        for kind, style in (("hidden", "-"), ("weight", "--")):
            rows = report.get(kind)
            if not rows:
                continue
            for j, k in enumerate(keys):
                ax.plot(layers, [r[k] for r in rows], style, color=f"C{j}", marker="o", ms=3,
                        label=f"{kind} {k}")  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_title(" / ".join(keys))
        ax.legend(fontsize=6)
    fig.suptitle(title or f"hidden-state merge ({report.get('op')}, solid) vs weight merge (dashed)",
                 y=1.04)  # fmt: skip
    _save_fig(fig, path)
    plt.close(fig)


def plot_sweep(rows: Sequence[dict], path: str | Path, value: str) -> None:
    """Per operator: ``value`` vs α, one line per (method, layer range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows if r["method"] in ("hidden", "weight")))
    fig, axes = plt.subplots(1, max(1, len(ops)), figsize=(4.5 * max(1, len(ops)), 3.4), squeeze=False)
    refs = [r for r in rows if r["method"] not in ("hidden", "weight")]
    for ax, op in zip(axes[0], ops):
        keys = dict.fromkeys((r["method"], r["layers"]) for r in rows if r["op"] == op)
        for method, layers in keys:
            pts = sorted((r["alpha"], r.get(value, math.nan)) for r in rows
                         if r["op"] == op and r["method"] == method and r["layers"] == layers)  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if method == "hidden" else "--",
                    marker="o", ms=3, label=f"{method} L{layers}")  # fmt: skip
        for r in refs:
            v = r.get(value)
            if isinstance(v, float) and not math.isnan(v):
                ax.axhline(v, color="0.6", lw=0.8, ls=":")
                ax.text(0.01, v, r["method"], transform=ax.get_yaxis_transform(), fontsize=6,
                        color="0.4", va="bottom")  # fmt: skip
        ax.set_title(op)
        ax.set_xlabel("alpha")
        ax.set_ylabel(value)
        ax.legend(fontsize=6)
    _save_fig(fig, path)
    plt.close(fig)


def run_markdown(result: dict) -> str:
    """The report of one ``run_hidden_merge``: scores, per-layer metrics, samples."""
    out = [f"# Hidden-state merge: {result['op']}\n",
           f"models: {', '.join(result['models'])}  \nmixed layers (α): {result['mix']}  \n"
           f"head: {result['head']} (α {result['head_alpha']})\n"]  # fmt: skip
    if result.get("scores"):
        tasks = sorted({t for s in result["scores"].values() for t in s})
        rows = [{"model": name, **{t: s.get(t, {}).get("primary", math.nan) for t in tasks}}
                for name, s in result["scores"].items()]  # fmt: skip
        out += ["\n## Scores (primary metric per task)\n", markdown_table(rows, ["model", *tasks])]
    rep = result["metrics"]
    for kind in ("hidden", "weight"):
        if rep.get(kind):
            out += [f"\n## Per-layer metrics: {kind} merge vs parents\n",
                    markdown_table(rep[kind], ["layer", *METRICS])]  # fmt: skip
    if result.get("samples"):
        out.append("\n## Samples\n")
        for s in result["samples"]:
            out.append(f"- `{s['prompt']}` → `{s['hidden']}`" + (f" (weight: `{s['weight']}`)" if "weight" in s else "") + "\n")
    return "".join(out)
