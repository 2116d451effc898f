import pytest
import torch

from lsm_dist.checkpoint import (
    Checkpoint,
    CheckpointError,
    UnknownTensorError,
    classify,
    nonfinite_count,
)
from tests.helpers import llama_tensors, write_checkpoint


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.3.self_attn.q_proj.weight", (3, "attn", "q_proj", "weight")),
        ("model.layers.0.self_attn.k_proj.bias", (0, "attn", "k_proj", "bias")),  # qwen2
        ("model.layers.1.mlp.down_proj.weight", (1, "mlp", "down_proj", "weight")),
        ("model.layers.2.pre_feedforward_layernorm.weight", (2, "other", "pre_feedforward_layernorm", "weight")),  # gemma3
        ("model.layers.2.self_attn.q_norm.weight", (2, "other", "q_norm", "weight")),
        ("language_model.model.layers.5.mlp.gate_proj.weight", (5, "mlp", "gate_proj", "weight")),
        ("transformer.h.0.attn.c_proj.weight", (0, "attn", "c_proj", "weight")),  # gpt-2
        ("transformer.h.0.mlp.c_proj.weight", (0, "mlp", "c_proj", "weight")),
        ("model.embed_tokens.weight", (None, "other", "embed", "weight")),
        ("lm_head.weight", (None, "other", "lm_head", "weight")),
        ("model.layers.1.mystery.weight", (1, None, "mystery", "weight")),
        ("foo.bar", (None, None, None, "bar")),
    ],
)
def test_classify(name, expected):
    assert classify(name) == expected


def test_reader_lazy_and_select(tmp_path):
    ts = llama_tensors(layers=3)
    ck = Checkpoint(write_checkpoint(tmp_path / "m", ts, shards=3))
    assert ck.num_layers == 3 and len(ck.tensors) == len(ts)
    attn = ck.select(["attn"])
    assert {t.role for t in attn} == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(attn) == 12
    mlp = ck.select(["mlp"], include=r"layers\.0\.")
    assert sorted(t.name for t in mlp) == sorted(n for n in ts if n.startswith("model.layers.0.mlp"))
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(ck.read(name), ts[name])
    rows = torch.cat(list(ck.iter_rows(name, max_elems=100)))
    assert torch.equal(rows, ts[name])
    # single-file checkpoints read the same
    single = Checkpoint(write_checkpoint(tmp_path / "s", ts, shards=1) / "model.safetensors")
    assert torch.equal(single.read(name), ts[name])
    assert Checkpoint(tmp_path / "m").digest() == ck.digest()


def test_unknown_tensor_name_is_named(tmp_path):
    ts = llama_tensors(layers=1) | {"model.layers.0.mystery.weight": torch.zeros(4, 4)}
    ck = Checkpoint(write_checkpoint(tmp_path / "m", ts))
    with pytest.raises(UnknownTensorError, match=r"model\.layers\.0\.mystery\.weight"):
        ck.select(["attn", "mlp"])
    assert len(ck.select(["attn", "mlp"], exclude="mystery")) == 7


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    d = write_checkpoint(tmp_path / "m", llama_tensors(layers=2), shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: truncated"):
        Checkpoint(d)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"index.json: points to shard model-00002-of-00002\.safetensors"):
        Checkpoint(d)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        Checkpoint(tmp_path / "e")
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(CheckpointError, match="junk.safetensors: corrupt safetensors header"):
        Checkpoint(f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nonfinite_count_fast_paths_are_exact(dtype):
    """The fast checks (a float32 / float64 sum, 16-bit exponent bits) count exactly what
    isfinite counts: NaN and both infinities, in non-contiguous tensors too; a sum that overflows
    on finite values is no false alarm."""
    x = torch.randn(1000).to(dtype)
    assert nonfinite_count(x) == 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[7] = y[500] = bad
        assert nonfinite_count(y) == 2, bad
    big = torch.full((10,), 6e4 if dtype == torch.float16 else 3e38).to(dtype)
    assert nonfinite_count(big) == 0  # the sum overflows, the values are finite
    nc = torch.randn(20, 30).to(dtype).t()
    nc[3, 4] = float("nan")
    assert not nc.is_contiguous() and nonfinite_count(nc) == 1
    assert nonfinite_count(torch.arange(5)) == 0
