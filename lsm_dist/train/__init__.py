"""VAE training on DeepSpeed ZeRO through accelerate (``lsm train``, ``python -m lsm_dist.train``).

``run_train(cfg)`` trains or resumes; ``export_vae(run_dir)`` writes the plain VAE checkpoint
of a run. See ``loop.py`` (the loop), ``checkpointing.py`` (atomic step directories, export),
``data.py`` (held-out split, validation sets), ``config.py`` (``TrainConfig``).
"""

from lsm_dist.train.checkpointing import CheckpointError, export_vae, list_checkpoints
from lsm_dist.train.config import PlateauConfig, TrainConfig, load_train_config
from lsm_dist.train.loop import TrainingDiverged, run_train

__all__ = ["CheckpointError", "PlateauConfig", "TrainConfig", "TrainingDiverged", "export_vae",
           "list_checkpoints", "load_train_config", "run_train"]
