"""VAE losses: reconstruction, KL to N(0, I), and per-block reconstruction error.

Normalization (what a ``beta`` means):

* ``recon_loss`` is a **mean over all elements** of the batch (B·tokens·chunk values), so it is
  on the scale of one weight value's squared (or absolute) error.
* ``kl_divergence`` is **summed over all latent numbers of a sample and averaged over the
  batch**: KL_b = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²), loss = mean_b KL_b.

``vae_loss = recon + beta · kl``. Because the two terms are normalized differently, a useful
``beta`` is small (≈ 1e-6 … 1e-3 for the paper config). ``beta = 0`` gives the stage-1 autoencoder
objective (KL is still returned for logging, detached from the loss).

All losses are computed in float32 whatever the dtype of the inputs (bf16 autocast outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECON_KINDS = ("mse", "l1", "huber", "mse_tail")


def recon_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse", *,
               huber_delta: float = 1.0, tail_weight: float = 1.0) -> torch.Tensor:
    """Reconstruction loss, mean over all elements.

    * ``mse``: mean (x̂ − x)²
    * ``l1``: mean |x̂ − x|
    * ``huber``: mean of 0.5·e² if |e| < δ else δ·(|e| − 0.5·δ), e = x̂ − x, δ = ``huber_delta``
    * ``mse_tail``: tail-aware weighted MSE, mean w ⊙ (x̂ − x)² with
      w = (1 + α·|x| / m) / (1 + α), m = mean |x| over the batch (no gradient), α = ``tail_weight``.
      w averages to 1 (so the loss is on the MSE scale) but a value k× larger than the typical
      magnitude counts ≈ (1 + αk)/(1 + α) times more, so the many near-zero weights do not
      dominate and outliers are reconstructed more faithfully.
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"recon_loss: x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} differ in shape")
    x_hat, x = x_hat.float(), x.float()
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    if kind == "huber":
        return F.huber_loss(x_hat, x, delta=huber_delta)
    if kind == "mse_tail":
        ax = x.detach().abs()
        w = (1.0 + tail_weight * ax / ax.mean().clamp_min(1e-12)) / (1.0 + tail_weight)
        return (w * (x_hat - x) ** 2).mean()
    raise ValueError(f"recon_loss: kind {kind!r} is not one of {list(RECON_KINDS)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over the latent numbers of each sample, mean over batch."""
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()


def vae_loss(out: dict[str, torch.Tensor], x: torch.Tensor, beta: float = 0.0,
             kind: str = "mse", **recon_kw) -> dict[str, torch.Tensor]:
    """dict(loss, recon, kl) from a ``TransformerVAE.forward`` output; loss = recon + beta·kl."""
    if beta < 0:
        raise ValueError(f"vae_loss: beta must be >= 0, got {beta}")
    recon = recon_loss(out["x_hat"], x, kind, **recon_kw)
    if beta > 0:
        kl = kl_divergence(out["mu"], out["logvar"])
        loss = recon + beta * kl
    else:  # stage-1 AE: avoid 0·inf = nan and a useless backward through the KL
        with torch.no_grad():
            kl = kl_divergence(out["mu"], out["logvar"])
        loss = recon
    return {"loss": loss, "recon": recon, "kl": kl}


def per_block_sse(x_hat: torch.Tensor, x: torch.Tensor, block_ids: torch.Tensor,
                  num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared errors and element counts per block id, each (num_blocks,) float64.

    All-reduce both (SUM) across ranks, then divide, to get a global per-block MSE."""
    B = x.shape[0]
    if block_ids.shape != (B,):
        raise ValueError(f"per_block_sse: block_ids must have shape ({B},), got {tuple(block_ids.shape)}")
    ids = block_ids.to(x.device, torch.long)
    if B and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"per_block_sse: block ids must lie in [0, {num_blocks})")
    err = (x_hat.detach().double() - x.detach().double()).pow(2).flatten(1)
    sse = torch.zeros(num_blocks, dtype=torch.float64, device=x.device).index_add_(0, ids, err.sum(1))
    per = torch.full((B,), float(err.shape[1]), dtype=torch.float64, device=x.device)
    cnt = torch.zeros(num_blocks, dtype=torch.float64, device=x.device).index_add_(0, ids, per)
    return sse, cnt


def per_block_mse(x_hat: torch.Tensor, x: torch.Tensor, block_ids: torch.Tensor,
                  num_blocks: int | None = None) -> dict[int, float]:
    """Mean squared error per block id present in ``block_ids`` (e.g. BLOCK_IDS: attn/mlp/other)."""
    n = num_blocks if num_blocks is not None else (int(block_ids.max()) + 1 if block_ids.numel() else 0)
    sse, cnt = per_block_sse(x_hat, x, block_ids, n)
    return {i: float(sse[i] / cnt[i]) for i in range(n) if cnt[i] > 0}
