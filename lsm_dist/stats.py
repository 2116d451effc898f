"""``lsm stats``: per-tensor weight statistics (the paper's Table 1 / Fig. 2 analysis).

For every selected tensor: mean, variance, skewness, excess kurtosis (population / biased
moments, as ``scipy.stats`` with ``bias=True``), min/max, the fraction of entries with
``|x - mean| > 3σ``, and the PCA explained-variance spectrum of the matrix rows.

Moments are streamed over ``Checkpoint.iter_rows`` in float64: each row block's central
moments (n, mean, M2, M3, M4) are computed exactly about the *block* mean and merged into
the running totals with the pairwise update of Chan et al. / Pébay (2008). This avoids the
cancellation of raw power sums and is exact up to rounding whatever the block split. Per
block the float64 working memory is two buffers of the block's size (``max_elems``).
A second streaming pass counts 3σ outliers and gathers a deterministic (seeded) subsample of
at most ``max_pca_rows`` rows for the PCA; nothing larger than one row block plus that
subsample is ever held in memory.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsm_dist.checkpoint import BLOCKS, Checkpoint
from lsm_dist.config import check, doc
from lsm_dist.utils import atomic_open, atomic_write_text, get_logger

CSV_FIELDS = [
    "model", "name", "layer", "block", "role", "shape", "dtype", "numel", "mean", "var", "std",
    "skewness", "excess_kurtosis", "min", "max", "frac_3sigma", "pca_k90", "pca_evr",
]
SUMMARY_STATS = [  # (csv column, table header)
    ("mean", "mean"), ("var", "var"), ("std", "std"), ("skewness", "skewness"),
    ("excess_kurtosis", "excess kurtosis"), ("frac_3sigma", "frac >3σ"), ("pca_k90", "PCA k90"),
]


@dataclass
class StatsConfig:
    checkpoints: list[str] = doc("checkpoint directories or .safetensors files to analyze", factory=list)
    labels: list[str] = doc("model names for the tables/plots (default: checkpoint dir/file names)", factory=list)
    blocks: list[str] = doc("block types to analyze: attn, mlp, other", factory=lambda: ["attn", "mlp"])
    include: str | None = doc("only tensors whose name matches this regex", None)
    exclude: str | None = doc("skip tensors whose name matches this regex", None)
    pca_components: int = doc("number of leading PCA explained-variance ratios kept per tensor", 32)
    max_pca_rows: int = doc("rows subsampled (seeded, without replacement) for the PCA of large matrices; "
                            "SVD cost ~ rows^2 * cols (1024 x 4096: ~2-3 s on 2 CPU cores)", 1024)
    max_elems: int = doc("elements per streamed row block (bounds memory: ~2 float64 buffers of this size)", 1 << 22)
    seed: int = doc("seed of the PCA row subsample", 0)
    out_dir: str = doc("directory for stats.csv, summary.md and stats.png", "runs/stats")

    def __post_init__(self) -> None:
        check(len(self.checkpoints) > 0, "checkpoints", "give at least one checkpoint path")
        check(not self.labels or len(self.labels) == len(self.checkpoints), "labels",
              f"{len(self.labels)} label(s) for {len(self.checkpoints)} checkpoint(s)")
        check(len(set(self.labels)) == len(self.labels), "labels", f"labels must be unique: {self.labels}")
        check(len(self.blocks) > 0, "blocks", "choose at least one block")
        for b in self.blocks:
            check(b in BLOCKS, "blocks", f"{b!r} is not one of {list(BLOCKS)}")
        for fname in ("include", "exclude"):
            pat = getattr(self, fname)
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as e:
                    check(False, fname, f"invalid regex {pat!r}: {e}")
        check(self.pca_components >= 1, "pca_components", f"must be >= 1, got {self.pca_components}")
        check(self.max_pca_rows >= 2, "max_pca_rows", f"must be >= 2, got {self.max_pca_rows}")
        check(self.max_elems >= 1, "max_elems", f"must be >= 1, got {self.max_elems}")


# -- moments ---------------------------------------------------------------------------
Moments = tuple[int, float, float, float, float]  # n, mean, M2, M3, M4 (central sums)


def _block_moments(x: torch.Tensor) -> Moments:
    """Central moment sums of one float64 block (``x`` is overwritten)."""
    n = x.numel()
    mean = float(x.mean())
    d = x.sub_(mean)
    r = float(d.mean())  # second-pass correction of the block mean's rounding error
    d.sub_(r)
    mean += r
    d2 = d * d
    return n, mean, float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2))


def _merge(a: Moments, b: Moments) -> Moments:
    """Combine two sets of central moment sums (Chan et al. 1979, Pébay 2008, eq. 3.1)."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    dn = delta / n
    mean = ma + dn * nb
    m2 = m2a + m2b + delta * dn * na * nb
    m3 = m3a + m3b + delta * dn * dn * na * nb * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a)
    m4 = (m4a + m4b + delta * dn ** 3 * na * nb * (na * na - na * nb + nb * nb)
          + 6.0 * dn * dn * (na * na * m2b + nb * nb * m2a) + 4.0 * dn * (na * m3b - nb * m3a))
    return n, mean, m2, m3, m4


