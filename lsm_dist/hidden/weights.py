"""Weight-space baselines of the hidden-state operators, built in memory.

``weight_merge(models, op, alpha, layers=None, calib=None)`` returns a new model (a deep copy
of model 0 with merged parameters), with the mixing weights ``w = mix_weights(N, α)`` of
``lsm_dist.hidden.ops``:

* ``lerp``    ``θ = Σ_i w_i θ_i`` per tensor (the ``soup`` merge operator).
* ``slerp``   two models, per tensor flattened: SLERP of the direction with the norm
  interpolated linearly (the same formula as on hidden states: the ``slerp_norm`` merge
  operator), ``lerp`` where the two tensors are (anti)parallel within ``eps`` radians.
* ``regmean`` RegMean (Jin et al., 2023) for every ``nn.Linear`` of the merged decoder
  layers: ``Wᵀ = (Σ_i w_i Ĝ_i)⁻¹ Σ_i w_i Ĝ_i W_iᵀ`` with ``G_i = X_iᵀX_i / n`` the Gram of
  that linear's inputs in model i on ``calib`` batches, ``Ĝ = γG + (1−γ)Diag(G) + λ·tr(G)/d·I``;
  biases, norms and other tensors use ``lerp``.

``layers``: only the tensors of those decoder layers are merged (the rest stay model 0's);
``None`` merges every tensor, embeddings / final norm / head included. Integer buffers (and
anything that is not floating point) are model 0's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lsm_dist.hidden.ops import OPS, mix_weights
from lsm_dist.merge.operators import MergeParams, apply_operator

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _selected(name: str, layers: set[int] | None) -> bool:
    if layers is None:
        return True
    i = _layer_of(name)
    return i is not None and i in layers


@torch.no_grad()
def linear_input_grams(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                       layers: set[int] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{linear module name: XᵀX / n}`` over non-padding tokens (float64), via forward hooks."""
    from lsm_dist.hidden.merger import positions_from_mask

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor | None] = [None]
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and _layer_of(name + ".") is not None and _selected(name + ".", layers):
            def hook(_m, inp, _out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                if keep[0] is not None:
                    x = x[keep[0]]
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(mod.register_forward_hook(hook))
    dev = next(model.parameters()).device
    try:
        for ids, mask in batches:
            keep[0] = None if mask is None else mask.reshape(-1).bool().to(dev)
            kw = {}
            if mask is not None:
                kw = {"attention_mask": mask.to(dev),
                      "position_ids": positions_from_mask(mask.to(dev), ids.shape[1])}  # fmt: skip
            model(input_ids=ids.to(dev), use_cache=False, **kw)
    finally:
        for h in handles:
            h.remove()
    return {n: s / counts[n] for n, s in sums.items()}


def _regmean_linear(ws: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float],
                    shrink: float, ridge: float) -> torch.Tensor:  # fmt: skip
    d = grams[0].shape[0]
    reg = []
    for g in grams:
        diag = torch.diagonal(g)
        gh = shrink * g + (1 - shrink) * torch.diag(diag)
        reg.append(gh + ridge * (diag.sum() / d).clamp_min(1e-30) * torch.eye(d, dtype=g.dtype, device=g.device))
    total = sum(w * g for w, g in zip(weights, reg))
    rhs = sum(w * (g @ wt.double().T) for w, g, wt in zip(weights, reg, ws))
    return torch.linalg.solve(total, rhs).T.to(ws[0].dtype)


@torch.no_grad()
def weight_merge(models: Sequence[nn.Module], op: str = "lerp", alpha: float = 0.5,
                 layers: Iterable[int] | None = None,
                 calib: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
                 slerp_eps: float = 1e-4, regmean_shrink: float = 0.9,
                 regmean_ridge: float = 1e-3) -> nn.Module:  # fmt: skip
    """A new model whose tensors merge ``models``' (see module docstring)."""
    from lsm_dist.hidden.merger import check_compatible

    check_compatible(models)
    if op not in OPS:
        raise ValueError(f"op: {op!r} is not one of {list(OPS)}")
    if op == "slerp" and len(models) != 2:
        raise ValueError(f"op: slerp merges exactly two models, got {len(models)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    sel = None if layers is None else {int(i) for i in layers}
    w = mix_weights(len(models), alpha)
    sds = [m.state_dict() for m in models]
    grams: list[dict[str, torch.Tensor]] = []
    if op == "regmean":
        if not calib:
            raise ValueError("op regmean: weight RegMean needs calib batches (input_ids, mask)")
        grams = [linear_input_grams(m, calib, sel) for m in models]
    merged_sd = {}
    for name, t0 in sds[0].items():
        if not t0.is_floating_point() or not _selected(name, sel):
            continue
        ts = [sd[name] for sd in sds]
        if ts[0].shape != ts[1].shape or any(t.shape != t0.shape for t in ts):
            raise ValueError(f"tensor {name}: shapes {[tuple(t.shape) for t in ts]} differ")
        mod = name.rsplit(".", 1)[0]
        if op == "regmean" and name.endswith(".weight") and mod in grams[0]:
            merged_sd[name] = _regmean_linear(ts, [g[mod] for g in grams], w, regmean_shrink, regmean_ridge)
        elif op == "slerp" and alpha not in (0.0, 1.0):
            p = MergeParams(lambda_=alpha, eps=slerp_eps)
            merged_sd[name] = apply_operator("slerp_norm", ts, p, key=name).to(t0.dtype)
        else:
            merged_sd[name] = apply_operator("soup", ts, MergeParams(weights=w), key=name).to(t0.dtype)
    out = copy.deepcopy(models[0])
    missing = out.load_state_dict(merged_sd, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"unexpected keys {missing.unexpected_keys}")
    return out.eval()
