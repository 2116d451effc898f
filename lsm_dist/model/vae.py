"""Transformer VAE over weight samples of ``tokens × chunk`` values (LS-Merge, Table 10).

Encoder: linear chunk embedding (chunk → d_model) → pre-norm transformer blocks (bidirectional
attention with RoPE on q/k) → token down-projection (concatenate groups of ``token_stride``
tokens, then a linear map back to d_model) or mean pooling → μ and log σ² heads (latent_dim per
latent token). Decoder mirrors it: latent_dim → d_model, up-projection to ``tokens`` tokens
(linear d_model → token_stride·d_model, or broadcast + learned positions when pooled), blocks,
linear head d_model → chunk. Latents always have shape ``(B, *cfg.latent_shape)``; a pooled
model has one latent token.

Plain checkpoints (``config.json`` + ``model.safetensors``) are written by :func:`save_vae` and
read by :func:`load_vae` without DeepSpeed and without pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lsm_dist.checkpoint import BLOCKS, read_safetensors_header, write_safetensors
from lsm_dist.config import ConfigError, check, check_choice, doc, from_dict, to_dict
from lsm_dist.utils import atomic_open, atomic_write_json

FORMAT = "lsm_dist.vae.v1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK_IDS = {b: i for i, b in enumerate(BLOCKS)}  # cond["block"] ids: attn 0, mlp 1, other 2
COND_KEYS = ("layer", "block", "role")


class VAECheckpointError(ValueError):
    """A VAE checkpoint is missing, malformed or does not fit its config (names the file)."""


@dataclass
class VAEConfig:
    chunk: int = doc("values per token (width of one row of a weight sample)", 640)
    tokens: int = doc("tokens per sample; a sample holds tokens*chunk weight values", 16)
    d_model: int = doc("transformer width", 768)
    enc_layers: int = doc("encoder transformer blocks", 6)
    dec_layers: int = doc("decoder transformer blocks", 6)
    heads: int = doc("attention heads (must divide d_model; head dim must be even for RoPE)", 4)
    mlp_ratio: float = doc("MLP hidden width / d_model (GELU MLP)", 4.0)
    rope_base: float = doc("RoPE frequency base", 20000.0)
    latent_dim: int = doc("latent numbers per latent token", 640)
    token_stride: int = doc(
        "token down-projection factor: groups of token_stride encoder tokens are concatenated and "
        "projected to one latent token, so latent tokens = tokens/token_stride (ignored if pooled)",
        2,
    )
    pooled: bool = doc("one mean-pooled latent vector per sample instead of token-wise latents", False)
    dropout: float = doc("dropout on attention probabilities and residual branches", 0.0)
    cond: str = doc(
        "conditioning: none | layer_block_role (learned layer/block/role embeddings added to the "
        "tokens of encoder and decoder)",
        "none",
    )
    max_layers: int = doc("layer-embedding size for cond (layer ids 0..max_layers-1, -1 = global)", 128)
    num_roles: int = doc("role-embedding size for cond (role ids 0..num_roles-1)", 64)
    norm: str = doc("normalization: rmsnorm | layernorm", "rmsnorm")
    skip: str = doc(
        "linear path around the transformer, added to mu and to the output, so the transformer "
        "learns the residual of a linear (PCA-like) code: none | group (each group of "
        "token_stride input tokens to its latent token and back: 2·group_values·latent_dim "
        "parameters) | sample (the whole sample to all latent numbers and back: "
        "2·tokens·chunk·latent_tokens·latent_dim parameters; sees correlations across all "
        "tokens, for small samples)",
        "none",
    )
    delta: dict[str, Any] | None = doc(
        "set by training on a delta corpus (lsm_dist.delta): {base, base_digest, gain}: the VAE "
        "codes task vectors W - W_base of that base, at scale gain·std(W_base) per tensor", None)

    def __post_init__(self) -> None:
        if self.delta is not None:
            check(isinstance(self.delta, dict) and {"base_digest", "gain"} <= set(self.delta)
                  and float(self.delta["gain"]) > 0, "delta",
                  f"must be {{base, base_digest, gain > 0}} (from a delta corpus), got {self.delta!r}")
        for name in ("chunk", "tokens", "d_model", "heads", "latent_dim", "token_stride",
                     "max_layers", "num_roles"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                  f"must be a positive integer, got {v!r}")
        for name in ("enc_layers", "dec_layers"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name,
                  f"must be a non-negative integer, got {v!r}")
        check(self.d_model % self.heads == 0, "heads",
              f"{self.heads} does not divide d_model={self.d_model}")
        check((self.d_model // self.heads) % 2 == 0, "heads",
              f"head dim d_model/heads={self.d_model // self.heads} must be even for RoPE")
        check(self.pooled or self.tokens % self.token_stride == 0, "token_stride",
              f"{self.token_stride} does not divide tokens={self.tokens}")
        check(self.mlp_ratio > 0 and int(self.mlp_ratio * self.d_model) > 0, "mlp_ratio",
              f"must be > 0, got {self.mlp_ratio}")
        check(self.rope_base > 1.0, "rope_base", f"must be > 1, got {self.rope_base}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check_choice(self.cond, "cond", ("none", "layer_block_role"))
        check_choice(self.norm, "norm", ("rmsnorm", "layernorm"))
        check_choice(self.skip, "skip", ("none", "group", "sample"))

    @property
    def latent_tokens(self) -> int:
        return 1 if self.pooled else self.tokens // self.token_stride

    @property
    def latent_shape(self) -> tuple[int, int]:
        """Per-sample latent shape (latent tokens, latent_dim)."""
        return (self.latent_tokens, self.latent_dim)

    @property
    def group_values(self) -> int:
        """Weight values that map to one latent token (token group × chunk)."""
        return (self.tokens if self.pooled else self.token_stride) * self.chunk

    @property
    def skip_shape(self) -> tuple[int, int, int]:
        """(rows per sample, values in, latent numbers out) of the linear skip path."""
        if self.skip == "sample":
            return 1, self.tokens * self.chunk, self.latent_tokens * self.latent_dim
        return self.latent_tokens, self.group_values, self.latent_dim

    @property
    def compression_ratio(self) -> float:
        """Weight values per sample / latent numbers per sample."""
        return (self.tokens * self.chunk) / (self.latent_tokens * self.latent_dim)

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)


def _norm(cfg: VAEConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-6)
    return nn.LayerNorm(cfg.d_model, eps=1e-6)


def rope_cos_sin(seq: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (seq, head_dim) cos/sin tables, rotate-half layout. Cheap, so built per call."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x (B, H, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)), x + MLP(norm(x)); bidirectional attention."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        d = cfg.d_model
        self.heads, self.p = cfg.heads, cfg.dropout
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_hidden, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return h + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(h)))))


class Stack(nn.Module):
    def __init__(self, cfg: VAEConfig, n: int):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n))
        self.norm = _norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(h.shape[1], self.cfg.d_model // self.cfg.heads, self.cfg.rope_base, h.device)
        for blk in self.blocks:
            h = blk(h, cos, sin)
        return self.norm(h)


class CondEmbedding(nn.Module):
    """Sum of learned layer / block / role embeddings, (B, 1, d_model) to add to every token.

    ``cond = {"layer": (B,), "block": (B,), "role": (B,)}`` LongTensors; layer -1 marks tensors
    outside any layer (embeddings, final norm, lm_head), block ids follow :data:`BLOCK_IDS`.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.limits = {"layer": (-1, cfg.max_layers), "block": (0, len(BLOCKS)), "role": (0, cfg.num_roles)}
        self.layer = nn.Embedding(cfg.max_layers + 1, cfg.d_model)
        self.block = nn.Embedding(len(BLOCKS), cfg.d_model)
        self.role = nn.Embedding(cfg.num_roles, cfg.d_model)

    def forward(self, cond: dict[str, torch.Tensor] | None, batch: int) -> torch.Tensor:
        if cond is None:
            raise ValueError("this VAE has cond='layer_block_role': pass cond={'layer','block','role'}")
        ids = {}
        for key in COND_KEYS:
            t = cond.get(key)
            if t is None or t.shape != (batch,) or t.is_floating_point():
                desc = None if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ValueError(f"cond[{key!r}] must be an integer tensor of shape ({batch},), got {desc}")
            ids[key] = t.to(self.layer.weight.device, torch.long)
        bad = torch.zeros((), dtype=torch.bool, device=self.layer.weight.device)
        for key, (lo, hi) in self.limits.items():
            bad = bad | ((ids[key] < lo) | (ids[key] >= hi)).any()
        if bool(bad):  # one host sync per call; names the offending key on failure
            for key, (lo, hi) in self.limits.items():
                t = ids[key]
                if ((t < lo) | (t >= hi)).any():
                    raise ValueError(f"cond[{key!r}] ids must lie in [{lo}, {hi}), got "
                                     f"min {int(t.min())} max {int(t.max())}")
        layer = torch.where(ids["layer"] < 0, self.limits["layer"][1], ids["layer"])
        e = self.layer(layer) + self.block(ids["block"]) + self.role(ids["role"])
        return e.unsqueeze(1)


class TransformerVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        d, s = cfg.d_model, cfg.token_stride
        self.embed = nn.Linear(cfg.chunk, d)
        self.enc_cond = CondEmbedding(cfg) if cfg.cond != "none" else None
        self.encoder = Stack(cfg, cfg.enc_layers)
        self.down = nn.Linear(s * d, d) if not cfg.pooled and s > 1 else None
        self.mu = nn.Linear(d, cfg.latent_dim)
        self.logvar = nn.Linear(d, cfg.latent_dim)
        self.latent_in = nn.Linear(cfg.latent_dim, d)
        self.up = nn.Linear(d, s * d) if not cfg.pooled and s > 1 else None
        self.dec_pos = nn.Parameter(torch.zeros(cfg.tokens, d)) if cfg.pooled else None
        self.dec_cond = CondEmbedding(cfg) if cfg.cond != "none" else None
        self.decoder = Stack(cfg, cfg.dec_layers)
        self.head = nn.Linear(d, cfg.chunk)
        _, n_in, n_out = cfg.skip_shape
        lin = cfg.skip != "none"
        self.skip_enc = nn.Linear(n_in, n_out, bias=False) if lin else None
        self.skip_dec = nn.Linear(n_out, n_in, bias=False) if lin else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for linears/embeddings, zero biases, unit norms; residual output
        projections (attn proj, fc2) scaled by 1/sqrt(2·layers of their stack) (GPT-2 style)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        for stack in (self.encoder, self.decoder):
            std = 0.02 / math.sqrt(2 * max(1, len(stack.blocks)))
            for blk in stack.blocks:
                nn.init.normal_(blk.proj.weight, std=std)
                nn.init.normal_(blk.fc2.weight, std=std)
        if self.dec_pos is not None:
            nn.init.normal_(self.dec_pos, std=0.02)
        if self.skip_enc is not None:  # a random orthonormal projection and its transpose;
            nn.init.orthogonal_(self.skip_enc.weight)  # the transformer's outputs start at zero,
            with torch.no_grad():  # so the VAE starts as exactly the linear code
                self.skip_dec.weight.copy_(self.skip_enc.weight.T)
            for m in (self.mu, self.head):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_skip_pca(self, x: torch.Tensor) -> float:
        """Start the linear skip path as the PCA code of samples ``x`` (N, tokens, chunk):
        ``skip_enc`` rows = the top principal directions of their token groups (``skip=group``)
        or of whole samples (``sample``), uncentered (the corpus is standardized per tensor);
        ``skip_dec`` = its transpose. Deterministic (float64 SVD on CPU), so every rank computes
        the same init. Returns the fraction of the groups' energy the code keeps (1 − the PCA
        relative error on ``x``)."""
        if self.skip_enc is None:
            raise ValueError("init_skip_pca needs a VAE with a linear skip path (skip=group|sample)")
        cfg = self.cfg
        if x.dim() != 3 or tuple(x.shape[1:]) != (cfg.tokens, cfg.chunk) or len(x) == 0:
            raise ValueError(f"init_skip_pca expects x of shape (N>0, {cfg.tokens}, {cfg.chunk}), "
                             f"got {tuple(x.shape)}")
        rows, n_in, n_out = cfg.skip_shape
        g = x.detach().cpu().double().reshape(-1, n_in)
        _, sv, vh = torch.linalg.svd(g, full_matrices=False)
        k = min(n_out, vh.shape[0])
        w = self.skip_enc.weight
        w[:k] = vh[:k].to(w.dtype)  # rows beyond the data's rank keep their random init
        self.skip_dec.weight.copy_(w.T)
        energy = (sv ** 2).sum()
        return float((sv[:k] ** 2).sum() / energy) if energy > 0 else 1.0

    # ---- encoder / decoder -------------------------------------------------------------
    def encode(self, x: torch.Tensor, cond: dict[str, torch.Tensor] | None = None, logvar: bool = True):
        """x (B, tokens, chunk) → (mu, logvar), each (B, latent_tokens, latent_dim); logvar is
        None when not asked for (a merge that reads the means alone)."""
        cfg = self.cfg
        if x.dim() != 3 or tuple(x.shape[1:]) != (cfg.tokens, cfg.chunk):
            raise ValueError(f"encode expects x of shape (B, {cfg.tokens}, {cfg.chunk}), got {tuple(x.shape)}")
        h = self.embed(x.to(self.embed.weight.dtype))
        if self.enc_cond is not None:
            h = h + self.enc_cond(cond, x.shape[0])
        h = self.encoder(h)
        B = h.shape[0]
        if cfg.pooled:
            h = h.mean(dim=1, keepdim=True)
        elif self.down is not None:
            h = self.down(h.reshape(B, cfg.latent_tokens, cfg.token_stride * cfg.d_model))
        mu = self.mu(h)
        if self.skip_enc is not None:
            rows, n_in, _ = cfg.skip_shape
            lin = self.skip_enc(x.to(mu.dtype).reshape(B, rows, n_in))
            mu = mu + lin.reshape(B, cfg.latent_tokens, cfg.latent_dim)
        return mu, (self.logvar(h).clamp(-30.0, 20.0) if logvar else None)

    def decode(self, z: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """z (B, latent_tokens, latent_dim) → x_hat (B, tokens, chunk)."""
        cfg = self.cfg
        if z.dim() != 3 or tuple(z.shape[1:]) != cfg.latent_shape:
            raise ValueError(f"decode expects z of shape (B, {cfg.latent_shape[0]}, {cfg.latent_shape[1]}), "
                             f"got {tuple(z.shape)}")
        h = self.latent_in(z.to(self.latent_in.weight.dtype))
        B = h.shape[0]
        if cfg.pooled:
            h = h + self.dec_pos.to(h.dtype)  # (B, 1, d) broadcast to (B, tokens, d)
        elif self.up is not None:
            h = self.up(h).reshape(B, cfg.tokens, cfg.d_model)
        if self.dec_cond is not None:
            h = h + self.dec_cond(cond, B)
        out = self.head(self.decoder(h))
        if self.skip_dec is not None:
            rows, _, n_out = cfg.skip_shape
            out = out + self.skip_dec(z.to(out.dtype).reshape(B, rows, n_out)).reshape(B, cfg.tokens, cfg.chunk)
        return out

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                sample: bool = True) -> dict[str, torch.Tensor]:
        """``sample=False``: z = μ (deterministic stage-1 autoencoder)."""
        mu, logvar = self.encode(x, cond)
        z = self.reparameterize(mu, logvar) if sample else mu
        return {"x_hat": self.decode(z, cond), "mu": mu, "logvar": logvar, "z": z}

    # ---- accounting --------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_sample(self, training: bool = True) -> int:
        """Matmul FLOPs for one sample: forward = 2·Σ_linear(in·out·rows it is applied to)
        + per block 4·T²·d_model (QKᵀ and AV); training (forward+backward) = 3 × forward.

        The 6·N·tokens rule, counted exactly: rows are ``tokens`` for the embedding, blocks and
        head, ``latent_tokens`` for the down/up projections and latent heads. Embedding lookups,
        norms, softmax and elementwise ops are ignored (standard for MFU)."""
        cfg = self.cfg
        T, Lt = cfg.tokens, cfg.latent_tokens
        macs = 0
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                top = name.split(".")[0]
                rows = (cfg.skip_shape[0] if top in ("skip_enc", "skip_dec")
                        else Lt if top in ("down", "mu", "logvar", "latent_in", "up") else T)
                macs += rows * m.in_features * m.out_features
        fwd = 2 * macs + (cfg.enc_layers + cfg.dec_layers) * 4 * T * T * cfg.d_model
        return 3 * fwd if training else fwd