def _nonfinite_error(ck: Checkpoint, name: str, bad: int) -> ValueError:
    return ValueError(f"tensor {name!r} in {ck.tensors[name].file} contains {bad} NaN/Inf value(s)")


def _moment_pass(ck: Checkpoint, name: str, max_elems: int) -> dict[str, float]:
    acc: Moments = (0, 0.0, 0.0, 0.0, 0.0)
    lo, hi = math.inf, -math.inf
    for block in ck.iter_rows(name, max_elems):
        x = block.reshape(-1).to(torch.float64, copy=True)  # mutated below
        if x.numel() == 0:
            continue
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            raise _nonfinite_error(ck, name, int((~finite).sum()))
        del finite
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        acc = _merge(acc, _block_moments(x))
        del x
    n, mean, m2, m3, m4 = acc
    nan = float("nan")
    var = m2 / n if n else nan
    std = math.sqrt(var) if n else nan
    skew = math.sqrt(n) * m3 / m2 ** 1.5 if n and m2 > 0 else nan
    kurt = n * m4 / (m2 * m2) - 3.0 if n and m2 > 0 else nan
    return {"numel": n, "mean": mean if n else nan, "var": var, "std": std, "skewness": skew,
            "excess_kurtosis": kurt, "min": lo if n else nan, "max": hi if n else nan}


def _tail_pass(
    ck: Checkpoint, name: str, mean: float, std: float, max_elems: int,
    keep_rows: np.ndarray | None = None,
) -> tuple[int, torch.Tensor | None]:
    """Count ``|x - mean| > 3σ`` and gather the rows ``keep_rows`` (sorted) as float32."""
    count, offset, kept = 0, 0, []
    thr = 3.0 * std
    for block in ck.iter_rows(name, max_elems):
        if math.isfinite(thr):
            count += int(((block.to(torch.float64) - mean).abs_() > thr).sum())
        if keep_rows is not None:
            rows = block.shape[0]
            lo, hi = np.searchsorted(keep_rows, [offset, offset + rows])
            if hi > lo:
                idx = torch.from_numpy(keep_rows[lo:hi] - offset)
                kept.append(block.reshape(rows, -1)[idx].to(torch.float32))
            offset += rows
    return count, (torch.cat(kept) if kept else None)


def tensor_moments(ck: Checkpoint, name: str, max_elems: int = 1 << 22) -> dict[str, float]:
    """Streaming float64 moments of one tensor (see module doc): numel, mean, var, std
    (population), skewness, excess kurtosis, min, max, frac_3sigma. Skewness/kurtosis are
    NaN for a constant tensor. Raises ValueError naming tensor and file on NaN/Inf."""
    out = _moment_pass(ck, name, max_elems)
    count, _ = _tail_pass(ck, name, out["mean"], out["std"], max_elems)
    out["frac_3sigma"] = count / out["numel"] if out["numel"] else float("nan")
    return out


