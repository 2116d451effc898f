import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lsm_dist.checkpoint import Checkpoint, CheckpointError
from lsm_dist.chunking import (
    STORED,
    ChunkSpec,
    NonFiniteError,
    chunk_tensor,
    norm_stats,
    normalize_range,
    standardize,
    to_bits,
    unchunk,
)
from lsm_dist.config import ConfigError, load_config
from lsm_dist.corpus import ConvertConfig, CorpusError, run_convert
from lsm_dist.corpus.reader import Corpus, CorpusStream, make_loader
from lsm_dist.corpus.verify import verify_corpus
from tests.helpers import corpus_cfg as cfg
from tests.helpers import llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    a = write_checkpoint(d / "a", llama_tensors(layers=2, seed=1, dtype=torch.bfloat16), shards=2)
    b = write_checkpoint(d / "b", llama_tensors(layers=3, hidden=48, inter=96, seed=2, dtype=torch.float32), shards=3)
    c = write_checkpoint(d / "c", llama_tensors(layers=1, seed=3, dtype=torch.float16), shards=1)
    return [a, b, c]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunk_roundtrip_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(50, 37, generator=g) * 0.03 + 0.002).to(dtype)
    t[3, :7] = 0  # exact zeros do not survive an affine map: they need fixups
    t[4, 0] = -0.0
    spec = ChunkSpec(4, 16)
    samples, fix, mean, std = chunk_tensor(t, spec)
    assert samples.shape == (spec.num_samples(t.numel()), 4, 16) and samples.dtype == np.float32
    assert abs(float(samples.reshape(-1)[: t.numel()].mean())) < 1e-5
    assert abs(float(samples.reshape(-1)[: t.numel()].std()) - 1) < 1e-4
    assert np.all(samples.reshape(-1)[t.numel():] == 0)
    back = unchunk(samples, t.shape, dtype, mean, std, fix)
    assert back.dtype == dtype and torch.equal(to_bits(back), to_bits(t))
    # without fixups it is only close
    approx = unchunk(samples, t.shape, dtype, mean, std, None)
    assert torch.allclose(approx.float(), t.float(), atol=1e-6)


def test_constant_tensor_and_nan():
    spec = ChunkSpec(2, 8)
    t = torch.full((5, 5), 0.5, dtype=torch.bfloat16)
    s, f, m, sd = chunk_tensor(t, spec)
    assert sd == 1.0 and torch.equal(unchunk(s, t.shape, t.dtype, m, sd, f), t)


@pytest.mark.parametrize("name", list(STORED))
def test_standardize_is_the_v1_arithmetic_for_every_value(name):
    """The read-side kernel (bit tricks for bf16/fp16 widening) gives exactly the float32 that
    format 1 stored: (x - mean) / std in float32 for 16-bit dtypes, float64 for fp32 — for every
    finite 16-bit value, and for fp32 values spread over the exponent range."""
    dt = STORED[name]
    if dt.itemsize == 2:
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dt.torch)
        x = x[torch.isfinite(x)]
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(50_000, generator=g) * torch.logspace(-30, 30, 50_000)
        x[:3] = torch.tensor([0.0, -0.0, 1e-45])
    mean, std = 0.0123456789, 0.0345678901
    wd = torch.float64 if name == "F32" else torch.float32
    ref = ((x.to(wd) - torch.tensor(mean, dtype=wd)) / torch.tensor(std, dtype=wd)).float()
    raw = x.view(torch.int16).numpy().view(np.uint16) if name == "BF16" else x.numpy()
    out = np.empty(len(x), np.float32)
    with np.errstate(over="ignore"):  # the largest bf16 values overflow / std, as they do in torch
        standardize(raw, name, mean, std, out)
        by_range = normalize_range(x, mean, std, 0, len(x) + 5)
    assert torch.equal(torch.from_numpy(out).view(torch.int32), ref.view(torch.int32))
    assert np.array_equal(by_range[: len(x)].view(np.int32), out.view(np.int32)) and not by_range[len(x):].any()
    # per-row statistics broadcast the same way
    rows = out[: 4 * 100].reshape(4, 100)
    two = np.empty_like(rows)
    standardize(raw[:400].reshape(4, 100), name, np.full((4, 1), mean), np.full((4, 1), std), two)
    assert np.array_equal(two.view(np.int32), rows.view(np.int32))


