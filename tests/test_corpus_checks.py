"""Corpus safety: every manifest entry checked against the bytes it points at, `lsm verify`
catching every edit, bad input named (shard and tensor), NaN found before anything is written,
`overwrite` and temp-file cleanup touching only what a conversion wrote."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.chunking import NonFiniteError
from lsm_dist.cli import main
from lsm_dist.corpus import CorpusError, run_convert
from lsm_dist.corpus.convert import manifest_digest
from lsm_dist.corpus.reader import Corpus, CorpusStream
from lsm_dist.corpus.verify import verify_corpus
from tests.helpers import corpus_cfg as cfg
from tests.helpers import llama_tensors, write_checkpoint


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A bf16 + an fp32 model (norms included: constant tensors) converted once; tests edit copies."""
    d = tmp_path_factory.mktemp("checks")
    a = write_checkpoint(d / "a", llama_tensors(layers=2, seed=1, dtype=torch.bfloat16), shards=2)
    b = write_checkpoint(d / "b", llama_tensors(layers=1, seed=2, dtype=torch.float32), shards=1)
    run_convert(cfg(d, [a, b], "ref", blocks=["attn", "mlp", "other"]), progress=False)
    return {"corpus": d / "ref", "models": [a, b]}


@pytest.fixture
def corpus(made, tmp_path) -> Path:
    out = tmp_path / "c"
    shutil.copytree(made["corpus"], out)
    return out


def edit(d: Path, fn, redigest: bool = True) -> None:
    """Edit manifest.json; ``redigest``: also recompute its content digest (a deliberate edit)."""
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    if redigest:
        m["manifest_digest"] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))


def stream_all(d: Path) -> list[dict]:
    return list(CorpusStream(Corpus(d), 8, resampled=False, shuffle_buffer=0, drop_last=False))


def tensor(m: dict, block: str = "mlp") -> dict:
    return next(t for t in m["tensors"] if t["block"] == block and len(t["locations"]) > 1)


def _set(key, value, block="mlp"):
    return lambda m: tensor(m, block).__setitem__(key, value(tensor(m, block)[key]) if callable(value) else value)


def _loc(i, delta, block="mlp"):
    def f(m):
        tensor(m, block)["locations"][0][i] += delta(m) if callable(delta) else delta
    return f


def _swap_offsets(m):  # point a block at another block of the same size
    t = tensor(m)
    t["locations"][0][3], t["locations"][1][3] = t["locations"][1][3], t["locations"][0][3]


# (what is edited, the edit, where it is caught: open = Corpus(), read = first block read, verify)
DELIBERATE = [
    ("block sample count", _loc(2, 1), "open", "does not continue|bytes of values"),
    ("block count", lambda m: tensor(m)["locations"].pop(), "open", "blocks hold"),
    ("tensor num_samples", _set("num_samples", lambda v: v + 1), "open", "do not fit numel"),
    ("shard num_samples", lambda m: m["shards"][0].__setitem__("num_samples", m["shards"][0]["num_samples"] + 1),
     "open", "its blocks hold"),
    ("corpus num_samples", lambda m: m.__setitem__("num_samples", m["num_samples"] - 1), "open", "tensors hold"),
    ("offset onto the tar header", _loc(3, -512), "open", "overlap"),
    ("offsets of two blocks swapped", _swap_offsets, "read", "the member at byte .* is 't"),
    ("offset past the shard", _loc(3, 1 << 30), "open", "outside the shard"),
    ("block byte size", _loc(4, 64), "open", "bytes of values"),
    ("metadata offset", _loc(5, 512), "open", "overlap|outside"),
    ("shard bytes", lambda m: m["shards"][0].__setitem__("bytes", m["shards"][0]["bytes"] + 512), "open", "total_bytes|truncated or wrong"),
    ("total_bytes", lambda m: m.__setitem__("total_bytes", 1), "open", "total_bytes"),
    ("first_sample", _set("first_sample", lambda v: v + 1), "open", "first_sample"),
    ("padding", _set("padding", lambda v: v + 1), "open", "padding"),
    ("numel", _set("numel", lambda v: v + 1), "open", "numel"),
    ("tokens", lambda m: m["settings"].__setitem__("tokens", 8), "open", "do not fit|bytes of values"),
    ("shard name", lambda m: m["shards"][0].__setitem__("name", "../a/model-00001-of-00002.safetensors"), "open", "not shard-NNNNNN"),
    ("stored dtype unknown", _set("stored_dtype", "F8"), "open", r"shard shard-\d+\.tar: stored dtype 'F8' is not one"),
    ("stored dtype", _set("stored_dtype", "F16"), "read", "does not start with the .npy header"),
    ("mean non-finite", _set("mean", float("nan")), "open", r"shard shard-\d+\.tar: mean is nan, not a finite number"),
    ("std non-finite", _set("std", float("inf")), "open", r"shard shard-\d+\.tar: std is inf, not a finite number"),
    ("std 0, tensor not constant", _set("std", 0.0), "read", r"shard-\d+\.tar: tensor \d+ .*std 0, but the tensor is not constant"),
    ("sha256", lambda m: m["shards"][0].__setitem__("sha256", "0" * 64), "verify", "checksum mismatch"),
    ("mean", _set("mean", lambda v: v + 1e-3), "verify", "mean/std recomputed"),
    ("std", _set("std", lambda v: v * 2), "verify", "mean/std recomputed"),
    ("name", _set("name", "model.layers.0.mlp.gate_proj.weight"), "verify", r"\['name'\] disagree"),
    ("layer", _set("layer", 7), "verify", r"\['layer'\] disagree"),
    ("block", _set("block", "attn"), "verify", r"\['block'\] disagree"),
    ("role", _set("role", "q_proj"), "verify", r"\['role'\] disagree"),
    ("shape", _set("shape", lambda v: v[::-1]), "verify", r"\['shape'\] disagree"),
    ("dtype", _set("dtype", "F16"), "verify", r"\['dtype'\] disagree"),
    ("model", _set("model", "b"), "verify", r"\['model'\] disagree"),
]


