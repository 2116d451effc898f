"""Safety regressions (issue 13): nothing from user input is executed or unpickled, nothing the
project did not write is deleted, and every header byte is checked before it is believed.

Each test here failed on the code before the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import Checkpoint, CheckpointError, classify, read_safetensors_header
from tests.helpers import llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- safetensors headers
def craft(path: Path, entries: dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file with exactly this header and data section (no checks)."""
    hb = json.dumps(entries).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data)
    return path


def two(a=(0, 16), b=(16, 32), dtype="F32", shape_a=(2, 2), shape_b=(4,)) -> dict:
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": dtype, "shape": list(shape_a), "data_offsets": list(a)},
            "b": {"dtype": "F32", "shape": list(shape_b), "data_offsets": list(b)}}


DATA = struct.pack("<8f", *range(8))


def test_well_formed_header_reads(tmp_path):
    f = craft(tmp_path / "ok.safetensors", two(), DATA)
    header, start = read_safetensors_header(f)
    assert set(header) == {"__metadata__", "a", "b"} and start == f.stat().st_size - 32
    ck = Checkpoint(f)
    assert ck.read("b").tolist() == [4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("entries,data,match", [
    (two(a=(0, 16), b=(8, 24)), DATA, r"tensor 'b' .*overlaps 'a'"),
    (two(a=(4, 20), b=(20, 36)), DATA + b"\0" * 4, r"tensor 'a' .*leaves 4 unused bytes after the header"),
    (two(a=(0, 16), b=(16, 32), shape_a=(2, 3)), DATA, r"tensor 'a' is F32 \[2, 3\] = 24 bytes, but its data_offsets \[0, 16\] span 16"),
    (two(dtype="F13"), DATA, r"tensor 'a' has unknown dtype 'F13'"),
    (two(), DATA[:24], r"truncated safetensors file.*tensor 'b' ends past the end"),
    (two(), DATA + b"\0" * 8, r"8 bytes after the last tensor"),
    (two(a=(0, -16)), DATA, r"tensor 'a' has bad data_offsets"),
    (two(shape_a=(2, -2)), DATA, r"tensor 'a' has a bad shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1}}, DATA[:16],
     r"malformed header entry for tensor 'a'"),
    ({"__metadata__": {"format": 1}}, b"", r"__metadata__ must map strings to strings"),
], ids=["overlap", "shifted", "size-mismatch", "unknown-dtype", "truncated", "trailing", "negative-offset",
        "negative-shape", "extra-key", "metadata"])  # fmt: skip
def test_corrupt_headers_are_named(tmp_path, entries, data, match):
    f = craft(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(CheckpointError, match=match) as e:
        read_safetensors_header(f)
    assert str(f) in str(e.value)
    with pytest.raises(CheckpointError, match=match):  # the reader convert / merge / stats use
        Checkpoint(f)


def test_header_length_and_duplicates(tmp_path):
    f = craft(tmp_path / "len.safetensors", two(), DATA, header_len=2**40)
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        read_safetensors_header(f)
    f = tmp_path / "dup.safetensors"
    hb = (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
          b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')  # fmt: skip
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + DATA[:16])
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_safetensors_header(f)


def test_shifted_offsets_in_a_real_checkpoint_are_refused(tmp_path):
    """The reported case: one entry of a sharded checkpoint moved onto its neighbour's bytes."""
    d = write_checkpoint(tmp_path / "m", llama_tensors(layers=1), shards=1)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.self_attn.q_proj.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 2, e + 2]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor .*(overlaps|unused bytes)"):
        Checkpoint(d)


# ---------------------------------------------------------------------------- names
def test_unknown_module_under_self_attn_is_not_attention(tmp_path):
    assert classify("model.layers.0.self_attn.lora_A.weight") == (0, None, "lora_A", "weight")
    assert classify("model.layers.0.self_attn.q_proj.base_layer.weight")[1] is None
    assert classify("model.layers.0.self_attn.rotary_emb.inv_freq")[1] == "other"
    assert classify("transformer.h.0.mlp.c_proj.weight")[1] == "mlp"  # shared names: parent decides
    ts = llama_tensors(layers=1) | {"model.layers.0.self_attn.lora_A.weight": torch.zeros(4, 32)}
    ck = Checkpoint(write_checkpoint(tmp_path / "m", ts, shards=1))
    from lsm_dist.checkpoint import UnknownTensorError

    with pytest.raises(UnknownTensorError, match=r"self_attn\.lora_A\.weight.*adapter"):
        ck.select(["attn"])
    assert len(ck.select(["attn"], exclude="lora_")) == 4


# ---------------------------------------------------------------------------- determinism
def test_vae_save_is_byte_deterministic(tmp_path):
    """safetensors writes __metadata__ from a hash map: the same VAE saved twice gave two
    digests, and a re-exported VAE made the same merge look like another one."""
    from lsm_dist.model import TransformerVAE, VAEConfig, save_vae, vae_digest
    from tests.merge_helpers import TINY_VAE

    torch.manual_seed(0)
    model = TransformerVAE(VAEConfig(**TINY_VAE))
    digests = {vae_digest(save_vae(model, tmp_path / f"v{i}")) for i in range(8)}
    assert len(digests) == 1
    meta = read_safetensors_header(tmp_path / "v0" / "model.safetensors")[0]["__metadata__"]
    assert list(meta) == sorted(meta)


# ---------------------------------------------------------------------------- lsm eval
BASE, EXPERT = "llama-tiny-base", "llama-tiny-reverse"
EVIL_MODULE = """import pathlib
pathlib.Path({marker!r}).write_text("code from the checkpoint ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "llama"
"""


def with_remote_code(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of ``src`` whose config names code (auto_map) that writes ``marker`` when run."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return dst


def eval_cfg(out: Path, checkpoints: list[str]):
    from lsm_dist.evaluate.run import EvalConfig

    return EvalConfig(checkpoints=checkpoints, tasks=["lsm_reverse_mc"], out_dir=str(out), limit=8,
                      n=40, dtype="float32", batch_size=16, progress=False)  # fmt: skip


def records(out: Path) -> dict[str, dict]:
    return {json.loads(f.read_text())["name"]: json.loads(f.read_text())
            for f in (out / "results").glob("*.json")}  # fmt: skip


@pytest.mark.slow
def test_eval_comma_in_path_injects_nothing(tiny_zoo, tmp_path):
    """`pretrained={path},...` let a directory named `x,trust_remote_code=True` turn on remote
    code for its sibling `x` (and score `x` instead of itself)."""
    import shutil

    from lsm_dist.evaluate.run import run_eval

    zoo = {n: Path(p) for n, p in tiny_zoo.items()}
    marker = tmp_path / "PWNED"
    with_remote_code(zoo[EXPERT], tmp_path / "x", marker)
    tricky = tmp_path / "x,trust_remote_code=True"
    shutil.copytree(zoo[BASE], tricky)
    link = tmp_path / "link-to-base"
    link.symlink_to(zoo[BASE])
    out = tmp_path / "eval"
    run_eval(eval_cfg(out, [f"tricky={tricky}", f"evil={tmp_path / 'x'}", f"base={link}"]))
    assert not marker.exists(), "code named by a checkpoint's auto_map was executed"
    rec = records(out)
    assert rec["tricky"]["path"] == str(tricky) and rec["base"]["path"] == str(zoo[BASE])
    # what was scored is the directory fingerprinted: `tricky` holds the base's weights
    assert rec["tricky"]["metrics"] == rec["base"]["metrics"]
    assert rec["tricky"]["metrics"] != rec["evil"]["metrics"]


def _poison(model_dir: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    f = model_dir / index[name]
    tensors = load_file(str(f))
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(f), metadata=read_safetensors_header(f)[0].get("__metadata__"))
    return f


@pytest.mark.slow
def test_eval_refuses_nan_weights_and_pickles(tiny_zoo, tmp_path):
    import shutil

    from lsm_dist.evaluate.run import EvalError, run_eval

    zoo = {n: Path(p) for n, p in tiny_zoo.items()}
    nan = tmp_path / "nan"
    shutil.copytree(zoo[BASE], nan)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _poison(nan, name)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(zoo[BASE] / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    out = tmp_path / "eval"
    with pytest.raises(EvalError) as e:
        run_eval(eval_cfg(out, [f"nan={nan}", f"pickled={pickled}", f"good={zoo[BASE]}"]))
    assert set(e.value.failures) == {"nan", "pickled"}
    assert str(shard) in e.value.failures["nan"] and name in e.value.failures["nan"]
    assert "NaN/Inf" in e.value.failures["nan"]
    assert "pytorch_model.bin is a pickle file, never loaded" in e.value.failures["pickled"]
    assert set(records(out)) == {"good"}


@pytest.mark.slow
def test_eval_refuses_a_checkpoint_changed_while_loading(tiny_zoo, tmp_path, monkeypatch):
    import shutil

    from lsm_dist.evaluate import run as R

    zoo = {n: Path(p) for n, p in tiny_zoo.items()}
    moving = tmp_path / "moving"
    shutil.copytree(zoo[BASE], moving)
    real = R.load_tokenizer

    def swap_then_load(path):  # another process replaces a shard while the model loads
        f = sorted(moving.glob("*.safetensors"))[0]
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(data)
        return real(path)

    monkeypatch.setattr(R, "load_tokenizer", swap_then_load)
    with pytest.raises(R.EvalError, match="files changed while it was being loaded"):
        R.run_eval(eval_cfg(tmp_path / "eval", [f"moving={moving}"]))


# ---------------------------------------------------------------------------- training state
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: code from the file, executed by pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_corpus(root: Path, seed: int) -> Path:
    from lsm_dist.corpus import ConvertConfig, run_convert
    from tests.test_train import structured

    m = write_checkpoint(root / f"m{seed}", structured(2, seed))
    out = root / f"corpus{seed}"
    run_convert(ConvertConfig(models=[str(m)], out_dir=str(out), tokens=8, chunk=64, block_samples=8,
                              shard_samples=32), progress=False)  # fmt: skip
    return out


def _train_cfg(corpus: Path, run: Path, **kw):
    from lsm_dist.train import load_train_config

    over = {"corpus": corpus, "run_dir": run, "stage1_steps": 4, "stage2_steps": 2, "ckpt_every": 3,
            "val_every": 0, "export": "false", **kw}
    return load_train_config(REPO / "configs/train/tiny.yaml", [f"{k}={v}" for k, v in over.items()])



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished single-process tiny training run (checkpoints at steps 3 and 6)."""
    from lsm_dist.train import run_train

    root = tmp_path_factory.mktemp("safety_train")
    corpora = [_tiny_corpus(root, 1), _tiny_corpus(root, 2)]
    run_train(_train_cfg(corpora[0], root / "run"))
    return {"run": root / "run", "corpus": corpora[0], "other": corpora[1]}


def _copy_run(trained, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(trained["run"], dst, symlinks=True))


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["pytorch_model/mp_rank_00_model_states.pt", "random_states_0.pkl"])
def test_replaced_training_pickle_never_runs(trained, tmp_path, victim):
    from lsm_dist.cli import main
    from lsm_dist.train import CheckpointError, export_vae, run_train

    run = _copy_run(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    f = run / "checkpoints" / "step-00000006" / victim
    torch.save({"module": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match=rf"{f}: refused to unpickle .*io\.open|{f}: refused to unpickle .*open"):
        export_vae(run)
    assert not marker.exists()
    assert main(["train", "export", str(run)]) == 1 and not marker.exists()
    with pytest.raises(CheckpointError, match=rf"{f}: refused to unpickle"):
        run_train(_train_cfg(trained["corpus"], run, stage2_steps=4))  # resume=auto
    assert not marker.exists()


@pytest.mark.slow
def test_resume_on_another_corpus_is_refused_and_leftovers_cleaned(trained, tmp_path):
    from lsm_dist.train import CheckpointError, run_train

    run = _copy_run(trained, tmp_path / "run")
    with pytest.raises(CheckpointError, match=rf"trained on corpus {trained['corpus']}.*this run's corpus is {trained['other']}"):
        run_train(_train_cfg(trained["other"], run))
    # a save killed before its rename left step-N.tmp/: the next run removes it, nothing else
    partial = run / "checkpoints" / "step-00000009.tmp"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    mine = run / "checkpoints" / "notes"
    mine.mkdir()
    (run / "checkpoints" / "step-00000009.tmp.keep").mkdir()
    out = run_train(_train_cfg(trained["corpus"], run))  # resumes the finished run: no step
    assert out["step"] == 6 and not partial.exists()
    assert mine.is_dir() and (run / "checkpoints" / "step-00000009.tmp.keep").is_dir()


def _limited(limit: int):
    """preexec_fn: a real short write (EFBIG) past ``limit`` bytes, as on a full disk."""
    import resource
    import signal

    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.mark.slow
def test_training_checkpoint_on_full_disk_is_explained(trained, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the module fixture's in-process run exported its rendezvous
    res = subprocess.run([sys.executable, "-m", "lsm_dist.train", "--config", "configs/train/tiny.yaml",
                          f"corpus={trained['corpus']}", f"run_dir={run}", "stage1_steps=4", "stage2_steps=2",
                          "ckpt_every=3", "val_every=0"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, preexec_fn=_limited(600_000))  # fmt: skip
    err = res.stderr
    assert res.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"could not write the step-3 training checkpoint into {run / 'checkpoints' / 'step-00000003.tmp'}" in err
    assert "while writing" in err and "disk is full" in err


# ---------------------------------------------------------------------------- lsm merge outputs
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.merge_helpers import build_model, perturbed_expert

    d = tmp_path_factory.mktemp("safety_models")
    base = build_model("llama", d / "base", 64, 2, 128, seed=0)
    return {"base": base, "a": perturbed_expert(base, d / "a", seed=1), "cache": d / "cache"}


def weight_plan(built: dict, out: Path, **kw):
    """A cheap merge that writes layer files (keep_layers), for the tests of what a merge leaves."""
    from lsm_dist.merge import MergePlan

    fields = dict(models={"base": str(built["base"]), "a": str(built["a"])}, space="weight",
                  out_dir=str(out), cache_dir=str(built["cache"]), max_shard_size="60KB",
                  keep_layers=True)  # fmt: skip
    return MergePlan(**(fields | kw))


def test_merge_never_deletes_a_model_dir_it_did_not_write(models, tmp_path):
    from lsm_dist.config import ConfigError
    from lsm_dist.merge import is_complete, run_merge

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    mine = out / "model" / "my-notes.txt"
    mine.write_text("not lsm's")
    with pytest.raises(ConfigError, match=rf"out_dir: {out / 'model'} was not written by lsm merge"):
        run_merge(weight_plan(models, out))
    assert mine.read_text() == "not lsm's"
    mine.unlink()
    (out / "model").rmdir()
    # a merge of ours is replaced by another one (overwrite), a user's file in layers/ is not
    run_merge(weight_plan(models, out))
    user = out / "layers" / "layer-0000.safetensors.bak"
    user.write_text("mine")
    from lsm_dist.merge import MergeParams

    with pytest.raises(ConfigError, match=rf"{user} was not written by lsm merge"):
        run_merge(weight_plan(models, out, overwrite=True, params=MergeParams(lambda_=0.3)))
    assert user.read_text() == "mine"
    user.unlink()
    got = run_merge(weight_plan(models, out, overwrite=True, params=MergeParams(lambda_=0.3)))
    assert is_complete(got) and json.loads((out / "merge_plan.json").read_text())["plan"]["params"]["lambda"] == 0.3


@pytest.mark.parametrize("where", ["parent", "same", "inside", "vae"])
def test_out_dir_overlapping_an_input_is_refused(models, tmp_path, where):
    """out_dir = the target's parent with the target named `model` destroyed the target."""
    import shutil

    from lsm_dist.config import ConfigError
    from lsm_dist.merge import run_merge

    target = Path(shutil.copytree(models["base"], tmp_path / "m" / "model"))
    before = sorted(p.name for p in target.iterdir())
    plan = dict(models={"base": str(target), "a": str(models["a"])})
    out = {"parent": tmp_path / "m", "same": target, "inside": target / "merged",
           "vae": tmp_path / "o"}[where]
    if where == "vae":  # a latent plan whose VAE lies inside out_dir
        plan |= {"space": "latent", "vae": str(tmp_path / "o" / "vae")}
    rel = {"parent": "holds", "same": "is", "inside": "is inside", "vae": "holds"}[where]
    with pytest.raises(ConfigError, match=rf"out_dir: {out} {rel} the input"):
        run_merge(weight_plan(models, out, **plan))
    assert sorted(p.name for p in target.iterdir()) == before


def test_nonfinite_untouched_target_tensor_fails_at_plan_time(models, tmp_path):
    import shutil

    from lsm_dist.config import ConfigError
    from lsm_dist.merge import prepare

    target = Path(shutil.copytree(models["base"], tmp_path / "nan-target"))
    name = "model.embed_tokens.weight"  # not merged (blocks: both = attn + mlp)
    shard = _poison(target, name)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"models\.base: {shard}: tensor '{name}' holds 1 NaN/Inf"):
        prepare(weight_plan(models, out, models={"base": str(target), "a": str(models["a"])}))
    assert not (out / "layers").exists()


def test_killed_merge_leftovers_are_cleaned(models, tmp_path):
    import shutil

    from lsm_dist.merge import is_complete, run_merge

    out = tmp_path / "out"
    run_merge(weight_plan(models, out))
    # the state of a run killed while writing layer-0001 after an assembly killed earlier:
    # a layer temp file, an assembly temp dir of a dead process, no model/ yet
    shutil.rmtree(out / "model")
    (out / "layers" / "layer-0001.safetensors").unlink()
    layer_tmp = out / "layers" / ".layer-0001.safetensors.k1ll3d.tmp"
    layer_tmp.write_bytes(b"half")
    dead = out / ".model.tmp-999999999"  # above pid_max: no such process
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"half")
    keep = out / ".model.tmp-notes"  # not the project's name pattern
    keep.mkdir()
    assert is_complete(run_merge(weight_plan(models, out)))
    assert not layer_tmp.exists() and not dead.exists() and keep.is_dir()


@pytest.mark.parametrize("how", ["file-size-limit", "full-tmpfs", "file-size-limit-no-layer-files"])
def test_merge_on_full_disk_names_the_file(models, tmp_path, how):
    import os
    import subprocess
    import sys

    import yaml

    out = tmp_path / "out"
    pre = None
    if how == "full-tmpfs":  # a real ENOSPC: a 200 KB file system (needs mount rights: root)
        out.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)],
                          capture_output=True).returncode != 0:  # fmt: skip
            pytest.skip("cannot mount a tmpfs here (not root)")
    else:  # EFBIG past 100 KB: a layer file does not fit (without layer files: past 30 KB, a shard)
        pre = _limited(30_000 if how.endswith("no-layer-files") else 100_000)
    try:
        plan = {"models": {"base": str(models["base"]), "a": str(models["a"])}, "space": "weight",
                "out_dir": str(out), "cache_dir": str(models["cache"]), "max_shard_size": "60KB",
                "keep_layers": not how.endswith("no-layer-files")}
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "lsm_dist.cli", "merge", "-c", str(tmp_path / "plan.yaml")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                             preexec_fn=pre)  # fmt: skip
    finally:
        if how == "full-tmpfs":
            subprocess.run(["umount", str(out)], check=True)
    err = res.stderr
    assert res.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"lsm merge: error: cannot write {out}/" in err and "disk full" in err, err[-3000:]