def test_norm_stats_one_pass_is_accurate_and_deterministic():
    g = torch.Generator().manual_seed(1)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        t = (torch.randn(70_001, generator=g) * 0.02 + 1.0).to(dt)  # mean >> std (a norm weight)
        exact = t.double()
        mean, std = norm_stats(t)
        assert abs(mean - float(exact.mean())) < 1e-6 * std
        assert std == pytest.approx(float(exact.std(unbiased=False)), rel=1e-6)
        assert norm_stats(t.clone()) == (mean, std)
    big = torch.tensor([3e19, -3e19, 1.0, 2.0])  # squares overflow float32: redone in float64
    assert norm_stats(big)[1] == pytest.approx(float(big.double().std(unbiased=False)))
    with pytest.raises(NonFiniteError, match="contains 1 NaN and 1 Inf"):
        norm_stats(torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.bfloat16))


def test_convert_parallel_equals_serial_and_rebuilds(two_models, tmp_path):
    m1 = run_convert(cfg(tmp_path, two_models, "w1"), progress=False)
    m2 = run_convert(cfg(tmp_path, two_models, "w2", num_workers=2), progress=False)
    assert m1 == m2
    for f in sorted((tmp_path / "w1").glob("shard-*.tar")):
        assert f.read_bytes() == (tmp_path / "w2" / f.name).read_bytes(), f.name
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()
    c = Corpus(tmp_path / "w1", verify=True)
    assert c.manifest["format_version"] == 2 and [m["id"] for m in c.manifest["models"]] == ["a", "b", "c"]
    assert len(c.shards) > 3
    for t in c.tensors:
        for key in ("name", "model", "layer", "block", "role", "shape", "dtype", "stored_dtype", "numel", "mean",
                    "std", "first_sample", "num_samples", "padding", "locations"):
            assert key in t
        assert t["stored_dtype"] == t["dtype"] and "fixups" not in t  # the stored bytes are the weights
    n = 0
    for t in c.tensors:  # exact rebuild of every tensor in its dtype
        ck = Checkpoint(next(m for m in two_models if m.name == t["model"]))
        orig = ck.read(t["name"])
        back = c.rebuild(t)
        assert back.dtype == orig.dtype and torch.equal(to_bits(back), to_bits(orig)), t["name"]
        assert t["first_sample"] == n
        n += t["num_samples"]
    assert n == c.num_samples == sum(s["num_samples"] for s in c.shards)
    # a re-run finds the corpus complete and changes nothing
    before = (tmp_path / "w1" / "manifest.json").stat().st_mtime_ns
    run_convert(cfg(tmp_path, two_models, "w1"), progress=False)
    assert (tmp_path / "w1" / "manifest.json").stat().st_mtime_ns == before


def test_large_blocks_hashed_while_written(tmp_path):
    """Blocks over 1 MiB are hashed on a helper thread as they are written: the recorded sha256
    is the file's, and the reused read buffer never leaks one tensor into the next's block."""
    g = torch.Generator().manual_seed(0)
    ts = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(1280, 1024, generator=g) * 0.02).to(torch.bfloat16)
          for i in range(3)}
    m = write_checkpoint(tmp_path / "big", ts, shards=1)
    run_convert(cfg(tmp_path, [m], tokens=16, chunk=640, block_samples=128, shard_samples=256), progress=False)
    c = Corpus(tmp_path / "corpus", verify=True)
    assert min(b.nbytes for bs in c.blocks for b in bs) > 1 << 20
    for t in c.tensors:
        assert torch.equal(to_bits(c.rebuild(t)), to_bits(ts[t["name"]]))


