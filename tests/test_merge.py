"""The merge engine: operators against hand-computed values, heterogeneous pieces, and whole
merges of tiny real Hugging Face models (Llama / Qwen2 / Gemma-3) through a briefly trained
tiny VAE: latent and weight space, heterogeneous OT, cache reuse, resume, bad inputs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError
from lsm_dist.merge import (
    MARKER,
    OPERATORS,
    AlignConfig,
    AssemblyError,
    LatentCache,
    MergeParams,
    MergePlan,
    align_latents,
    apply_operator,
    finalize_encode,
    get_operator,
    is_complete,
    load_plan,
    make_generator,
    prepare,
    proportional_layer_map,
    register_operator,
    resample_axis,
    resolve_layer_map,
    run_assemble,
    run_decode,
    run_encode,
    run_merge,
)
from lsm_dist.merge.decode import group_file
from lsm_dist.merge.encode import caches_for
from lsm_dist.merge.hetero import fit_and_apply
from lsm_dist.merge.io import read_header
from lsm_dist.model import TransformerVAE, VAEConfig, save_vae
from tests.helpers import write_checkpoint
from tests.merge_helpers import TINY_VAE, build_model, perturbed_expert, train_tiny_vae

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls are much slower with 2 threads on small VMs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_zoo")
    torch.set_num_threads(1)
    z = {"base": build_model("llama", d / "llama-base", 64, 4, 128, seed=0)}
    z["a"] = perturbed_expert(z["base"], d / "llama-a", seed=1)
    z["b"] = perturbed_expert(z["base"], d / "llama-b", seed=2)
    z["gemma"] = build_model("gemma3", d / "gemma3", 96, 3, 192, seed=3, dtype=torch.bfloat16)
    z["qwen"] = build_model("qwen2", d / "qwen2", 48, 2, 96, seed=4)
    z["vae"] = train_tiny_vae([z["base"], z["a"], z["gemma"], z["qwen"]], d / "vae")
    z["cache"] = d / "cache"
    return z


def plan_for(zoo, out: Path, models=("base", "a", "b"), **kw) -> MergePlan:
    fields = dict(models={m: str(zoo[m]) for m in models}, vae=str(zoo["vae"]), out_dir=str(out),
                  cache_dir=str(zoo["cache"]), batch_size=16, max_shard_size="60KB",
                  decode="direct")  # the paper's D(z); delta decoding: tests/test_delta.py
    return MergePlan(**(fields | kw))


def forward_ok(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 40, 41, 42, 5]])).logits
    assert torch.isfinite(logits).all()
    return logits


# ---------------------------------------------------------------------------- operators
def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_lerp_endpoints_and_value():
    a, b = t(1, 2, 3), t(3, 2, -1)
    assert torch.equal(apply_operator("lerp", [a, b], MergeParams(lambda_=0.0)), a)
    assert torch.equal(apply_operator("lerp", [a, b], MergeParams(lambda_=1.0)), b)
    assert torch.allclose(apply_operator("lerp", [a, b], MergeParams(lambda_=0.25)), t(1.5, 2, 2))


def test_slerp_orthogonal_and_fallback():
    e1, e2 = t(1, 0), t(0, 1)
    out = apply_operator("slerp", [e1, e2], MergeParams(lambda_=0.5))
    assert torch.allclose(out, t(1, 1) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(apply_operator("slerp", [e1, e2], MergeParams(lambda_=0.0)), e1, atol=1e-6)
    # per-vector granularity: each row is slerped on its own
    a, b = torch.stack([e1, e1 * 2]), torch.stack([e2, e1 * 4])
    v = apply_operator("slerp", [a, b], MergeParams(lambda_=0.5, granularity="vector"))
    assert torch.allclose(v[0], t(1, 1) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(v[1], t(3, 0))  # parallel rows: LERP fallback
    near = e1 + 1e-5 * e2
    assert torch.allclose(apply_operator("slerp", [e1, near], MergeParams(lambda_=0.3)), torch.lerp(e1, near, 0.3))
    assert torch.isfinite(apply_operator("slerp", [t(0, 0), e2], MergeParams(lambda_=0.5))).all()


def test_soup_weights():
    a, b = t(0, 4), t(4, 0)
    assert torch.allclose(apply_operator("soup", [a, b]), t(2, 2))
    assert torch.allclose(apply_operator("soup", [a, b], MergeParams(weights=[0.25, 0.75])), t(3, 1))
    with pytest.raises(ConfigError, match=r"params.weights.*sum to 1.2"):
        apply_operator("soup", [a, b], MergeParams(weights=[0.5, 0.7]))
    with pytest.raises(ConfigError, match=r"params.weights.*2 input"):
        apply_operator("soup", [a, b], MergeParams(weights=[1.0]))
    out = apply_operator("soup", [a, b], MergeParams(weights=[1, 3], normalize=True))
    assert torch.allclose(out, t(3, 1))


def test_task_arithmetic():
    base = t(1, 1)
    out = apply_operator("task_arithmetic", [t(2, 1), t(1, 3)], MergeParams(weights=[1.0, 0.5]), base=base)
    assert torch.allclose(out, t(2, 2))
    with pytest.raises(ConfigError, match="base"):
        apply_operator("task_arithmetic", [t(2, 1)], MergeParams())


def test_ties_hand_computed():
    base = t(1, 1, 1, 1)
    d1, d2 = t(3, -1, 0.5, -2), t(-1, -2.5, 0.1, 2.2)
    # trimmed (density 0.5): d1 -> [3,0,0,-2], d2 -> [0,-2.5,0,2.2]; elected sign of the sum
    # [3,-2.5,0,0.2] is [+,-,0,+]; disjoint mean keeps only agreeing entries.
    out = apply_operator("ties", [base + d1, base + d2], MergeParams(density=0.5), base=base)
    assert torch.allclose(out, base + t(3, -2.5, 0, 2.2))
    # density 1: agreeing entries are averaged, disagreeing ones dropped
    out = apply_operator("ties", [t(2, -1), t(4, 3), t(-1, -1)], MergeParams(density=1.0), base=t(0, 0))
    assert torch.allclose(out, t(3, 3))


def test_dare_seeded():
    base = torch.zeros(1000)
    x = base + torch.linspace(1, 2, 1000)
    p0 = apply_operator("dare", [x], MergeParams(drop_p=0.0), base=base, key="w")
    assert torch.allclose(p0, x)
    out = apply_operator("dare", [x], MergeParams(drop_p=0.5, seed=3), base=base, key="w")
    keep = torch.rand(1000, generator=make_generator(3, "w:0:0")) < 0.5  # the documented mask (input 0, row block 0): kept where u < 1-p
    assert torch.allclose(out, torch.where(keep, 2 * x, torch.zeros_like(x)))
    again = apply_operator("dare", [x], MergeParams(drop_p=0.5, seed=3), base=base, key="w")
    other = apply_operator("dare", [x], MergeParams(drop_p=0.5, seed=4), base=base, key="w")
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert abs(out.mean().item() - x.mean().item()) < 0.15  # unbiased in expectation


def test_self_merge():
    mu, lv = t(1, -1, 0.5), torch.full((3,), math.log(0.25))
    out = apply_operator("self_merge", [mu], MergeParams(samples=4, seed=1), logvars=[lv], key="k")
    g = make_generator(1, "k")
    eps = torch.stack([torch.randn(3, generator=g) for _ in range(4)])
    assert torch.allclose(out, (mu + 0.5 * eps).mean(0), atol=1e-6)
    many = apply_operator("self_merge", [torch.zeros(5000)], MergeParams(samples=64),
                          logvars=[torch.zeros(5000)], key="k")
    assert abs(many.std().item() - 1 / 8) < 0.01  # sigma / sqrt(K)
    with pytest.raises(ValueError, match="log-variances"):
        apply_operator("self_merge", [mu], MergeParams())


def test_registry_and_param_validation():
    with pytest.raises(ConfigError, match=r"unknown merge operator 'nope'.*'lerp'"):
        get_operator("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_operator("lerp")(lambda *a, **k: None)
    with pytest.raises(ConfigError, match=r"params\.lambda.*1\.5"):
        MergeParams(lambda_=1.5)
    with pytest.raises(ConfigError, match=r"params\.density"):
        MergeParams(density=0.0)
    with pytest.raises(ConfigError, match=r"params\.drop_p"):
        MergeParams(drop_p=1.0)
    with pytest.raises(ConfigError, match="exactly 2"):
        apply_operator("lerp", [t(1)])
    assert {"lerp", "slerp", "soup", "task_arithmetic", "ties", "dare", "self_merge"} <= set(OPERATORS)


# ------------------------------------------------------------------------------- hetero
def test_layer_maps():
    assert proportional_layer_map(4, 3) == [0, 1, 1, 2]
    assert proportional_layer_map(3, 4) == [0, 2, 3]
    assert proportional_layer_map(4, 4) == [0, 1, 2, 3]
    assert proportional_layer_map(1, 5) == [0]
    assert resolve_layer_map([0, 0, 1], 3, 2, "s") == [0, 0, 1]
    with pytest.raises(ConfigError, match=r"layer_map\[s\].*3 layers"):
        resolve_layer_map([0, 1], 3, 2, "s")
    with pytest.raises(ConfigError, match=r"entries \[5\]"):
        resolve_layer_map([0, 1, 5], 3, 2, "s")


def test_resample_axis():
    x = torch.arange(4.0).reshape(4, 1)
    assert torch.allclose(resample_axis(x, 7).reshape(-1), torch.arange(7.0) / 2)
    assert torch.allclose(resample_axis(x, 2).reshape(-1), t(0, 3))
    assert resample_axis(torch.ones(1, 3), 5).shape == (5, 3)


def test_gaussian_two_samples_finite():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 1, 64, generator=g), torch.randn(5, 1, 64, generator=g) * 3 + 1
    with pytest.warns(RuntimeWarning, match="regularizing"):
        out = align_latents(zs, zt, AlignConfig(method="gaussian", reg=1e-6), make_generator(0))
    assert out.shape == zt.shape and torch.isfinite(out).all()
    with pytest.warns(RuntimeWarning, match="1 point"):
        one = align_latents(zs[:1], zt[:1], AlignConfig(method="gaussian"), make_generator(0))
    assert torch.isfinite(one).all()


def test_gaussian_and_emd_maps():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3000, 4, generator=g, dtype=torch.float64)
    A = torch.tensor([[2.0, 0, 0, 0], [0.5, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1]], dtype=torch.float64)
    xt = torch.randn(3000, 4, generator=g, dtype=torch.float64) @ A + 3
    out = fit_and_apply(xs, xt, AlignConfig(method="gaussian", max_samples=3000), make_generator(0))
    assert torch.allclose(out.mean(0), xt.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(out.T), torch.cov(xt.T), atol=0.25)
    # EMD between a point set and a permutation of it maps every point onto its twin
    pts = torch.randn(50, 3, generator=g, dtype=torch.float64)
    perm = pts[torch.randperm(50, generator=g)]
    assert torch.allclose(fit_and_apply(pts, perm, AlignConfig(method="emd"), make_generator(0)), pts)
    sub = fit_and_apply(xs[:400], xt[:300], AlignConfig(method="emd", max_samples=100), make_generator(0))
    assert sub.shape == (400, 4) and torch.isfinite(sub).all()
    sk = fit_and_apply(xs[:200], xt[:200], AlignConfig(method="sinkhorn", reg=1e-2), make_generator(0))
    assert torch.isfinite(sk).all() and (sk.mean(0) - xt[:200].mean(0)).abs().max() < 0.5


# ---------------------------------------------------------------------- end-to-end merges
LATENT_CASES = {
    "lerp": dict(method="lerp", models=("base", "a"), params=MergeParams(lambda_=0.5)),
    "slerp": dict(method="slerp", models=("base", "a"), params=MergeParams(lambda_=0.5, granularity="vector")),
    "soup": dict(method="soup", models=("base", "a", "b"), params=MergeParams(weights=[0.2, 0.4, 0.4])),
    "task_arithmetic": dict(method="task_arithmetic", base="base", params=MergeParams(weights=[0.5, 0.5])),
    "ties": dict(method="ties", base="base", params=MergeParams(density=0.5)),
    "dare": dict(method="dare", base="base", params=MergeParams(drop_p=0.3, weights=[0.5, 0.5])),
    "self_merge": dict(method="self_merge", models=("a",), params=MergeParams(samples=4)),
    # the methods mergekit users expect, on latent deltas / latents
    "dare_ties": dict(method="dare_ties", base="base", params=MergeParams(density=[0.5, 0.7], weights=[0.6, 0.4])),
    "breadcrumbs_ties": dict(method="breadcrumbs_ties", base="base", params=MergeParams(density=0.8, gamma=0.05)),
    "della": dict(method="della", base="base", params=MergeParams(density=0.5, epsilon=0.1)),
    "model_stock": dict(method="model_stock", base="base"),
    "nuslerp": dict(method="nuslerp", models=("base", "a"), params=MergeParams(weights=[0.4, 0.6])),
    "multislerp": dict(method="multislerp", params=MergeParams(weights=[0.5, 0.3, 0.2])),
    "karcher": dict(method="karcher"),
    "passthrough": dict(method="passthrough", models=("a",)),
}


@pytest.mark.parametrize("case", list(LATENT_CASES))
def test_latent_merge_loads(zoo, tmp_path, case):
    out = run_merge(plan_for(zoo, tmp_path / case, **LATENT_CASES[case]))
    assert out == tmp_path / case / "model" and is_complete(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["merged_tensors"] == 4 * 7 and marker["shards"] > 1
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file() and not list(out.parent.glob(".model.tmp-*"))
    assert len(list((tmp_path / case / "layers").glob("layer-*.safetensors"))) == 4
    forward_ok(out)
    ck, target = Checkpoint(out), Checkpoint(zoo["a" if case in ("self_merge", "passthrough") else "base"])
    emb = "model.embed_tokens.weight"
    assert torch.equal(ck.read(emb), target.read(emb))  # untouched tensors: the target's
    q = "model.layers.1.self_attn.q_proj.weight"
    assert ck.read(q).shape == target.read(q).shape and not torch.equal(ck.read(q), target.read(q))
    assert run_merge(plan_for(zoo, tmp_path / case, **LATENT_CASES[case])) == out  # done: a no-op


def test_latent_lerp_zero_reconstructs_target(zoo, tmp_path):
    out = run_merge(plan_for(zoo, tmp_path / "l0", models=("base", "a"), params=MergeParams(lambda_=0.0)))
    ck, base = Checkpoint(out), Checkpoint(zoo["base"])
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"):
        rec, orig = ck.read(name), base.read(name)
        corr = torch.corrcoef(torch.stack([rec.reshape(-1), orig.reshape(-1)]))[0, 1]
        # random-init weights are i.i.d. noise: at compression 4 even PCA keeps ~25% of the
        # variance (corr ~0.5); the tiny VAE gets close, and the de-normalization is the target's
        assert corr > 0.3, (name, float(corr))
        assert 0.2 < float(rec.std() / orig.std()) < 1.5
        assert abs(float(rec.mean() - orig.mean())) < 0.1 * float(orig.std())


@pytest.mark.parametrize("method", ["lerp", "soup", "task_arithmetic", "ties", "dare", "slerp"])
def test_weight_space_baselines(zoo, tmp_path, method):
    kw = {"lerp": dict(models=("base", "a")), "slerp": dict(models=("base", "a")),
          "soup": dict(models=("base", "a", "b"))}.get(method, dict(base="base"))
    plan = plan_for(zoo, tmp_path / method, method=method, space="weight", vae=None,
                    params=MergeParams(lambda_=0.5, density=0.5, drop_p=0.5), **kw)
    out = run_merge(plan)
    forward_ok(out)
    ck, base, a = Checkpoint(out), Checkpoint(zoo["base"]), Checkpoint(zoo["a"])
    name = "model.layers.2.mlp.down_proj.weight"
    if method == "lerp":
        assert torch.allclose(ck.read(name), (base.read(name) + a.read(name)) / 2, atol=1e-6)
    if method == "task_arithmetic":  # weights 1.0 each: base + d_a + d_b
        b = Checkpoint(zoo["b"])
        want = a.read(name) + b.read(name) - base.read(name)
        assert torch.allclose(ck.read(name), want, atol=1e-5)


def test_weight_lerp_zero_is_target_exactly(zoo, tmp_path):
    plan = plan_for(zoo, tmp_path / "w0", models=("base", "a"), space="weight", vae=None,
                    params=MergeParams(lambda_=0.0))
    out, base = Checkpoint(run_merge(plan)), Checkpoint(zoo["base"])
    for name in base.names:
        assert torch.equal(out.read(name), base.read(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("target,source,align", [("base", "gemma", "gaussian"), ("qwen", "base", "emd"),
                                                 ("qwen", "gemma", "sinkhorn")])
def test_heterogeneous_ot_merge(zoo, tmp_path, target, source, align):
    plan = plan_for(zoo, tmp_path / "h", models=(target, source), target=target,
                    alignment=AlignConfig(method=align, reg=1e-2 if align == "sinkhorn" else 1e-3),
                    params=MergeParams(lambda_=0.1))
    rp = prepare(plan)
    assert rp.heterogeneous
    assert rp.models[source].layer_map == proportional_layer_map(rp.models[target].num_layers,
                                                                 rp.models[source].num_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # few points per covariance in tiny models
        out = run_merge(plan)
    logits = forward_ok(out)
    assert logits.shape[-1] == 100
    tgt = Checkpoint(zoo[target])
    assert {n: v.shape for n, v in Checkpoint(out).tensors.items()} == {n: v.shape for n, v in tgt.tensors.items()}


def test_hetero_explicit_layer_map_and_own_vae(zoo, tmp_path):
    torch.manual_seed(5)  # the source model's own VAE (same latent width): encodes gemma only
    own = save_vae(TransformerVAE(VAEConfig(**TINY_VAE)), tmp_path / "gemma-vae")
    plan = plan_for(zoo, tmp_path / "hm", models=("base", "gemma"), target="base", alignment="gaussian",
                    layer_map={"gemma": [2, 2, 1, 0]})
    plan.models["gemma"].vae = str(own)
    rp = prepare(plan)
    job = next(j for j in rp.jobs if j.name == "model.layers.0.mlp.up_proj.weight")
    assert job.sources["gemma"] == "model.layers.2.mlp.up_proj.weight"
    assert rp.models["gemma"].vae_digest != rp.models["base"].vae_digest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        forward_ok(run_merge(plan))
    caches = {p.name for p in zoo["cache"].iterdir() if p.is_dir()}
    assert f"{rp.models['gemma'].digest}-{rp.models['gemma'].vae_digest}" in caches


# ------------------------------------------------------------------- cache, resume, errors
def test_latent_cache_reused(zoo, tmp_path):
    cache = tmp_path / "cache"
    p1 = plan_for(zoo, tmp_path / "c1", models=("base", "a"), cache_dir=str(cache))
    rp1 = prepare(p1)
    s1 = run_encode(rp1)
    assert s1["encoded"] == 2 * 28 and s1["reused"] == 0
    files = sorted(cache.glob("*/tensors/*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    man = json.loads(next(cache.glob("*/manifest.json")).read_text())
    entry = man["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert entry["shape"] == [32, 64] and entry["num_samples"] == 4 and entry["layer"] == 0
    assert {"file", "dtype", "mean", "std", "block", "role", "source"} <= set(entry)
    p2 = plan_for(zoo, tmp_path / "c2", models=("base", "a"), cache_dir=str(cache),
                  params=MergeParams(lambda_=0.3))
    rp2 = prepare(p2)
    assert rp2.digest != rp1.digest
    s2 = run_encode(rp2)
    assert s2["encoded"] == 0 and s2["reused"] == 2 * 28
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert {p.parent.parent.name for p in files} == {f"{m.digest}-{m.vae_digest}" for m in rp2.models.values()}


def test_latent_cache_stores_logvar_only_when_a_method_needs_it(zoo, tmp_path):
    cache = tmp_path / "cache"
    name = "model.layers.1.mlp.up_proj.weight"
    rp = prepare(plan_for(zoo, tmp_path / "m", models=("a", "b"), target="a", cache_dir=str(cache),
                          latent_dtype="bfloat16"))
    assert run_encode(rp)["encoded"] == 2 * 28
    lc = caches_for(rp)["a"]
    with safe_open(str(lc.tensor_path(name)), framework="pt") as f:
        assert set(f.keys()) == {"mu"}  # the means alone: half the disk
        assert f.get_tensor("mu").dtype == torch.bfloat16
    mu, lv = lc.load(name)
    assert lv is None and mu.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="without log-variances"):
        lc.load(name, logvar=True)
    # a method that samples the posterior encodes again, with the log-variances, and then reuses them
    sm = prepare(plan_for(zoo, tmp_path / "s", models=("a",), target="a", method="self_merge",
                          cache_dir=str(cache), latent_dtype="bfloat16", params=MergeParams(samples=2)))
    assert run_encode(sm)["encoded"] == 28
    mu2, lv2 = caches_for(sm)["a"].load(name, logvar=True)
    assert torch.equal(mu2, mu) and lv2.shape == mu.shape
    assert run_encode(sm)["reused"] == 28 and run_encode(rp)["reused"] == 2 * 28
    forward_ok(run_merge(plan_for(zoo, tmp_path / "s2", models=("a",), target="a", method="self_merge",
                                  cache_dir=str(cache), latent_dtype="bfloat16", params=MergeParams(samples=2))))


def test_encode_split_across_workers(zoo, tmp_path):
    rp = prepare(plan_for(zoo, tmp_path / "w", models=("base", "a"), cache_dir=str(tmp_path / "c")))
    assert run_encode(rp, worker=(0, 2))["encoded"] == 28
    with pytest.raises(FileNotFoundError, match="28 tensor"):
        finalize_encode(rp)
    assert run_encode(rp, worker=(1, 2))["encoded"] == 28
    split = finalize_encode(rp)
    ref_rp = prepare(plan_for(zoo, tmp_path / "w1", models=("base", "a")))
    run_encode(ref_rp)  # one worker, the shared cache
    name = "model.layers.2.mlp.gate_proj.weight"
    for cache in split.values():
        ref = LatentCache(zoo["cache"], cache.model_digest, cache.vae_digest)
        assert cache.manifest["tensors"][name]["mean"] == ref.manifest["tensors"][name]["mean"]
        assert torch.equal(cache.load(name)[0], ref.load(name)[0])


def test_decode_resumes_after_partial_run(zoo, tmp_path):
    rp = prepare(plan_for(zoo, tmp_path / "r", models=("base", "a")))
    run_encode(rp)
    first = run_decode(rp, worker=(0, 2))  # "killed" after this worker's layers
    assert first == {"written": 2, "skipped": 0}
    done = {g: group_file(rp, g).stat().st_mtime_ns for g in list(rp.groups)[0::2]}
    assert not any(group_file(rp, g).exists() for g in list(rp.groups)[1::2])
    # a file from another plan is not trusted
    stale = group_file(rp, "layer-0003")
    save_file({"x": torch.zeros(1)}, str(stale), metadata={"lsm_merge": json.dumps({"plan_digest": "other"})})
    again = run_decode(rp)
    assert again == {"written": 2, "skipped": 2}
    assert all(group_file(rp, g).stat().st_mtime_ns == ns for g, ns in done.items())
    assert "model.layers.3.mlp.up_proj.weight" in load_file(str(stale))
    forward_ok(run_assemble(rp))


def test_failed_assembly_leaves_no_marker(zoo, tmp_path):
    rp = prepare(plan_for(zoo, tmp_path / "f", models=("base", "a"), space="weight", vae=None))
    run_decode(rp)
    f = group_file(rp, "layer-0001")
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[name][0, 0] = float("nan")
    meta = read_header(f)["__metadata__"]
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(AssemblyError, match=name.replace(".", r"\.")):
        run_assemble(rp)
    assert not is_complete(rp.model_dir) and not (rp.model_dir / MARKER).exists()
    assert not list(rp.out_dir.glob(".model.tmp-*"))


def test_plan_errors(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"params\.lambda"):
        load_plan(REPO / "configs/merge/lerp.yaml", ["params.lambda=1.5"])
    with pytest.raises(ConfigError, match=r"params\.weights.*sum to 1"):
        plan_for(zoo, tmp_path / "e", method="soup", params=MergeParams(weights=[0.5, 0.2, 0.2]))
    with pytest.raises(ConfigError, match="alignment: gaussian"):
        prepare(plan_for(zoo, tmp_path / "e", models=("base", "gemma")))
    with pytest.raises(ConfigError, match="space: latent"):
        prepare(plan_for(zoo, tmp_path / "e", models=("base", "gemma"), space="weight", vae=None))
    with pytest.raises(ConfigError, match=r"method.*unknown merge operator.*known"):
        plan_for(zoo, tmp_path / "e", method="magic")
    with pytest.raises(ConfigError, match="space: latent"):
        plan_for(zoo, tmp_path / "e", method="self_merge", space="weight", vae=None)
    bad = MergePlan(models={"base": str(zoo["base"]), "nope": str(tmp_path / "missing")},
                    vae=str(zoo["vae"]), out_dir=str(tmp_path / "e"), cache_dir=str(zoo["cache"]))
    with pytest.raises(ConfigError, match=r"models\.nope: cannot open"):
        prepare(bad)


def test_missing_tensor_named(zoo, tmp_path):
    ck = Checkpoint(zoo["a"])
    tensors = {n: ck.read(n) for n in ck.names if n != "model.layers.2.mlp.down_proj.weight"}
    holey = write_checkpoint(tmp_path / "holey", tensors, shards=2, config=ck.config)
    plan = MergePlan(models={"base": str(zoo["base"]), "holey": str(holey)}, vae=str(zoo["vae"]),
                     out_dir=str(tmp_path / "o"), cache_dir=str(zoo["cache"]))
    with pytest.raises(ConfigError, match=r"models\.holey: has no tensor layer 2 'mlp\.down_proj\.weight'"):
        prepare(plan)


def test_vae_that_does_not_fit(zoo, tmp_path):
    big = VAEConfig(chunk=512, tokens=64, d_model=16, enc_layers=0, dec_layers=0, heads=2, latent_dim=8)
    vdir = save_vae(TransformerVAE(big), tmp_path / "big-vae")
    plan = plan_for(zoo, tmp_path / "o", models=("base", "a"), vae=str(vdir))
    with pytest.raises(ConfigError, match=r"VAE .*big-vae.* does not fit model base .*padding"):
        prepare(plan)


@pytest.mark.parametrize("blocks,n", [("attn", 16), ("mlp", 12), ("both", 28), (["attn", "mlp"], 28)])
def test_blocks_selection(zoo, tmp_path, blocks, n):
    rp = prepare(plan_for(zoo, tmp_path / "b", models=("base", "a"), blocks=blocks))
    assert len(rp.jobs) == n and len(rp.groups) == 4
    assert {j.block for j in rp.jobs} == ({"attn", "mlp"} if n == 28 else {blocks})


def test_out_dir_of_another_merge_refused(zoo, tmp_path):
    prepare(plan_for(zoo, tmp_path / "o", models=("base", "a"), params=MergeParams(lambda_=0.2)))
    with pytest.raises(ConfigError, match="holds another merge"):
        prepare(plan_for(zoo, tmp_path / "o", models=("base", "a"), params=MergeParams(lambda_=0.4)))
    prepare(plan_for(zoo, tmp_path / "o", models=("base", "a"), params=MergeParams(lambda_=0.4), overwrite=True))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "merge").glob("*.yaml")), ids=lambda p: p.name)
def test_config_files_load(path):
    plan = load_plan(path)
    assert plan.models and plan.target in plan.models
    get_operator(plan.method).validate(plan.params, len(plan.inputs), plan.base is not None)


def test_cli_stages_split_across_array_tasks(zoo, tmp_path, monkeypatch):
    import yaml

    from lsm_dist.cli import main

    plan = {"models": {"base": str(zoo["base"]), "a": str(zoo["a"])}, "method": "lerp",
            "params": {"lambda": 0.4}, "vae": str(zoo["vae"]), "out_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"), "batch_size": 16}
    y = tmp_path / "plan.yaml"
    y.write_text(yaml.safe_dump(plan))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for stage in ("encode", "merge"):
        for i in range(2):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            assert main([stage, "-c", str(y), "--worker"]) == 0
        if stage == "encode":
            assert main(["encode", "-c", str(y), "--finalize"]) == 0
    assert len(list((tmp_path / "out" / "layers").glob("*.safetensors"))) == 4
    assert not is_complete(tmp_path / "out" / "model")
    assert main(["assemble", "-c", str(y)]) == 0
    assert is_complete(tmp_path / "out" / "model")
    assert main(["merge", "-c", str(y), "params.lambda=1.5"]) == 2
    assert main(["merge", str(y), "params.lambda=1.5"]) == 2  # the positional plan, as the README says
    assert main(["merge", str(y), "-c", str(y)]) == 2  # not both
    assert main(["merge", str(y)]) == 0  # done: a no-op


def test_native_plan_per_model_params_filters_and_slices(zoo, tmp_path):
    import yaml

    y = tmp_path / "plan.yaml"
    y.write_text(yaml.safe_dump({
        "models": {"base": str(zoo["base"]),
                   "a": {"path": str(zoo["a"]), "params": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
                   "b": {"path": str(zoo["b"]), "params": {"weight": [0.0, 1.0]}}},  # gradient over 4 layers
        "base": "base", "method": "task_arithmetic", "space": "weight", "rest": "weight",
        "out_dir": str(tmp_path / "o"), "cache_dir": str(zoo["cache"])}))
    out = Checkpoint(run_merge(load_plan(y)))
    base, a, b = Checkpoint(zoo["base"]), Checkpoint(zoo["a"]), Checkpoint(zoo["b"])
    for name, wa, wb in [("model.layers.0.mlp.up_proj.weight", 0.5, 0.0),
                         ("model.layers.3.self_attn.q_proj.weight", 1.0, 1.0),
                         ("model.layers.1.self_attn.v_proj.weight", 1.0, 1 / 3)]:
        x0 = base.read(name)
        want = x0 + wa * (a.read(name) - x0) + wb * (b.read(name) - x0)
        assert torch.allclose(out.read(name), want, atol=1e-6), name
    y.write_text(yaml.safe_dump({
        "models": {"a": str(zoo["a"]), "b": str(zoo["b"])}, "method": "passthrough", "space": "weight",
        "slices": [{"sources": [{"model": "a", "layers": [0, 3]}]}, {"sources": [{"model": "b", "layers": [1, 4]}]}],
        "out_dir": str(tmp_path / "s"), "cache_dir": str(zoo["cache"])}))
    stack = load_plan(y)
    model = run_merge(stack)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    ck = Checkpoint(model)
    assert ck.num_layers == 6
    assert torch.equal(ck.read("model.layers.4.mlp.up_proj.weight"), b.read("model.layers.2.mlp.up_proj.weight"))
    assert torch.equal(ck.read("model.layers.1.input_layernorm.weight"), a.read("model.layers.1.input_layernorm.weight"))
    assert torch.equal(ck.read("lm_head.weight"), b.read("lm_head.weight"))  # rest: target -> copied from the slice
    forward_ok(model)


@pytest.mark.parametrize("method,params", [("sce", {"select_topk": 0.5}), ("ram", {}), ("ramplus_tl", {}),
                                           ("nearswap", {"nearswap_t": 0.05}), ("arcee_fusion", {})])
def test_selective_methods_run_on_latents(zoo, tmp_path, method, params):
    """mergekit's selective methods (lsm_dist/merge/selective.py) run in latent space like every
    operator (their weight-space results equal mergekit's: tests/test_mergekit.py)."""
    models = ("base", "a") if method in ("nearswap", "arcee_fusion") else ("base", "a", "b")
    plan = plan_for(zoo, tmp_path / "o", models=models, method=method, base="base", target="base",
                    params=MergeParams(**params), decode="delta")
    out = run_merge(plan)
    assert is_complete(out)
    forward_ok(out)


def test_hetero_dropped_layers_named_and_delta_encoding_refused_early(zoo, tmp_path):
    """base (4 layers) as the source of the 2-layer qwen target: the proportional map reads
    layers 0 and 3, the card names 1 and 2 as read by no target layer. A heterogeneous plan
    with encoding: delta is refused at plan time (it died mid-encode with a bare shape error)."""
    plan = plan_for(zoo, tmp_path / "d", models=("qwen", "base"), target="qwen", alignment="gaussian",
                    params=MergeParams(lambda_=0.1), decode="delta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = run_merge(plan)
    card = (out / "README.md").read_text()
    assert "`base`: 2 of its 4 layers are read by no target layer" in card and "`[1, 2]`" in card
    bad = plan_for(zoo, tmp_path / "e", models=("qwen", "base", "a"), target="qwen", base="base",
                   inputs=["a"], method="task_arithmetic", alignment="gaussian", encoding="delta")
    with pytest.raises(ConfigError, match="encoding: heterogeneous models .* delta encoding encodes task vectors"):
        prepare(bad)


# ------------------------------------------------------------- merging by row blocks
def _tied_pair(rows=600, cols=300, n=3, seed=0):
    """bf16-stored weights and n fine-tunes: their float32 deltas hold large tie groups."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(rows, cols, generator=g)).bfloat16().float()
    xs = [(base + 1e-3 * torch.randn(rows, cols, generator=g)).bfloat16().float() for _ in range(n)]
    return base, xs


@pytest.mark.parametrize("method,params", [
    ("linear", dict(weights=[0.5, 0.3, 0.2])), ("task_arithmetic", dict(scale=0.7)),
    ("ties", dict(density=[0.2, 0.5, 0.9])), ("dare_ties", dict(density=0.4)),
    ("dare_linear", dict(density=[0.3, 0.6, 0.5], rescale="l1")),
])
def test_row_block_stream_equals_the_whole_tensor_merge(monkeypatch, method, params):
    """apply_operator_stream (rows read block by block, as a weight merge reads a checkpoint)
    gives the whole-tensor result bit for bit, over several row blocks."""
    from lsm_dist.merge import operators as ops
    from lsm_dist.merge.operators import apply_operator_stream

    monkeypatch.setattr(ops, "BLOCK_ELEMS", 7000)  # 23 rows of 300: 27 blocks
    base, xs = _tied_pair()
    p = MergeParams(seed=5, **params)
    whole = apply_operator(method, xs, p, base=None if method == "linear" else base, key="m.w")
    blocks = list(apply_operator_stream(method, 3, lambda i, a, b: xs[i][a:b].bfloat16(),
                                        None if method == "linear" else (lambda a, b: base[a:b]),
                                        tuple(base.shape), p, key="m.w"))
    assert len(blocks) == len(ops.row_spans(tuple(base.shape))) > 20
    assert torch.equal(torch.cat(blocks), whole)


def test_ties_spread_keeps_exactly_k_spread_over_the_tensor(monkeypatch):
    """tie_break: spread keeps exactly max(1, floor(d·n)) entries of each delta, every entry
    above the threshold, tied entries spread over the rows (an index order would keep the
    first rows' only); without ties it is mergekit's argsort selection exactly."""
    from lsm_dist.merge import operators as ops
    from lsm_dist.merge.task_vectors import magnitude_mask

    monkeypatch.setattr(ops, "BLOCK_ELEMS", 9000)
    base, (x,) = _tied_pair(n=1)
    d = x - base
    for dens in (0.05, 0.3, 0.5):
        k = int(dens * d.numel())
        p = MergeParams(density=dens, normalize=False, tie_break="spread")
        kept = apply_operator("ties", [x], p, base=base, key="k") != base
        assert int(kept.sum()) == k
        kth = d.abs().reshape(-1).sort(descending=True).values[k - 1]
        assert bool(kept[d.abs() > kth].all()) and not bool(kept[d.abs() < kth].any())
        tied = d.abs() == kth
        share = kept[tied].float().reshape(-1)
        first, second = kept[:300][tied[:300]].float().mean(), kept[300:][tied[300:]].float().mean()
        assert 0 < float(share.mean()) < 1 and abs(float(first - second)) < 0.1, (dens, first, second)
    cont = base + 1e-3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(9))  # no ties
    for dens in (0.1, 0.5):
        spread = apply_operator("ties", [cont], MergeParams(density=dens, tie_break="spread"), base=base, key="c")
        exact = apply_operator("ties", [cont], MergeParams(density=dens, tie_break="argsort"), base=base, key="c")
        assert torch.equal(spread, exact)
        assert torch.equal(spread != base, magnitude_mask(cont - base, dens).bool())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ties_argsort_by_row_blocks_is_mergekits_selection(monkeypatch, dtype):
    """tie_break: argsort merges by row blocks and keeps what mergekit keeps: the first
    floor(d·n) entries of torch's argsort of |δ| (float32, descending) over the whole tensor,
    tied entries at the threshold included -- bit for bit the whole-tensor TIES (the argsort
    mask, sign election, disjoint mean), in the weights' own working dtype, over many blocks."""
    from lsm_dist.merge import introselect
    from lsm_dist.merge import operators as ops
    from lsm_dist.merge.operators import apply_operator_stream
    from lsm_dist.merge.task_vectors import argsort_thresholds, combine, sparsify

    monkeypatch.setattr(ops, "BLOCK_ELEMS", 7000)
    base, xs = _tied_pair()
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    shape = tuple(base.shape)
    for dens in ([0.2, 0.5, 0.9], 0.01, "sorted"):
        if dens == "sorted":  # where the sort would turn to heapsort (after 3 partitions here): put back, sort
            monkeypatch.setattr(introselect, "depth_limit", lambda n: 3)
            dens = [0.3, 0.5, 0.7]
        p = MergeParams(density=dens, tie_break="argsort", sign_tie="positive")
        blocks = list(apply_operator_stream("ties", 3, lambda i, a, b: xs[i][a:b], lambda a, b: base[a:b],
                                            shape, p, key="t", dtype=dtype))
        assert len(blocks) > 20
        ds = dens if isinstance(dens, list) else [dens] * 3
        whole = torch.stack([sparsify(x - base, "magnitude", d, "none", None) for x, d in zip(xs, ds)])
        ref = base + combine(whole, torch.ones(3, dtype=dtype), p, True, True)
        assert torch.equal(torch.cat(blocks), ref)
    # the case that needs the sort: the threshold splits a tie group (bf16-stored weights)
    d = (xs[1] - base).reshape(-1)
    k = int(0.5 * d.numel())
    (t, chosen), = argsort_thresholds(lambda i: iter([(0, d)]), {0: k}, d.numel()).values()
    tied = int((d.abs().float().view(torch.int32) == t).sum())
    assert 0 < chosen.numel() < tied


def test_argsort_order_in_place_and_in_own_dtype():
    """The fallback of argsort_thresholds: torch's CPU sort of |δ| in place, in bf16 / fp16,
    puts the entries in the order of mergekit's float32 argsort (ties included), and that order
    is not index order (so no cheaper rule than the sort's own reproduces it)."""
    g = torch.Generator().manual_seed(3)
    x = (0.01 * torch.randn(200_000, generator=g)).bfloat16()
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        ref = torch.argsort(x.to(dt).abs().float(), descending=True)  # mergekit's
        assert not torch.equal(ref, torch.argsort(x.to(dt).abs().float(), descending=True, stable=True))
        buf, idx = x.to(dt).abs(), torch.empty(x.numel(), dtype=torch.int64)
        torch.sort(buf, descending=True, out=(buf, idx))
        assert torch.equal(idx, ref), dt


def test_first_k_is_torch_argsorts_selection(monkeypatch):
    """introselect.first_k keeps exactly the entries torch.argsort(values.float(),
    descending=True)[:k] keeps, ties at the k-th value included: sizes from 1 to 70k, one to a
    million distinct values, k at the ends and inside, bf16 / fp16 / fp32, windows of 7 entries
    up (the vectorized partition's windowing) -- against torch itself, on this machine."""
    import random

    from lsm_dist.merge import introselect

    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    cases = 0
    for _ in range(160):
        n = rng.choice([1, 2, 16, 17, 40, 300, 1000, 5000, 70000])
        distinct = rng.choice([1, 2, 3, 10, 200, 10**6])
        monkeypatch.setattr(introselect, "WINDOW", rng.choice([7, 64, 1 << 22] if n <= 1000 else [997, 1 << 22]))
        monkeypatch.setattr(introselect, "SUB", rng.choice([3, 50, 1 << 16]))
        dt = rng.choice([torch.bfloat16, torch.float16, torch.float32])
        x = torch.randint(0, distinct, (n,), generator=gen).float().mul(1e-3).to(dt)
        for k in {1, n, max(1, n // 2), rng.randint(1, n)}:
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.argsort(x.float(), descending=True)[:k]] = True
            t, tied = introselect.first_k(x.clone(), k)
            got = x.float() > t
            got[tied] = True
            assert (x[tied].float() == t).all() and torch.equal(got, ref), (n, distinct, k, dt)
            cases += 1
    assert cases > 400


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_single_process_weight_merge_writes_each_tensor_once(zoo, tmp_path, method, monkeypatch):
    """One process, weight space: the checkpoint is written as the tensors are merged (no
    layers/ at any point), bit for bit what the layer-file path (keep_layers) assembles."""
    import lsm_dist.merge.run as run_mod
    from lsm_dist.merge import operators as ops

    monkeypatch.setattr(ops, "BLOCK_ELEMS", 2000)  # several row blocks per matrix
    kw = dict(models=("base", "a", "b"), base="base", method=method, space="weight", vae=None,
              params=MergeParams(density=0.5, seed=2))
    monkeypatch.setattr(run_mod, "run_decode", lambda *a, **k: pytest.fail("layer files written"))
    direct = Checkpoint(run_merge(plan_for(zoo, tmp_path / "direct", **kw)))  # keep_layers: false by default
    assert not (tmp_path / "direct" / "layers").exists()
    monkeypatch.undo()
    monkeypatch.setattr(ops, "BLOCK_ELEMS", 2000)
    layered = Checkpoint(run_merge(plan_for(zoo, tmp_path / "layered", keep_layers=True, **kw)))
    assert (tmp_path / "layered" / "layers").is_dir()
    assert direct.names == layered.names
    for name in direct.names:
        assert torch.equal(direct.read(name), layered.read(name)), name


def test_assembly_frees_each_layer_file_once_copied(zoo, tmp_path, monkeypatch):
    """keep_layers: false, layer files (a latent merge): each layer file is deleted as soon as
    its tensors are in the output, so the merged weights are never on disk twice; an assembly
    that fails after freeing some is re-run by merging those layers again, to the same bytes."""
    import importlib

    asm_mod = importlib.import_module("lsm_dist.merge.assemble")  # (the package exports a function of that name)
    kw = dict(models=("base", "a"), target="base", max_shard_size="20KB")
    ref = Checkpoint(run_merge(plan_for(zoo, tmp_path / "ref", keep_layers=True, **kw)))
    plan = plan_for(zoo, tmp_path / "rel", keep_layers=False, **kw)
    rp = prepare(plan)
    run_encode(rp)
    run_decode(rp)
    layers = rp.layers_dir
    seen, real = [], asm_mod.write_streaming

    def watch(path, infos, fetch, **k):  # layer files present as each shard starts
        seen.append(({t.name for t in infos}, {p.name for p in layers.glob("*.safetensors")}))
        return real(path, infos, fetch, **k)

    monkeypatch.setattr(asm_mod, "write_streaming", watch)
    owner = {n: f"{g}.safetensors" for g, js in rp.groups.items() for n in (j.name for j in js)}
    written: set[str] = set()
    run_assemble(rp)
    assert len(seen) > 3 and not layers.exists()
    for names, present in seen:  # a file whose tensors all went into earlier shards is gone
        done = {f for f in set(owner.values()) if all(n in written for n, o in owner.items() if o == f)}
        assert not done & present, (done & present)
        written |= names
    # fail the assembly in the first shard after a layer file was freed: the freed ones are gone,
    # a re-run of the merge stage writes them again
    rp2 = prepare(plan_for(zoo, tmp_path / "fail", keep_layers=False, **kw))
    run_decode(rp2)

    def failing(path, infos, fetch, **k):
        if len(list(rp2.layers_dir.glob("*.safetensors"))) < len(rp2.groups):
            raise asm_mod.AssemblyError("injected: disk full")
        return real(path, infos, fetch, **k)

    monkeypatch.setattr(asm_mod, "write_streaming", failing)
    with pytest.raises(asm_mod.AssemblyError, match="injected"):
        run_assemble(rp2)
    before = set(rp2.groups)
    left = {p.stem for p in rp2.layers_dir.glob("*.safetensors")}
    assert left and left < before and not rp2.model_dir.exists()
    with pytest.raises(asm_mod.AssemblyError, match="run the merge/decode stage"):
        run_assemble(rp2)
    monkeypatch.setattr(asm_mod, "write_streaming", real)
    assert run_decode(rp2)["written"] == len(before - left)
    got = Checkpoint(run_assemble(rp2))
    assert got.names == ref.names and all(torch.equal(got.read(n), ref.read(n)) for n in ref.names)


def test_streaming_writer_starts_writeback_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """write_streaming hands written bytes to writeback as it goes (fadvise); the file is the
    same byte for byte, whole tensors and row blocks alike."""
    from lsm_dist.checkpoint import TensorInfo
    from lsm_dist.merge import io

    xs = {f"t{i}": torch.randn(64, 32) for i in range(4)}
    infos = [TensorInfo(n, "", "F32", (64, 32), None, None, None, "weight") for n in xs]
    io.write_streaming(tmp_path / "a.safetensors", infos, lambda n: xs[n])
    calls = []
    real = io._start_writeback
    monkeypatch.setattr(io, "WRITEBACK_BYTES", 1)
    monkeypatch.setattr(io, "_start_writeback", lambda f, since: calls.append(since) or real(f, since))
    io.write_streaming(tmp_path / "b.safetensors", infos, lambda n: iter(xs[n].split(16)))
    assert len(calls) == 4
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