def count_parameters(cfg: VAEConfig) -> int:
    """Parameter count of ``TransformerVAE(cfg)`` without allocating it (meta device)."""
    with torch.device("meta"):
        return TransformerVAE(cfg).num_parameters()


# ---- plain checkpoint I/O ----------------------------------------------------------------
def _config_dict(cfg: VAEConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def save_vae(model: TransformerVAE, directory: str | Path) -> Path:
    """Write ``config.json`` (``format`` + VAEConfig fields) and ``model.safetensors``.

    Each file is written to a temp file and renamed; weights go first and carry the config in
    their safetensors metadata, so :func:`load_vae` detects a config.json from another save."""
    directory = Path(directory)
    _refuse_foreign_vae_files(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = _config_dict(model.cfg)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_open(directory / WEIGHTS_NAME, "wb") as f:  # same model, same bytes (digest)
        write_safetensors(f, tensors, {"format": FORMAT, "config": json.dumps(cfg, sort_keys=True)})
    atomic_write_json(directory / CONFIG_NAME, {"format": FORMAT, **to_dict(model.cfg)})
    return directory


def _refuse_foreign_vae_files(directory: Path) -> None:
    """A ``model.safetensors`` / ``config.json`` already in ``directory`` is replaced only when it
    is an lsm_dist VAE's (its ``format``): never a user's file of the same name."""
    w, c = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if w.exists() or w.is_symlink():
        try:
            ours = not w.is_symlink() and safetensors_metadata(w).get("format") == FORMAT
        except Exception:  # noqa: BLE001 -- unreadable: not provably ours
            ours = False
        if not ours:
            raise VAECheckpointError(f"{w} exists and is not an lsm_dist VAE checkpoint: refusing to overwrite "
                                     "it; move it away or export elsewhere")
    if c.exists() or c.is_symlink():
        try:
            ours = not c.is_symlink() and json.loads(c.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise VAECheckpointError(f"{c} exists and is not an lsm_dist VAE config: refusing to overwrite it; "
                                     "move it away or export elsewhere")


def safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_vae_config(directory: str | Path) -> VAEConfig:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise VAECheckpointError(f"VAE checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise VAECheckpointError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VAECheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise VAECheckpointError(f"{path}: format {fmt!r} is not {FORMAT!r}")
    data = {k: v for k, v in data.items() if k != "format"}
    try:
        return from_dict(VAEConfig, data)
    except ConfigError as e:
        raise VAECheckpointError(f"{path}: {e}") from None


def _listing(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_vae(directory: str | Path, map_location: str | torch.device = "cpu") -> TransformerVAE:
    """Load a :func:`save_vae` directory (safetensors only, never pickle); returns eval mode."""
    directory = Path(directory)
    cfg = read_vae_config(directory)
    wpath, cpath = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not wpath.is_file():
        raise VAECheckpointError(f"{wpath} does not exist")
    try:
        sd = load_file(wpath, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise VAECheckpointError(f"{wpath} is not a readable safetensors file: {e}") from None
    model = TransformerVAE(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(f"{k}: file {have[k]} vs config {want[k]}"
                    for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or shapes:
        parts = [f"{label} [{_listing(xs)}]" for label, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
        raise VAECheckpointError(f"{wpath} does not match the configuration in {cpath}: " + "; ".join(parts))
    bad = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise VAECheckpointError(f"{wpath}: non-finite values (NaN/Inf) in [{_listing(bad)}]")
    meta = read_safetensors_header(wpath)[0].get("__metadata__") or {}
    if "config" in meta:
        # a field added after the save is absent from it and must hold its default
        saved = {**_config_dict(VAEConfig()), **json.loads(meta["config"])}
        now = _config_dict(cfg)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise VAECheckpointError(f"{cpath} disagrees with the config saved in {wpath} on "
                                     f"{_listing(diff)} (files from different saves?)")
    model.load_state_dict(sd)
    return model.to(map_location).eval()


def vae_digest(directory: str | Path) -> str:
    """sha256 over config.json bytes then model.safetensors bytes; first 16 hex chars."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        path = Path(directory) / name
        if not path.is_file():
            raise VAECheckpointError(f"{path} does not exist")
        with open(path, "rb") as f:
            while buf := f.read(1 << 22):
                h.update(buf)
    return h.hexdigest()[:16]
