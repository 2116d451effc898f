"""The merge operators mergekit users expect, each against a small case computed by hand (the
comments give the arithmetic), plus per-input parameters and settings that vary by tensor and
depth."""

from __future__ import annotations

import math

import pytest
import torch

from lsm_dist.config import ConfigError
from lsm_dist.merge import OPERATORS, MergeParams, apply_operator, make_generator
from lsm_dist.merge.settings import evaluate, resolve_params
from lsm_dist.merge.task_vectors import della_keep_prob


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


D1 = t(0.1, -0.5, 0.3, 2.0, -0.2, 0.05, 0.4, -1.0, 0.0, 0.6)
D2 = t(-0.2, 0.3, 0.15, -0.4, 0.5, 0.9, -0.05, 0.7, 0.25, -0.1)
ZERO = torch.zeros(10)


def test_registry_has_the_methods_mergekit_users_expect():
    want = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "passthrough",
            "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "slerp_norm"}
    assert want <= set(OPERATORS)
    assert OPERATORS["model_stock"].needs_base and OPERATORS["nuslerp"].base == "optional"
    assert OPERATORS["della"].per_input == ("density", "epsilon")


def test_breadcrumbs_drops_outliers_and_small_entries():
    # |D1| ascending: 0(8) .05(5) .1(0) .2(4) | .3(2) .4(6) .5(1) .6(9) 1.0(7) | 2.0(3)
    # density .5, gamma .1 of 10: keep 5, drop the top 1 and the bottom 10-5-1 = 4
    out = apply_operator("breadcrumbs", [D1], MergeParams(density=0.5, gamma=0.1), base=ZERO)
    assert torch.equal(out, t(0, -0.5, 0.3, 0, 0, 0, 0.4, -1.0, 0, 0.6))
    base = torch.ones(10)
    out = apply_operator("breadcrumbs", [base + D1], MergeParams(density=0.5, gamma=0.1, weights=[2.0]),
                         base=base)
    assert torch.allclose(out, base + 2 * t(0, -0.5, 0.3, 0, 0, 0, 0.4, -1.0, 0, 0.6))


def test_breadcrumbs_ties_per_input_density_and_normalize():
    # D2 kept (same rule): idx 8 1 3 4 7 -> m2 = [0 .3 0 -.4 .5 0 0 .7 .25 0]
    m1 = t(0, -0.5, 0.3, 0, 0, 0, 0.4, -1.0, 0, 0.6)
    m2 = t(0, 0.3, 0, -0.4, 0.5, 0, 0, 0.7, 0.25, 0)
    p = MergeParams(density=[0.5, 0.5], gamma=0.1, weights=[1.0, 0.5])
    # Σ w m = [0 -.35 .3 -.2 .25 0 .4 -.65 .125 .6]: signs [0 - + - + 0 + - + +]; agreeing terms:
    want_sum = t(0, -0.5, 0.3, -0.2, 0.25, 0, 0.4, -1.0, 0.125, 0.6)
    assert torch.allclose(apply_operator("breadcrumbs_ties", [D1, D2], p, base=ZERO), want_sum)
    # normalize: ÷ the agreeing weights (1 or 0.5 here)
    want_mean = t(0, -0.5, 0.3, -0.4, 0.5, 0, 0.4, -1.0, 0.25, 0.6)
    out = apply_operator("breadcrumbs_ties", [D1, D2], MergeParams(density=0.5, gamma=0.1, weights=[1.0, 0.5],
                                                                   normalize=True), base=ZERO)
    assert torch.allclose(out, want_mean)
    # a density per input: input 1 keeps everything (density 1)
    out = apply_operator("breadcrumbs", [D1, D2], MergeParams(density=[0.5, 1.0], gamma=0.1), base=ZERO)
    assert torch.allclose(out, m1 + D2)
    assert not torch.allclose(out, m1 + m2)
    with pytest.raises(ConfigError, match=r"params.density: has 3 value\(s\) for 2 input"):
        apply_operator("breadcrumbs", [D1, D2], MergeParams(density=[0.5, 0.5, 0.5]), base=ZERO)


