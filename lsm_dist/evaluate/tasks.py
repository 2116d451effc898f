"""lm-eval task folders for the zoo's task families, generated offline.

For every family ``t`` of ``lsm_dist.zoo.tasks.TASK_NAMES`` (arith, recall, reverse):

* ``lsm_<t>_mc``  (``output_type: multiple_choice``): log-likelihood of each choice after the
  prompt; metrics ``acc`` and ``acc_norm``. Choices keep their leading space and
  ``target_delimiter`` is ``""``, so the scored continuation is exactly the trained answer.
* ``lsm_<t>_gen`` (``output_type: generate_until``): greedy continuation until ``"\\n"`` (and the
  tokenizer's EOS, which lm-eval adds), at most ``max_gen_toks`` tokens (a model whose
  ``generation_config`` sets ``max_new_tokens`` generates up to that instead: transformers
  prefers it to lm-eval's ``max_length``; stopping at EOS / newline is unaffected); the ``strip`` filter
  removes surrounding whitespace and ``exact_match`` compares with the stripped answer.

Groups: ``lsm_zoo_mc`` (mean acc), ``lsm_zoo_gen`` (mean exact_match) and ``lsm_zoo`` (both).

``lsm_english_ppl`` (``output_type: loglikelihood_rolling``): perplexity on a fixed plain-English
text shipped with the package (``data/english.txt``: 16 paragraphs, ~1,800 words, written for
this project; each paragraph one document, ~2,000 SmolLM2 tokens in all), metrics
``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``. It is the sensitive signal of
damage to a pretrained model's general ability that task accuracy alone misses.
Test rows come from the held-out ``test`` split (``examples(t, "test", n, seed)``; ``recall``
has fewer test names than a large ``n``); few-shot examples from a small ``train`` pool.

``write_tasks(root)`` writes ``root/tasks/`` (YAML + ``data/*.jsonl`` with absolute paths,
each file atomically, ``manifest.json`` last) and rewrites nothing when the content digest of
what it would write equals the manifest's. The ``lsm_`` prefix is this package's namespace:
names that start with it are resolved in the generated folder only (see ``run.resolve_tasks``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lsm_dist.utils import atomic_write_json, atomic_write_text, read_json, sha256_json
from lsm_dist.zoo import tasks as T

PREFIX = "lsm_"
GROUP = "lsm_zoo"
PPL_TASK = "lsm_english_ppl"
# multiple-choice task lists of the presets: the tiny zoo's three families, and the default zoo's
# (its experts' tasks shift / flip first, then the base's other skills, kept or lost by a merge)
MC_TASKS = ["lsm_arith_mc", "lsm_recall_mc", "lsm_reverse_mc"]
DEFAULT_ZOO_MC = ["lsm_shift_mc", "lsm_flip_mc", *MC_TASKS]
ENGLISH = Path(__file__).resolve().parent / "data" / "english.txt"
KINDS = ("mc", "gen")
MANIFEST = "manifest.json"
TASKS_FORMAT = 1  # bump when the YAML layout changes


def task_name(family: str, kind: str) -> str:
    return f"{PREFIX}{family}_{kind}"


def local_task_names() -> list[str]:
    """Every task and group name the generated folder defines."""
    leaves = [task_name(f, k) for k in KINDS for f in T.TASK_NAMES]
    return [GROUP, *(f"{GROUP}_{k}" for k in KINDS), *leaves, PPL_TASK]


def english_documents() -> list[str]:
    """The fixed English text, one document per paragraph."""
    return [p.strip() for p in ENGLISH.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def ppl_yaml(data: str) -> dict[str, Any]:
    """Rolling log-likelihood of each document (lm-eval's wikitext recipe, local data)."""
    return {
        "task": PPL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _rows(family: str, split: str, n: int, seed: int) -> list[dict]:
    return [T.multiple_choice(ex) for ex in T.examples(family, split, n, seed)]


def _common(family: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "tag": [f"{PREFIX}tasks"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data},
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "doc_to_text": "prompt",
        "metadata": {"version": float(T.TASKS_VERSION), "family": family},
    }


def mc_yaml(family: str, data: dict[str, str]) -> dict[str, Any]:
    """The multiple-choice task of ``family`` (``data``: split → absolute JSONL path)."""
    return {
        "task": task_name(family, "mc"),
        **_common(family, data),
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def gen_yaml(family: str, data: dict[str, str], max_gen_toks: int) -> dict[str, Any]:
    """The generation task of ``family``: greedy, exact match after stripping whitespace."""
    return {
        "task": task_name(family, "gen"),
        **_common(family, data),
        "output_type": "generate_until",
        "doc_to_target": "{{answer | trim}}",
        "target_delimiter": " ",
        "generation_kwargs": {
            "until": ["\n"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        },  # fmt: skip
        "filter_list": [
            {
                "name": "strip",
                "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
            }
        ],  # fmt: skip
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def group_yamls() -> dict[str, dict[str, Any]]:
    metric = {"mc": ("acc", "none"), "gen": ("exact_match", "strip")}
    out: dict[str, dict[str, Any]] = {}
    for k in KINDS:
        m, flt = metric[k]
        out[f"{GROUP}_{k}"] = {
            "group": f"{GROUP}_{k}",
            "task": [task_name(f, k) for f in T.TASK_NAMES],
            "aggregate_metric_list": [
                {"metric": m, "aggregation": "mean", "weight_by_size": False, "filter_list": flt}
            ],  # fmt: skip
            "metadata": {"version": float(T.TASKS_VERSION)},
        }
    out[GROUP] = {
        "group": GROUP,
        "task": [f"{GROUP}_{k}" for k in KINDS],
        "metadata": {"version": float(T.TASKS_VERSION)},
    }
    return out


VALIDATION_SEED = 7919  # validation rows: train-split items drawn with this seed offset


def render_tasks(tasks_dir: Path, n: int = 100, seed: int = 0, fewshot_pool: int = 16,
                 max_gen_toks: int = 8, rows: str = "test") -> dict[str, str]:  # fmt: skip
    """Relative path → file text of the whole task folder (nothing written). ``rows="validation"``:
    the scored rows are items of the *train* split (another seed than the few-shot pool), so a
    search that tunes on them never sees a held-out test row."""
    tasks_dir = tasks_dir.resolve()
    files: dict[str, str] = {}
    for fam in T.TASK_NAMES:
        data = {}
        for split, count in (("test", n), ("train", fewshot_pool)):
            rel = f"data/{fam}_{split}.jsonl"
            if split == "test" and rows == "validation":
                files[rel] = _jsonl(_rows(fam, "train", count, seed + VALIDATION_SEED))
            else:
                files[rel] = _jsonl(_rows(fam, split, count, seed))
            data[split] = str(tasks_dir / rel)
        files[f"{task_name(fam, 'mc')}.yaml"] = yaml.safe_dump(mc_yaml(fam, data), sort_keys=False)
        files[f"{task_name(fam, 'gen')}.yaml"] = yaml.safe_dump(
            gen_yaml(fam, data, max_gen_toks), sort_keys=False
        )
    for name, cfg in group_yamls().items():
        files[f"_{name}.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
    files["data/english_test.jsonl"] = _jsonl([{"text": d} for d in english_documents()])
    files[f"{PPL_TASK}.yaml"] = yaml.safe_dump(ppl_yaml(str(tasks_dir / "data/english_test.jsonl")),
                                              sort_keys=False)
    return files


def write_tasks(root: str | Path, n: int = 100, seed: int = 0, fewshot_pool: int = 16,
                max_gen_toks: int = 8, rows: str = "test") -> Path:  # fmt: skip
    """Write (or keep) ``<root>/tasks/``; returns that folder.

    ``n`` test rows per family (seeded by ``seed``), ``fewshot_pool`` train rows for few-shot
    prompts, ``max_gen_toks`` for the generation tasks. Files are rewritten only when the
    digest of their content differs from the manifest's (or a file is missing).
    """
    if rows not in ("test", "validation"):
        raise ValueError(f"rows must be test or validation, got {rows!r}")
    if n <= 0 or fewshot_pool <= 0 or max_gen_toks <= 0:
        raise ValueError(f"n, fewshot_pool, max_gen_toks must be > 0, got {n}, {fewshot_pool}, "
                         f"{max_gen_toks}")  # fmt: skip
    tasks_dir = (Path(root) / "tasks").resolve()
    files = render_tasks(tasks_dir, n, seed, fewshot_pool, max_gen_toks, rows)
    digest = sha256_json({"format": TASKS_FORMAT, "files": files})
    try:
        old = read_json(tasks_dir / MANIFEST)
    except (FileNotFoundError, ValueError):
        old = None
    if (isinstance(old, dict) and old.get("digest") == digest
            and all((tasks_dir / rel).is_file() for rel in files)):  # fmt: skip
        return tasks_dir
    stale = tasks_dir / MANIFEST
    stale.unlink(missing_ok=True)  # the folder is incomplete until the new manifest exists
    for rel, text in files.items():
        atomic_write_text(tasks_dir / rel, text)
    atomic_write_json(tasks_dir / MANIFEST, {
        "digest": digest, "n": n, "seed": seed, "fewshot_pool": fewshot_pool, "rows": rows,
        "max_gen_toks": max_gen_toks, "tasks": local_task_names(), "files": sorted(files),
    })  # fmt: skip
    return tasks_dir


def tasks_digest(tasks_dir: str | Path) -> str:
    """The content digest recorded in a generated folder's manifest."""
    return str(read_json(Path(tasks_dir) / MANIFEST)["digest"])


def chance_level(eval_dir: str | Path, family: str) -> float:
    """Accuracy of uniform guessing on the generated multiple-choice task ``family`` (arith, ...)
    as written into ``eval_dir/tasks/`` (NaN for a task not generated there)."""
    f = Path(eval_dir) / "tasks" / "data" / f"{family}_test.jsonl"
    if not f.is_file():
        return float("nan")
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return sum(1.0 / len(r["choices"]) for r in rows) / max(len(rows), 1)
