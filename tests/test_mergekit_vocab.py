"""mergekit's vocabulary keys through ``lsm merge``: ``tokenizer_source: union | base | <model>``,
``tokenizer: {source, tokens, pad_to_multiple_of}`` and ``chat_template`` (``lsm_dist.merge.vocab``),
on tiny Llama models with different vocabularies built here; the peer tests run mergekit 0.1.5 on
the same configs (as ``tests/test_mergekit.py``, whose fixtures and runner they reuse) and compare
every tensor, config.json's vocab_size and the tokenizer files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError
from lsm_dist.merge import load_plan, prepare, run_merge
from tests.merge_helpers import build_model, perturbed_expert
from tests.test_mergekit import RUNNER, require_peer, write_cfg


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # and mergekit with OMP_NUM_THREADS=1: reductions round by the thread count
    yield
    torch.set_num_threads(n)


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def vocab_variant(base_dir: Path, path: Path, added: list[str], seed: int, template: str | None = None,
                  ordinary: tuple[str, ...] = ()) -> Path:
    """The base with tokens in its tokenizer (``ordinary``: in the word-level vocabulary itself;
    ``added``: added tokens) and its embeddings / head grown to match (new rows random), every
    weight tensor then perturbed, so no row equals another model's."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lsm_dist.zoo.tokenizer import BOS, EOS, PAD, UNK, build_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tok = build_tokenizer()
    if ordinary:
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["model"]["vocab"] |= {t: len(spec["model"]["vocab"]) + i for i, t in enumerate(ordinary)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS,
                                      eos_token=EOS, pad_token=PAD, unk_token=UNK)
    tok.add_tokens(added)
    if template:
        tok.chat_template = template
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    model.save_pretrained(str(path), max_shard_size="40KB")
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vocab_zoo(tmp_path_factory):
    """base (the zoo's 100-token tokenizer), a (its vocabulary), tools (+ <tool> <think>, a chat
    template), vision (+ <think> <img> <tab>: <think> at another id), latin (+ é ß in its
    vocabulary, + <think>), bare (a without tokenizer files)."""
    import shutil

    d = tmp_path_factory.mktemp("vocab_zoo")
    base = build_model("llama", d / "base", 64, 4, 128, seed=0)
    a = perturbed_expert(base, d / "a", seed=1)
    shutil.copytree(a, d / "bare", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    return {"base": base, "a": a, "bare": d / "bare",
            "tools": vocab_variant(base, d / "tools", ["<tool>", "<think>"], 11, TEMPLATE),
            "vision": vocab_variant(base, d / "vision", ["<think>", "<img>", "<tab>"], 12),
            "latin": vocab_variant(base, d / "latin", ["<think>"], 13, ordinary=("é", "ß"))}


# name: (compare, config); compare "id": every tensor bit-equal; "token": the ids of tokens added by two
# models follow mergekit's set order (PYTHONHASHSEED), so rows are compared token by token
VOCAB_CASES = {
    "union-task_arithmetic": ("id", """
models:
  - model: {tools}
    parameters:
      weight: 0.7
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
dtype: float32
"""),
    "union4-linear": ("token", """
models:
  - model: {base}
    parameters:
      weight: 1.0
  - model: {tools}
    parameters:
      weight: 0.5
  - model: {vision}
    parameters:
      weight: 0.3
  - model: {latin}
    parameters:
      weight: 0.2
merge_method: linear
base_model: {base}
tokenizer_source: union
dtype: float32
"""),
    "model-slerp": ("id", """
models:
  - model: {base}
  - model: {vision}
merge_method: slerp
base_model: {base}
parameters:
  t: 0.4
tokenizer_source: {vision}
dtype: float32
"""),
    "tokens-ties": ("id", """
models:
  - model: {tools}
    parameters:
      weight: 0.6
      density: 0.7
  - model: {vision}
    parameters:
      weight: 0.4
      density: 0.5
merge_method: ties
base_model: {base}
tokenizer:
  source: {tools}
  pad_to_multiple_of: 16
  tokens:
    "<think>":
      source: {vision}
      force: true
    "<new>":
      source:
        kind: zero
    "<img>":
      source:
        kind: model_token
        model: {tools}
        token: "<tool>"
    "a":
      source:
        kind: model_token
        model: {base}
        token_id: 5
      force: true
dtype: float32
"""),
    "base-auto-template": ("id", """
models:
  - model: {tools}
    parameters:
      weight: 0.5
  - model: {vision}
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: base
chat_template: auto
dtype: bfloat16
"""),
    "union-chatml": ("id", """
models:
  - model: {base}
    parameters:
      weight: 0.5
  - model: {tools}
    parameters:
      weight: 0.5
merge_method: linear
base_model: {base}
tokenizer:
  source: union
  pad_to_multiple_of: 8
chat_template: chatml
dtype: float32
"""),
    "template-only": ("id", """
models:
  - model: {base}
    parameters:
      weight: 0.5
  - model: {a}
    parameters:
      weight: 0.5
merge_method: linear
chat_template: "{{% for m in messages %}}[{{{{ m['role'] }}}}] {{{{ m['content'] }}}}{{% endfor %}}"
dtype: float32
"""),
    # a model without a tokenizer: taken to have the base's vocabulary (mergekit: "Assuming same as base")
    "no-tokenizer": ("id", """
models:
  - model: {bare}
    parameters:
      weight: 0.6
  - model: {tools}
    parameters:
      weight: 0.4
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
dtype: float32
"""),
    "slices-passthrough": ("id", """
slices:
  - sources:
    - model: {tools}
      layer_range: [0, 2]
  - sources:
    - model: {vision}
      layer_range: [2, 4]
merge_method: passthrough
base_model: {base}
tokenizer_source: {vision}
dtype: float32
"""),
}


@pytest.fixture(scope="module")
def vocab_peer_outputs(vocab_zoo, tmp_path_factory):
    """VOCAB_CASES merged by mergekit 0.1.5 (one process, mergekit-yaml's entry point)."""
    py = require_peer()
    d = tmp_path_factory.mktemp("vocab_peer")
    argv, outs = [], {}
    for name, (_, text) in VOCAB_CASES.items():
        argv += [str(write_cfg(d, text, vocab_zoo, f"{name}.yml")), str(d / f"mk-{name}")]
        outs[name] = (d / f"{name}.yml", d / f"mk-{name}")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")},
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([py, "-c", RUNNER, *argv], capture_output=True, text=True, env=env, cwd=d, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return outs


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VOCAB_CASES))
def test_vocabulary_agrees_with_mergekit(name, vocab_zoo, vocab_peer_outputs, tmp_path, capsys):
    """`lsm merge CONFIG OUT` and `mergekit-yaml CONFIG OUT`: the same tensors bit for bit (the
    vocabulary's rows permuted, defaulted and padded as mergekit does), the same vocab_size, the
    same tokenizer vocabulary and chat template."""
    import json

    from lsm_dist.cli import main

    compare = VOCAB_CASES[name][0]
    cfg, mk_dir = vocab_peer_outputs[name]
    out = tmp_path / "OUT"
    assert main(["merge", str(cfg), str(out)]) == 0
    ours, theirs = Checkpoint(out), Checkpoint(mk_dir)
    assert set(ours.names) == set(theirs.names)
    cfg_o, cfg_t = (json.loads((p / "config.json").read_text()) for p in (out, mk_dir))
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        assert cfg_o[key] == cfg_t[key], key
    tok_o, tok_t = _tokenizer(out), _tokenizer(mk_dir)
    assert tok_o.chat_template == tok_t.chat_template
    vo, vt = tok_o.get_vocab(), tok_t.get_vocab()
    for n in ours.names:
        assert ours.tensors[n].shape == theirs.tensors[n].shape and ours.tensors[n].dtype == theirs.tensors[n].dtype, n
    if compare == "id":
        assert vo == vt
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            assert (out / f).is_file() == (mk_dir / f).is_file(), f
            assert not (out / f).is_file() or (out / f).read_bytes() == (mk_dir / f).read_bytes(), f
        diff = [n for n in sorted(ours.names) if not torch.equal(ours.read(n), theirs.read(n))]
        assert not diff, f"{len(diff)} tensor(s) differ, e.g. {diff[:3]}"
    else:
        assert set(vo) == set(vt) and len(vo) == len(vt)
        toks = sorted(vo)
        for n in sorted(ours.names):
            a, b = ours.read(n), theirs.read(n)
            if n in VOCAB_TENSORS:
                a, b = a[[vo[t] for t in toks]], b[[vt[t] for t in toks]]
            assert torch.equal(a, b), n
    assert cfg_o["vocab_size"] == ours.tensors["model.embed_tokens.weight"].shape[0]


