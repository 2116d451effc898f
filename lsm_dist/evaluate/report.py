"""Evaluation reports: flat metrics from lm-eval results, comparison table (Markdown + CSV),
the plots of ``evaluate.plots`` (heatmap, retention, accuracy vs λ) and TensorBoard scalars.

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

from lsm_dist.evaluate import plots
from lsm_dist.utils import atomic_write_text

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


def own_tasks(base: Mapping[str, float], experts: Sequence[Mapping[str, float]], tasks: Sequence[str],
              trained: Sequence[str | None] | None = None) -> list[str]:
    """Each expert's own task: the one it was fine-tuned on (``trained``, when it is among
    ``tasks``), else the one of ``tasks`` where it gains most over ``base``."""
    trained = list(trained or [None] * len(experts))
    return [t if t in tasks else max(tasks, key=lambda f, e=e: e[f] - base[f]) for t, e in zip(trained, experts)]


def gain_retention(base: Mapping[str, float], experts: Sequence[Mapping[str, float]],
                   merged: Mapping[str, float], tasks: Sequence[str],
                   se_base: Mapping[str, float] | None = None,
                   se_experts: Sequence[Mapping[str, float]] | None = None) -> list[float]:
    """The share of each expert's gain over the base a merge keeps on that expert's task
    ``tasks[i]``: ``(merge − base) / (expert − base)``; NaN where the expert does not gain
    beyond noise (``evaluate.verdict.retention``; without standard errors: where it does not
    gain at all)."""
    from lsm_dist.evaluate.verdict import retention

    se_base = se_base or {}
    se_experts = se_experts or [{}] * len(experts)
    return [retention(base[t], se_base.get(t), e[t], se_e.get(t), merged[t])
            for t, e, se_e in zip(tasks, experts, se_experts)]


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


def write_reports(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, base: str | None = None,
                  experts: Sequence[str] = ()) -> dict[str, Path]:  # fmt: skip
    """``results.md``, ``results.csv``, ``results.png`` (the checkpoint × task heatmap) and
    ``tb/`` under ``out_dir``; with ``experts``, ``results_retention.png`` (each checkpoint's
    score as a fraction of the best expert per task); when the merges hold λ sweeps,
    ``results_lambda.png`` (accuracy vs λ per merge family, the base and experts as reference
    lines). See ``evaluate.plots``."""
    out = Path(out_dir)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    note = table_note(rows) if rows and any("from" in r for r in rows) else ""
    atomic_write_text(paths["md"], note + markdown_table(rows))
    atomic_write_text(paths["csv"], csv_text(rows))
    if rows:
        names = {r["name"] for r in rows}
        roles = {**{e: "expert" for e in experts if e in names}, **({base: "base"} if base in names else {})}
        plots.heatmap(rows, paths["png"], roles=roles)
        if experts and plots.retention_plot(rows, out / "results_retention.png", list(experts), base):
            paths["retention"] = out / "results_retention.png"
        sweep = plots.lambda_sweeps(rows)
        if sweep:
            keys = [k for _, k, _ in plots.task_metrics(sweep)]
            refs = {f"{r['name']} ({roles[r['name']]})": r["metrics"] for r in rows if r["name"] in roles}
            paths["lambda"] = plots.plot_sweep(sweep, out / "results_lambda.png", x="lambda", metrics=keys,
                                               group="merge", refs=refs, title="accuracy vs λ of the merges")
        write_tensorboard([r for r in rows if r.get("from", "this call") == "this call"], out / "tb")
    return paths
