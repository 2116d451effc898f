"""Test helpers: tiny Llama-style safetensors checkpoints written without transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensors(layers: int = 2, hidden: int = 32, inter: int = 64, vocab: int = 48, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.02):
        t = torch.randn(*shape, generator=g)
        return (t * scale).to(dtype)

    out = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
           "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": w(hidden, hidden),
            p + "self_attn.k_proj.weight": w(hidden // 2, hidden),
            p + "self_attn.v_proj.weight": w(hidden // 2, hidden),
            p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 2,
                     config: dict | None = None) -> Path:
    """Save like save_pretrained: config.json + model-0000i-of-0000n.safetensors + index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    inter: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama GGUF (F32 tensors, a byte-level BPE tokenizer) written with the gguf
    package the way llama.cpp's converter writes one (q/k rows permuted); returns the HF state
    dict it encodes, which transformers' GGUF loader must give back exactly."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[i] for i in range(256)]
    tokens += ["he", "ll", "\u0120w"]
    vocab = len(tokens) + 2
    tokens += ["<extra0>", "<extra1>"]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    sd = LlamaForCausalLM(cfg).state_dict()

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * 259 + [4, 4])
    w.add_token_merges(["h e", "l l", "\u0120 w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        names |= {p + "self_attn.q_proj.weight": g + "attn_q.weight", p + "self_attn.k_proj.weight": g + "attn_k.weight",
                  p + "self_attn.v_proj.weight": g + "attn_v.weight", p + "self_attn.o_proj.weight": g + "attn_output.weight",
                  p + "mlp.gate_proj.weight": g + "ffn_gate.weight", p + "mlp.up_proj.weight": g + "ffn_up.weight",
                  p + "mlp.down_proj.weight": g + "ffn_down.weight", p + "input_layernorm.weight": g + "attn_norm.weight",
                  p + "post_attention_layernorm.weight": g + "ffn_norm.weight"}
    for hf, gg in names.items():
        t = sd[hf]
        if "q_proj" in hf:
            t = permute(t, heads)
        elif "k_proj" in hf:
            t = permute(t, kv_heads)
        w.add_tensor(gg, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: sd[k] for k in names}
def corpus_cfg(tmp: Path, models, name: str = "corpus", **kw):
    """A tiny-sample ConvertConfig (4 × 32 values, 8-sample blocks) writing ``tmp / name``."""
    from lsm_dist.corpus import ConvertConfig

    base = dict(models=[str(m) for m in models], out_dir=str(tmp / name), tokens=4, chunk=32,
                block_samples=8, shard_samples=24)
    return ConvertConfig(**(base | kw))


def fake_sbatch_env(tmp_path: Path, fail_from: int | None = None) -> dict:
    """An environment whose ``sbatch`` only records its arguments in ``tmp_path/sbatch-calls``
    (and prints a job id; with ``fail_from``, the submissions from that number on fail) and whose
    ``scancel`` records its in ``tmp_path/scancel-calls``: a script's submissions are checked
    without a cluster."""
    import os

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    calls = tmp_path / "sbatch-calls"
    refuse = f"[ $(wc -l < {calls}) -lt {fail_from} ] || exit 1\n" if fail_from else ""
    (fake / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n{refuse}echo 1\n")
    (fake / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scancel-calls'}\n")
    for f in ("sbatch", "scancel"):
        (fake / f).chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
