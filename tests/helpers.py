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


def corpus_cfg(tmp: Path, models, name: str = "corpus", **kw):
    """A tiny-sample ConvertConfig (4 × 32 values, 8-sample blocks) writing ``tmp / name``."""
    from lsm_dist.corpus import ConvertConfig

    base = dict(models=[str(m) for m in models], out_dir=str(tmp / name), tokens=4, chunk=32,
                block_samples=8, shard_samples=24)
    return ConvertConfig(**(base | kw))