def _masks(seed: int, key: str, probs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The documented masks: one uniform draw per entry and input, kept where u < keep prob."""
    g = make_generator(seed, key)
    return [(torch.rand(10, generator=g) < p).float() for p in probs]


def _dare_masks(seed: int, key: str, probs: list[float], n: int = 10) -> list[torch.Tensor]:
    """DARE's documented masks (merged by row blocks): input i's draws for row block j come
    from the generator of ``(seed, f"{key}:{i}:{j}")``; a 10-entry tensor is one block."""
    return [(torch.rand(n, generator=make_generator(seed, f"{key}:{i}:0")) < p).float()
            for i, p in enumerate(probs)]


def test_dare_ties_per_input_density_inverse_and_l1():
    d = [0.3, 0.8]
    k1, k2 = _dare_masks(7, "w", d)
    p = MergeParams(density=d, weights=[1.0, 1.0], seed=7)
    out = apply_operator("dare_ties", [D1, D2], p, base=ZERO, key="w")
    e1, e2 = D1 * k1 / 0.3, D2 * k2 / 0.8  # inverse rescale: 1 / keep probability
    s = e1 + e2
    agree1 = (torch.sign(e1) == torch.sign(s)) & (e1 != 0)
    agree2 = (torch.sign(e2) == torch.sign(s)) & (e2 != 0)
    want = torch.where(agree1, e1, 0) + torch.where(agree2, e2, 0)  # dare_ties: no normalize
    assert torch.allclose(out, want)
    # rescale: l1 (mergekit): each kept delta scaled to the L1 norm of the whole delta
    out = apply_operator("dare_linear", [D1], MergeParams(density=[0.3], rescale="l1", seed=7), base=ZERO, key="w")
    kept = D1 * k1
    assert torch.allclose(out, kept * (D1.abs().sum() / kept.abs().sum()))


def test_della_keep_probabilities_and_merge():
    row = t(0.1, -0.4, 0.2, 0.3)
    # magnitude ranks 0 3 1 2 of 4: p = .5 - .15 + rank/3 · .3
    assert torch.allclose(della_keep_prob(row, 0.5, 0.15), t(0.35, 0.65, 0.45, 0.55))
    mat = torch.stack([row, -row * 2])  # ranks per row (the second row has the same order)
    assert torch.allclose(della_keep_prob(mat, 0.5, 0.15)[1], t(0.35, 0.65, 0.45, 0.55))
    probs = [della_keep_prob(D1, 0.5, 0.1), della_keep_prob(D2, 0.6, 0.2)]
    k1, k2 = _masks(1, "x", probs)
    p = MergeParams(density=[0.5, 0.6], epsilon=[0.1, 0.2], weights=[0.6, 0.4], seed=1)
    e1, e2 = 0.6 * D1 * k1 / probs[0], 0.4 * D2 * k2 / probs[1]
    lin = apply_operator("della_linear", [D1, D2], p, base=ZERO, key="x")
    assert torch.allclose(lin, e1 + e2, atol=1e-6)
    s = e1 + e2
    a1 = ((torch.sign(e1) == torch.sign(s)) & (e1 != 0)).float()
    a2 = ((torch.sign(e2) == torch.sign(s)) & (e2 != 0)).float()
    div = 0.6 * a1 + 0.4 * a2
    want = (e1 * a1 + e2 * a2) / torch.where(div == 0, 1.0, div)  # della normalizes by default
    assert torch.allclose(apply_operator("della", [D1, D2], p, base=ZERO, key="x"), want, atol=1e-6)
    with pytest.raises(ValueError, match="density ± epsilon"):
        apply_operator("della", [D1], MergeParams(density=0.9, epsilon=0.14), base=ZERO)


def test_ties_sign_tie_rule():
    # entry 0: +1 and -1 sum to exactly 0
    xs, base = [t(1.0, 2.0), t(-1.0, 1.0)], t(0.0, 0.0)
    zero = apply_operator("ties", xs, MergeParams(density=1.0), base=base)
    assert torch.equal(zero, t(0.0, 1.5))  # no sign elected: entry stays at the base
    pos = apply_operator("ties", xs, MergeParams(density=1.0, sign_tie="positive"), base=base)
    assert torch.equal(pos, t(1.0, 1.5))  # mergekit: + wins


def test_model_stock():
    base = t(1.0, 1.0)
    # offsets (1, 0) and (1, 1): cos = 1/√2, t = 2c / (1 + c), avg = (2, 1.5)
    c = 1 / math.sqrt(2)
    tt = 2 * c / (1 + c)
    out = apply_operator("model_stock", [t(2.0, 1.0), t(2.0, 2.0)], base=base)
    assert torch.allclose(out, tt * t(2.0, 1.5) + (1 - tt) * base)
    # orthogonal offsets: cos 0 -> t 0 -> the base
    assert torch.allclose(apply_operator("model_stock", [t(2.0, 1.0), t(1.0, 2.0)], base=base), base)
    # per row (filter_wise): row 0 orthogonal, row 1 identical offsets (cos 1 -> t 1 -> the mean)
    b2 = torch.zeros(2, 2)
    out = apply_operator("model_stock", [t(1, 0, 1, 1).reshape(2, 2), t(0, 1, 1, 1).reshape(2, 2)],
                         MergeParams(granularity="vector"), base=b2)
    assert torch.allclose(out, t(0, 0, 1, 1).reshape(2, 2))


def test_nuslerp():
    e1, e2 = t(1.0, 0.0), t(0.0, 1.0)
    # λ = w1/(w0+w1) = .75, θ = π/2: (sin(π/8), sin(3π/8))
    want = t(math.sin(math.pi / 8), math.sin(3 * math.pi / 8))
    assert torch.allclose(apply_operator("nuslerp", [e1, e2], MergeParams(weights=[1, 3])), want)
    base = t(1.0, -1.0)
    out = apply_operator("nuslerp", [base + e1, base + e2], MergeParams(weights=[1, 3]), base=base)
    assert torch.allclose(out, base + want)  # of the task vectors
    rows = apply_operator("nuslerp", [torch.stack([e1, e1]), torch.stack([e2, e1 * 3])],
                          MergeParams(weights=[1, 1], granularity="vector"))
    assert torch.allclose(rows, torch.stack([t(1, 1) / math.sqrt(2), t(2, 0)]))  # row 1 colinear: lerp


def test_multislerp_and_karcher():
    e1, e2 = t(2.0, 0.0), t(0.0, 1.0)
    # units (1,0), (0,1), weights .75/.25: weighted mean direction (.75, .25)/|.|; the tangent
    # mean is 0 there, so that is the result, times the weighted norm .75·2 + .25·1
    d = t(0.75, 0.25) / math.hypot(0.75, 0.25)
    out = apply_operator("multislerp", [e1, e2], MergeParams(weights=[0.75, 0.25]))
    assert torch.allclose(out, 1.75 * d, atol=1e-6)
    # karcher: the weighted Karcher mean on the circle is at angle .25·90° = 22.5°
    out = apply_operator("karcher", [e1, e2], MergeParams(weights=[0.75, 0.25], max_iter=50, tol=1e-7))
    assert torch.allclose(out, 1.75 * t(math.cos(math.pi / 8), math.sin(math.pi / 8)), atol=1e-4)
    # uniform (mergekit's karcher): the midpoint, scaled by the mean norm 1.5
    out = apply_operator("karcher", [e1, e2], MergeParams())
    assert torch.allclose(out, 1.5 * t(1, 1) / math.sqrt(2), atol=1e-5)


def test_linear_passthrough_slerp_norm():
    xs = [t(1.0, 2.0), t(3.0, 0.0), t(-1.0, 1.0)]
    p = MergeParams(weights=[1.0, 0.3, 0.5])
    assert torch.allclose(apply_operator("linear", xs, p), (xs[0] + 0.3 * xs[1] + 0.5 * xs[2]) / 1.8)
    p = MergeParams(weights=[1.0, 0.3, 0.5], normalize=False)
    assert torch.allclose(apply_operator("linear", xs, p), xs[0] + 0.3 * xs[1] + 0.5 * xs[2])
    assert torch.equal(apply_operator("passthrough", [xs[0]]), xs[0])
    assert torch.equal(apply_operator("passthrough", [xs[0]], MergeParams(scale=0.5)), t(0.5, 1.0))
    # direction halfway on the circle, norm (1 + 2)/2
    out = apply_operator("slerp_norm", [t(1.0, 0.0), t(0.0, 2.0)], MergeParams(lambda_=0.5))
    assert torch.allclose(out, 1.5 * t(1, 1) / math.sqrt(2))


def test_settings_gradients_and_filters():
    grad = [0.0, 0.5, 0.3, 0.7, 1.0]
    # t = 1/3 of 5 points: position 4/3 -> .5·(2/3) + .3·(1/3)
    assert evaluate(grad, "x", 1 / 3) == pytest.approx(0.4333333)
    assert evaluate(grad, "x", 1.0) == 1.0 and evaluate(grad, "x", 0.0) == 0.0
    conds = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    assert evaluate(conds, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.2
    assert evaluate(conds, "model.layers.0.mlp.up_proj.weight", 0.25) == 0.75
    assert evaluate(conds, "model.norm.weight", 0.0) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is None
    # per-input values: the model's own, else the shared settings, else params
    p = resolve_params(MergeParams(density=0.5), ["a", "b"], ["a", "b"],
                       shared=[{"lambda": [0, 1]}],
                       per_model={"a": [{"density": 0.9, "weight": [1, 3]}], "b": [{"weight": 1}]},
                       out_name="w", input_names={"a": "w", "b": "w"}, t=0.5)
    assert p.density == [0.9, 0.5] and p.weights == [2.0, 1.0] and p.lambda_ == 0.5
    with pytest.raises(ConfigError, match=r"no weight for input\(s\) \['b'\]"):
        resolve_params(MergeParams(), ["a", "b"], ["a", "b"], [], {"a": [{"weight": 1}], "b": []},
                       "w", {"a": "w", "b": "w"}, 0.0)
    with pytest.raises(ConfigError, match=r"params.lambda.*tensor w"):
        resolve_params(MergeParams(), ["a"], ["a"], [{"lambda": 3}], {"a": []}, "w", {"a": "w"}, 0.0)