def test_vocabulary_rows_by_hand(vocab_zoo, tmp_path):
    """mergekit's rules, computed here: a token one input has → its row for every input; one several
    inputs lack → the base's row; forced and zero sources; padding rows the mean of the token rows."""
    text = VOCAB_CASES["tokens-ties"][1].replace("merge_method: ties", "merge_method: task_arithmetic")
    rp = prepare(load_plan(write_cfg(tmp_path, text, vocab_zoo), [f"out_dir={tmp_path / 'o'}"]))
    v = rp.vocab
    assert v.size == 112 and len(v.tokens) == 104 and v.tokens[:102] == _tokenizer(vocab_zoo["tools"]).convert_ids_to_tokens(list(range(102)))
    assert v.tokens[102:] == ["<new>", "<img>"] and rp.config_patch["vocab_size"] == 112
    job = next(j for j in rp.jobs if j.name == "model.embed_tokens.weight")
    assert job.vocab == ["tools", "vision", "base"] and job.vocab_base == "base" and job.shape == (112, 64)
    emb = {m: Checkpoint(vocab_zoo[m]).read("model.embed_tokens.weight") for m in ("base", "tools", "vision")}
    out = v.permute(dict(emb), "base", "embed")
    idx = {t: i for i, t in enumerate(v.tokens)}
    vis = _tokenizer(vocab_zoo["vision"]).get_vocab()
    for m in ("base", "tools", "vision"):
        x = out[m]
        assert torch.equal(x[idx["b"]], emb[m][_tokenizer(vocab_zoo[m]).get_vocab()["b"]])  # its own row
        assert torch.equal(x[idx["<tool>"]], emb["tools"][100])  # only tools has it
        assert torch.equal(x[idx["<think>"]], emb["vision"][vis["<think>"]])  # forced: vision's
        assert torch.equal(x[idx["a"]], emb["base"][5])  # forced: the base's row 5
        assert not x[idx["<new>"]].any()  # zero
        assert torch.equal(x[104:], x[:104].mean(0).expand(8, -1))  # padding
    assert torch.equal(out["vision"][idx["<img>"]], emb["vision"][vis["<img>"]])  # vision keeps its own
    assert torch.equal(out["base"][idx["<img>"]], emb["tools"][100])  # the others: tools' <tool>