# -- PCA -------------------------------------------------------------------------------
def subsample_rows(n_rows: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted, deterministic subset of ``min(n_rows, max_rows)`` row indices."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))


def explained_variance(tensor2d: torch.Tensor, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """All PCA explained-variance ratios of the rows of a matrix (columns centered),
    ``svdvals**2 / sum`` in float32; rows subsampled to ``max_rows``. Zeros if constant."""
    x = tensor2d.reshape(tensor2d.shape[0], -1) if tensor2d.dim() != 2 else tensor2d
    if max_rows is not None and x.shape[0] > max_rows:
        x = x[torch.from_numpy(subsample_rows(x.shape[0], max_rows, seed))]
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("matrix contains NaN/Inf values")
    x = x - x.mean(dim=0, keepdim=True)
    if x.shape[0] < x.shape[1]:  # same singular values; LAPACK is ~2x faster on tall input
        x = x.T.contiguous()
    s2 = torch.linalg.svdvals(x).double().square().numpy()
    total = s2.sum()
    return s2 / total if total > 0 else np.zeros_like(s2)


def pca_spectrum(
    tensor2d: torch.Tensor, k: int, max_rows: int | None = None, seed: int = 0
) -> np.ndarray:
    """Explained-variance ratios of the top-``k`` principal components (fewer if rank-limited)."""
    return explained_variance(tensor2d, max_rows, seed)[:k]


def components_for_variance(ratios: np.ndarray, frac: float = 0.9) -> int:
    """Smallest number of leading components whose ratios sum to >= ``frac`` (0 if none)."""
    if len(ratios) == 0 or ratios.sum() <= 0:
        return 0
    return int(min(np.searchsorted(np.cumsum(ratios), frac - 1e-12) + 1, len(ratios)))


# -- per tensor and per run ------------------------------------------------------------
def analyze_tensor(ck: Checkpoint, name: str, cfg: StatsConfig) -> dict[str, Any]:
    """One stats.csv row (without ``model``): moments plus PCA of the (subsampled) rows."""
    info = ck.tensors[name]
    row: dict[str, Any] = {
        "name": name, "layer": info.layer, "block": info.block, "role": info.role,
        "shape": "x".join(map(str, info.shape)), "dtype": info.dtype,
    }
    row.update(_moment_pass(ck, name, cfg.max_elems))
    is_matrix = len(info.shape) >= 2 and info.shape[0] >= 2 and info.numel // info.shape[0] >= 2
    keep = subsample_rows(info.shape[0], cfg.max_pca_rows, cfg.seed) if is_matrix else None
    count, rows = _tail_pass(ck, name, row["mean"], row["std"], cfg.max_elems, keep)
    row["frac_3sigma"] = count / row["numel"] if row["numel"] else float("nan")
    evr = explained_variance(rows) if rows is not None else np.zeros(0)
    row["pca_k90"] = components_for_variance(evr, 0.9) if rows is not None else None
    row["pca_evr"] = evr[: cfg.pca_components]
    return row


def _fnum(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _evr(v: Any) -> np.ndarray:
    if isinstance(v, str):
        return np.array([float(t) for t in v.split()], dtype=np.float64)
    return np.asarray(v if v is not None else [], dtype=np.float64)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (model, block): models in first-seen order, blocks as in ``BLOCKS``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["model"]), str(r["block"])), []).append(r)
    models = list(dict.fromkeys(m for m, _ in groups))
    order = {b: i for i, b in enumerate(BLOCKS)}
    return dict(sorted(groups.items(), key=lambda kv: (models.index(kv[0][0]), order.get(kv[0][1], 9))))


