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