@pytest.mark.parametrize("what,fn,stage,msg", DELIBERATE, ids=[d[0] for d in DELIBERATE])
def test_every_manifest_edit_is_caught(corpus, what, fn, stage, msg):
    """A manifest edited with its digest recomputed: the layout checks on open, the header
    checks on every block read, or `lsm verify` catch it; a block is never read from bytes that
    are not its own member (no tar header bytes reach training)."""
    edit(corpus, fn)
    with pytest.raises(CorpusError, match=msg):
        verify_corpus(corpus)
    assert main(["verify", str(corpus)]) == 1
    if stage == "open":
        with pytest.raises(CorpusError, match=msg):
            Corpus(corpus)
    elif stage == "read":
        with pytest.raises(CorpusError, match=msg):
            stream_all(corpus)
    else:  # harmless to the bytes read; training still gets exactly the stored blocks
        assert len(stream_all(corpus)) > 0


@pytest.mark.parametrize("field", ["roles", "plan_digest", "settings", "models", "tensors", "shards"])
def test_naive_edit_of_any_field_is_refused(corpus, field):
    def fn(m):
        if field == "roles":
            m["roles"] = m["roles"][::-1]
        elif field == "plan_digest":
            m["plan_digest"] = "0" * 16
        elif field == "settings":
            m["settings"]["include"] = "x"
        elif field == "models":
            m["models"][0]["digest"] = "0" * 16
        elif field == "tensors":
            m["tensors"][0]["locations"][0][2] += 1
        else:
            m["shards"][0]["num_samples"] += 1
    edit(corpus, fn, redigest=False)
    with pytest.raises(CorpusError, match="edited after conversion"):
        Corpus(corpus)


def test_moved_source_path_may_be_edited(corpus, made, tmp_path):
    moved = tmp_path / "moved-a"
    shutil.copytree(made["models"][0], moved)
    edit(corpus, lambda m: m["models"][0].__setitem__("path", str(moved)), redigest=False)
    n = len(Corpus(corpus).tensors)
    assert f"{n} of {n} compared bit for bit" in verify_corpus(corpus, rebuild=True)  # with the moved copy


def test_std_0_of_a_constant_tensor_reads_as_zeros(corpus):
    """std 0 is accepted only where the values are all the mean: a norm weight of ones."""
    m = json.loads((corpus / "manifest.json").read_text())
    norm = next(t for t in m["tensors"] if t["role"] == "input_layernorm")
    edit(corpus, lambda m: m["tensors"][norm["index"]].__setitem__("std", 0.0))
    c = Corpus(corpus)
    x = c.read_samples(c.tensors[norm["index"]])
    assert not x.any()
    assert "OK" in verify_corpus(corpus)


def test_unknown_format_version_names_it_and_the_convert_command(corpus, made):
    edit(corpus, lambda m: m.__setitem__("format_version", 3), redigest=True)
    with pytest.raises(CorpusError, match=r"format version 3; this lsm_dist reads versions \[1, 2\]\. Convert the "
                                          r"checkpoints again: lsm convert models=\[a=.*/a,b=.*/b\] tokens=4 chunk=32"):
        Corpus(corpus)


def test_verify_rebuild_compares_with_the_source(made, tmp_path):
    """`lsm verify --rebuild` reads the source checkpoint: a tensor changed there after the
    conversion (same header) fails, naming it; a source that is gone is reported, not failed."""
    src = tmp_path / "a"
    shutil.copytree(made["models"][0], src)
    run_convert(cfg(tmp_path, [src]), progress=False)
    out = tmp_path / "corpus"
    report = verify_corpus(out, rebuild=True)
    n = len(Corpus(out).tensors)
    assert f"{n} of {n} compared bit for bit" in report
    name = "model.layers.1.self_attn.v_proj.weight"
    info = Checkpoint(src).tensors[name]
    with open(info.file, "r+b") as f:  # one bf16 value of the source changes in place
        f.seek(info.offset + 10)
        b = f.read(2)
        f.seek(info.offset + 10)
        f.write(bytes([b[0] ^ 1, b[1]]))
    with pytest.raises(CorpusError, match=rf"tensor {name} of a does not rebuild bit for bit"):
        verify_corpus(out, rebuild=True)
    assert main(["verify", str(out), "--rebuild"]) == 1
    assert main(["verify", str(out)]) == 0  # the corpus itself is intact
    shutil.rmtree(src)
    report = verify_corpus(out, rebuild=True)
    assert f"0 of {n} compared" in report and "rebuilt from the corpus only" in report