@pytest.mark.parametrize("cfg,match", [
    ("tokenizer_source: /no/such/model\n", r"tokenizer_source: '/no/such/model' is neither union, base nor a model"),
    ("tokenizer_source: {vision}\ntokenizer: {{source: union}}\n", r"tokenizer_source or tokenizer, not both"),
    ("tokenizer:\n  tokens:\n    '<x>': {{source: /no/such/model}}\n", r"tokens\['<x>'\]\.source: '/no/such/model' names no model"),
    ("tokenizer:\n  tokens:\n    '<x>': {{source: {{kind: model_token, model: {tools}}}}}\n", r"exactly one of token or token_id"),
    ("tokenizer:\n  pad_to_multiple_of: 0\n", r"pad_to_multiple_of: expected a positive integer"),
    ("tokenizer:\n  tokns: {{}}\n", r"unknown key\(s\) \['tokns'\]"),
    # checked when the plan is resolved: before any tensor is read
    ("tokenizer:\n  tokens:\n    '<x>': {{force: true}}\n", r"tokens\['<x>'\]\.source: .*no source is given"),
    ("tokenizer:\n  tokens:\n    '<img>': {{source: {tools}}}\n", r"tools has no token '<img>' to take its row from"),
    ("tokenizer:\n  tokens:\n    '<x>': {{source: {{kind: model_token, model: {tools}, token: '<nope>'}}}}\n",
     r"tools's tokenizer has no token '<nope>'"),
    ("tokenizer_source: union\nchat_template: chatmlx\n", r"chat_template: 'chatmlx' is neither auto, a built-in"),
])
def test_vocabulary_errors_before_heavy_work(cfg, match, vocab_zoo, tmp_path):
    text = """models:
  - model: {tools}
    parameters: {{weight: 0.5}}
  - model: {vision}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
base_model: {base}
dtype: float32
""" + cfg
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=match):
        prepare(load_plan(write_cfg(tmp_path, text, vocab_zoo), [f"out_dir={out}"]))
    assert not (out / "layers").exists() and not (out / "model").exists()


