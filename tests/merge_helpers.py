"""Helpers for the merge tests: tiny real Hugging Face models and a briefly trained tiny VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lsm_dist.checkpoint import Checkpoint
from lsm_dist.chunking import ChunkSpec, chunk_tensor
from lsm_dist.model import TransformerVAE, VAEConfig, kl_divergence, save_vae

VOCAB = 100
TINY_VAE = dict(chunk=64, tokens=8, d_model=64, enc_layers=2, dec_layers=2, heads=4, latent_dim=32,
                token_stride=2, max_layers=16, num_roles=16)


def hf_config(family: str, hidden: int, layers: int, inter: int, heads: int = 4, kv: int = 2):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return Gemma3TextConfig(**common, query_pre_attn_scalar=hidden // heads, sliding_window=64)


def save_model(model, path: Path, dtype: torch.dtype, tokenizer: bool = True) -> Path:
    model.to(dtype).save_pretrained(str(path), max_shard_size="40KB")
    if tokenizer:
        from lsm_dist.zoo.tokenizer import build_tokenizer

        build_tokenizer().save_pretrained(str(path))
    return path


def build_model(family: str, path: Path, hidden: int, layers: int, inter: int, seed: int,
                dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, hidden, layers, inter), dtype=torch.float32)
    return save_model(model, path, dtype)


def perturbed_expert(base_dir: Path, path: Path, seed: int, scale: float = 0.3,
                     dtype: torch.dtype = torch.float32) -> Path:
    """The base plus seeded noise (scale × each tensor's std) on attention and MLP weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return save_model(model, path, dtype)


def training_samples(models: list[Path], spec: ChunkSpec) -> np.ndarray:
    out = []
    for m in models:
        with Checkpoint(m) as ck:
            for t in ck.select(("attn", "mlp")):
                out.append(chunk_tensor(ck.read(t.name), spec)[0])
    return np.concatenate(out)


def train_tiny_vae(models: list[Path], out: Path, steps: int = 250, beta: float = 1e-4,
                   seed: int = 0) -> Path:
    """A tiny VAE trained briefly (AE + small KL) on the models' attn/mlp samples."""
    torch.manual_seed(seed)
    cfg = VAEConfig(**TINY_VAE)
    data = torch.from_numpy(training_samples(models, ChunkSpec(cfg.tokens, cfg.chunk)))
    model = TransformerVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (64,), generator=g)
        x = data[idx]
        res = model(x, sample=step >= steps // 2)
        loss = torch.nn.functional.mse_loss(res["x_hat"], x)
        if step >= steps // 2:
            loss = loss + beta * kl_divergence(res["mu"], res["logvar"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_vae(model, out)
