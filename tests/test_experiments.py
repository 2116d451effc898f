"""The paper's experiments (lsm_dist.experiments) in quick mode on the tiny zoo, and the
PCA-at-the-same-ratio baseline against a hand computation."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lsm_dist.config import ConfigError
from lsm_dist.experiments import (
    ExperimentConfig,
    fit_pca,
    pca_components_for,
    pca_reconstruct,
    relative_error,
    run_experiment,
    vae_model_config,
)
from lsm_dist.experiments.recon import latent_numbers
from lsm_dist.model import VAEConfig


# ---- PCA at the VAE's compression ratio (hand-computed) ------------------------------------
def test_pca_matches_hand_computation():
    # centered data: variance 0.5 along x, 0.125 along y -> the first component is the x axis
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    mean, comps = fit_pca(x, 1)
    assert np.allclose(mean, [0.0, 0.0])
    assert np.allclose(np.abs(comps), [[1.0, 0.0]])
    xh = pca_reconstruct(x, mean, comps)
    assert np.allclose(xh, [[1, 0], [-1, 0], [0, 0], [0, 0]], atol=1e-7)
    # lost: 0.5^2 + 0.5^2 = 0.5 of a total 1 + 1 + 0.25 + 0.25 = 2.5
    assert relative_error(x, xh) == pytest.approx(0.2)
    # with an offset the mean is added back; error 0.5 of sum of squares 74.5
    y = x + 3.0
    m2, c2 = fit_pca(y, 1)
    assert np.allclose(m2, [3.0, 3.0])
    assert relative_error(y, pca_reconstruct(y, m2, c2)) == pytest.approx(0.5 / 74.5)
    # every component kept: exact; k larger than the data allows is capped
    assert relative_error(x, pca_reconstruct(x, *fit_pca(x, 2))) == pytest.approx(0.0, abs=1e-12)
    assert fit_pca(x[:1], 5)[1].shape == (1, 2)


def test_svd_baseline_hand_computed():
    """The per-matrix SVD keeps k(rows + cols) = numel / r numbers and is the best rank-k fit."""
    from lsm_dist.experiments.recon import svd_rank, svd_reconstruct

    assert svd_rank((64, 64), 2.0) == 16 and svd_rank((100, 50), 1.6) == 20 and svd_rank((4, 4), 100) == 1
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, 64, dtype=torch.float64)
    w = (u * s) @ v.T + 0.5
    wh = svd_reconstruct(w, 2.0)  # rank 16 of the centered matrix
    assert torch.linalg.matrix_rank(wh - w.mean()) <= 17
    tail = float((s[16:] ** 2).sum())
    err = float(((wh - w) ** 2).sum())
    centered = w - w.mean()  # centering moves the spectrum slightly: compare with its own tail
    sc = torch.linalg.svdvals(centered)
    assert abs(err - float((sc[16:] ** 2).sum())) < 1e-6 * tail


def test_pca_components_at_the_vae_ratio():
    # samples of 8 x 64 = 512 values, token_stride 2 -> 4 latent tokens
    for ratio, dim in ((1.6, 80), (2.0, 64), (4.0, 32)):
        cfg = ExperimentConfig(name="recon_ratio", tokens=8, chunk=64, vae={})
        model = vae_model_config(cfg, ratio)
        assert model["latent_dim"] == dim
        vcfg = VAEConfig(**model)
        assert vcfg.compression_ratio == pytest.approx(ratio)
        assert latent_numbers(vcfg) == pca_components_for(512, ratio) == 512 / ratio
    with pytest.raises(ConfigError, match="ratios"):
        vae_model_config(ExperimentConfig(name="recon_ratio", tokens=8, chunk=64, vae={}), 3.0)


def test_config_presets_and_validation():
    q = ExperimentConfig(name="cross_arch", quick=True)
    assert q.zoo_config == "configs/zoo/tiny.yaml" and q.out_dir == "runs/experiments-quick/cross_arch"
    assert q.shared_dir == "runs/experiments-quick/shared"
    full = ExperimentConfig(name="expert_merge", eval_n=10)
    assert full.eval_n == 10 and full.experts == ["llama-shift", "llama-flip"]
    with pytest.raises(ConfigError, match="name"):
        ExperimentConfig(name="nope")
    with pytest.raises(ConfigError, match="lambdas"):
        ExperimentConfig(name="cross_arch", lambdas=[1.5])


# ---- the experiments, quick mode -----------------------------------------------------------
@pytest.fixture(scope="module")
def exp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def _cfg(name, root, tiny_zoo, **kw):
    zoo_dir = Path(next(iter(tiny_zoo.values()))).parent
    return ExperimentConfig(name=name, quick=True, out_dir=str(root / name), shared_dir=str(root / "shared"),
                            zoo_dir=str(zoo_dir), **kw)


def _rows(out: Path, stem: str = "results") -> list[dict]:
    return list(csv.DictReader((out / f"{stem}.csv").open()))


def _check_outputs(md: Path, title: str) -> Path:
    out = md.parent
    text = md.read_text()
    assert title in text and "## Observations" in text and "| " in text
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "result.json").read_text())["observations"]
    return out


def _check_acc(rows: list[dict], fams=("arith", "recall", "reverse")) -> None:
    for r in rows:
        for f in (*fams, "mean"):
            assert 0.0 <= float(r[f]) <= 1.0, (f, r)
        assert 1.0 < float(r["ppl"]) < math.inf, r  # word perplexity on the English text


@pytest.mark.slow
def test_recon_ratio_quick(exp_root, tiny_zoo):
    # two ratios keep the test short (each VAE trains in its own process); r=2 is shared
    md = run_experiment(_cfg("recon_ratio", exp_root, tiny_zoo, ratios=[2.0, 4.0]))
    out = _check_outputs(md, "recon_ratio")
    rows = _rows(out)
    assert {(r["set"], r["block"]) for r in rows} == {(s, b) for s in ("train", "heldout") for b in ("attn", "mlp", "all")}
    for r in rows:
        for k in ("VAE rel-MSE", "PCA rel-MSE", "SVD rel-MSE", "VAE rel-Frob", "PCA rel-Frob", "SVD rel-Frob"):
            assert 0.0 <= float(r[k]) < 2.0 and math.isfinite(float(r[k])), (k, r)
    # PCA on its own training samples: nested subspaces, so error grows with the ratio
    pca = [float(r["PCA rel-MSE"]) for r in sorted((r for r in rows if (r["set"], r["block"]) == ("train", "all")),
                                                  key=lambda r: float(r["r"]))]
    assert pca == sorted(pca) and len(pca) == 2
    assert [int(r["latent numbers / sample"]) for r in rows[:2]] == [64, 32]  # 128-value samples
    acc = _rows(out, "accuracy")
    assert [r["weights"] for r in acc] == ["original", "VAE r=2", "VAE r=4", "PCA r=2", "PCA r=4",
                                           "SVD r=2", "SVD r=4"]
    _check_acc(acc)
    # the SVD baseline: nested ranks, so its error grows with the ratio too
    svd = [float(r["SVD rel-MSE"]) for r in sorted((r for r in rows if (r["set"], r["block"]) == ("train", "all")),
                                                  key=lambda r: float(r["r"]))]
    assert svd == sorted(svd) and svd[0] > 0


@pytest.mark.slow
def test_self_merge_quick(exp_root, tiny_zoo):
    out = _check_outputs(run_experiment(_cfg("self_merge", exp_root, tiny_zoo)), "self_merge")
    rows = _rows(out)
    assert [(r["variant"], r["decode"]) for r in rows] == [
        ("original", ""), ("self-merge K=1", "delta"), ("self-merge K=4", "delta"),
        ("VAE recon (decode μ)", "direct"), ("self-merge K=1", "direct"), ("self-merge K=4", "direct")]
    _check_acc(rows)
    assert "delta decoding: perplexity within" in (out / "results.md").read_text()


@pytest.mark.slow
def test_expert_merge_quick(exp_root, tiny_zoo):
    out = _check_outputs(run_experiment(_cfg("expert_merge", exp_root, tiny_zoo)), "expert_merge")
    rows = _rows(out)
    assert [(r["method"], r["space"]) for r in rows[3:]] == [
        (m, s) for m in ("lerp", "ties")
        for s in ("latent/delta", "latent/direct", "latent-tv/direct", "weight")]
    _check_acc(rows)
    for space in ("latent-delta", "latent-direct", "weight"):
        assert (out / "merges" / f"lerp-{space}" / "model" / "model.safetensors.index.json").is_file()
    text = (out / "results.md").read_text()
    assert "gain retention" in text and "best latent/delta merge" in text and "best latent-tv/direct" in text
    plan = json.loads((out / "merges" / "ties-latent-tv-direct" / "merge_plan.json").read_text())["plan"]
    assert plan["encoding"] == "delta" and plan["base"] == "llama-tiny-base"


@pytest.mark.slow
def test_blocks_quick(exp_root, tiny_zoo):
    out = _check_outputs(run_experiment(_cfg("blocks", exp_root, tiny_zoo)), "blocks")
    rows = _rows(out)
    assert [r["merged blocks"] for r in rows] == ["(original)"] * 2 + [
        b for b in ("MLP only", "attention only", "both") for _ in range(2)]
    _check_acc(rows)
    # MLP-only merges leave the target's attention tensors untouched
    plan = json.loads((out / "merges" / "lerp-mlp-latent" / "merge_plan.json").read_text())
    assert plan["plan"]["blocks"] == ["mlp"]


@pytest.mark.slow
def test_cross_arch_quick_cli_and_resume(exp_root, tiny_zoo, capsys):
    from lsm_dist.cli import main

    zoo_dir = Path(next(iter(tiny_zoo.values()))).parent
    argv = ["experiment", "-c", "configs/experiments/cross_arch.yaml", "--quick", f"out_dir={exp_root / 'cross_arch'}",
            f"shared_dir={exp_root / 'shared'}", f"zoo_dir={zoo_dir}"]
    repo = Path(__file__).resolve().parents[1]
    argv[2] = str(repo / argv[2])
    assert main(argv) == 0
    assert "cross_arch" in capsys.readouterr().out
    out = exp_root / "cross_arch"
    rows = _rows(out)
    _check_acc(rows)
    # both directions; every variant of the quick preset at each of its λ
    assert {r["direction"] for r in rows} == {"llama-tiny-base ← qwen2-tiny-base", "qwen2-tiny-base ← llama-tiny-base"}
    d = [r for r in rows if r["direction"] == "llama-tiny-base ← qwen2-tiny-base" and r["variant"]]
    assert [(r["variant"], float(r["λ"])) for r in d] == [
        ("gaussian/latent/delta", 0.0), ("gaussian/latent/delta", 0.1), ("gaussian/latent/delta", 1.0),
        ("gaussian/latent/direct", 0.1), ("activations/weight", 0.1), ("activations/weight", 0.5),
        ("activations/latent/delta/cka", 0.1)]
    target = next(r for r in rows if r["what"] == "target llama-tiny-base")
    same = d[0]  # λ = 0, delta decoding: the target itself, scored once, not merged again
    assert same["what"].startswith("= the target") and same["arith"] == target["arith"]
    assert all(r["verdict"] for r in d[1:])
    # the reverse direction carries the llama reverse expert's task vector into qwen2
    skill = [r for r in rows if r["what"] == "skill of llama-tiny-reverse carried"]
    assert [(r["variant"], float(r["λ"])) for r in skill] == [("activations/weight", 1.0), ("gaussian/latent/delta", 1.0)]
    text = (out / "results.md").read_text()
    assert "skill transfer" in text and ("beats the target" in text or "beat the target" in text)
    # a re-run reuses the VAE, merges and scores: no training, same numbers
    assert main(argv) == 0
    again = json.loads((out / "result.json").read_text())
    assert not any(k.startswith("train") for k in again["timings"])
    assert _rows(out) == rows


@pytest.mark.slow
def test_noise_quick_on_a_user_checkpoint(exp_root, tiny_zoo):
    """The tolerance curve of any checkpoint (`models`, no zoo): accuracy / perplexity per
    noise level; the noisy copies differ from the original by the asked relative MSE."""
    from lsm_dist.checkpoint import Checkpoint

    mine = str(tiny_zoo["llama-tiny-arith"])
    cfg = ExperimentConfig(name="noise", quick=True, out_dir=str(exp_root / "noise"),
                           shared_dir=str(exp_root / "shared"), models={"mine": mine},
                           noise_models=["mine"], noise_levels=[0.01, 0.3], zoo_config="none")
    out = _check_outputs(run_experiment(cfg), "noise")
    rows = _rows(out)
    assert [float(r["rel-MSE"]) for r in rows] == [0.0, 0.01, 0.3]
    _check_acc(rows)
    # a tiny arithmetic model's word perplexity on English is astronomical either way, so
    # only its form is checked here; the real model's curve is in docs/experiments.md
    assert all(math.isfinite(float(r["ppl"])) and float(r["ppl"]) > 1 for r in rows)
    a = Checkpoint(mine)
    b = Checkpoint(out / "merges" / "mine-noise0.3" / "model")
    n = "model.layers.0.mlp.up_proj.weight"
    x, y = a.read(n).double(), b.read(n).double()
    rel = float(((y - x) ** 2).mean() / x.var())
    assert 0.2 < rel < 0.4, rel
    assert torch.equal(a.read("model.embed_tokens.weight"), b.read("model.embed_tokens.weight"))
    with pytest.raises(ConfigError, match="neither in `models`"):
        run_experiment(ExperimentConfig(name="noise", quick=True, out_dir=str(exp_root / "n2"),
                                        noise_models=["nope"], zoo_config="none"))


def test_retention_on_the_task_an_expert_was_trained_for():
    """Retention (merge - base) / (expert - base) is read on each expert's own task: the one it
    was fine-tuned on when known, else the one where it gains most."""
    from lsm_dist.experiments.merges import retention

    base = {"arith": 0.5, "recall": 0.2}
    ea = {"arith": 0.6, "recall": 0.4}  # trained for arith, gains more on recall
    eb = {"arith": 0.5, "recall": 0.6}
    rows = [{"label": "m", "arith": 0.55, "recall": 0.5}]
    fams = ["arith", "recall"]
    assert retention(base, ea, eb, rows, fams)["m"] == pytest.approx([1.5, 0.75])
    assert retention(base, ea, eb, rows, fams, own=["arith", None])["m"] == pytest.approx([0.5, 0.75])


def test_cross_arch_refuses_alignment_none_for_other_shapes_before_training(exp_root, tiny_zoo):
    """A `none` variant (tensors merged as they are) for a pair whose shapes differ is refused
    before any VAE is trained, naming the tensor and both models."""
    zoo_dir = Path(next(iter(tiny_zoo.values()))).parent
    cfg = ExperimentConfig(name="cross_arch", quick=True, out_dir=str(exp_root / "xa-none"),
                           shared_dir=str(exp_root / "xa-none-shared"), zoo_dir=str(zoo_dir),
                           hetero_target="llama-tiny-base", hetero_sources=["qwen2-tiny-base"], reverse=False,
                           variants=[{"alignment": "gaussian", "lambdas": [0.1]},
                                     {"alignment": "none", "lambdas": [0.1]}], transfers={})
    with pytest.raises(ConfigError, match=r"alignment none .*is 64x32 in .*llama-tiny-base, 96x48 in .*qwen2-tiny-base"):
        run_experiment(cfg)
    assert not list((exp_root / "xa-none-shared").glob("**/vae*"))