def test_format_1_still_reads_and_gives_the_same_samples(two_models, tmp_path):
    """A format-1 corpus (standardized float32 + fixups) of the same weights: same stats, the
    format-2 reader's samples bit-identical to format 1's, the same batches from both backends
    with and without shuffling, exact rebuilds from both; format 2 is the weights' own bytes."""
    v2 = Corpus(run_convert(cfg(tmp_path, two_models, "v2"), progress=False) and tmp_path / "v2")
    v1 = Corpus(run_convert(cfg(tmp_path, two_models, "v1", format_version=1), progress=False) and tmp_path / "v1")
    assert (v1.version, v2.version) == (1, 2)
    assert sum(t["fixups"] for t in v1.tensors) > 0 and "fixups" in v1.summary() and "fixups" not in v2.summary()
    values = sum(t["numel"] for t in v2.tensors)
    raw_bytes = sum((t["numel"] + t["padding"]) * STORED[t["dtype"]].itemsize for t in v2.tensors)
    assert sum(b.nbytes - len(b.head) for bs in v2.blocks for b in bs) == raw_bytes  # the values as stored
    assert v1.manifest["total_bytes"] > 4 * values  # float32, plus fixups
    for t2, t1 in zip(v2.tensors, v1.tensors):
        assert (t2["mean"], t2["std"]) == (t1["mean"], t1["std"])
        a, b = v2.read_samples(t2), v1.read_samples(t1)
        assert np.array_equal(a.view(np.int32), b.view(np.int32)), t2["name"]
        assert not a.reshape(-1)[t2["numel"]:].any()  # padding is exactly 0 as the model sees it
        assert torch.equal(to_bits(v2.rebuild(t2)), to_bits(v1.rebuild(t1)))
    for backend in ("indexed", "webdataset"):
        for shuffle in (0, 40):
            kw = dict(resampled=False, shuffle_buffer=shuffle, drop_last=False, backend=backend, seed=2)
            b1, b2 = list(CorpusStream(v1, 7, **kw)), list(CorpusStream(v2, 7, **kw))
            assert len(b1) == len(b2) > 10
            for x, y in zip(b1, b2):
                assert torch.equal(x["x"].view(torch.int32), y["x"].view(torch.int32))
                assert torch.equal(x["sample"], y["sample"]) and torch.equal(x["tensor"], y["tensor"])
    assert "every tensor rebuilds; 42 of 42 compared bit for bit" in verify_corpus(v1.path, rebuild=True)


@pytest.mark.parametrize("backend", ["indexed", "webdataset"])
def test_stream_blocks_never_straddle_and_split_by_rank(two_models, tmp_path, backend):
    c = Corpus(run_convert(cfg(tmp_path, two_models), progress=False) and tmp_path / "corpus")
    seen = []
    for rank in range(2):
        s = CorpusStream(c, 5, rank=rank, world_size=2, resampled=False, shuffle_buffer=0, drop_last=False, backend=backend)
        for b in s:
            assert b["x"].shape[1:] == (4, 32)
            seen += list(zip(b["tensor"].tolist(), b["sample"].tolist()))
    assert len(seen) == len(set(seen)) == c.num_samples
    # every sample's values come from exactly its own tensor
    t = c.tensors[5]
    s = CorpusStream(c, 1, resampled=False, shuffle_buffer=0, backend=backend)
    rows = [b for b in s if int(b["tensor"][0]) == 5]
    full = c.read_samples(t)
    assert np.array_equal(np.stack([r["x"][0].numpy() for r in rows]), full)
    assert int(rows[0]["block"][0]) == {"attn": 0, "mlp": 1}[t["block"]]


