"""Delta decoding: W = W_target + D(z_merged) - D(z_target). Identity merges give the target
bit for bit; with a linear code (a fresh skip-path VAE is exactly one) a latent lerp is task
arithmetic with the delta projected by the code; direct decoding is still available."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.merge import MergePlan, run_merge
from lsm_dist.merge.operators import MergeParams
from lsm_dist.model import TransformerVAE, VAEConfig, load_vae, save_vae
from tests.merge_helpers import TINY_VAE, build_model, perturbed_expert, train_tiny_vae


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("delta")
    torch.set_num_threads(1)
    z = {"base": build_model("llama", d / "base", 64, 2, 128, seed=0)}
    z["a"] = perturbed_expert(z["base"], d / "a", seed=1, scale=0.1)
    z["b"] = perturbed_expert(z["base"], d / "b", seed=2, scale=0.1)
    z["bf16"] = build_model("llama", d / "bf16", 64, 2, 128, seed=5, dtype=torch.bfloat16)
    z["vae"] = train_tiny_vae([z["base"], z["a"]], d / "vae", steps=60)
    torch.manual_seed(0)
    z["linear"] = save_vae(TransformerVAE(VAEConfig(**{**TINY_VAE, "skip": "sample"})).eval(), d / "linear")
    z["dir"] = d
    return z


def plan(models, out: Path, vae="vae", **kw) -> MergePlan:
    fields = dict(models={"a": str(models["a"]), "b": str(models["b"])}, target="a",
                  vae=str(models[vae]), out_dir=str(out), cache_dir=str(models["dir"] / "cache"),
                  batch_size=16, max_shard_size="60KB", method="lerp")
    return MergePlan(**(fields | kw))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.read(n) for n in ck.tensors}


@pytest.mark.parametrize("method, params", [("lerp", {"lambda_": 0.0}), ("soup", {"weights": [1.0, 0.0]})])
def test_identity_merge_is_the_target_bit_for_bit(models, tmp_path, method, params):
    out = run_merge(plan(models, tmp_path / "m", method=method, params=MergeParams(**params)))
    got, want = tensors(out), tensors(models["a"])
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # direct decoding of the same plan is the VAE's reconstruction: not the target
    out = run_merge(plan(models, tmp_path / "d", method=method, params=MergeParams(**params), decode="direct"))
    direct = tensors(out)
    assert any(not torch.equal(direct[n], want[n]) for n in want if "proj" in n)


def test_identity_bf16_target(models, tmp_path):
    p = MergePlan(models={"x": str(models["bf16"])}, target="x", method="soup", vae=str(models["vae"]),
                  out_dir=str(tmp_path / "m"), cache_dir=str(tmp_path / "c"), batch_size=16)
    got, want = tensors(run_merge(p)), tensors(models["bf16"])
    assert all(torch.equal(got[n], want[n]) and got[n].dtype == torch.bfloat16 for n in want)


def test_linear_code_lerp_is_projected_task_arithmetic(models, tmp_path):
    """Closed form with a linear code (encode z = x E^T, decode x = z E): delta-decoded
    lerp = W_a + lambda * std_a * ((z_b - z_a) E), per tensor, padding dropped."""
    lam = 0.3
    p = plan(models, tmp_path / "m", vae="linear", params=MergeParams(lambda_=lam))
    got = tensors(run_merge(p))
    vae = load_vae(models["linear"])
    assert not any(v.abs().sum() for n, v in vae.state_dict().items() if n.startswith(("mu.", "head.")))
    E = vae.skip_enc.weight.detach().double()  # (latent numbers, values per sample)
    wa = Checkpoint(models["a"])
    from lsm_dist.merge.encode import caches_for
    from lsm_dist.merge.plan import resolve_plan

    caches = caches_for(resolve_plan(p))
    checked = 0
    for name, t in wa.tensors.items():
        if not name.endswith("proj.weight"):
            assert torch.equal(got[name], wa.read(name)), name
            continue
        za, zb = caches["a"].load(name)[0].double(), caches["b"].load(name)[0].double()
        std = caches["a"].manifest["tensors"][name]["std"]
        d = ((zb - za).reshape(za.shape[0], -1) @ E).reshape(-1)[: t.numel]
        want = wa.read(name).double().reshape(-1) + lam * std * d
        assert torch.allclose(got[name].double().reshape(-1), want, rtol=0, atol=1e-6), name
        checked += 1
    assert checked == 2 * 7
    # and the code really is linear: z_a is x_a E^T for the normalized samples of a
    from lsm_dist.chunking import ChunkSpec, chunk_tensor

    name = "model.layers.1.mlp.down_proj.weight"
    x = torch.from_numpy(chunk_tensor(wa.read(name), ChunkSpec(vae.cfg.tokens, vae.cfg.chunk))[0]).double()
    za = caches["a"].load(name)[0].double()
    assert torch.allclose(za.reshape(len(x), -1), x.reshape(len(x), -1) @ E.T, atol=1e-5)


def test_self_merge_delta_moves_only_along_the_decoder(models, tmp_path):
    """Self-merge with delta decoding: W + D(mean of K samples) - D(mu); with K large the
    mean of the samples tends to mu, so the change shrinks."""
    def change(k: int) -> float:
        p = MergePlan(models={"a": str(models["a"])}, target="a", method="self_merge", vae=str(models["vae"]),
                      params=MergeParams(samples=k), out_dir=str(tmp_path / f"k{k}"),
                      cache_dir=str(models["dir"] / "cache"), batch_size=16)
        got, want = tensors(run_merge(p)), tensors(models["a"])
        return sum((got[n].double() - want[n].double()).pow(2).sum().item() for n in want)

    c1, c64 = change(1), change(64)
    assert 0 < c64 < c1


def test_decode_field_is_validated(models, tmp_path):
    from lsm_dist.config import ConfigError

    with pytest.raises(ConfigError, match="decode.*'sideways'.*delta.*direct"):
        plan(models, tmp_path / "m", decode="sideways")


# ---------------------------------------------------------------------------- delta encoding
@pytest.fixture(scope="module")
def delta_setup(models, tmp_path_factory):
    """A delta corpus of the two experts against their base, and a VAE trained on it with the
    project's trainer (DeepSpeed, one process): its config records the base."""
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.train import load_train_config, run_train

    d = tmp_path_factory.mktemp("delta_enc")
    run_convert(ConvertConfig(models=[f"a={models['a']}", f"b={models['b']}"], base=str(models["base"]),
                              out_dir=str(d / "corpus"), tokens=8, chunk=64, block_samples=16,
                              shard_samples=64), progress=False)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_train_config(repo / "configs/train/tiny.yaml", [
        f"corpus={d / 'corpus'}", f"run_dir={d / 'run'}", "stage1_steps=20", "stage2_steps=5", "ckpt_every=0",
        "val_every=10", "log_every=5", "model.skip=sample"])
    vae = Path(run_train(cfg)["vae"])
    return {"dir": d, "corpus": d / "corpus", "vae": vae}


