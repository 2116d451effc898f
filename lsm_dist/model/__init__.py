"""The transformer VAE over weight samples, its losses and its plain checkpoint format."""

from lsm_dist.model.losses import (
    RECON_KINDS,
    kl_divergence,
    per_block_mse,
    per_block_sse,
    recon_loss,
    vae_loss,
)
from lsm_dist.model.vae import (
    BLOCK_IDS,
    FORMAT,
    TransformerVAE,
    VAECheckpointError,
    VAEConfig,
    count_parameters,
    load_vae,
    read_vae_config,
    save_vae,
    vae_digest,
)

__all__ = [
    "BLOCK_IDS", "FORMAT", "RECON_KINDS", "TransformerVAE", "VAECheckpointError", "VAEConfig",
    "count_parameters", "kl_divergence", "load_vae", "per_block_mse", "per_block_sse",
    "read_vae_config", "recon_loss", "save_vae", "vae_digest", "vae_loss",
]