def test_vocabulary_needs_the_embeddings_merged(vocab_zoo, tmp_path):
    """rest: target would copy the target's embeddings, of the old vocabulary: refused by name."""
    text = VOCAB_CASES["union-task_arithmetic"][1]
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight has a vocabulary axis"):
        prepare(load_plan(write_cfg(tmp_path, text, vocab_zoo), [f"out_dir={tmp_path / 'o'}", "rest=target"]))


def test_vocabulary_in_latent_space(vocab_zoo, tmp_path):
    """space: latent: attn / mlp merged on latents, the embeddings and head (rest: weight) permuted
    into the output vocabulary and merged in weight space: as in the weight-space merge."""
    from tests.merge_helpers import train_tiny_vae

    vae = train_tiny_vae([vocab_zoo["base"], vocab_zoo["tools"]], tmp_path / "vae", steps=20)
    cfg = write_cfg(tmp_path, VOCAB_CASES["union-task_arithmetic"][1], vocab_zoo)
    weight = Checkpoint(run_merge(load_plan(cfg, [f"out_dir={tmp_path / 'w'}"])))
    plan = load_plan(cfg, ["space=latent", f"vae={vae}", f"out_dir={tmp_path / 'l'}", f"cache_dir={tmp_path / 'c'}",
                           "batch_size=16"])
    rp = prepare(plan)
    assert {j.space for j in rp.jobs if j.vocab} == {"weight"} and "latent" in {j.space for j in rp.jobs}
    latent = Checkpoint(run_merge(plan))
    assert latent.tensors["model.embed_tokens.weight"].shape == (102, 64)
    for n in VOCAB_TENSORS:
        assert torch.equal(latent.read(n), weight.read(n)), n
    n = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(latent.read(n), weight.read(n))  # decoded from latents
    assert _tokenizer(latent.path).get_vocab() == _tokenizer(weight.path).get_vocab()


def test_vocabulary_tokenizer_written_without_copy_tokenizer(vocab_zoo, tmp_path):
    """As mergekit: a built vocabulary's tokenizer is written also under --no-copy-tokenizer; a
    chat template alone re-saves the target's tokenizer, and under --no-copy-tokenizer nothing."""
    from lsm_dist.cli import main

    union = write_cfg(tmp_path, VOCAB_CASES["union-chatml"][1], vocab_zoo, "u.yml")
    assert main(["merge", str(union), str(tmp_path / "u"), "--no-copy-tokenizer"]) == 0
    tok = _tokenizer(tmp_path / "u")
    assert len(tok) == 102 and "<|im_start|>" in tok.chat_template
    only = write_cfg(tmp_path, VOCAB_CASES["template-only"][1], vocab_zoo, "t.yml")
    assert main(["merge", str(only), str(tmp_path / "t")]) == 0
    assert _tokenizer(tmp_path / "t").chat_template.startswith("{% for m in messages %}[")
    assert main(["merge", str(only), str(tmp_path / "n"), "--no-copy-tokenizer"]) == 0
    assert not [p.name for p in (tmp_path / "n").iterdir() if p.name.startswith(("tokenizer", "chat_template"))]


