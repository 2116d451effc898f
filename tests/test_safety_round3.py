"""Safety, round 3 (the hostile-input battery on d84d6f2): task code, four ways to lose a user's
file, silent corruptions. Each test is the battery's reproduction, which passed (exit 0) then."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import CheckpointError
from lsm_dist.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.merge_helpers import build_model, perturbed_expert

    d = tmp_path_factory.mktemp("round3")
    base = build_model("llama", d / "base", 64, 2, 128, seed=0)
    return {"base": base, "a": perturbed_expert(base, d / "a", seed=1), "cache": d / "cache"}


def _plan(built, out: Path, **kw):
    from lsm_dist.merge import MergePlan

    return MergePlan(**({"models": {"base": str(built["base"]), "a": str(built["a"])}, "space": "weight",
                        "out_dir": str(out), "cache_dir": str(built["cache"]), "max_shard_size": "60KB"} | kw))



def _relabel(f: Path, name: str, dtype: str) -> None:
    """Rewrite one tensor's dtype in a safetensors header (same byte size: the data is unchanged)."""
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    f.write_bytes(raw[:8] + text + raw[8 + n :])


# ---------------------------------------------------------------------------- code execution
def test_task_code_is_refused_unless_allowed(tmp_path, models):
    from lsm_dist.evaluate.run import EvalConfig, run_eval

    d = tmp_path / "tasks"
    d.mkdir()
    canary = tmp_path / "ran"
    (d / "evil_utils.py").write_text(f"open({str(canary)!r}, 'w').write('x')\ndef doc_to_text(doc):\n    return 'x'\n")
    (d / "t.yaml").write_text("task: t\ndataset_path: json\noutput_type: multiple_choice\n"
                              "doc_to_text: !function evil_utils.doc_to_text\n")
    (d / "sub").mkdir()
    (d / "sub" / "u.yaml").write_text("include: ../t.yaml\ntask: u\n")
    cfg = EvalConfig(checkpoints=[f"base={models['base']}"], tasks=["t"], include_path=[str(d)],
                     out_dir=str(tmp_path / "eval"), progress=False)
    with pytest.raises(ConfigError, match=r"t\.yaml:4: doc_to_text: !function evil_utils\.doc_to_text.*allow_task_code=true"):
        run_eval(cfg)
    assert not canary.exists() and not (tmp_path / "eval").exists()  # refused before anything ran or was written
    # a task YAML handed in directly, and one whose dataset would run its own loading script
    (tmp_path / "r.yaml").write_text("task: r\ndataset_path: someone/data\ndataset_kwargs:\n  trust_remote_code: true\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4: trust_remote_code: true"):
        run_eval(EvalConfig(checkpoints=[f"base={models['base']}"], tasks=[str(tmp_path / "r.yaml")],
                            out_dir=str(tmp_path / "eval"), progress=False))


# ---------------------------------------------------------------------------- data loss
def test_merge_keeps_a_users_file_beside_an_earlier_merge(models, tmp_path):
    from lsm_dist.merge import MergeParams, run_merge

    out = tmp_path / "out"
    run_merge(_plan(models, out))
    (out / "merge_plan.json").unlink()  # the battery: an earlier merge's model/, no record
    thesis = out / "model" / "thesis.tex"
    thesis.write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=rf"{thesis} was not written by lsm merge"):
            run_merge(_plan(models, out, overwrite=overwrite, params=MergeParams(lambda_=0.3)))
        assert thesis.read_text() == "years of work"
    thesis.unlink()  # without it, the earlier merge (provably ours, file by file) is replaced
    run_merge(_plan(models, out, overwrite=True, params=MergeParams(lambda_=0.3)))


