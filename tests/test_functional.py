"""Functional alignment (alignment: activations, lsm_dist.merge.functional) on tiny models of two
families: exact recovery where the answer is known, shapes, caching, the plan path in weight
and latent space, the task-vector mode, and the card's account."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError
from lsm_dist.merge import functional as F
from lsm_dist.merge.hetero import AlignConfig
from lsm_dist.merge.plan import load_plan
from lsm_dist.merge.run import run_merge
from tests.merge_helpers import build_model, train_tiny_vae

MLP = F.MLP


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A Llama target (hidden 64, 2 layers, MLP 128) and a Gemma-3 source of another width and
    depth (hidden 96, 3 layers, MLP 192), both with the zoo tokenizer, and a tiny VAE."""
    d = tmp_path_factory.mktemp("functional")
    t = build_model("llama", d / "llama", 64, 2, 128, seed=0)
    s = build_model("gemma3", d / "gemma3", 96, 3, 192, seed=3)
    return {"t": t, "s": s, "vae": train_tiny_vae([t, s], d / "vae", steps=60)}


def _mlp(ck_dir, layer):
    with Checkpoint(ck_dir) as ck:
        return {p: ck.read(f"model.layers.{layer}.mlp.{p}.weight").clone() for p in MLP}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _permuted_copy(src: Path, dst: Path, seed: int = 0) -> None:
    """``src`` with every layer's MLP neurons permuted and half of them sign-flipped (up and
    down rows / columns): the same function, other units."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    files = {f: load_file(str(f)) for f in dst.glob("*.safetensors")}
    w = {k: v for t in files.values() for k, v in t.items()}
    for name in sorted(n for n in w if n.endswith("mlp.up_proj.weight")):
        pre = name[: -len("up_proj.weight")]
        m = w[name].shape[0]
        perm = torch.randperm(m, generator=g)
        sign = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).to(w[name].dtype)
        w[pre + "gate_proj.weight"] = w[pre + "gate_proj.weight"][perm]
        w[pre + "up_proj.weight"] = w[pre + "up_proj.weight"][perm] * sign[:, None]
        w[pre + "down_proj.weight"] = w[pre + "down_proj.weight"][:, perm] * sign[None, :]
    for f, t in files.items():
        save_file({k: w[k].contiguous() for k in t}, str(f), metadata={"format": "pt"})


def _transport(target, source, base=None, depth="proportional"):
    docs = F.calibration_documents(40)
    kt, at = F.capture(target, docs)
    ks, as_ = F.capture(base or source, docs)
    fitted = F.fit(kt, at, ks, as_, depth=depth)
    with Checkpoint(target) as t, Checkpoint(source) as s:
        b = Checkpoint(base) if base else None
        out = F.transported_tensors(fitted, s, t, b)
        if b:
            b.close()
    return fitted, out


def test_word_ends_pair_two_tokenizations():
    text = "The cat sat. Q: 18+7= A: 25"
    a = [(0, 3), (3, 7), (7, 11), (11, 12), (12, 15), (15, 18), (18, 19), (19, 20), (20, 21), (21, 24), (24, 27)]
    assert F.word_ends(text, a) == {3: 0, 7: 1, 11: 2, 18: 5, 20: 7, 27: 10}  # " Q:" ends in ":"


def test_cka_layer_map_is_monotone_and_optimal():
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.1, 0.95, 0.2]])
    assert F.cka_layer_map(sim) == [0, 1, 1]  # 0.9 + 0.3 + 0.95 beats 0.9 + 0.8 + 0.2 (non-decreasing)
    assert F.cka_layer_map(np.eye(3)) == [0, 1, 2]


def test_an_outlier_channel_is_carried_not_amplified():
    """A unit of large mean and small spread (a residual outlier channel) in both models: the map
    must carry its mean (a linear map acts on raw activations). Centred standardization scaled
    it by the ratio of the spreads, 10x here (this broke a real Gemma-3 -> SmolLM2 transport)."""
    rng = np.random.default_rng(0)
    a_t = rng.normal(size=(4000, 6))
    a_s = a_t[:, ::-1] * 1.5 + rng.normal(scale=0.01, size=(4000, 6))  # reversed units, 1.5x larger
    a_t[:, 0] = 10 + rng.normal(scale=0.01, size=4000)  # the outlier channel: spreads 0.01 / 0.1
    a_s[:, 5] = 10 + rng.normal(scale=0.1, size=4000)
    c = F.couple(a_t, a_s)
    x_t = a_t.mean(0)
    x_s = c.s_from_t() @ x_t  # the target's mean input in the source's basis
    np.testing.assert_allclose(x_s[5], 10, rtol=0.01)  # old: ~100
    back = c.t_from_s() @ a_s[:50].T  # and back: the other units exactly, the outlier to its spread
    np.testing.assert_allclose(back[1:], a_t[:50, 1:].T, atol=0.05)
    np.testing.assert_allclose(back[0], a_t[:50, 0], atol=0.5)


def test_a_massive_target_unit_is_not_multiplied_into_the_source():
    """A unit the target uses for massive activations (RMS 1000x the others', as SmolLM2's MLP
    layer 11 writes) coupled to an ordinary source unit: unbounded, the map multiplies that source
    unit by the full ratio (measured on SmolLM2 <- Gemma-3: up to 4e4; a 5 % merge reached
    perplexity 1e4); with max_gain the pair's gain stays within the factor of the median's."""
    rng = np.random.default_rng(0)
    a_s = rng.normal(size=(4000, 8))
    a_t = 3.0 * a_s[:, ::-1] + rng.normal(scale=0.01, size=(4000, 8))  # median gain 3
    a_t[:, 0] *= 1000.0  # the massive unit (still the same direction: the coupling keeps it)
    free = F.couple(a_t, a_s).t_from_s()
    assert np.abs(free).max() > 2000
    for mg in (1.0, 2.0, 4.0):
        c = F.couple(a_t, a_s, max_gain=mg)
        m = c.t_from_s()
        assert np.abs(m).max() <= 3.0 * mg * 1.001
        np.testing.assert_allclose(np.abs(m[1:]).max(1), 3.0, rtol=0.01)  # the others untouched
        np.testing.assert_allclose(c.s_from_t() @ m, np.eye(8), atol=1e-6)  # still inverse maps
    with pytest.raises(ConfigError, match="max_gain"):
        AlignConfig(method="activations", max_gain=0.5)


def test_self_and_permuted_copies_come_back_exactly(pair, tmp_path):
    """A model transported onto itself is itself; a copy with permuted, sign-flipped neurons is
    mapped back onto the original's units (the couplings recover the permutation)."""
    base = pair["t"]
    fitted, out = _transport(base, base)
    assert fitted.layer_map == list(range(len(fitted.layer_map)))
    for name, x in out.items():
        layer = int(name.split(".")[2])
        torch.testing.assert_close(x, _mlp(base, layer)[name.split(".")[4]], rtol=1e-4, atol=1e-5)
    assert all(c.quality > 0.999 for cps in fitted.couplings for c in cps)
    perm = tmp_path / "permuted"
    _permuted_copy(base, perm)
    fitted, out = _transport(base, perm)
    for name, x in out.items():
        layer = int(name.split(".")[2])
        torch.testing.assert_close(x, _mlp(base, layer)[name.split(".")[4]], rtol=1e-4, atol=1e-5)