def test_tokens_beyond_vocab_size_refused(vocab_zoo, tmp_path):
    """A tokenizer with tokens past its model's vocab_size: where mergekit would fail mid-merge (a
    KeyError) or strip the base's tokenizer, refused when the plan is resolved, naming the model."""
    import json
    import shutil

    cut = Path(shutil.copytree(vocab_zoo["tools"], tmp_path / "cut"))
    cfg = json.loads((cut / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**cfg, "vocab_size": 101}))  # <think> (101) is past it
    zoo = {**vocab_zoo, "cut": cut}
    text = "models:\n  - model: {cut}\n    parameters: {{weight: 0.5}}\nmerge_method: task_arithmetic\n" \
           "dtype: float32\n"
    with pytest.raises(ConfigError, match=r"cut's tokenizer has token '<think>' .* at an id >= its vocab_size 101"):
        prepare(load_plan(write_cfg(tmp_path, text + "base_model: {base}\ntokenizer_source: {cut}\n", zoo, "a.yml"),
                          [f"out_dir={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match=r"models.cut: its tokenizer holds 1 token\(s\) at ids >= its vocab_size"):
        prepare(load_plan(write_cfg(tmp_path, text.replace("{cut}", "{tools}") + "base_model: {cut}\n"
                                    "tokenizer_source: union\n", zoo, "b.yml"), [f"out_dir={tmp_path / 'b'}"]))


@pytest.mark.slow
def test_a_model_card_config_runs_unchanged_and_equals_mergekit(vocab_zoo, tmp_path):
    """The issue's "done when": a config as a mergekit model card gives it -- Hub ids, `int8_mask`,
    `tokenizer_source: union`, a leftover `name:` -- with the models in the HF cache (offline), run
    by `lsm merge CONFIG OUT` and by `mergekit-yaml CONFIG OUT` from the same cache: every tensor
    bit for bit, the same vocabulary. mergekit 0.1.5 lists a repo's files online before it reads
    its cache (mergekit/common.py, ModelReference.local_path: list_repo_files), so offline it cannot
    run a Hub id even when cached: it is given the same config with the snapshot paths the ids
    resolve to."""
    from lsm_dist.cli import main
    from tests.test_hub import lay_out

    py = require_peer()
    cache = tmp_path / "hf"
    snaps = {"HuggingFaceTB/SmolLM2-135M-Instruct": lay_out(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", vocab_zoo["base"]),
             "someone/SmolLM2-tools": lay_out(cache, "someone/SmolLM2-tools", vocab_zoo["tools"])}
    cfg = tmp_path / "card.yml"
    cfg.write_text("name: smol-tools\nslices:\n  - sources:\n"
                   "      - model: HuggingFaceTB/SmolLM2-135M-Instruct\n        layer_range: [0, 4]\n"
                   "      - model: someone/SmolLM2-tools\n        layer_range: [0, 4]\n"
                   "merge_method: slerp\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
                   "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                   "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
                   "  int8_mask: true\ntokenizer_source: union\ndtype: float32\n")
    mk_cfg = tmp_path / "card-paths.yml"
    text = cfg.read_text()
    for repo, snap in snaps.items():
        text = text.replace(repo, str(snap))
    mk_cfg.write_text(text)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")},
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([py, "-c", RUNNER, str(mk_cfg), str(tmp_path / "mk")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main(["merge", str(cfg), str(tmp_path / "OUT")]) == 0
    finally:
        mp.undo()
    ours, theirs = Checkpoint(tmp_path / "OUT"), Checkpoint(tmp_path / "mk")
    assert set(ours.names) == set(theirs.names)
    diff = [n for n in sorted(ours.names) if not torch.equal(ours.read(n), theirs.read(n))]
    assert not diff, f"{len(diff)} tensor(s) differ, e.g. {diff[:3]}"
    assert _tokenizer(tmp_path / "OUT").get_vocab() == _tokenizer(tmp_path / "mk").get_vocab()
    assert ours.tensors["model.embed_tokens.weight"].shape[0] > Checkpoint(vocab_zoo["base"]).tensors[
        "model.embed_tokens.weight"].shape[0]  # the union grew the vocabulary