# ---------------------------------------------------------------------------- lsm zoo
def test_zoo_never_replaces_a_directory_it_did_not_build(tmp_path):
    from lsm_dist.config import ConfigError
    from lsm_dist.zoo import build_zoo, load_zoo_config

    cfg = load_zoo_config(REPO / "configs/zoo/tiny.yaml", [f"out_dir={tmp_path}", "eval_samples=0"])
    cfg.models = [m for m in cfg.models if m.name == "qwen2-tiny-base"]
    cfg.models[0].steps = 2
    user = tmp_path / "qwen2-tiny-base"
    user.mkdir()
    (user / "my-model.safetensors").write_bytes(b"a user's own checkpoint")
    with pytest.raises(ConfigError, match=rf"out_dir: {user} exists and is not a model this zoo built"):
        build_zoo(cfg, progress=False)
    assert (user / "my-model.safetensors").read_bytes() == b"a user's own checkpoint"
    (user / "my-model.safetensors").unlink()  # an empty directory holds nothing to lose
    paths = build_zoo(cfg, progress=False)
    assert (paths["qwen2-tiny-base"] / "zoo_card.json").is_file()
    paths = build_zoo(cfg, progress=False, force=True)  # its own model: replaced
    assert (paths["qwen2-tiny-base"] / "zoo_card.json").is_file()