def test_backends_agree_and_shuffle_is_a_permutation(two_models, tmp_path):
    run_convert(cfg(tmp_path, two_models), progress=False)
    c = Corpus(tmp_path / "corpus")
    a = [b for b in CorpusStream(c, 7, resampled=False, shuffle_buffer=0, drop_last=False)]
    w = [b for b in CorpusStream(c, 7, resampled=False, shuffle_buffer=0, drop_last=False, backend="webdataset")]
    assert all(torch.equal(x["x"], y["x"]) and torch.equal(x["sample"], y["sample"]) for x, y in zip(a, w))
    sh = [b for b in CorpusStream(c, 7, resampled=False, shuffle_buffer=40, drop_last=False, seed=5)]
    key = lambda bs: sorted(zip(torch.cat([b["tensor"] for b in bs]).tolist(), torch.cat([b["sample"] for b in bs]).tolist()))  # noqa: E731
    assert key(sh) == key(a) and len(key(a)) == c.num_samples
    order = lambda bs: torch.cat([b["sample"] for b in bs]).tolist()  # noqa: E731
    assert order(sh) != order(a)
    # shuffled samples still carry their own values
    first = sh[0]
    for i in range(3):
        t = c.tensors[int(first["tensor"][i])]
        full = c.read_samples(t)
        assert np.array_equal(first["x"][i].numpy(), full[int(first["sample"][i])])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_is_exact(two_models, tmp_path, workers):
    run_convert(cfg(tmp_path, two_models), progress=False)
    c = Corpus(tmp_path / "corpus")
    full_it = iter(make_loader(CorpusStream(c, 6, seed=3, shuffle_buffer=32), num_workers=workers))
    full = [next(full_it)["x"] for _ in range(9)]
    res_it = iter(make_loader(CorpusStream(c, 6, seed=3, shuffle_buffer=32, start_batches=5), num_workers=workers))
    resumed = [next(res_it)["x"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("resampled", [True, False])
def test_thread_loader_matches_dataloader(two_models, tmp_path, resampled):
    """ThreadLoader = DataLoader's worker protocol in threads: the same batches in the same
    order, also when resumed, and a finite stream ends (exhausted workers are skipped)."""
    run_convert(cfg(tmp_path, two_models), progress=False)
    c = Corpus(tmp_path / "corpus")

    def batches(kind: str, start: int = 0, n: int | None = 12) -> list[dict]:
        stream = CorpusStream(c, 6, seed=3, shuffle_buffer=32, resampled=resampled, start_batches=start,
                              drop_last=False)
        it = iter(make_loader(stream, num_workers=3, kind=kind))
        out = [b for _, b in zip(range(n), it)] if n else list(it)
        return out

    n = 12 if resampled else None
    ref, got = batches("process", n=n), batches("thread", n=n)
    assert len(ref) == len(got) > 3
    for a, b in zip(ref, got):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["sample"], b["sample"])
    if not resampled:  # every sample exactly once
        assert sum(len(b["x"]) for b in got) == c.num_samples
    resumed = batches("thread", start=5, n=4)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(ref[5:9], resumed))


def test_thread_loader_reports_worker_errors_and_stops(two_models, tmp_path):
    run_convert(cfg(tmp_path, two_models), progress=False)
    c = Corpus(tmp_path / "corpus")
    stream = CorpusStream(c, 6, seed=3, shuffle_buffer=32)
    it = iter(make_loader(stream, num_workers=2, kind="thread"))
    next(it)
    it.close()  # the consumer stops early: the worker threads end
    assert not [t for t in threading.enumerate() if t.name.startswith("lsm-loader-")]
    with pytest.raises(ValueError, match="loader kind"):
        make_loader(stream, 2, kind="fibers")
    shard = c.path / c.shards[0]["name"]
    shard.write_bytes(shard.read_bytes()[:2048])  # truncated under the running reader
    stream = CorpusStream(c, 6, seed=3, shuffle_buffer=32, resampled=False)
    with pytest.raises(CorpusError, match="truncated"):
        list(make_loader(stream, num_workers=2, kind="thread"))


def test_kill_and_resume_gives_identical_corpus(tmp_path):
    big = write_checkpoint(tmp_path / "big", llama_tensors(layers=6, hidden=128, inter=256), shards=4)
    args = [f"models=[{big}]", "tokens=4", "chunk=32", "block_samples=16", "shard_samples=32"]
    ref = run_convert(load_config(ConvertConfig, None, args + [f"out_dir={tmp_path / 'ref'}"]), progress=False)
    out = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lsm_dist.cli", "convert", *args, f"out_dir={out}"],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("*.json"))) < 5:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list((out / "parts").glob("*.json")))
    assert 0 < done < len(ref["shards"]), "the kill should land mid-conversion"
    assert not (out / "manifest.json").exists()
    with pytest.raises(CorpusError, match="not a finished corpus"):
        Corpus(out)
    resumed = run_convert(load_config(ConvertConfig, None, args + [f"out_dir={out}"]), progress=False)
    assert resumed == ref
    assert not list(out.glob(".*.tmp"))
    for f in (tmp_path / "ref").glob("shard-*.tar"):
        assert f.read_bytes() == (out / f.name).read_bytes()


# ---- bad input ------------------------------------------------------------------------

def test_chunk_that_does_not_fit(two_models, tmp_path):
    with pytest.raises(ValueError, match=r"does not fit these tensors: \d+% of the corpus would be padding"):
        run_convert(cfg(tmp_path, two_models, tokens=16, chunk=640), progress=False)
    with pytest.raises(ConfigError, match="tokens: must be positive"):
        cfg(tmp_path, two_models, tokens=0)