def test_training_refuses_a_run_dir_of_the_users(tmp_path):
    from lsm_dist.train import load_train_config, run_train
    from tests.test_safety import _tiny_corpus

    corpus = _tiny_corpus(tmp_path, 0)
    run = tmp_path / "run"
    (run / "vae").mkdir(parents=True)
    mine = {run / "vae" / "model.safetensors": b"my own VAE", run / "vae" / "config.json": b"{}",
            run / "config.yaml": b"lr: 1", run / "export.json": b"{}", run / "PREEMPTED": b"my note"}
    for p, data in mine.items():
        p.write_bytes(data)
    cfg = load_train_config(REPO / "configs/train/tiny.yaml",
                            [f"corpus={corpus}", f"run_dir={run}", "stage1_steps=2", "stage2_steps=0"])
    with pytest.raises(ConfigError, match=rf"run_dir: {run} holds files lsm train did not write"):
        run_train(cfg)
    assert all(p.read_bytes() == data for p, data in mine.items())


def test_vae_export_never_overwrites_a_users_checkpoint(tmp_path):
    from lsm_dist.model import TransformerVAE, VAECheckpointError, VAEConfig, save_vae

    d = tmp_path / "mine"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"a user's weights")
    with pytest.raises(VAECheckpointError, match="is not an lsm_dist VAE checkpoint"):
        save_vae(TransformerVAE(VAEConfig(chunk=8, tokens=4, d_model=16, enc_layers=1, dec_layers=1, heads=2,
                                          latent_dim=4)), d)
    assert (d / "model.safetensors").read_bytes() == b"a user's weights"


def test_zoo_rebuild_keeps_a_users_notes(tmp_path):
    from lsm_dist.zoo import build_zoo, load_zoo_config

    cfg = load_zoo_config(REPO / "configs/zoo/tiny.yaml", [f"out_dir={tmp_path}", "eval_samples=0"])
    cfg.models = [m for m in cfg.models if m.name == "qwen2-tiny-base"]
    cfg.models[0].steps = 2
    paths = build_zoo(cfg, progress=False)
    notes = paths["qwen2-tiny-base"] / "NOTES.md"
    notes.write_text("mine")
    build_zoo(cfg, progress=False)  # reused: nothing replaced, nothing said
    cfg.models[0].steps = 3  # a changed recipe: the model is rebuilt
    with pytest.raises(ConfigError, match=rf"{notes} is in the zoo model qwen2-tiny-base but lsm zoo did not write it"):
        build_zoo(cfg, progress=False)
    assert notes.read_text() == "mine"


def test_eval_keeps_a_users_reports(tmp_path, models):
    from lsm_dist.evaluate.run import EvalConfig, run_eval

    out = tmp_path / "eval"
    out.mkdir()
    for f in ("results.md", "summary.json"):
        (out / f).write_text(f"my {f}")
    with pytest.raises(ConfigError, match=rf"out_dir: {out / 'results.md'} was not written by lsm eval"):
        run_eval(EvalConfig(checkpoints=[f"base={models['base']}"], tasks=["lsm_arith_mc"], out_dir=str(out),
                            n=4, progress=False))
    assert (out / "results.md").read_text() == "my results.md"


# ---------------------------------------------------------------------------- silent corruption
def test_a_relabelled_dtype_is_named_everywhere(models, tmp_path):
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.evaluate.run import checkpoint_fingerprint
    from lsm_dist.merge import run_merge

    bad = tmp_path / "bad"
    shutil.copytree(models["a"], bad)
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    _relabel(bad / index[name], name, "I32")
    msg = rf"'{name}' has dtype I32 in a weight position"
    with pytest.raises(ValueError, match=msg):
        run_convert(ConvertConfig(models=[str(bad)], out_dir=str(tmp_path / "c")), progress=False)
    with pytest.raises(ValueError, match=msg):
        run_merge(_plan(models, tmp_path / "m", models={"base": str(models["base"]), "a": str(bad)}))
    with pytest.raises(ValueError, match=msg):  # as the target: its I32 weight would be copied on
        run_merge(_plan(models, tmp_path / "m2", models={"a": str(bad), "base": str(models["base"])}, target="a"))
    with pytest.raises(CheckpointError, match=msg):
        checkpoint_fingerprint(bad)


