"""mergekit configs read onto the merge plan, and the peer test: mergekit's own example configs
(paths adapted to tiny models built here, ``dtype: float32``) through both ``mergekit-yaml`` and
``lsm merge``, outputs compared tensor by tensor.

mergekit runs from ``LSM_MERGEKIT_PYTHON``, else a ``.venv-mergekit`` in the repository (a
separate venv, if one was made), else the project's venv, where the dev extra installs it
(``tools/setup.sh``); without it the peer tests skip, except under ``LSM_REQUIRE_PEERS=1`` (CI),
where they fail."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError
from lsm_dist.merge import load_plan, prepare, run_merge
from lsm_dist.merge.mergekit import plan_data
from tests.merge_helpers import build_model, perturbed_expert

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: 2 threads only add overhead on small VMs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mk_zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("mk_zoo")
    z = {"base": build_model("llama", d / "base", 64, 4, 128, seed=0)}
    for i, name in enumerate(("a", "b", "c"), start=1):
        z[name] = perturbed_expert(z["base"], d / name, seed=i)
    return z


def write_cfg(tmp: Path, text: str, zoo: dict, name: str = "cfg.yml") -> Path:
    p = tmp / name
    p.write_text(text.format(**{k: str(v) for k, v in zoo.items()}))
    return p


# ------------------------------------------------------------------- examples (mergekit's)
# Each is one of mergekit's own example configs (examples/*.yml or the README), adapted only
# in the model paths and `dtype: float32` (the examples say float16 / bfloat16).
EXAMPLES = {
    # examples/linear.yml
    "linear": ("exact", """
models:
  - model: {base}
    parameters:
      weight: 1.0
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float32
"""),
    # examples/gradient-slerp.yml
    "gradient-slerp": ("exact", """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
