"""The small-model zoo: real, trained Hugging Face causal LMs (Llama / Qwen2 / Gemma-3) built
offline on CPU from generated tasks, with a shared character-level tokenizer.

``build_zoo(load_zoo_config("configs/zoo/default.yaml"))`` returns ``{name: model_dir}``.
"""

from lsm_dist.zoo.build import (
    ZooConfig,
    ZooModelSpec,
    build_zoo,
    evaluate_exact_match,
    greedy_generate,
    load_model,
    load_zoo_config,
    param_count,
    read_card,
    trained_tasks,
)
from lsm_dist.zoo.tasks import (
    TASK_NAMES,
    TRAIN_TASKS,
    Example,
    examples,
    mixed_lm_text,
    multiple_choice,
    train_stream,
    write_task_jsonl,
)
from lsm_dist.zoo.tokenizer import build_tokenizer

__all__ = [
    "TASK_NAMES",
    "TRAIN_TASKS",
    "Example",
    "ZooConfig",
    "ZooModelSpec",
    "build_tokenizer",
    "build_zoo",
    "evaluate_exact_match",
    "examples",
    "greedy_generate",
    "load_model",
    "load_zoo_config",
    "mixed_lm_text",
    "multiple_choice",
    "param_count",
    "read_card",
    "trained_tasks",
    "train_stream",
    "write_task_jsonl",
]
