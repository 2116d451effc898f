"""Tests for lsm_dist.stats: streaming moments, PCA spectrum, run_stats outputs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError, from_dict
from lsm_dist.stats import (
    CSV_FIELDS,
    StatsConfig,
    components_for_variance,
    explained_variance,
    format_summary,
    pca_spectrum,
    run_stats,
    subsample_rows,
    tensor_moments,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def direct(x: torch.Tensor) -> dict[str, float]:
    """Reference: two-pass float64 moments on the full tensor (hand formulas)."""
    a = x.to(torch.float64).numpy().ravel()
    n = a.size
    mean = a.sum() / n
    d = a - mean
    m2, m3, m4 = (d**2).sum() / n, (d**3).sum() / n, (d**4).sum() / n
    std = math.sqrt(m2)
    return {
        "numel": n, "mean": mean, "var": m2, "std": std, "skewness": m3 / m2**1.5,
        "excess_kurtosis": m4 / m2**2 - 3.0, "min": a.min(), "max": a.max(),
        "frac_3sigma": float((np.abs(d) > 3 * std).sum()) / n,
    }


def assert_moments(got: dict, ref: dict, rel: float = 1e-9) -> None:
    assert got["numel"] == ref["numel"]
    assert got["min"] == ref["min"] and got["max"] == ref["max"]
    assert got["frac_3sigma"] == pytest.approx(ref["frac_3sigma"], abs=1.0 / ref["numel"])
    assert abs(got["mean"] - ref["mean"]) <= rel * (abs(ref["mean"]) + ref["std"])
    for k in ("var", "std", "skewness", "excess_kurtosis"):
        assert got[k] == pytest.approx(ref[k], rel=rel, abs=rel * 1e-3), k


def student_t(shape, df, seed, scale=1.0, loc=0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(loc + scale * rng.standard_t(df, size=shape)).to(torch.float32)


def gaussian(shape, seed, scale=1.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(scale * rng.standard_normal(shape)).to(torch.float32)


def make_llama(path, layers=2, hidden=32, inter=48, seed=0, bf16=True, config=True):
    """A tiny Llama-style checkpoint: heavy-tailed attention, Gaussian MLP."""
    path.mkdir(parents=True, exist_ok=True)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": gaussian((64, hidden), seed),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": gaussian((64, hidden), seed + 1),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        s = seed + 10 * (i + 1)
        for j, r in enumerate(("q", "k", "v", "o")):
            t[p + f"self_attn.{r}_proj.weight"] = student_t((hidden, hidden), 5, s + j, 0.02)
        t[p + "mlp.gate_proj.weight"] = gaussian((inter, hidden), s + 5, 0.02)
        t[p + "mlp.up_proj.weight"] = gaussian((inter, hidden), s + 6, 0.02)
        t[p + "mlp.down_proj.weight"] = gaussian((hidden, inter), s + 7, 0.02)
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    if bf16:
        for k in list(t):
            if "v_proj" in k or "up_proj" in k:
                t[k] = t[k].to(torch.bfloat16)
    save_file(t, str(path / "model.safetensors"))
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return path


def one_tensor(tmp_path, name, x, fname="m.safetensors") -> Checkpoint:
    save_file({name: x.contiguous()}, str(tmp_path / fname))
    return Checkpoint(tmp_path / fname)


# -- moments ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_elems", [7, 48 * 5, 48 * 64, 1 << 22])
def test_streaming_moments_match_direct(tmp_path, max_elems):
    name = "model.layers.0.self_attn.q_proj.weight"
    x = student_t((64, 48), 5, 1, scale=2.0, loc=0.3)  # 1 row .. all rows per block
    ck = one_tensor(tmp_path, name, x)
    got = tensor_moments(ck, name, max_elems=max_elems)
    assert_moments(got, direct(x))
    if max_elems < 48 * 64:
        assert len(list(ck.iter_rows(name, max_elems))) > 1


def test_bf16_and_3d_tensor_moments(tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    x = student_t((37, 6, 5), 4, 2, 0.05).to(torch.bfloat16)
    ck = one_tensor(tmp_path, name, x)
    assert_moments(tensor_moments(ck, name, max_elems=60), direct(x))


def test_large_offset_is_numerically_sound(tmp_path):
    # mean >> std: raw power sums would cancel catastrophically; the Chan/Pébay merge does not
    name = "model.layers.0.mlp.up_proj.weight"
    rng = np.random.default_rng(3)
    x = torch.from_numpy(1e4 + 1e-2 * rng.standard_t(6, size=(300, 20)))  # float64 storage
    ck = one_tensor(tmp_path, name, x)
    assert_moments(tensor_moments(ck, name, max_elems=140), direct(x), rel=1e-8)


def test_heavy_tail_has_higher_kurtosis(tmp_path):
    t = student_t((128, 256), 5, 4, 0.02)
    g = gaussian((128, 256), 5, 0.02)
    save_file({"model.layers.0.self_attn.q_proj.weight": t,
               "model.layers.0.mlp.gate_proj.weight": g}, str(tmp_path / "m.safetensors"))
    ck = Checkpoint(tmp_path / "m.safetensors")
    kt = tensor_moments(ck, "model.layers.0.self_attn.q_proj.weight", 1000)
    kg = tensor_moments(ck, "model.layers.0.mlp.gate_proj.weight", 1000)
    assert kt["excess_kurtosis"] > 1.5  # population value 6 for df=5
    assert abs(kg["excess_kurtosis"]) < 0.2
    assert abs(kg["skewness"]) < 0.1
    assert kt["frac_3sigma"] > kg["frac_3sigma"] * 0.5 and 0.001 < kg["frac_3sigma"] < 0.005


def test_constant_tensor(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    ck = one_tensor(tmp_path, name, torch.full((10, 4), 0.5))
    m = tensor_moments(ck, name, max_elems=8)
    assert m["mean"] == 0.5 and m["var"] == 0.0 and m["frac_3sigma"] == 0.0
    assert math.isnan(m["skewness"]) and math.isnan(m["excess_kurtosis"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raises_naming_tensor_and_file(tmp_path, bad):
    name = "model.layers.3.self_attn.k_proj.weight"
    x = gaussian((40, 8), 0)
    x[33, 2] = bad
    ck = one_tensor(tmp_path, name, x, "broken.safetensors")
    with pytest.raises(ValueError, match=r"k_proj.*broken\.safetensors.*NaN/Inf"):
        tensor_moments(ck, name, max_elems=16)


# -- PCA -------------------------------------------------------------------------------
def test_pca_rank2_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2, generator=g) @ torch.randn(2, 64, generator=g)
    a = a + torch.randn(1, 64, generator=g) * 5  # column offsets are removed by centering
    evr = pca_spectrum(a, 8)
    assert evr.shape == (8,)
    assert evr[:2].sum() >= 0.999
    assert np.all(np.diff(evr) <= 1e-12)
    assert components_for_variance(explained_variance(a), 0.9) <= 2
    sub = pca_spectrum(a, 4, max_rows=50, seed=1)
    assert sub[:2].sum() >= 0.999


def test_pca_isotropic_and_edge_cases():
    x = torch.randn(2000, 20, generator=torch.Generator().manual_seed(1))
    evr = explained_variance(x)
    assert evr.sum() == pytest.approx(1.0, abs=1e-6)
    assert components_for_variance(evr, 0.9) >= 15
    assert len(pca_spectrum(x, 50)) == 20  # rank-limited
    assert components_for_variance(explained_variance(torch.ones(5, 3))) == 0
    assert components_for_variance(np.array([0.5, 0.4, 0.1]), 0.9) == 2


def test_subsample_rows_deterministic():
    a, b = subsample_rows(1000, 64, seed=3), subsample_rows(1000, 64, seed=3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 64 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, subsample_rows(1000, 64, seed=4))
    assert np.array_equal(subsample_rows(10, 64), np.arange(10))


# -- config and run --------------------------------------------------------------------
def test_config_validation(tmp_path):
    cfg = from_dict(StatsConfig, {"checkpoints": [str(tmp_path)], "pca_components": 4})
    assert cfg.blocks == ["attn", "mlp"] and cfg.pca_components == 4
    for bad, field in [({}, "checkpoints"), ({"blocks": ["ffn"]}, "blocks"),
                       ({"include": "("}, "include"), ({"labels": ["a", "b"]}, "labels"),
                       ({"pca_components": 0}, "pca_components"), ({"max_pca_rows": 1}, "max_pca_rows")]:
        data = {"checkpoints": [str(tmp_path)], **bad} if field != "checkpoints" else bad
        with pytest.raises(ConfigError, match=field):
            from_dict(StatsConfig, data)


def test_run_stats_writes_outputs(tmp_path, capsys):
    a = make_llama(tmp_path / "model_a", seed=0)
    b = make_llama(tmp_path / "b", seed=100, config=False) / "model.safetensors"
    out = tmp_path / "out"
    cfg = StatsConfig(checkpoints=[str(a), str(b)], pca_components=6, max_pca_rows=20,
                      max_elems=100, out_dir=str(out))
    summary = run_stats(cfg)
    assert summary == out / "summary.md"
    assert (out / "stats.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))

    with open(out / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS
    assert len(rows) == 2 * 2 * 7  # models x layers x (4 attn + 3 mlp); norms/embeds excluded
    assert {r["model"] for r in rows} == {"model_a", "model"}
    assert {r["block"] for r in rows} == {"attn", "mlp"}
    v = next(r for r in rows if r["name"] == "model.layers.1.self_attn.v_proj.weight")
    assert v["dtype"] == "BF16" and v["shape"] == "32x32" and v["layer"] == "1" and v["role"] == "v_proj"

    # streamed moments and the gathered PCA row subsample match direct computation
    ck = Checkpoint(a)
    up = next(r for r in rows if r["model"] == "model_a" and r["name"].endswith("0.mlp.up_proj.weight"))
    x = ck.read(up["name"])
    ref = direct(x)
    assert float(up["excess_kurtosis"]) == pytest.approx(ref["excess_kurtosis"], rel=1e-9)
    full = explained_variance(x, max_rows=20, seed=0)
    got = np.array([float(s) for s in up["pca_evr"].split()])
    np.testing.assert_allclose(got, full[:6], rtol=1e-5, atol=1e-7)
    assert int(up["pca_k90"]) == components_for_variance(full, 0.9)

    attn_k = [float(r["excess_kurtosis"]) for r in rows if r["block"] == "attn"]
    mlp_k = [float(r["excess_kurtosis"]) for r in rows if r["block"] == "mlp"]
    assert np.mean(attn_k) > np.mean(mlp_k) + 0.5

    md = summary.read_text()
    table = format_summary(rows)  # works on csv strings too
    assert table in md and table in capsys.readouterr().out
    body = table.splitlines()[2:]
    assert sorted(ln.split(" | ")[:2] for ln in body) == [
        ["| model", "attn"], ["| model", "mlp"], ["| model_a", "attn"], ["| model_a", "mlp"]]
    assert "max excess kurtosis" in table.splitlines()[0]


def test_run_stats_nan_names_tensor(tmp_path):
    p = make_llama(tmp_path / "m", layers=1, bf16=False)
    from safetensors.torch import load_file

    t = load_file(str(p / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight"][5, 5] = float("nan")
    save_file(t, str(p / "model.safetensors"))
    cfg = StatsConfig(checkpoints=[str(p)], out_dir=str(tmp_path / "out"), max_elems=64)
    with pytest.raises(ValueError, match=r"down_proj.*model\.safetensors"):
        run_stats(cfg, echo=False)
    assert not (tmp_path / "out" / "summary.md").exists()


def test_run_stats_other_block_and_empty_selection(tmp_path):
    p = make_llama(tmp_path / "m", layers=1)
    cfg = StatsConfig(checkpoints=[str(p)], blocks=["other"], out_dir=str(tmp_path / "o"))
    run_stats(cfg, echo=False)
    with open(tmp_path / "o" / "stats.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["model.norm.weight"]["pca_k90"] == ""  # 1-D: no PCA
    assert rows["model.embed_tokens.weight"]["pca_k90"] != ""
    bad = StatsConfig(checkpoints=[str(p)], include="nomatch", out_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no tensors selected"):
        run_stats(bad, echo=False)