"""),
    # examples/orcamini-platy-44layer.yml (layer stacking: 3 + 3 layers of two models)
    "passthrough": ("exact", """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""),
    "task_arithmetic": ("exact", """
models:
  - model: {a}
    parameters:
      weight: 0.7
  - model: {b}
    parameters:
      weight: 0.4
merge_method: task_arithmetic
base_model: {base}
parameters:
  normalize: false
  lambda: 0.9
dtype: float32
"""),
    # examples/bio-merge.yml
    "ties": ("ties", """
models:
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: float32
"""),
    # examples/mega.yml, second document (density gradient, weight by filter)
    "ties-gradient": ("ties", """
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""),
    "dare_ties": ("random", """
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: float32
"""),
    "dare_linear": ("random", """
models:
  - model: {a}
    parameters:
      density: 0.6
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.4
      weight: 0.5
merge_method: dare_linear
base_model: {base}
dtype: float32
"""),
    "breadcrumbs_ties": ("ties", """
models:
  - model: {a}
    parameters:
      density: 0.8
      gamma: 0.05
      weight: 0.6
  - model: {b}
    parameters:
      density: 0.7
      gamma: 0.01
      weight: 0.4
merge_method: breadcrumbs_ties
base_model: {base}
dtype: float32
"""),
    "della": ("random", """
models:
  - model: {a}
    parameters:
      density: 0.5
      epsilon: 0.1
      weight: 0.6
  - model: {b}
    parameters:
      density: 0.6
      epsilon: 0.2
      weight: 0.4
merge_method: della
base_model: {base}
parameters:
  lambda: 0.9
dtype: float32
"""),
    "model_stock": ("exact", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: float32
"""),
    "nuslerp": ("exact", """
models:
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: 0.7
merge_method: nuslerp
base_model: {base}
dtype: float32
"""),
    "multislerp": ("exact", """
models:
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: 0.3
  - model: {c}
    parameters:
      weight: 0.2
merge_method: multislerp
dtype: float32
"""),
    "karcher": ("exact", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: karcher
tokenizer_source: base
base_model: {base}
dtype: float32
"""),
    # mergekit's selective methods (lsm_dist/merge/selective.py)
    "sce": ("ties", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 0.6
dtype: float32
"""),
    "ram": ("exact", """
models:
  - model: {a}
  - model: {b}
merge_method: ram
base_model: {base}
parameters:
  epsilon: 0.001
dtype: float32
"""),
    "ramplus_tl": ("exact", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: ramplus_tl
base_model: {base}
parameters:
  r: 0.3
  alpha: 0.5
  epsilon: 0.001
dtype: float32
"""),
    "nearswap": ("exact", """
models:
  - model: {a}
merge_method: nearswap
base_model: {base}
parameters:
  t: 0.01
dtype: float32
"""),
    "arcee_fusion": ("exact", """
models:
  - model: {a}
merge_method: arcee_fusion
base_model: {base}
dtype: float32
"""),
}


# the deterministic ones also in bfloat16 (mergekit computes the task-vector methods in `dtype`)
BF16 = ["linear", "gradient-slerp", "task_arithmetic", "ties", "breadcrumbs_ties", "karcher", "model_stock",
        "ram", "ramplus_tl", "nearswap", "arcee_fusion", "sce"]
CASES = list(EXAMPLES) + [f"{n}@bf16" for n in BF16]


def example_text(case: str) -> tuple[str, str]:
    name, _, dt = case.partition("@")
    kind, text = EXAMPLES[name]
    return kind, (text.replace("dtype: float32", "dtype: bfloat16") if dt else text)


# ------------------------------------------------------------------------ the reader
def test_every_example_reads_onto_a_plan(mk_zoo, tmp_path):
    for name, (_, text) in EXAMPLES.items():
        plan = load_plan(write_cfg(tmp_path, text, mk_zoo, f"{name}.yml"), [f"out_dir={tmp_path / name}"])
        assert plan.space == "weight" and plan.rest == "weight" and plan.dtype == "float32", name
        rp = prepare(plan)
        assert {j.space for j in rp.jobs} == {"weight"}, name  # mergekit merges every tensor
        assert len(rp.outputs) == (6 * 9 + 3 if name == "passthrough" else 4 * 9 + 3), name


def test_reader_maps_mergekit_semantics(mk_zoo, tmp_path):
    plan = load_plan(write_cfg(tmp_path, EXAMPLES["ties-gradient"][1], mk_zoo), [f"out_dir={tmp_path / 'o'}"])
    assert plan.method == "ties" and plan.base == "base" and plan.target == "base"
    assert plan.inputs == ["a", "b"] and plan.params.sign_tie == "positive" and plan.params.density == 1.0
    rp = prepare(plan)
    jobs = {j.name: j for j in rp.jobs}
    # density [1, 0.7, 0.1] over 4 layers: t = 1/3 -> 0.7 (2/3·... exactly index 0.667 -> 1·(1-2/3)+0.7·2/3)
    assert jobs["model.layers.1.mlp.up_proj.weight"].params.density == pytest.approx([0.8, 0.33])
    assert jobs["model.layers.3.mlp.up_proj.weight"].params.density == pytest.approx([0.1, 0.33])
    assert jobs["model.embed_tokens.weight"].params.density == pytest.approx([1.0, 0.33])  # t = 0
    # weight of b by filter: 0.5 on mlp tensors, 0 elsewhere
    assert jobs["model.layers.2.mlp.down_proj.weight"].params.weights == [1.0, 0.5]
    assert jobs["model.layers.2.self_attn.q_proj.weight"].params.weights == [1.0, 0.0]
    dare = plan_data({"merge_method": "dare_ties", "base_model": "x", "models": [
        {"model": "x"}, {"model": "y", "parameters": {"weight": 1, "density": 0.5}}]})
    assert dare["params"]["rescale"] == "l1" and dare["inputs"] == ["y"]
    lora = plan_data({"merge_method": "linear", "models": [{"model": "b+lora_dir", "parameters": {"weight": 1}}]})
    assert lora["models"]["b"]["path"] == "b" and lora["models"]["b"]["lora"] == "lora_dir"
    nus = plan_data({"merge_method": "nuslerp", "models": [{"model": "p", "parameters": {"weight": 1}},
                     {"model": "q", "parameters": {"weight": 1}}],
                     "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}})
    assert nus["tensor_params"] == {"granularity": "column"}
    stack = load_plan(write_cfg(tmp_path, EXAMPLES["passthrough"][1], mk_zoo, "p.yml"),
                      [f"out_dir={tmp_path / 'p'}"])
    rp = prepare(stack)
    assert rp.config_patch["num_hidden_layers"] == 6
    src = {j.name: j.sources for j in rp.jobs}
    assert src["model.layers.2.mlp.up_proj.weight"] == {"a": "model.layers.2.mlp.up_proj.weight"}
    assert src["model.layers.3.mlp.up_proj.weight"] == {"b": "model.layers.1.mlp.up_proj.weight"}
    assert src["lm_head.weight"] == {"b": "lm_head.weight"} and src["model.embed_tokens.weight"] == {
        "a": "model.embed_tokens.weight"}


@pytest.mark.parametrize("raw,match", [
    ({"merge_method": "frankenmerge", "models": [{"model": "x"}]}, r"merge_method: 'frankenmerge' is not supported"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer_source": "y"},
     r"tokenizer_source: 'y' is neither union, base nor a model of this config"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer_source": "base"},
     r"tokenizer_source: `base` needs a base_model"),
    ({"merge_method": "linear", "modules": {"m": {}}, "models": [{"model": "x"}]}, r"modules"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}]},
     r"models\[0\]\.parameters\.density: is not a parameter of mergekit's linear"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]}, r"needs `weight`"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "slices": []}, r"exactly one of"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "nmae": "n"},
     r"unknown key\(s\) \['nmae'\]"),  # `name` is accepted (a mergekit-multi leftover, no effect)
    ({"merge_method": "slerp", "base_model": "x", "models": [{"model": "x"}, {"model": "y"}],
      "parameters": {"t": [{"pattern": "mlp", "value": 0.3}]}}, r"parameters\.t\[0\].*unknown key\(s\) \['pattern'\]"),
])
def test_reader_errors_name_the_key(raw, match):
    from lsm_dist.config import from_dict
    from lsm_dist.merge.plan import MergePlan

    with pytest.raises(ConfigError, match=match):
        from_dict(MergePlan, plan_data(raw, "cfg.yml"))


def test_space_latent_is_the_one_new_key(mk_zoo, tmp_path):
    from tests.merge_helpers import train_tiny_vae

    vae = train_tiny_vae([mk_zoo["base"], mk_zoo["a"]], tmp_path / "vae", steps=20)
    text = EXAMPLES["gradient-slerp"][1] + "space: latent\n"
    plan = load_plan(write_cfg(tmp_path, text, mk_zoo), [f"vae={vae}", f"out_dir={tmp_path / 'o'}",
                                                          f"cache_dir={tmp_path / 'c'}", "batch_size=16"])
    rp = prepare(plan)
    kinds = {j.name: j.space for j in rp.jobs}
    assert kinds["model.layers.1.mlp.up_proj.weight"] == "latent"
    assert kinds["model.norm.weight"] == "weight" and kinds["model.embed_tokens.weight"] == "weight"
    out = run_merge(plan)
    ck = Checkpoint(out)
    assert len(ck.names) == 39 and all(torch.isfinite(ck.read(n)).all() for n in ck.names)
    card = (out / "README.md").read_text()
    assert "in latent space" in card and rp.models["base"].vae_digest in card and "mergekit:" in card


# ------------------------------------------------------------------------ the peer test
def peer_python() -> str | None:
    env = os.environ.get("LSM_MERGEKIT_PYTHON")
    if env:
        return env
    venv = REPO / ".venv-mergekit" / "bin" / "python"
    if venv.is_file():
        return str(venv)
    return sys.executable if importlib.util.find_spec("mergekit") is not None else None


def require_peer() -> str:
    """The Python that runs mergekit; skips without one (fails under LSM_REQUIRE_PEERS=1, as CI runs)."""
    py = peer_python()
    if py is None:
        msg = "mergekit is not installed (pip install -e .[dev], or set LSM_MERGEKIT_PYTHON)"
        if os.environ.get("LSM_REQUIRE_PEERS") == "1":
            pytest.fail(f"LSM_REQUIRE_PEERS=1 but {msg}")
        pytest.skip(msg)
    return py


RUNNER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for cfg, out in zip(args[0::2], args[1::2]):
    main.main([cfg, out, "--random-seed", "0", "--no-write-model-card"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def peer_outputs(mk_zoo, tmp_path_factory):
    """Every example merged by mergekit (one process, `mergekit-yaml`'s own entry point)."""
    py = require_peer()
    d = tmp_path_factory.mktemp("peer")
    argv, outs = [], {}
    for case in CASES:
        argv += [str(write_cfg(d, example_text(case)[1], mk_zoo, f"{case}.yml")), str(d / f"mk-{case}")]
        outs[case] = (d / f"{case}.yml", d / f"mk-{case}")
    # the same thread count as our merges: parallel reductions (norms, dots) round by it
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")},
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([py, "-c", RUNNER, *argv], capture_output=True, text=True, env=env,
                       cwd=d, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return outs


def _deltas(ck: Checkpoint, base: Checkpoint, names) -> torch.Tensor:
    return torch.cat([(ck.read(n).float() - base.read(n).float()).reshape(-1) for n in names])


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_agrees_with_mergekit(name, mk_zoo, peer_outputs, tmp_path):
    kind = example_text(name)[0]
    cfg, mk_dir = peer_outputs[name]
    ours = Checkpoint(run_merge(load_plan(cfg, [f"out_dir={tmp_path / 'o'}"])))
    theirs = Checkpoint(mk_dir)
    assert set(ours.names) == set(theirs.names)
    import json

    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        assert json.loads((ours.path / "config.json").read_text())[key] == \
            json.loads((mk_dir / "config.json").read_text())[key], key
    names = sorted(ours.names)
    for n in names:
        assert ours.tensors[n].shape == theirs.tensors[n].shape and ours.tensors[n].dtype == theirs.tensors[n].dtype, n
    if kind == "exact":
        diff = [n for n in names if not torch.equal(ours.read(n), theirs.read(n))]
        assert not diff, f"{len(diff)} tensor(s) differ, e.g. {diff[:3]}"
    elif kind == "ties":  # equal except where ranking / sign ties could break either way
        total = sum(ours.tensors[n].numel for n in names)
        differ = sum(int((ours.read(n) != theirs.read(n)).sum()) for n in names)
        assert differ <= 1e-4 * total, f"{differ} of {total} entries differ"
    else:  # random masks: the same distribution, not the same draws
        base = Checkpoint(mk_zoo["base"])
        merged = [n for n in names if "layers" in n and "proj" in n]
        da, db = _deltas(ours, base, merged), _deltas(theirs, base, merged)
        assert not torch.equal(da, db)
        za, zb = float((da == 0).float().mean()), float((db == 0).float().mean())
        assert abs(za - zb) < 0.01, (za, zb)  # fraction of entries left at the base
        assert abs(float(da.norm() / db.norm()) - 1) < 0.03
        assert abs(float(da.abs().mean() / db.abs().mean()) - 1) < 0.03
        assert float(torch.corrcoef(torch.stack([da, db]))[0, 1]) > 0.3


def test_cli_runs_a_mergekit_config_unchanged(mk_zoo, tmp_path, capsys):
    from lsm_dist.cli import main

    cfg = write_cfg(tmp_path, EXAMPLES["linear"][1], mk_zoo)
    assert main(["merge", str(cfg), f"out_dir={tmp_path / 'o'}"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    ck, base, a, b = (Checkpoint(p) for p in (out, mk_zoo["base"], mk_zoo["a"], mk_zoo["b"]))
    n = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(ck.read(n), (base.read(n) + 0.3 * a.read(n) + 0.5 * b.read(n)) / 1.8, atol=1e-6)
    cfg.write_text(cfg.read_text().replace("merge_method: linear", "merge_method: frankenmerge"))
    assert main(["merge", str(cfg), f"out_dir={tmp_path / 'o2'}"]) == 2
    assert "merge_method: 'frankenmerge' is not supported" in capsys.readouterr().err


def test_unclassified_tensors_are_merged_like_mergekit(tmp_path):
    from tests.helpers import llama_tensors, write_checkpoint

    paths = []
    for seed in (0, 1):
        t = llama_tensors(layers=2, seed=seed, dtype=torch.float32)
        t["model.extra_scale.weight"] = torch.full((4,), float(seed + 1))  # no attn/mlp/other role
        paths.append(write_checkpoint(tmp_path / f"m{seed}", t, shards=1))
    raw = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
           "dtype": "float32"}
    from lsm_dist.config import from_dict
    from lsm_dist.merge.plan import MergePlan

    plan = from_dict(MergePlan, {**plan_data(raw), "out_dir": str(tmp_path / "o")})
    out = Checkpoint(run_merge(plan))
    assert torch.equal(out.read("model.extra_scale.weight"), torch.full((4,), 1.5))
    native = dataclasses_replace(plan, rest="target", out_dir=str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="cannot classify"):
        prepare(native)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_mergekit_yaml_command_line_and_layout(tmp_path):
    """`lsm merge CONFIG OUT` with mergekit-yaml's flags: the model is OUT itself (loadable as OUT,
    mergekit_config.yml in it), no layers/ left, the merge's own files in OUT/.lsm_merge; a re-run
    of another config into it replaces only what it wrote; a user's file there stops it."""
    from lsm_dist.cli import main
    from lsm_dist.merge import is_complete
    from tests.merge_helpers import build_model, perturbed_expert

    base = build_model("llama", tmp_path / "base", 64, 2, 128, seed=0)
    other = perturbed_expert(base, tmp_path / "other", seed=1)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {other}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    out = tmp_path / "OUT"
    assert main(["merge", str(cfg), str(out), "--copy-tokenizer", "--lazy-unpickle", "--allow-crimes",
                 "--out-shard-size", "20K", "--no-write-model-card"]) == 0
    assert is_complete(out) and (out / "config.json").is_file() and (out / "mergekit_config.yml").read_text() == cfg.read_text()
    assert (out / "tokenizer.json").is_file() and not (out / "layers").exists() and not (out / "model").exists()
    assert (out / ".lsm_merge" / "merge_plan.json").is_file() and (out / ".lsm_merge" / "merge.log").is_file()
    assert not (out / ".lsm_merge" / "layers").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1  # 20K parameters x 2 bytes per shard
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loadable as OUT
    cfg.write_text(cfg.read_text().replace("weight: 0.5}\ndtype", "weight: 0.7}\ndtype"))
    assert main(["merge", str(cfg), str(out), "overwrite=true", "--no-copy-tokenizer"]) == 0
    assert not (out / "tokenizer.json").exists() and "0.7" in (out / "mergekit_config.yml").read_text()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(cfg), str(out), "overwrite=true", "params.seed=3"]) != 0
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["merge", str(cfg), str(tmp_path / "x"), "--trust-remote-code"]) != 0
