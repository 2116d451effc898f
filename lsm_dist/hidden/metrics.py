"""Geometry of merged hidden states relative to the two parents, per layer.

All per-token metrics take ``h_m`` (merged), ``h_a``, ``h_b`` of shape ``(n, d)`` and return
``(n,)``; tokens where a metric is undefined are NaN and left out of the means.

* **Midness** ``1 − ‖h_m − (h_a + h_b)/2‖ / (‖h_a − h_b‖ / 2)``: 1 at the midpoint, 0 when
  ``h_m`` is as far from the midpoint as a parent is (e.g. equals a parent), negative
  farther away. Undefined where ``‖h_a − h_b‖ ≤ 1e-6 · max(‖h_a‖, ‖h_b‖)`` (the parents agree).
  (The seed paper names the metric; this exact formula is ours.)
* **ArcRatio** ``∠(h_a, h_m) / ∠(h_a, h_b)``: how far along the arc from ``h_a`` to ``h_b`` the
  merged direction is (SLERP at α gives exactly α; LERP bends toward the middle when the
  norms differ). Undefined where ``∠(h_a, h_b) < 1e-4`` rad.
* **ArcNormDev** ``‖h_m‖ / ((1 − t)‖h_a‖ + t‖h_b‖) − 1`` with ``t`` = ArcRatio clipped to [0, 1]:
  the norm deviation from the SLERP geodesic at the same position (0 for SLERP, < 0 for
  LERP, whose chord shrinks the norm: ``cos(θ/2) − 1`` at the middle of equal norms).
* **OffPlane** ``‖h_m − P h_m‖ / ‖h_m‖`` with ``P`` the projection on ``span(h_a, h_b)``: 0 for
  LERP and SLERP, > 0 for RegMean and for weight merging.
* **cos** cosine similarity of ``h_m`` with each parent.
* **CKA** linear CKA (Kornblith et al., 2019) between the token×feature matrices:
  ``‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`` on column-centered ``X``, ``Y`` (invariant to orthogonal
  maps and isotropic scaling; 1 for identical representations).

``compare_merges`` runs the parents alone, the hidden-state merger and (optionally) a
weight-merged model on the same calibration batches and reports every metric per layer for
both merges, against the parents run alone (models 0 and 1 when more are merged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

METRICS = ("midness", "arc_ratio", "arc_norm_dev", "off_plane", "cos_a", "cos_b", "cka_a", "cka_b")


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.double().reshape(-1, x.shape[-1])


def midness(h_m: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
    m, a, b = _f(h_m), _f(h_a), _f(h_b)
    half = (a - b).norm(dim=-1) / 2
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1))
    out = 1 - (m - (a + b) / 2).norm(dim=-1) / half.clamp_min(1e-300)
    return torch.where(half * 2 > 1e-6 * scale, out, torch.full_like(out, math.nan))


def _angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def arc_ratio(h_m: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    m, a, b = _f(h_m), _f(h_a), _f(h_b)
    ab = _angle(a, b)
    out = _angle(a, m) / ab.clamp_min(1e-300)
    return torch.where(ab >= eps, out, torch.full_like(out, math.nan))


def arc_norm_dev(h_m: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    m, a, b = _f(h_m), _f(h_a), _f(h_b)
    t = arc_ratio(m, a, b, eps).clamp(0.0, 1.0)
    geo = (1 - t) * a.norm(dim=-1) + t * b.norm(dim=-1)
    return m.norm(dim=-1) / geo.clamp_min(1e-300) - 1


def off_plane(h_m: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
    m, a, b = _f(h_m), _f(h_a), _f(h_b)
    e1 = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    v = b - (b * e1).sum(-1, keepdim=True) * e1
    vn = v.norm(dim=-1, keepdim=True)
    e2 = torch.where(vn > 1e-12 * b.norm(dim=-1, keepdim=True), v / vn.clamp_min(1e-300), torch.zeros_like(v))
    resid2 = (m * m).sum(-1) - (m * e1).sum(-1) ** 2 - (m * e2).sum(-1) ** 2
    return resid2.clamp_min(0).sqrt() / m.norm(dim=-1).clamp_min(1e-300)


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _f(x), _f(y)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-300)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``(n, d1)`` and ``(n, d2)`` feature matrices (rows = tokens)."""
    x, y = _f(x), _f(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = (y.T @ x).norm() ** 2
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else math.nan


def _nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


def layer_metrics(h_m: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor) -> dict[str, float]:
    """Every metric (means over tokens) for one layer's ``(n, d)`` states."""
    return {
        "midness": _nanmean(midness(h_m, h_a, h_b)),
        "arc_ratio": _nanmean(arc_ratio(h_m, h_a, h_b)),
        "arc_norm_dev": _nanmean(arc_norm_dev(h_m, h_a, h_b)),
        "off_plane": _nanmean(off_plane(h_m, h_a, h_b)),
        "cos_a": _nanmean(cosine(h_m, h_a)),
        "cos_b": _nanmean(cosine(h_m, h_b)),
        "cka_a": linear_cka(h_m, h_a),
        "cka_b": linear_cka(h_m, h_b),
    }


def _valid(states: Sequence[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per layer ``(n_valid, d)`` float32 CPU rows (non-padding tokens)."""
    out = []
    for h in states:
        x = h.detach().float().cpu().reshape(-1, h.shape[-1])
        out.append(x if mask is None else x[mask.reshape(-1).bool().cpu()])
    return out


@torch.no_grad()
def compare_merges(merger, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                   weight_model: nn.Module | None = None) -> dict:  # fmt: skip
    """Per-layer metrics of the hidden merge (and of ``weight_model``) vs the parents.

    Returns ``{"layers": [0..L-1], "mixed": {layer: α}, "op": ..., "hidden": [row per layer],
    "weight": [row per layer] or None}``; each row holds ``METRICS`` plus ``layer``."""
    from lsm_dist.hidden.merger import layer_states

    dev = merger.device
    acc: dict[str, list[list[torch.Tensor]]] = {"a": [], "b": [], "hidden": [], "weight": []}
    for ids, mask in batches:
        ids = ids.to(dev)
        m = None if mask is None else mask.to(dev)
        acc["a"].append(_valid(layer_states(merger.models[0], ids, m), mask))
        acc["b"].append(_valid(layer_states(merger.models[1], ids, m), mask))
        acc["hidden"].append(_valid(merger.forward(ids, m, return_hidden=True).hidden, mask))
        if weight_model is not None:
            acc["weight"].append(_valid(layer_states(weight_model, ids, m), mask))
    n_layers = merger.num_layers
    cat = {k: [torch.cat([b[i] for b in v]) for i in range(n_layers)] for k, v in acc.items() if v}
    report = {"layers": list(range(n_layers)), "mixed": dict(merger.mix), "op": merger.op,
              "hidden": [], "weight": [] if weight_model is not None else None}  # fmt: skip
    for i in range(n_layers):
        for kind in ("hidden", "weight"):
            if kind in cat:
                row = {"layer": i, **layer_metrics(cat[kind][i], cat["a"][i], cat["b"][i])}
                report[kind].append(row)
    return report


def summarize(rows: Sequence[dict], layers: Sequence[int] | None = None) -> dict[str, float]:
    """Means of each metric over ``layers`` (default: all), plus the last layer's CKA."""
    sel = [r for r in rows if layers is None or r["layer"] in set(layers)] or list(rows)
    out = {}
    for k in METRICS:
        vals = [r[k] for r in sel if not math.isnan(r[k])]
        out[f"mean_{k}"] = sum(vals) / len(vals) if vals else math.nan
    if rows:
        out["last_cka_a"], out["last_cka_b"] = rows[-1]["cka_a"], rows[-1]["cka_b"]
    return out
