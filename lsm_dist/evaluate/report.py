"""Evaluation reports: flat metrics from lm-eval results, comparison table (Markdown + CSV),
bar plot, TensorBoard scalars, and the accuracy-vs-λ sweep plot used by experiments.

A flat metric key is ``"<task>/<metric>"`` (``"<task>/<metric>[<filter>]"`` when lm-eval's
filter is not ``none``, e.g. ``lsm_arith_gen/exact_match[strip]``); its standard error is
under ``"<key>_stderr"`` (``None`` where lm-eval reports ``"N/A"``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lsm_dist.utils import atomic_open, atomic_write_text

STDERR = "_stderr"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def flatten_results(results: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"<task>/<metric>": value, "<task>/<metric>_stderr": stderr}`` from lm-eval results
    (``results["results"]``: leaf tasks and groups that aggregate), in lm-eval's order."""
    flat: dict[str, float | None] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or key.split(",", 1)[0].endswith(STDERR):
                continue
            metric, flt = key.split(",", 1)
            name = f"{task}/{metric}" + ("" if flt == "none" else f"[{flt}]")
            v = _num(value)
            if v is None:
                continue
            flat[name] = v
            flat[name + STDERR] = _num(metrics.get(f"{metric}{STDERR},{flt}"))
    return flat


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric keys (no stderr) present in any row's ``metrics``, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r["metrics"]:
            if not k.endswith(STDERR):
                cols.setdefault(k, None)
    return list(cols)


def _fmt(v: float | None, se: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if se is None or math.isnan(se) else f"{v:.3f} ± {se:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows = checkpoints (``{"name", "metrics"}``), columns = task metrics "value ± stderr"."""
    if not rows:
        return "(no checkpoint was scored)\n"
    cols = metric_columns(rows)
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        m = r["metrics"]
        cells = [_fmt(m.get(c), m.get(c + STDERR)) for c in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Columns ``checkpoint, path, digest`` then each metric and its ``_stderr``."""
    cols = metric_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["checkpoint", "path", "digest"] + [x for c in cols for x in (c, c + STDERR)])
    for r in rows:
        m = r["metrics"]
        vals = [m.get(x) for c in cols for x in (c, c + STDERR)]
        w.writerow([r["name"], r.get("path", ""), r.get("digest", "")]
                   + ["" if v is None else repr(v) for v in vals])  # fmt: skip
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per metric column, one bar per checkpoint, stderr whiskers."""
    plt = _plt()
    cols = metric_columns(rows)
    n = max(1, len(rows))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(40.0, max(6.0, 0.5 * len(cols) * (1 + 0.3 * n))), 4.5))
    for i, r in enumerate(rows):
        m = r["metrics"]
        ys = [m.get(c) if m.get(c) is not None else math.nan for c in cols]
        errs = [m.get(c + STDERR) or 0.0 for c in cols]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=r["name"])
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title or "evaluation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def write_tensorboard(rows: Sequence[Mapping[str, Any]], tb_dir: str | Path, step: int = 0) -> None:
    """One TensorBoard run per checkpoint (``tb_dir/<name>``), tags ``eval/<task>/<metric>``."""
    from torch.utils.tensorboard import SummaryWriter

    for r in rows:
        w = SummaryWriter(log_dir=str(Path(tb_dir) / r["name"]))
        try:
            for k, v in r["metrics"].items():
                if v is not None and not k.endswith(STDERR):
                    w.add_scalar(f"eval/{k}", v, step)
        finally:
            w.close()


def cumulative_rows(out_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                    scoring: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``rows`` (this call's checkpoints, in order) followed by every other checkpoint whose
    result is cached in ``out_dir/results/`` *with the same scoring* (tasks, limit, few-shot,
    dtype, seed: comparable numbers), by name; of several cached results for one name (the
    checkpoint changed), the newest file. Each row gets ``"from": "this call" | "cached"``."""
    from lsm_dist.utils import read_json

    names = {r["name"] for r in rows}
    out = [{**r, "from": "this call"} for r in rows]
    newest: dict[str, tuple[int, dict]] = {}
    for f in sorted((Path(out_dir) / "results").glob("*.json")):
        try:
            rec = read_json(f)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("scoring") != dict(scoring) or rec.get("name") in names:
            continue
        stamp = f.stat().st_mtime_ns
        if rec.get("name") and (rec["name"] not in newest or stamp > newest[rec["name"]][0]):
            newest[rec["name"]] = (stamp, rec)
    out += [{**newest[n][1], "from": "cached"} for n in sorted(newest)]
    return out


def table_note(rows: Sequence[Mapping[str, Any]]) -> str:
    here = sum(r.get("from") == "this call" for r in rows)
    return (f"{len(rows)} checkpoint(s): {here} from this call, {len(rows) - here} scored earlier into "
            "this out_dir with the same tasks and settings (cached in results/).\n\n")


def write_reports(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``results.md``, ``results.csv``, ``results.png`` and ``tb/`` under ``out_dir``."""
    out = Path(out_dir)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    note = table_note(rows) if rows and any("from" in r for r in rows) else ""
    atomic_write_text(paths["md"], note + markdown_table(rows))
    atomic_write_text(paths["csv"], csv_text(rows))
    if rows:
        bar_plot(rows, paths["png"])
        write_tensorboard([r for r in rows if r.get("from", "this call") == "this call"], out / "tb")
    return paths


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, x: str = "lambda",
               metrics: Sequence[str] | None = None, group: str | None = None,
               title: str = "", ylabel: str = "accuracy") -> Path:  # fmt: skip
    """Line plot of ``metrics`` against ``rows[i][x]`` (e.g. accuracy vs λ), one line per
    metric (and per value of ``rows[i][group]``, e.g. the merge method), with stderr bars
    from ``"<metric>_stderr"`` where present. ``metrics`` defaults to every numeric key
    except ``x``, ``group`` and stderr keys. Rows may also be ``{"metrics": {...}, x: ...}``.
    """
    plt = _plt()
    flat = [{**r.get("metrics", {}), **{k: v for k, v in r.items() if k != "metrics"}}
            for r in rows]  # fmt: skip
    if metrics is None:
        seen: dict[str, None] = {}
        for r in flat:
            for k, v in r.items():
                if k not in (x, group) and not k.endswith(STDERR) and _num(v) is not None:
                    seen.setdefault(k, None)
        metrics = list(seen)
    groups = list(dict.fromkeys(r.get(group) for r in flat)) if group else [None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for g in groups:
        sub = sorted((r for r in flat if group is None or r.get(group) == g), key=lambda r: r[x])
        for m in metrics:
            pts = [
                (r[x], r[m], r.get(m + STDERR) or 0.0) for r in sub if _num(r.get(m)) is not None
            ]
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            label = m if g is None else f"{g}: {m}"
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs {x}")
    ax.grid(alpha=0.3)
    if metrics:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