def test_other_corpus_in_out_dir_refused(two_models, tmp_path):
    run_convert(cfg(tmp_path, two_models[:1]), progress=False)
    with pytest.raises(CorpusError, match="already holds a different corpus"):
        run_convert(cfg(tmp_path, two_models[1:]), progress=False)
    m = run_convert(cfg(tmp_path, two_models[1:], overwrite=True), progress=False)
    assert [x["id"] for x in m["models"]] == ["b", "c"]


def test_missing_model_and_unknown_names(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run_convert(cfg(tmp_path, [tmp_path / "nope"]), progress=False)
    ts = llama_tensors(layers=1) | {"model.weird.thing": torch.zeros(3)}
    m = write_checkpoint(tmp_path / "u", ts)
    with pytest.raises(ValueError, match=r"cannot classify .*model\.weird\.thing"):
        run_convert(cfg(tmp_path, [m]), progress=False)


def test_corrupt_truncated_and_checksum(two_models, tmp_path):
    run_convert(cfg(tmp_path, two_models), progress=False)
    d = tmp_path / "corpus"
    shard = d / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    Corpus(d)  # sizes still match
    with pytest.raises(CorpusError, match=r"shard-000001\.tar: checksum mismatch"):
        Corpus(d, verify=True)
    s = CorpusStream(Corpus(d), 4, resampled=False, verify=True, shuffle_buffer=0)
    with pytest.raises(CorpusError, match="checksum mismatch"):
        list(s)
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CorpusError, match=r"shard-000001\.tar: truncated"):
        Corpus(d)
    # the streaming reader names a shard whose tar structure is broken (same size)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    c = Corpus(d, verify=True)
    blk = min((b for bs in c.blocks for b in bs if b.shard == 1), key=lambda b: b.offset)
    data[blk.offset - 512 : blk.offset - 256] = b"\xff" * 256  # the tar header of a block
    shard.write_bytes(bytes(data))
    for backend in ("indexed", "webdataset"):
        with pytest.raises(CorpusError, match=r"shard-000001\.tar.*corrupt or truncated tar shard"):
            list(CorpusStream(Corpus(d), 4, resampled=False, shuffle_buffer=0, backend=backend))


def test_cli_convert_verify(two_models, tmp_path):
    from lsm_dist.cli import main

    out = tmp_path / "cli"
    assert main(["convert", f"models=[{two_models[0]}]", f"out_dir={out}", "tokens=4", "chunk=32"]) == 0
    assert main(["verify", str(out), "--rebuild"]) == 0
    assert main(["convert", "tokens=abc"]) == 2
    assert main(["convert", "nosuchkey=1"]) == 2


@pytest.fixture(scope="module")
def zoo_corpus(tiny_zoo, tmp_path_factory) -> Corpus:
    """Every tensor (attn, mlp and the rest) of every zoo model in one format-2 corpus."""
    models = [f"{n}={p}" for n, p in tiny_zoo.items()]
    out = tmp_path_factory.mktemp("zoo_corpus") / "zoo"
    run_convert(ConvertConfig(models=models, out_dir=str(out), tokens=4, chunk=32, blocks=["attn", "mlp", "other"],
                              params=["weight", "bias"], num_workers=2), progress=False)
    return Corpus(out, verify=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_every_zoo_model_round_trips_exactly(tiny_zoo, zoo_corpus, dtype):
    """Every zoo model (Llama, Qwen2, Gemma-3) saved in ``dtype`` comes back bit for bit from
    the corpus, with no fixups: the stored bytes are the weights."""
    c = zoo_corpus
    assert {x["model_type"] for x in c.manifest["models"]} >= {"llama", "qwen2", "gemma3_text"}
    models = [m["id"] for m in c.manifest["models"] if m["dtypes"] == [dtype]]
    assert models, f"the tiny zoo has no {dtype} model"
    for name in models:
        ck = Checkpoint(tiny_zoo[name])
        entries = [t for t in c.tensors if t["model"] == name]
        assert len(entries) == len(ck.tensors), name  # every tensor of the checkpoint is in the corpus
        for t in entries:
            orig = ck.read(t["name"])
            assert t["stored_dtype"] == dtype and "fixups" not in t
            back = c.rebuild(t)
            assert back.dtype == orig.dtype and torch.equal(to_bits(back), to_bits(orig)), (name, t["name"])
    if dtype == "BF16":  # once: the CLI check reads every source and agrees
        assert f"{len(c.tensors)} of {len(c.tensors)} compared bit for bit" in verify_corpus(c.path, rebuild=True)