def _nanagg(fn, vals: list[float]) -> float:
    a = np.array(vals, dtype=np.float64)
    return float(fn(a[~np.isnan(a)])) if (~np.isnan(a)).any() else float("nan")


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown table by model × block: mean of each statistic and max excess kurtosis.

    ``rows`` are stats.csv rows as dicts (numbers or their strings); NaNs are ignored."""
    head = ["model", "block", "tensors"] + [h for _, h in SUMMARY_STATS[:5]]
    head += ["max excess kurtosis"] + [h for _, h in SUMMARY_STATS[5:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, block), rs in _groups(rows).items():
        means = {c: _nanagg(np.mean, [_fnum(r[c]) for r in rs]) for c, _ in SUMMARY_STATS}
        kmax = _nanagg(np.max, [_fnum(r["excess_kurtosis"]) for r in rs])
        vals = [means[c] for c, _ in SUMMARY_STATS[:5]] + [kmax] + [means[c] for c, _ in SUMMARY_STATS[5:]]
        lines.append("| " + " | ".join([model, block, str(len(rs))] + [f"{v:.4g}" for v in vals]) + " |")
    return "\n".join(lines) + "\n"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, np.ndarray):
        return " ".join(f"{x:.8g}" for x in v)
    return repr(v) if isinstance(v, float) else v


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _write_plot(path: Path, rows: list[dict[str, Any]], k: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for i, ((model, block), rs) in enumerate(_groups(rows).items()):
        color, marker = f"C{i % 10}", {"attn": "o", "mlp": "s"}.get(block, "^")
        by_layer: dict[int, list[float]] = {}
        for r in rs:
            if r["layer"] not in (None, "") and not math.isnan(_fnum(r["excess_kurtosis"])):
                by_layer.setdefault(int(r["layer"]), []).append(_fnum(r["excess_kurtosis"]))
        if by_layer:
            layers = sorted(by_layer)
            pts = [(layer, v) for layer in layers for v in by_layer[layer]]
            ax1.scatter(*zip(*pts), s=10, alpha=0.35, color=color, marker=marker)
            ax1.plot(layers, [np.mean(by_layer[la]) for la in layers], color=color,
                     marker=marker, ms=4, label=f"{model} / {block} (mean)")
        curves = [_evr(r["pca_evr"]) for r in rs]
        curves = [np.pad(c[:k], (0, k - len(c[:k]))) for c in curves if len(c)]
        if curves:
            cum = np.cumsum(np.mean(curves, axis=0))
            ax2.plot(np.arange(1, k + 1), cum, color=color, marker=marker, ms=3,
                     label=f"{model} / {block}")
    ax1.axhline(0.0, color="gray", lw=0.8, ls=":")
    ax1.set(xlabel="layer", ylabel="excess kurtosis", title="Excess kurtosis per layer")
    ax2.axhline(0.9, color="gray", lw=0.8, ls=":")
    ax2.set(xlabel="principal component", ylabel="cumulative explained variance",
            title=f"Mean PCA explained variance (top {k})", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def _labels(cfg: StatsConfig) -> list[str]:
    if cfg.labels:
        return list(cfg.labels)
    names = [Path(p).stem if Path(p).suffix == ".safetensors" else Path(p).resolve().name
             for p in cfg.checkpoints]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def run_stats(cfg: StatsConfig, echo: bool = True) -> Path:
    """Analyze every selected tensor of every checkpoint; write ``stats.csv``, ``summary.md``
    and ``stats.png`` atomically into ``cfg.out_dir``; print the summary table (``echo``)
    and return the path of ``summary.md``."""
    log = get_logger()
    out = Path(cfg.out_dir)
    rows: list[dict[str, Any]] = []
    for label, path in zip(_labels(cfg), cfg.checkpoints):
        with Checkpoint(path) as ck:
            infos = ck.select(blocks=cfg.blocks, include=cfg.include, exclude=cfg.exclude, mixed_dtypes=True)
            if not infos:
                raise ValueError(f"{path}: no tensors selected (blocks={cfg.blocks}, "
                                 f"include={cfg.include!r}, exclude={cfg.exclude!r})")
            log.info("stats: %s (%s): %d tensors", label, path, len(infos))
            t0 = time.time()
            for i, info in enumerate(infos):
                rows.append({"model": label, **analyze_tensor(ck, info.name, cfg)})
                log.debug("stats: [%d/%d] %s", i + 1, len(infos), info.name)
            log.info("stats: %s done in %.1fs", label, time.time() - t0)
    table = format_summary(rows)
    _write_csv(out / "stats.csv", rows)
    _write_plot(out / "stats.png", rows, cfg.pca_components)
    text = (f"# Weight statistics\n\nPer model × block: mean over tensors of each statistic "
            f"(population moments, excess kurtosis = m4/m2² − 3), max excess kurtosis, "
            f"fraction of entries with |x − mean| > 3σ, components for 90% PCA variance "
            f"(≤ {cfg.max_pca_rows} rows).\n\n{table}")
    summary = out / "summary.md"
    atomic_write_text(summary, text)
    if echo:
        print(table, end="")
    return summary