# ---- bad input at conversion --------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_nan_found_before_any_shard_is_written(tmp_path, workers):
    ts = llama_tensors(layers=3, hidden=64, inter=128)
    ts["model.layers.2.mlp.down_proj.weight"][3, 4] = float("nan")  # the last tensor converted
    ts["model.layers.2.mlp.down_proj.weight"][5, 6] = float("inf")
    m = write_checkpoint(tmp_path / "nan", ts)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.2\.mlp\.down_proj\.weight: contains 1 NaN and 1 Inf"):
        run_convert(cfg(tmp_path, [m], num_workers=workers), progress=False)
    out = tmp_path / "corpus"
    assert len(json.loads((out / "plan.json").read_text())["shards"]) > 4
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # no shard, part or temp file


def test_other_dtypes_refused_by_name(tmp_path):
    ts = {k: v.double() for k, v in llama_tensors(layers=1, dtype=torch.float32).items()}  # a float64 model
    m = write_checkpoint(tmp_path / "f64", ts)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.\w+\.\w+\.weight has dtype F64; corpus "
                                         r"format 2 stores BF16/F16/F32 values only"):
        run_convert(cfg(tmp_path, [m]), progress=False)
    # one float64 weight among float32 ones: named as the odd one out (checkpoint.weight_dtype_problems)
    ts = llama_tensors(layers=1, dtype=torch.float32)
    ts["model.layers.0.mlp.up_proj.weight"] = ts["model.layers.0.mlp.up_proj.weight"].double()
    m = write_checkpoint(tmp_path / "mixed", ts)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has dtype F64, the model's "
                                         r"other \d+ weights F32"):
        run_convert(cfg(tmp_path, [m]), progress=False)


# ---- only what a conversion wrote is removed ---------------------------------------------

def test_overwrite_removes_only_the_replaced_corpus_files(made, tmp_path):
    a, b = made["models"]
    out = tmp_path / "corpus"
    first = run_convert(cfg(tmp_path, [a, b]), progress=False)
    mine = {out / "notes.txt": "mine", out / "parts" / "keep.json": "{}", out / "shard-999999.tar": "not a shard",
            out / ".backup.tmp": "x"}
    for p, text in mine.items():
        p.write_text(text)
    second = run_convert(cfg(tmp_path, [b], overwrite=True), progress=False)
    assert len(second["shards"]) < len(first["shards"])
    for p, text in mine.items():
        assert p.read_text() == text, p  # the user's files survive
    names = {s["name"] for s in second["shards"]}
    assert {p.name for p in out.glob("shard-0*.tar")} == names  # the old corpus' extra shards are gone
    assert {p.name for p in (out / "parts").iterdir()} == {n + ".json" for n in names} | {"keep.json"}
    Corpus(out, verify=True)


def test_a_directory_with_files_not_ours_is_refused(made, tmp_path):
    out = tmp_path / "user"
    out.mkdir()
    (out / "shard-000000.tar").write_text("the user's own file")
    with pytest.raises(CorpusError, match="no plan or manifest of a conversion"):
        run_convert(cfg(tmp_path, made["models"][:1], "user", overwrite=True), progress=False)
    (out / "plan.json").write_text('{"my": "own plan"}')
    with pytest.raises(CorpusError, match="not a plan or manifest a conversion wrote"):
        run_convert(cfg(tmp_path, made["models"][:1], "user", overwrite=True), progress=False)
    assert (out / "shard-000000.tar").read_text() == "the user's own file"
    assert (out / "plan.json").read_text() == '{"my": "own plan"}'


def test_temp_files_of_killed_runs_are_cleaned(made, tmp_path):
    run_convert(cfg(tmp_path, made["models"][:1]), progress=False)
    out = tmp_path / "corpus"
    (out / "manifest.json").unlink()
    (out / "parts" / "shard-000001.tar.json").unlink()  # a run killed while writing shard 1
    leftovers = [out / ".shard-000001.tar.k3x9_a0q.tmp", out / "parts" / ".shard-000001.tar.json.ab12cd34.tmp",
                 out / "parts" / ".shard-000000.tar.json.zz00zz00.tmp", out / ".manifest.json.q1w2e3r4.tmp",
                 out / ".plan.json.0a0a0a0a.tmp"]
    kept = [out / ".shard-000001.tar.mine.tmp", out / "parts" / ".notes.tmp", out / "parts" / "x.tmp"]
    for p in leftovers + kept:
        p.write_bytes(b"partial")
    run_convert(cfg(tmp_path, made["models"][:1]), progress=False)
    assert not [p for p in leftovers if p.exists()]
    assert all(p.read_bytes() == b"partial" for p in kept)
    assert "OK" in verify_corpus(out, rebuild=True)
