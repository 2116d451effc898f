"""Evaluation with lm-eval: generated offline tasks for the zoo's families, resumable scoring
of checkpoints (or in-memory models), comparison tables, plots and TensorBoard scalars."""

from lsm_dist.evaluate.plots import plot_sweep
from lsm_dist.evaluate.report import flatten_results, write_reports
from lsm_dist.evaluate.run import (
    CheckpointError,
    EvalConfig,
    EvalError,
    checkpoint_fingerprint,
    evaluate_model,
    parse_checkpoints,
    resolve_tasks,
    run_eval,
)
from lsm_dist.evaluate.tasks import GROUP, local_task_names, write_tasks

__all__ = [
    "GROUP",
    "CheckpointError",
    "EvalConfig",
    "EvalError",
    "checkpoint_fingerprint",
    "evaluate_model",
    "flatten_results",
    "local_task_names",
    "parse_checkpoints",
    "plot_sweep",
    "resolve_tasks",
    "run_eval",
    "write_reports",
    "write_tasks",
]
