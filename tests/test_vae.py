"""Transformer VAE: config validation, shapes, compression ratios, checkpoint I/O, losses."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lsm_dist.config import ConfigError, load_config
from lsm_dist.model import (
    BLOCK_IDS,
    FORMAT,
    TransformerVAE,
    VAECheckpointError,
    VAEConfig,
    count_parameters,
    kl_divergence,
    load_vae,
    per_block_mse,
    per_block_sse,
    recon_loss,
    save_vae,
    vae_digest,
    vae_loss,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vae"
TINY = dict(chunk=64, tokens=8, d_model=64, enc_layers=2, dec_layers=2, heads=4,
            latent_dim=32, token_stride=2, max_layers=16, num_roles=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # on small shared CPU VMs, 2 OpenMP threads make tiny matmuls ~100x slower than 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> VAEConfig:
    return VAEConfig(**{**TINY, **kw})


def make_cond(n: int, cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer": torch.randint(-1, cfg.max_layers, (n,), generator=g),
        "block": torch.randint(0, len(BLOCK_IDS), (n,), generator=g),
        "role": torch.randint(0, cfg.num_roles, (n,), generator=g),
    }


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pooled,stride", [(False, 1), (False, 2), (False, 4), (True, 2)])
@pytest.mark.parametrize("cond,skip", [("none", "none"), ("layer_block_role", "none"),
                                       ("none", "group"), ("none", "sample")])
def test_shapes(pooled, stride, cond, skip):
    cfg = tiny(pooled=pooled, token_stride=stride, cond=cond, skip=skip)
    m = TransformerVAE(cfg)
    x = torch.randn(3, cfg.tokens, cfg.chunk)
    c = make_cond(3, cfg) if cond != "none" else None
    out = m(x, c)
    lt = 1 if pooled else cfg.tokens // stride
    assert cfg.latent_shape == (lt, cfg.latent_dim)
    for k in ("mu", "logvar", "z"):
        assert out[k].shape == (3, lt, cfg.latent_dim)
    assert out["x_hat"].shape == x.shape
    mu, logvar = m.encode(x, c)
    assert m.decode(mu, c).shape == x.shape
    with pytest.raises(ValueError, match="encode expects"):
        m.encode(torch.randn(3, cfg.tokens + 1, cfg.chunk), c)
    with pytest.raises(ValueError, match="decode expects"):
        m.decode(torch.randn(3, lt, cfg.latent_dim + 1), c)


@pytest.mark.parametrize("skip,pooled", [("group", False), ("group", True), ("sample", False)])
def test_linear_skip_path(skip, pooled):
    """skip=group|sample: μ and x̂ are the transformer's plus a linear map of the token group or
    the whole sample; at init the two maps are a random orthonormal projection and its transpose."""
    cfg = tiny(skip=skip, pooled=pooled, latent_dim=64)
    m = TransformerVAE(cfg).eval()
    rows, n_in, n_out = cfg.skip_shape
    assert (rows, n_in, n_out) == ((1, 512, cfg.latent_tokens * 64) if skip == "sample"
                                   else (cfg.latent_tokens, cfg.group_values, 64))
    assert m.skip_enc.weight.shape == (n_out, n_in) and m.skip_dec.weight.shape == (n_in, n_out)
    assert torch.allclose(m.skip_enc.weight @ m.skip_dec.weight, torch.eye(n_out), atol=1e-5)
    x = torch.randn(4, cfg.tokens, cfg.chunk)
    with torch.no_grad():
        mu, _ = m.encode(x)
        ref = TransformerVAE(dataclasses.replace(cfg, skip="none"))
        ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("skip_")})
        mu0, _ = ref.eval().encode(x)
        lin = (x.reshape(4, rows, n_in) @ m.skip_enc.weight.T).reshape(mu.shape)
        assert torch.allclose(mu, mu0 + lin, atol=1e-5)
        out = m.decode(mu)
        want = ref.decode(mu) + (mu.reshape(4, rows, n_out) @ m.skip_dec.weight.T).reshape(x.shape)
        assert torch.allclose(out, want, atol=1e-5)
    assert m.num_parameters() == ref.num_parameters() + 2 * n_in * n_out == count_parameters(cfg)
    fl = 2 * 2 * rows * n_in * n_out * 3  # two linears, training = 3 × forward
    assert m.flops_per_sample() == ref.flops_per_sample() + fl


@pytest.mark.parametrize("skip", ["group", "sample"])
def test_init_skip_pca(skip):
    """The PCA init makes the linear path the best rank-k code of the fit samples: on data of
    rank ≤ k it is exact, and the returned energy fraction is 1 − PCA's relative error."""
    cfg = tiny(skip=skip, latent_dim=32)
    m = TransformerVAE(cfg).eval()
    rows, n_in, n_out = cfg.skip_shape
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n_in, n_out // 2, generator=g))[0]  # rank n_out/2 data
    x = (torch.randn(300 * rows, n_out // 2, generator=g) @ basis.T).reshape(-1, cfg.tokens, cfg.chunk)
    kept = m.init_skip_pca(x)
    assert kept == pytest.approx(1.0, abs=1e-9)
    w = m.skip_enc.weight.detach().double()
    v = x.double().reshape(-1, n_in)
    assert torch.allclose(v @ w.T @ w, v, atol=1e-4)  # encode-decode through the linear path
    assert torch.equal(m.skip_dec.weight, m.skip_enc.weight.T)
    noise = torch.randn(300, cfg.tokens, cfg.chunk, generator=g)
    kept = m.init_skip_pca(noise)
    gv = noise.double().reshape(-1, n_in)
    w = m.skip_enc.weight.detach().double()
    rel = float(((gv - gv @ w.T @ w) ** 2).sum() / (gv ** 2).sum())
    assert 0 < kept < 1 and rel == pytest.approx(1 - kept, abs=1e-5)
    with pytest.raises(ValueError, match="linear skip path"):
        TransformerVAE(tiny()).init_skip_pca(x)


def test_compression_ratios():
    paper = load_config(VAEConfig, CONFIGS / "paper.yaml")
    assert paper.compression_ratio == 2.0 and paper.latent_shape == (8, 640)
    # r = 4: stride 4 (4 latent tokens of 640)
    assert dataclasses.replace(paper, token_stride=4).compression_ratio == 4.0
    # r = 1.6: stride 2 with latent_dim 800, or stride 1 with latent_dim 400
    assert dataclasses.replace(paper, latent_dim=800).compression_ratio == pytest.approx(1.6)
    assert dataclasses.replace(paper, token_stride=1, latent_dim=400).compression_ratio == pytest.approx(1.6)
    assert dataclasses.replace(paper, token_stride=1).compression_ratio == 1.0
    assert dataclasses.replace(paper, pooled=True).compression_ratio == 16.0
    assert tiny().compression_ratio == 4.0


def test_parameter_counts_and_flops():
    paper = load_config(VAEConfig, CONFIGS / "paper.yaml")
    n = count_parameters(paper)
    # Table 10 with a GELU MLP (mlp_ratio 4) is ~90M; 12+12 blocks or d_model 1024 give 150-200M
    assert 85e6 < n < 95e6, n
    assert 150e6 < count_parameters(dataclasses.replace(paper, enc_layers=12, dec_layers=12)) < 200e6
    assert 150e6 < count_parameters(dataclasses.replace(paper, d_model=1024)) < 200e6
    with torch.device("meta"):
        m = TransformerVAE(paper)
    f = m.flops_per_sample()
    assert 0.9 < f / (6 * n * paper.tokens) < 1.1
    assert m.flops_per_sample(training=False) * 3 == f
    assert TransformerVAE(tiny()).num_parameters() == count_parameters(tiny())


@pytest.mark.parametrize("kw,field", [
    (dict(token_stride=3), "token_stride"),
    (dict(heads=5), "heads"),
    (dict(d_model=-64), "d_model"),
    (dict(chunk=0), "chunk"),
    (dict(tokens=-8), "tokens"),
    (dict(latent_dim=-1), "latent_dim"),
    (dict(enc_layers=-1), "enc_layers"),
    (dict(d_model=60, heads=4), "heads"),  # head dim 15 is odd: no RoPE
    (dict(dropout=1.0), "dropout"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(rope_base=0.5), "rope_base"),
    (dict(cond="layer"), "cond"),
    (dict(norm="batchnorm"), "norm"),
])
def test_invalid_configs(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        tiny(**kw)


def test_all_yaml_configs_load():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in paths} >= {"paper", "small", "tiny"}
    for p in paths:
        cfg = load_config(VAEConfig, p)
        assert count_parameters(cfg) > 0
    assert load_config(VAEConfig, CONFIGS / "tiny.yaml") == tiny()
    assert 1e6 < count_parameters(load_config(VAEConfig, CONFIGS / "small.yaml")) < 10e6


# ---- model behaviour --------------------------------------------------------------------------
def test_deterministic_and_sampling():
    torch.manual_seed(0)
    m = TransformerVAE(tiny()).eval()
    x = torch.randn(4, 8, 64)
    a, b = m(x, sample=False), m(x, sample=False)
    assert torch.equal(a["x_hat"], b["x_hat"]) and torch.equal(a["z"], a["mu"])
    s = m(x, sample=True)
    assert not torch.equal(s["z"], s["mu"])



def test_encode_means_alone():
    """A merge reading the means alone asks for no log-variances: none are computed or held."""
    torch.manual_seed(0)
    m = TransformerVAE(tiny()).eval()
    x = torch.randn(4, 8, 64)
    with torch.no_grad():
        (mu, lv), (mu1, lv1) = m.encode(x), m.encode(x, logvar=False)
    assert torch.equal(mu, mu1) and lv1 is None and lv.shape == mu.shape


def test_cond_embeddings():
    cfg = tiny(cond="layer_block_role")
    m = TransformerVAE(cfg).eval()
    x = torch.randn(4, 8, 64)
    c1, c2 = make_cond(4, cfg, 1), make_cond(4, cfg, 2)
    assert not torch.allclose(m(x, c1, sample=False)["x_hat"], m(x, c2, sample=False)["x_hat"])
    with pytest.raises(ValueError, match="cond"):
        m(x, None)
    with pytest.raises(ValueError, match=r"cond\['role'\] ids must lie in \[0, 16\)"):
        m(x, {**c1, "role": torch.full((4,), 16)})
    with pytest.raises(ValueError, match=r"cond\['layer'\] must be an integer tensor of shape \(4,\)"):
        m(x, {**c1, "layer": torch.zeros(3, dtype=torch.long)})
    # an unconditioned model ignores cond
    m0 = TransformerVAE(tiny()).eval()
    assert torch.equal(m0(x, c1, sample=False)["x_hat"], m0(x, None, sample=False)["x_hat"])


def test_bf16_autocast_cpu():
    cfg = tiny(cond="layer_block_role")
    m = TransformerVAE(cfg)
    x = torch.randn(4, 8, 64)
    c = make_cond(4, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, c)
        losses = vae_loss(out, x, beta=1e-3, kind="mse_tail")
    assert out["x_hat"].dtype == torch.bfloat16
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("cond", ["none", "layer_block_role"])
def test_tiny_vae_overfits_fixed_batch(cond):
    torch.manual_seed(0)
    cfg = tiny(cond=cond)
    m = TransformerVAE(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, cfg.tokens, cfg.chunk, generator=g)
    c = make_cond(32, cfg) if cond != "none" else None
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = last = None
    for _ in range(300):
        recon = vae_loss(m(x, c, sample=False), x, beta=0.0)["recon"]
        last = recon.item()
        first = first if first is not None else last
        if first / last >= 10:
            break
        opt.zero_grad()
        recon.backward()
        opt.step()
    assert first / last >= 10, (first, last)


# ---- checkpoint I/O ---------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    cfg = tiny(cond="layer_block_role", pooled=True)
    m = TransformerVAE(cfg).eval()
    d = save_vae(m, tmp_path / "vae")
    meta = json.loads((d / "config.json").read_text())
    assert meta["format"] == FORMAT and meta["d_model"] == 64 and meta["pooled"] is True
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left
    m2 = load_vae(d)
    assert m2.cfg == cfg and not m2.training
    x = torch.randn(5, 8, 64)
    c = make_cond(5, cfg)
    assert torch.equal(m(x, c, sample=False)["x_hat"], m2(x, c, sample=False)["x_hat"])
    dig = vae_digest(d)
    assert len(dig) == 16 and dig == vae_digest(d)
    with torch.no_grad():
        m.head.bias.add_(1.0)
    save_vae(m, d)
    assert vae_digest(d) != dig


def test_load_checkpoint_saved_before_a_new_config_field(tmp_path):
    """A VAE saved before ``skip`` existed (absent from config.json and the weights' metadata)
    loads with the field's default."""
    from safetensors.torch import load_file, save_file

    d = save_vae(TransformerVAE(tiny()), tmp_path / "old")
    meta = json.loads((d / "config.json").read_text())
    del meta["skip"]
    (d / "config.json").write_text(json.dumps(meta))
    sd = load_file(d / "model.safetensors")
    cfg = {k: v for k, v in meta.items() if k != "format"}
    save_file(sd, d / "model.safetensors", metadata={"format": FORMAT, "config": json.dumps(cfg)})
    assert load_vae(d).cfg.skip == "none"


def test_load_mismatched_config_fails(tmp_path):
    d = save_vae(TransformerVAE(tiny()), tmp_path / "a")
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "d_model": 32}))
    with pytest.raises(VAECheckpointError, match=r"config\.json.*shape mismatches \[decoder\.blocks\.0\.fc1\.weight: file \(256, 64\) vs config \(128, 32\).*\(\+\d+ more\)"):
        load_vae(d)
    (d / "config.json").write_text(json.dumps({**meta, "pooled": True}))
    with pytest.raises(VAECheckpointError, match=r"missing keys \[dec_pos\].*unexpected keys \[down\.bias, down\.weight"):
        load_vae(d)
    # same shapes, different non-shape field: caught via the config stored in the weights
    (d / "config.json").write_text(json.dumps({**meta, "rope_base": 10000.0}))
    with pytest.raises(VAECheckpointError, match="disagrees .* on rope_base"):
        load_vae(d)
    (d / "config.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(VAECheckpointError, match="format 'other'"):
        load_vae(d)
    (d / "config.json").write_text(json.dumps({**meta, "heads": 3}))
    with pytest.raises(VAECheckpointError, match=r"config\.json: heads:"):
        load_vae(d)


def test_load_refuses_nonfinite_and_missing(tmp_path):
    m = TransformerVAE(tiny())
    with torch.no_grad():
        m.encoder.blocks[0].fc1.weight[0, 0] = float("nan")
        m.head.bias[1] = float("inf")
    d = save_vae(m, tmp_path / "bad")
    with pytest.raises(VAECheckpointError, match=r"model\.safetensors: non-finite.*encoder\.blocks\.0\.fc1\.weight.*head\.bias"):
        load_vae(d)
    with pytest.raises(VAECheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope")
    (d / "model.safetensors").unlink()
    with pytest.raises(VAECheckpointError, match=r"model\.safetensors does not exist"):
        load_vae(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(VAECheckpointError, match="not a readable safetensors"):
        load_vae(d)
    (d / "config.json").unlink()
    with pytest.raises(VAECheckpointError, match=r"config\.json does not exist"):
        load_vae(d)


# ---- losses -----------------------------------------------------------------------------------
def test_recon_losses_hand_computed():
    x = torch.tensor([[0.0, 1.0, -2.0, 4.0]])
    xh = torch.tensor([[0.5, 1.0, -1.0, 1.0]])  # e = [0.5, 0, 1, -3]
    assert recon_loss(xh, x, "mse").item() == pytest.approx((0.25 + 1 + 9) / 4)
    assert recon_loss(xh, x, "l1").item() == pytest.approx((0.5 + 1 + 3) / 4)
    assert recon_loss(xh, x, "huber").item() == pytest.approx((0.125 + 0.5 + 2.5) / 4)
    # mse_tail, alpha=1: m = mean|x| = 7/4, w = (1 + |x|/m)/2 = (7 + 4|x|)/14
    w = torch.tensor([7.0, 11.0, 15.0, 23.0]) / 14
    assert recon_loss(xh, x, "mse_tail").item() == pytest.approx(
        float((w * torch.tensor([0.25, 0.0, 1.0, 9.0])).mean()))
    assert recon_loss(xh, x, "mse_tail").item() == pytest.approx((1 / 8 + 222 / 14) / 4)
    # weights average to 1: a uniform error gives the plain MSE
    assert recon_loss(x + 0.5, x, "mse_tail").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="kind 'l3'"):
        recon_loss(xh, x, "l3")
    with pytest.raises(ValueError, match="differ in shape"):
        recon_loss(xh[:, :3], x, "mse")


def test_kl_and_vae_loss():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # sample 0: 0.5*(1+1-1-0) + 0.5*(0+2-1-log2); sample 1: 0; mean over the batch
    expect = (0.5 + 0.5 * (1 - math.log(2.0))) / 2
    assert kl_divergence(mu, logvar).item() == pytest.approx(expect)
    assert kl_divergence(mu.view(2, 1, 2), logvar.view(2, 1, 2)).item() == pytest.approx(expect)
    x = torch.zeros(2, 3)
    out = {"x_hat": torch.ones(2, 3), "mu": mu, "logvar": logvar}
    r = vae_loss(out, x, beta=0.5, kind="mse")
    assert r["recon"].item() == pytest.approx(1.0) and r["kl"].item() == pytest.approx(expect)
    assert r["loss"].item() == pytest.approx(1.0 + 0.5 * expect)
    r0 = vae_loss({**out, "logvar": torch.full((2, 2), float("inf"))}, x, beta=0.0)
    assert r0["loss"].item() == pytest.approx(1.0)  # beta=0 never multiplies 0*inf
    with pytest.raises(ValueError, match="beta"):
        vae_loss(out, x, beta=-1.0)


def test_per_block_errors():
    x = torch.zeros(4, 2, 2)
    xh = torch.stack([torch.full((2, 2), v) for v in (1.0, 3.0, 2.0, 0.0)])
    ids = torch.tensor([BLOCK_IDS["attn"], BLOCK_IDS["attn"], BLOCK_IDS["mlp"], BLOCK_IDS["mlp"]])
    assert per_block_mse(xh, x, ids, 3) == {0: pytest.approx(5.0), 1: pytest.approx(2.0)}
    sse, cnt = per_block_sse(xh, x, ids, 3)
    assert sse.tolist() == [40.0, 16.0, 0.0] and cnt.tolist() == [8.0, 8.0, 0.0]
    with pytest.raises(ValueError, match="block ids"):
        per_block_mse(xh, x, torch.tensor([0, 1, 2, 3]), 3)