def test_delta_corpus_stores_task_vectors(models, delta_setup, tmp_path):
    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.corpus.verify import verify_corpus

    c = Corpus(delta_setup["corpus"])
    d = c.manifest["delta"]
    assert d["base"] == str(Path(models["base"]).resolve()) and d["gain"] > 0
    a, base = Checkpoint(models["a"]), Checkpoint(models["base"])
    t = c.find("a", "model.layers.1.mlp.up_proj.weight")
    assert t["dtype"] == "F32" and t["base_std"] > 0
    tau = a.read(t["name"]).float() - base.read(t["name"]).float()
    assert torch.equal(c.rebuild(t), tau)  # the task vector, bit for bit
    assert "compared bit for bit" in verify_corpus(delta_setup["corpus"], rebuild=True)


def test_delta_corpus_against_the_wrong_base_names_the_tensor(models, tmp_path):
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.delta import DeltaError

    other = build_model("llama", tmp_path / "other", 48, 2, 128, seed=9)
    with pytest.raises(DeltaError, match=r"tensor 'model\.layers\.0\..*' is \[.*\] in .* but .* in base"):
        run_convert(ConvertConfig(models=[str(models["a"])], base=str(other), out_dir=str(tmp_path / "c"),
                                  tokens=8, chunk=64), progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_delta_vae_records_its_base_and_merges_onto_it(models, delta_setup, tmp_path):
    """encoding: delta encodes every operand's W − W_base at one scale per tensor (gain ·
    std(W_base)), merges the latents and lands on the base; the identity (soup of the base
    alone) gives the base bit for bit with delta decoding; mismatches are refused by name."""
    from lsm_dist.config import ConfigError
    from lsm_dist.merge.plan import resolve_plan
    from lsm_dist.model import read_vae_config

    vcfg = read_vae_config(delta_setup["vae"])
    from lsm_dist.checkpoint import content_digest

    assert vcfg.delta["base_digest"] == content_digest(Checkpoint(models["base"]))
    common = dict(models={"base": str(models["base"]), "a": str(models["a"]), "b": str(models["b"])},
                  base="base", target="base", vae=str(delta_setup["vae"]), encoding="delta",
                  cache_dir=str(tmp_path / "cache"), batch_size=16)
    base_t = tensors(models["base"])
    ident = run_merge(MergePlan(method="soup", inputs=["base"], out_dir=str(tmp_path / "id"), **common))
    got = tensors(ident)
    assert all(torch.equal(got[n], base_t[n]) for n in base_t)
    for dec in ("delta", "direct"):
        out = run_merge(MergePlan(method="task_arithmetic", inputs=["a", "b"], decode=dec,
                                  out_dir=str(tmp_path / f"ta-{dec}"), **common))
        m = tensors(out)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(m[q], base_t[q])  # moved towards the experts
        assert torch.equal(m["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"])
        # the merged task vector points where the experts' do: positive correlation with τ_a + τ_b
        tau = (Checkpoint(models["a"]).read(q).float() + Checkpoint(models["b"]).read(q).float()
               - 2 * base_t[q].float())
        got_tau = m[q].float() - base_t[q].float()
        assert float(torch.nn.functional.cosine_similarity(tau.reshape(1, -1), got_tau.reshape(1, -1))) > 0.3
    with pytest.raises(ConfigError, match="codes task vectors.*set encoding: delta"):
        resolve_plan(MergePlan(**{**common, "encoding": "full"}, method="soup", out_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="codes full weights"):
        resolve_plan(MergePlan(**{**common, "vae": str(models["vae"])}, method="soup", out_dir=str(tmp_path / "y")))
    other = build_model("llama", tmp_path / "other-base", 64, 2, 128, seed=11)
    with pytest.raises(ConfigError, match="base: the delta VAE .* was trained on task vectors of base"):
        resolve_plan(MergePlan(**{**common, "models": {**common["models"], "base": str(other)}}, method="soup",
                               out_dir=str(tmp_path / "z")))
    with pytest.raises(ConfigError, match="encoding: delta encoding encodes task vectors.*set `base`"):
        MergePlan(models={"a": str(models["a"])}, encoding="delta", vae=str(delta_setup["vae"]))