def test_a_single_file_beside_a_sharded_index_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    from lsm_dist.checkpoint import Checkpoint
    from lsm_dist.evaluate.run import checkpoint_fingerprint

    d = tmp_path / "both"
    shutil.copytree(models["a"], d)
    save_file({"x": torch.full((2,), float("nan"))}, str(d / "model.safetensors"))
    for read in (Checkpoint, checkpoint_fingerprint):
        with pytest.raises(CheckpointError, match="holds both model.safetensors and the sharded index"):
            read(d)


def test_a_corpus_without_its_digest_is_not_trained_on(tmp_path):
    from lsm_dist.corpus.corpus import Corpus, CorpusError
    from lsm_dist.train import load_train_config, run_train
    from tests.test_safety import _tiny_corpus

    corpus = _tiny_corpus(tmp_path, 0)
    m = json.loads((corpus / "manifest.json").read_text())
    m["tensors"][0]["mean"] += 0.5  # the battery: a tensor's mean edited, the digest removed
    del m["manifest_digest"]
    (corpus / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorpusError, match="has no content digest"):
        Corpus(corpus)
    cfg = load_train_config(REPO / "configs/train/tiny.yaml",
                            [f"corpus={corpus}", f"run_dir={tmp_path / 'run'}", "stage1_steps=2", "stage2_steps=0"])
    with pytest.raises(CorpusError, match="has no content digest"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_another_architecture_of_the_same_shapes_needs_allow_crimes(models, tmp_path):
    from lsm_dist.merge import is_complete, run_merge

    mistral = tmp_path / "mistral"
    shutil.copytree(models["a"], mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (mistral / "config.json").write_text(json.dumps(cfg))
    plan = {"models": {"base": str(models["base"]), "a": str(mistral)}}
    with pytest.raises(ConfigError, match="a is MistralForCausalLM but the target base is LlamaForCausalLM.*allow_crimes"):
        run_merge(_plan(models, tmp_path / "m", **plan))
    assert is_complete(run_merge(_plan(models, tmp_path / "m", allow_crimes=True, **plan)))


def test_a_fresh_start_over_a_dead_first_run_keeps_one_record_per_step(tmp_path):
    """Killed while writing the first checkpoint: no complete checkpoint, but metrics.jsonl and
    an event file; the re-run starts over and drops them (one curve, one event file)."""
    from lsm_dist.train import load_train_config, run_train
    from tests.test_safety import _tiny_corpus

    corpus = _tiny_corpus(tmp_path, 0)
    run = tmp_path / "run"
    over = [f"corpus={corpus}", f"run_dir={run}", "stage1_steps=4", "stage2_steps=0", "log_every=1",
            "ckpt_every=2", "val_every=0", "export=false"]
    run_train(load_train_config(REPO / "configs/train/tiny.yaml", over))
    shutil.rmtree(run / "checkpoints")  # what a kill during the first save leaves: records, no checkpoint
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    run_train(load_train_config(REPO / "configs/train/tiny.yaml", over))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["kind"]) for r in recs]
    assert len(keys) == len(set(keys)), keys
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------------------- messages
def test_unknown_model_type_says_no_remote_code(models, tmp_path):
    from lsm_dist.checkpoint import load_causal_lm

    d = tmp_path / "odd"
    shutil.copytree(models["base"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "evilnet"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'evilnet' is not an architecture transformers") as e:
        load_causal_lm(d)
    assert "trust_remote_code=True" not in str(e.value) and "hf.co" not in str(e.value)


def test_garbage_gguf_is_named(tmp_path):
    from lsm_dist.zoo.gguf import gguf_summary

    f = tmp_path / "junk.gguf"
    f.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(ConfigError, match=rf"gguf: {f} is not a readable GGUF file"):
        gguf_summary(f)


def test_nan_in_a_non_target_input_names_the_model(models, tmp_path):
    from lsm_dist.merge import run_merge
    from tests.test_safety import _poison

    bad = tmp_path / "nan"
    shutil.copytree(models["a"], bad)
    _poison(bad, "model.layers.0.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=r"models\.a \(Checkpoint\(.*nan.*'model\.layers\.0\.mlp\.down_proj\.weight' "
                                         r"holds 1 NaN/Inf"):
        run_merge(_plan(models, tmp_path / "m", models={"base": str(models["base"]), "a": str(bad)}))


def test_hidden_merge_checks_its_models(models, tmp_path):
    from lsm_dist.hidden.run import load_models
    from tests.test_safety import _poison

    bad = tmp_path / "nan"
    shutil.copytree(models["a"], bad)
    _poison(bad, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' holds 1 NaN/Inf"):
        load_models([str(models["base"]), str(bad)])
    cut = tmp_path / "cut"
    shutil.copytree(models["a"], cut)
    shard = sorted(cut.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(shard)):
        load_models([str(models["base"]), str(cut)])


def test_refused_out_dir_gets_no_merge_log(models, tmp_path, capsys):
    from lsm_dist.cli import main

    target = Path(shutil.copytree(models["base"], tmp_path / "m" / "model"))
    plan = tmp_path / "p.yaml"
    plan.write_text(json.dumps({"models": {"base": str(target), "a": str(models["a"])}, "space": "weight",
                                "out_dir": str(target)}))
    assert main(["merge", str(plan)]) != 0
    assert "is the input" in capsys.readouterr().err
    assert not (target / "merge.log").exists()


def test_weight_space_merge_writes_nothing_outside_out_dir(models, tmp_path, monkeypatch):
    from lsm_dist.merge import MergePlan, run_merge

    monkeypatch.chdir(tmp_path)
    run_merge(MergePlan(models={"base": str(models["base"]), "a": str(models["a"])}, space="weight",
                        out_dir=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no runs/latent_cache here


def test_an_edited_latent_is_refused(models, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lsm_dist.merge import MergeParams, MergePlan, run_merge
    from tests.merge_helpers import train_tiny_vae

    vae = train_tiny_vae([models["base"], models["a"]], tmp_path / "vae", steps=10)
    cache = tmp_path / "lc"

    def plan(lam):
        return MergePlan(models={"base": str(models["base"]), "a": str(models["a"])}, vae=str(vae), out_dir=str(tmp_path / f"o{lam}"),
                         cache_dir=str(cache), params=MergeParams(lambda_=lam))

    run_merge(plan(0.5))
    f = next(cache.rglob("*mlp.up_proj.weight.safetensors"))
    with safe_open(str(f), framework="pt") as h:
        meta, t = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (not a dict)
    t["mu"] = t["mu"] + 1.0
    save_file(t, str(f), metadata=meta)
    with pytest.raises(ValueError, match=rf"{f}: the latents do not match the checksum"):
        run_merge(plan(0.3))


@pytest.mark.parametrize("n", ["12345678901234567890", "1000000"])
def test_submit_merge_bounds_the_task_count(tmp_path, n):
    import subprocess

    from tests.helpers import fake_sbatch_env

    plan = tmp_path / "p.yaml"
    plan.write_text("models: {a: x}\n")
    res = subprocess.run(["bash", str(REPO / "slurm/submit_merge.sh"), n, str(plan)], cwd=tmp_path,
                         env=fake_sbatch_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 2 and "from 1 to 999999" in res.stderr
    assert not (tmp_path / "sbatch-calls").exists()


def test_a_percent_in_the_run_dir_is_literal_for_srun():
    text = (REPO / "slurm/train_vae.sh").read_text()
    assert '--output="${RUN_DIR//%/%%}/logs/node%n-%j.log"' in text
    import subprocess

    out = subprocess.run(["bash", "-c", 'RUN_DIR="runs/100%j"; echo "${RUN_DIR//%/%%}"'], capture_output=True,
                         text=True).stdout.strip()
    assert out == "runs/100%%j"


def test_keep_layers_false_leaves_only_the_checkpoint(models, tmp_path):
    from lsm_dist.merge import is_complete, run_merge

    out = tmp_path / "out"
    got = run_merge(_plan(models, out, keep_layers=False))
    assert is_complete(got) and not (out / "layers").exists()
    assert run_merge(_plan(models, out, keep_layers=False)) == got  # a re-run: complete, nothing redone