# ---------------------------------------------------------------------------- config messages
def test_nested_config_error_names_the_field():
    from lsm_dist.config import ConfigError
    from lsm_dist.train import load_train_config

    with pytest.raises(ConfigError, match=r"^model\.d_model: must be a positive integer, got 0$") as e:
        load_train_config(REPO / "configs/train/tiny.yaml", ["model.d_model=0"])
    assert "does not match" not in str(e.value)


# ---------------------------------------------------------------------------- shell
@pytest.mark.parametrize("n", ["0", "-3", "PATH[$(touch PWNED)]", "2x", ""])
def test_submit_convert_refuses_a_bad_task_count(tmp_path, n):
    """`$((N - 1))` evaluated a crafted N as an expression (running its command substitution);
    `0` submitted --array=0--1."""
    import subprocess

    from tests.helpers import fake_sbatch_env

    cfg = tmp_path / "convert.yaml"
    cfg.write_text("models: []\n")
    env = fake_sbatch_env(tmp_path)
    res = subprocess.run(["bash", str(REPO / "slurm/submit_convert.sh"), n, str(cfg)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "must be a positive integer" in res.stderr, res.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "sbatch-calls").exists()


def test_bench_reader_never_hands_dir_to_a_shell(tmp_path):
    import os
    import subprocess
    import sys

    d = tmp_path / "c;touch PWNED;x"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_reader.py"), "--mb", "0.25",
                          "--workers", "0", "--warm-only", "--dir", str(d)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cat of the format-1 shards:" in res.stdout and not (tmp_path / "PWNED").exists()


def test_symlink_loops_are_one_line_errors(models, tmp_path, capsys):
    from lsm_dist.cli import main

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["stats", f"checkpoints=[{loop}]", f"out_dir={tmp_path / 'st'}"]) == 1
    assert "symbolic link" in capsys.readouterr().err
    y = tmp_path / "plan.yaml"
    y.write_text(json.dumps({"models": {"base": str(models["base"]), "a": str(models["a"])},
                             "space": "weight", "out_dir": str(loop)}))  # fmt: skip
    assert main(["merge", "-c", str(y)]) == 2
    assert f"out_dir: {loop} is a dangling symbolic link or a symlink loop" in capsys.readouterr().err


@pytest.mark.slow
def test_reexport_keeps_the_vae_digest(trained, tmp_path):
    from lsm_dist.model import vae_digest
    from lsm_dist.train import export_vae

    run = _copy_run(trained, tmp_path / "run")
    digests = {vae_digest(export_vae(run, out=tmp_path / f"vae{i}")) for i in range(8)}
    assert len(digests) == 1
    meta = read_safetensors_header(tmp_path / "vae0" / "model.safetensors")[0]["__metadata__"]
    assert list(meta) == sorted(meta)
