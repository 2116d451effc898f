"""lsm_dist: LS-Merge (merging language models in a latent space of their weights) at cluster scale."""

__version__ = "0.1.0"
