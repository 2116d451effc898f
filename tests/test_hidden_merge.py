"""Tests for lsm_dist.hidden: lockstep hidden-state merging, its metrics, the lm-eval wrapper,
the weight-space baselines and the run / sweep outputs (tiny trained models, CPU)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lsm_dist.config import ConfigError, from_dict
from lsm_dist.hidden import HiddenStateMerger, MergedCausalLM, layer_states, weight_merge
from lsm_dist.hidden.metrics import (
    arc_norm_dev,
    arc_ratio,
    compare_merges,
    cosine,
    linear_cka,
    midness,
    off_plane,
)
from lsm_dist.hidden.ops import RegMean, lerp, slerp
from lsm_dist.hidden.run import HiddenMergeConfig, run_hidden_merge, sweep_hidden_vs_weight

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["cat", "dog", "sun", "red", "sky", "map", "cup", "pen"]


# --------------------------------------------------------------------------- tiny models
def hf_config(family: str = "llama", hidden: int = 32, layers: int = 4, vocab: int = 100, **kw):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, **kw)  # fmt: skip
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return Gemma3TextConfig(**common, query_pre_attn_scalar=hidden // 4, sliding_window=6)


def random_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(family, **kw), dtype=torch.float32).eval()


def texts_a(n: int, seed: int) -> list[str]:  # words, lowercase
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(5)) + "." for _ in range(n)]


def texts_b(n: int, seed: int) -> list[str]:  # small sums
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append(f"{a}+{b}={a + b}")
    return out


def train(model, tok, texts, steps: int, lr: float = 3e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for s in range(steps):
        enc = tok(texts[(s * 16) % len(texts) :][:16], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="module")
def tok():
    from lsm_dist.zoo.tokenizer import build_tokenizer

    return build_tokenizer(model_max_length=64)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tok):
    """A base trained on both text kinds, and two experts fine-tuned on one kind each,
    saved as HF checkpoints (float32) with the tokenizer."""
    import copy

    root = tmp_path_factory.mktemp("hidden_zoo")
    base = train(random_model("llama", 0), tok, texts_a(160, 0) + texts_b(160, 0), 30)
    experts = {"a": train(copy.deepcopy(base), tok, texts_a(320, 1), 20),
               "b": train(copy.deepcopy(base), tok, texts_b(320, 2), 20)}  # fmt: skip
    paths = {}
    for name, m in experts.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return {"a": experts["a"], "b": experts["b"], "paths": paths}


def batch(tok, texts, side: str = "right"):
    tok.padding_side = side
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


def calib(tok):
    return [batch(tok, texts_a(8, 5) + texts_b(8, 6))]


# --------------------------------------------------------------------------- merger
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_alpha_zero_reproduces_model_a_exactly(family, tok):
    a, b = random_model(family, 0, layers=6), random_model(family, 1, layers=6)
    ids, mask = batch(tok, ["hello there, model", "hi"])
    ref = a(input_ids=ids, attention_mask=mask).logits
    m = HiddenStateMerger([a, b], layers=[1, 3, 5], alpha=0.0, op="lerp")
    for op in ("lerp", "slerp", "regmean"):
        if op == "regmean":
            m.calibrate([(ids, mask)])
        m.set_mix(op=op)
        assert torch.equal(m(ids, mask).logits, ref), op
    # reversible: mix, then back to α = 0 without reloading anything
    m.set_mix(alpha=0.7, op="slerp")
    assert not torch.allclose(m(ids, mask).logits, ref)
    m.set_mix(alpha=0.0)
    assert torch.equal(m(ids, mask).logits, ref)


def test_alpha_one_everywhere_follows_model_b(zoo, tok):
    ids, mask = batch(tok, ["cat dog sun", "12+3="])
    m = HiddenStateMerger([zoo["a"], zoo["b"]], layers=range(4), alpha=1.0)
    out = m(ids, mask, return_hidden=True)
    hb = layer_states(zoo["b"], ids, mask)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(out.hidden, hb))
    torch.testing.assert_close(out.logits, zoo["b"](input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("op", ["lerp", "slerp", "regmean"])
def test_identical_models_equal_single_model(op, zoo, tok):
    a = zoo["a"]
    ids, mask = batch(tok, ["cat dog sun.", "7+8=15"])
    ref = a(input_ids=ids, attention_mask=mask).logits
    m = HiddenStateMerger([a, a], layers=range(4), alpha=0.5, op="lerp")
    if op == "regmean":
        for full in (True, False):
            m.regmean_full = full
            m.calibrate(calib(tok))
            m.set_mix(op="regmean")
            torch.testing.assert_close(m(ids, mask).logits, ref, atol=1e-4, rtol=1e-4)
        return
    m.set_mix(op=op)
    torch.testing.assert_close(m(ids, mask).logits, ref, atol=1e-5, rtol=1e-5)
    if op == "lerp":  # three identical models
        m3 = HiddenStateMerger([a, a, a], layers=[0, 2], alpha=0.6)
        torch.testing.assert_close(m3(ids, mask).logits, ref, atol=1e-5, rtol=1e-5)


def test_mixing_changes_later_layers_of_every_model(zoo, tok):
    ids, mask = batch(tok, ["cat sun 1+2=3"])
    m = HiddenStateMerger([zoo["a"], zoo["b"]], layers=[1], alpha=0.5, head="mix")
    out = m(ids, mask, return_hidden=True)
    ha, hb = layer_states(zoo["a"], ids, mask), layer_states(zoo["b"], ids, mask)
    torch.testing.assert_close(out.hidden[1], (ha[1] + hb[1]) / 2, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.hidden[0], ha[0])  # before the first mixed layer: model a alone
    # both models' layer 2 read the mixed state: model b's pre-mix layer-2 output differs from b alone
    assert not torch.allclose(out.pre_mix[2][1], hb[2])
    first = HiddenStateMerger([zoo["a"], zoo["b"]], layers=[1], alpha=0.5, head="first")
    assert first.depths() == [4, 2]
    torch.testing.assert_close(first(ids, mask).logits, zoo["a"].lm_head(zoo["a"].model.norm(out.hidden[-1])))


def test_set_mix_keeps_unchanged_settings(zoo):
    m = HiddenStateMerger([zoo["a"], zoo["b"]], alpha=0.3)
    assert m.mix == {} and m.head_alpha == 0.0
    m.set_mix(layers=[2, 0])
    assert m.mix == {0: 0.3, 2: 0.3} and m.head_alpha == 0.3
    m.set_mix(alpha=[0.1, 0.9], head_alpha=0.5)
    assert m.mix == {0: 0.1, 2: 0.9} and m.head_alpha == 0.5
    m.set_mix(op="slerp", head="first")
    assert (m.op, m.head, m.mix, m.head_alpha) == ("slerp", "first", {0: 0.1, 2: 0.9}, 0.5)
    m.set_mix(head_alpha="auto")
    assert m.head_alpha == 0.9
    with pytest.raises(ValueError, match="give alpha"):
        m.set_mix(layers=[1])


@pytest.mark.parametrize("op", ["lerp", "slerp", "regmean"])
def test_generation_with_cache_matches_recompute(op, zoo, tok):
    m = HiddenStateMerger([zoo["a"], zoo["b"]], layers=[1, 2, 3], alpha=[0.25, 0.5, 0.75])
    if op == "regmean":
        m.calibrate(calib(tok))
    m.set_mix(op=op)
    ids, mask = batch(tok, ["cat dog", "3+4="], side="left")
    g_cache = m.generate(ids, 12, attention_mask=mask, use_cache=True)
    g_full = m.generate(ids, 12, attention_mask=mask, use_cache=False)
    assert torch.equal(g_cache, g_full)
    assert g_cache.shape[1] > ids.shape[1]


def test_generation_cache_gemma3_sliding_window(tok):
    a, b = random_model("gemma3", 0, layers=6), random_model("gemma3", 1, layers=6)
    m = HiddenStateMerger([a, b], layers=[2, 5], alpha=0.5, op="slerp")
    ids = tok(["a longer prompt than the window"], return_tensors="pt")["input_ids"]
    assert torch.equal(m.generate(ids, 8), m.generate(ids, 8, use_cache=False))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_equals_unbatched(side, zoo, tok):
    m = HiddenStateMerger([zoo["a"], zoo["b"]], layers=[0, 2], alpha=0.5, op="slerp")
    prompts = ["cat dog sun red", "1+2=", "sky"]
    ids, mask = batch(tok, prompts, side=side)
    logits = m(ids, mask).logits
    gen = m.generate(ids, 6, attention_mask=mask)
    for i, p in enumerate(prompts):
        one = tok([p], return_tensors="pt")["input_ids"]
        n = one.shape[1]
        rows = slice(ids.shape[1] - n, None) if side == "left" else slice(0, n)
        torch.testing.assert_close(logits[i, rows], m(one).logits[0], atol=1e-5, rtol=1e-5)
        if side == "left":  # generation continues after the last column: prompts left-padded
            assert gen[i, ids.shape[1] :].tolist() == m.generate(one, 6)[0, n:].tolist()


def test_errors_name_the_bad_value(zoo):
    a = zoo["a"]
    with pytest.raises(ValueError, match="hidden_size=48"):
        HiddenStateMerger([a, random_model("llama", 0, hidden=48)])
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        HiddenStateMerger([a, random_model("qwen2", 0)])
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        HiddenStateMerger([a, random_model("llama", 0, layers=3)])
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        HiddenStateMerger([a, a], layers=[1, 4])
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        HiddenStateMerger([a, a], layers=[-1])
    with pytest.raises(ValueError, match="alpha 1.5 is outside"):
        HiddenStateMerger([a, a], layers=[1], alpha=1.5)
    with pytest.raises(ValueError, match="alpha -0.1 is outside"):
        HiddenStateMerger([a, a], layers=[1, 2], alpha=[0.5, -0.1])
    with pytest.raises(ValueError, match="2 alphas given for 1 layers"):
        HiddenStateMerger([a, a], layers=[1], alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="'mean' is not one of"):
        HiddenStateMerger([a, a], op="mean")
    with pytest.raises(ValueError, match="slerp mixes exactly two"):
        HiddenStateMerger([a, a, a], op="slerp")
    with pytest.raises(ValueError, match="calibrate"):
        HiddenStateMerger([a, a], layers=[0], op="regmean")
    with pytest.raises(ConfigError, match="alpha"):
        from_dict(HiddenMergeConfig, {"models": ["x", "y"], "alpha": 2.0})
    with pytest.raises(ConfigError, match="op"):
        from_dict(HiddenMergeConfig, {"models": ["x", "y"], "op": "ties"})
    with pytest.raises(ConfigError, match="models"):
        from_dict(HiddenMergeConfig, {"models": ["x"]})


# --------------------------------------------------------------------------- operators
def test_slerp_geometry_and_small_angle_fallback():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    h = slerp(a, b, 0.5)
    torch.testing.assert_close(h, torch.tensor([[1.5 / math.sqrt(2), 1.5 / math.sqrt(2), 0.0]]))
    for t in (0.2, 0.7):  # angle moves linearly, norm linearly
        ht = slerp(a, b, t)
        torch.testing.assert_close(arc_ratio(ht, a, b).float(), torch.tensor([t]))
        torch.testing.assert_close(ht.norm(dim=-1), torch.tensor([(1 - t) + 2 * t]))
    near = a + torch.tensor([[0.0, 1e-6, 0.0]])  # angle 1e-6 < eps: exactly lerp
    assert torch.equal(slerp(a, near, 0.3), 0.7 * a + 0.3 * near)
    anti = -a
    assert torch.equal(slerp(a, anti, 0.25), 0.75 * a + 0.25 * anti)
    z = torch.zeros(1, 3)
    assert torch.equal(slerp(a, z, 0.5), 0.5 * a)
    torch.testing.assert_close(lerp([a, b], 0.25), torch.tensor([[0.75, 0.5, 0.0]]))


def test_regmean_formula_by_hand():
    g0, g1 = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))
    h0, h1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    diag = RegMean([torch.diagonal(g0), torch.diagonal(g1)], [0.5, 0.5], full=False, ridge=0.0)
    # per coordinate: (g0 h0 + g1 h1) / (g0 + g1)
    torch.testing.assert_close(diag([h0, h1]), torch.tensor([[(4 + 3) / 5, (1 - 3) / 4]]))
    g0f = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    full = RegMean([g0f, g1], [0.25, 0.75], full=True, shrink=1.0, ridge=0.0)
    s = 0.25 * g0f + 0.75 * g1
    want = torch.linalg.solve(s, 0.25 * g0f @ h0.T + 0.75 * g1 @ h1.T).T
    torch.testing.assert_close(full([h0, h1]), want)
    ridge = RegMean([g0f, g1], [0.5, 0.5], full=True, shrink=0.5, ridge=0.1)
    torch.testing.assert_close(ridge([h0, h0]), h0)  # identical states come back exactly


# --------------------------------------------------------------------------- metrics
def test_metrics_hand_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x + 1) == pytest.approx(1.0)
    y = torch.randn(50, 4, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    hsic = lambda k, m: torch.trace(k @ m)  # noqa: E731  (Gram-matrix form of linear CKA)
    kx, ky = xc @ xc.T, yc @ yc.T
    assert linear_cka(x, y) == pytest.approx(float(hsic(kx, ky) / (hsic(kx, kx) * hsic(ky, ky)).sqrt()))
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert midness((a + b) / 2, a, b).item() == pytest.approx(1.0)
    assert midness(a, a, b).item() == pytest.approx(0.0)
    assert midness(torch.tensor([[0.5, 0.0]]), a, b).item() == pytest.approx(1 - 0.5 / (math.sqrt(2) / 2))
    assert math.isnan(midness(a, a, a).item())
    lerp_mid = (a + b) / 2  # 45° of 90°, norm 1/√2 against 1 on the geodesic
    assert arc_ratio(lerp_mid, a, b).item() == pytest.approx(0.5)
    assert arc_norm_dev(lerp_mid, a, b).item() == pytest.approx(math.cos(math.pi / 4) - 1)
    assert arc_norm_dev(slerp(a, b, 0.3), a, b).item() == pytest.approx(0.0, abs=1e-6)
    a3, b3 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert off_plane(torch.tensor([[2.0, 5.0, 0.0]]), a3, b3).item() == pytest.approx(0.0, abs=1e-12)
    assert off_plane(torch.tensor([[0.0, 3.0, 4.0]]), a3, b3).item() == pytest.approx(0.8)
    assert cosine(a, b).item() == pytest.approx(0.0)


def test_compare_merges_hidden_vs_weight(zoo, tok):
    models = [zoo["a"], zoo["b"]]
    m = HiddenStateMerger(models, layers=[1, 2], alpha=0.5, op="slerp")
    wm = weight_merge(models, "lerp", 0.5)
    rep = compare_merges(m, calib(tok), wm)
    assert len(rep["hidden"]) == len(rep["weight"]) == 4
    h = rep["hidden"]
    assert h[0]["midness"] == pytest.approx(0.0, abs=1e-6) and h[0]["cka_a"] == pytest.approx(1.0)
    assert h[1]["arc_ratio"] == pytest.approx(0.5, abs=1e-4)  # first mixed layer: exact SLERP
    assert h[1]["arc_norm_dev"] == pytest.approx(0.0, abs=1e-4)
    assert h[1]["off_plane"] == pytest.approx(0.0, abs=1e-3)
    for row in rep["weight"]:
        assert all(math.isfinite(row[k]) for k in ("midness", "cka_a", "cka_b"))


# --------------------------------------------------------------------------- weight merges
def test_weight_merge_baselines(zoo, tok):
    a, b = zoo["a"], zoo["b"]
    ids, mask = batch(tok, ["cat 1+1=2"])
    ref = a(input_ids=ids, attention_mask=mask).logits
    for op in ("lerp", "slerp"):
        assert torch.equal(weight_merge([a, b], op, 0.0)(input_ids=ids, attention_mask=mask).logits, ref)
    same = weight_merge([a, a], "regmean", 0.5, calib=calib(tok))
    torch.testing.assert_close(same(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=1e-4)
    part = weight_merge([a, b], "lerp", 0.5, layers=[2])
    sa, sp, sb = a.state_dict(), part.state_dict(), b.state_dict()
    assert torch.equal(sp["model.layers.1.mlp.up_proj.weight"], sa["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(sp["model.layers.2.mlp.up_proj.weight"],
                               (sa["model.layers.2.mlp.up_proj.weight"] + sb["model.layers.2.mlp.up_proj.weight"]) / 2)  # fmt: skip
    assert torch.equal(sp["lm_head.weight"], sa["lm_head.weight"])


# --------------------------------------------------------------------------- lm-eval, run, sweep
@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden_tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        choices = sorted({str(x + y), str(x + y + 1), str(abs(x - y) + 20), str(x * y + 30)})
        rows.append({"prompt": f"{x}+{y}=", "choices": choices, "label": choices.index(str(x + y))})
    data = d / "tiny_sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_sums.yaml").write_text(
        "task: hm_tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    gen = d / "tiny_gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["choices"][r["label"]]}) + "\n"
                           for r in rows[:4]))  # fmt: skip
    (d / "tiny_gen.yaml").write_text(
        "task: hm_tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {gen}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 3\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return d


def test_lm_eval_scores_merged_module(zoo, tok, mc_task):
    from lsm_dist.hidden.run import lm_eval_scores

    module = MergedCausalLM.from_models([zoo["a"], zoo["b"]], layers=[1, 2, 3], alpha=0.0)
    ref = lm_eval_scores(zoo["a"], tok, ["hm_tiny_sums"], include_path=str(mc_task))
    got = lm_eval_scores(module, tok, ["hm_tiny_sums"], include_path=str(mc_task))
    assert got["hm_tiny_sums"]["primary"] == ref["hm_tiny_sums"]["primary"]  # α = 0 is model a
    module.set_mix(alpha=0.75, op="slerp")
    mixed = lm_eval_scores(module, tok, ["hm_tiny_sums"], include_path=str(mc_task))
    assert 0.0 <= mixed["hm_tiny_sums"]["acc,none"] <= 1.0
    # generate_until goes through module.generate (left-padded batch, stop sequences)
    module.set_mix(alpha=0.0)
    calls, inner = [], module.merger.generate
    module.merger.generate = lambda *a, **k: calls.append(k) or inner(*a, **k)
    g_ref = lm_eval_scores(zoo["a"], tok, ["hm_tiny_gen"], include_path=str(mc_task), batch_size=4)
    g_mod = lm_eval_scores(module, tok, ["hm_tiny_gen"], include_path=str(mc_task), batch_size=4)
    assert g_mod["hm_tiny_gen"]["primary"] == g_ref["hm_tiny_gen"]["primary"]
    assert calls and calls[0]["attention_mask"] is not None and calls[0]["stopping_criteria"] is not None
    out = module.generate(tok(["2+2="], return_tensors="pt")["input_ids"], max_length=10)
    assert out.shape[1] <= 10


def test_run_and_sweep_write_reports(zoo, tok, mc_task, tmp_path):
    p = zoo["paths"]
    cfg = from_dict(HiddenMergeConfig, {
        "models": [str(p["a"]), str(p["b"])], "op": "regmean", "layers": [2, 3], "alphas": [0.5, 0.75],
        "calib_samples": 16, "tasks": ["hm_tiny_sums"], "include_path": str(mc_task), "limit": 8,
        "prompts": ["3+4="], "max_new_tokens": 4, "out_dir": str(tmp_path / "run")})  # fmt: skip
    res = run_hidden_merge(cfg)
    out = tmp_path / "run"
    for f in ("results.json", "report.md", "metrics.png", "hidden_merge.resolved.yaml"):
        assert (out / f).is_file(), f
    assert (out / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "results.json").read_text())
    assert saved["mix"] == {"2": 0.5, "3": 0.75} and set(saved["scores"]) == {"model0", "model1", "hidden", "weight"}
    assert len(res["metrics"]["hidden"]) == 4 and res["samples"][0]["prompt"] == "3+4="
    assert "| layer |" in (out / "report.md").read_text()

    rows = sweep_hidden_vs_weight([p["a"], p["b"]], ops=["lerp", "slerp"], layer_ranges=["2:"],
                                  alphas=(0.5,), tasks=["hm_tiny_sums"], include_path=str(mc_task),
                                  limit=8, calib_texts=texts_a(4, 9) + texts_b(4, 9),
                                  out_dir=tmp_path / "sweep")  # fmt: skip
    assert [r["method"] for r in rows] == ["model0", "model1", "hidden", "weight", "hidden", "weight"]
    assert all(r["layers"] == "2-3" for r in rows[2:])
    for f in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "sweep" / f).is_file(), f
    header = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[0]
    assert header.startswith("op,layers,alpha,method,hm_tiny_sums,mean_midness")


def test_cli_hidden_merge(zoo, tmp_path, capsys):
    from lsm_dist.cli import main

    p = zoo["paths"]
    args = ["hidden-merge", f"models=[{p['a']},{p['b']}]", "op=slerp", "layers=[1,3]", "alpha=0.25",
            "calib_samples=8", "weight_baseline=false", f"out_dir={tmp_path / 'cli'}"]  # fmt: skip
    assert main(args) == 0
    assert "# Hidden-state merge: slerp" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["mix"] == {"1": 0.25, "3": 0.25}
    assert main([*args[:3], "layers=[9]"]) == 1 and "layer 9 is out of range" in capsys.readouterr().err
    assert main([*args[:3], "alpha=1.5"]) == 2 and "alpha" in capsys.readouterr().err