def test_task_vector_of_the_base_itself_is_zero(pair):
    base = pair["t"]
    _, out = _transport(base, base, base=base)
    for name, x in out.items():
        torch.testing.assert_close(x, _mlp(base, int(name.split(".")[2]))[name.split(".")[4]], rtol=0, atol=1e-6)


def _plan(tmp_path, zoo, space, **extra):
    plan = {"models": {"t": str(zoo["t"]), "s": str(zoo["s"])}, "target": "t",
            "method": "lerp", "params": {"lambda": 0.3}, "space": space,
            "alignment": {"method": "activations", "calibration_items": 20, **extra.pop("alignment", {})},
            "out_dir": str(tmp_path / f"out-{space}"), "cache_dir": str(tmp_path / "lc"), **extra}
    p = tmp_path / f"plan-{space}.yaml"
    p.write_text(json.dumps(plan))
    return p


def test_two_families_merge_in_weight_space_with_card(pair, tmp_path, cache):
    """Llama (2 layers, hidden 64) ← Gemma-3 (3 layers, hidden 96, MLP 192): weight space after
    transport; MLPs move by λ toward the transported source, attention and the rest stay the
    target's; the card says how it was aligned and which source layer was dropped."""
    t = pair["t"]
    out = run_merge(load_plan(_plan(tmp_path, pair, "weight", alignment={"depth": "cka"})))
    merged, target = Checkpoint(out), Checkpoint(t)
    aligned = next((cache / "aligned").iterdir())
    moved = Checkpoint(aligned)
    for name in target.names:
        x, y = merged.read(name), target.read(name)
        if ".mlp." in name:
            torch.testing.assert_close(x, y + 0.3 * (moved.read(name) - y), rtol=1e-5, atol=1e-6)
            assert not torch.equal(x, y)
        else:
            assert torch.equal(x, y), name
    card = (out / "README.md").read_text()
    assert "`activations` (functional alignment" in card and "depth map `cka`" in card
    assert "source layers read by no target layer" in card
    rec = json.loads((tmp_path / "out-weight" / "merge_plan.json").read_text())
    assert rec["alignment_report"]["models"]["s"]["layer_map"] == json.loads(
        (aligned / F.MARKER).read_text())["layer_map"]
    # a second plan on the same pair reuses the cached transport
    run_merge(load_plan(_plan(tmp_path, pair, "weight", alignment={"depth": "cka"},
                              params={"lambda": 0.1}, overwrite=True)))
    assert len(list((cache / "aligned").iterdir())) == 1


def test_two_families_merge_in_latent_space(pair, tmp_path, cache):
    """The transported source encoded by the VAE, merged with the target in latent space (delta
    decoding): λ = 0 gives the target bit for bit, λ > 0 moves only the MLPs."""
    out = run_merge(load_plan(_plan(tmp_path, pair, "latent", vae=str(pair["vae"]), params={"lambda": 0.0})))
    with Checkpoint(out) as m, Checkpoint(pair["t"]) as t:
        assert all(torch.equal(m.read(n), t.read(n)) for n in t.names)
    out = run_merge(load_plan(_plan(tmp_path, pair, "latent", vae=str(pair["vae"]), overwrite=True)))
    with Checkpoint(out) as m, Checkpoint(pair["t"]) as t:
        changed = {n for n in t.names if not torch.equal(m.read(n), t.read(n))}
    assert changed and all(".mlp." in n for n in changed)


def test_bad_source_base_refused(pair, tmp_path, cache):
    with pytest.raises(ConfigError, match="source_base"):
        run_merge(load_plan(_plan(tmp_path, pair, "weight", alignment={"source_base": "nope"})))
    with pytest.raises(ConfigError, match="only alignment: activations"):
        load_plan(_plan(tmp_path, pair, "weight", alignment={"method": "gaussian", "source_base": "s"}))
