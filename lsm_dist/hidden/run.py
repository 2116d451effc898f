"""Run a hidden-state merge end to end, and sweep it against weight merging.

``run_hidden_merge(cfg)`` loads the models, builds a ``HiddenStateMerger`` (calibrating it
for RegMean), computes the per-layer metrics of the hidden merge and of the weight-space
merge with the same operator and α (``lsm_dist.hidden.weights``) on calibration text,
optionally generates from prompts, scores the parents and both merges with lm-eval through an
in-memory ``HFLM`` (registered task names, or local task YAMLs via ``include_path``), and
writes into ``out_dir``: ``hidden_merge.resolved.yaml``, ``results.json``, ``report.md``,
``metrics.png`` (all atomic).

``sweep_hidden_vs_weight(models, ops, layer_ranges, alphas, tasks)`` re-mixes ONE merger
(``set_mix``: no reload) over every operator × layer range × α, builds the matching weight
merge (only those layers' tensors merged), and writes ``sweep.{json,csv,md,png}``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lsm_dist.config import check, check_choice, doc, save_resolved, to_dict
from lsm_dist.hidden.merger import HEADS, HiddenStateMerger
from lsm_dist.hidden.metrics import compare_merges, summarize
from lsm_dist.hidden.module import MergedCausalLM
from lsm_dist.hidden.ops import OPS
from lsm_dist.hidden.report import (
    markdown_table,
    plot_layer_metrics,
    plot_sweep,
    run_markdown,
    write_csv,
)
from lsm_dist.hidden.weights import weight_merge
from lsm_dist.utils import atomic_write_json, atomic_write_text, get_logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRIMARY = ("acc,none", "acc_norm,none", "exact_match,none", "word_perplexity,none")
log = get_logger("lsm.hidden")


@dataclasses.dataclass
class HiddenMergeConfig:
    models: list[str] = doc("model directories (HF causal LMs of one architecture); models[0] "
                            "is the anchor (α = 0)", factory=list)  # fmt: skip
    op: str = doc("mixing operator: " + " | ".join(OPS), "lerp")
    layers: list[int] | None = doc("decoder layers whose output is mixed (0-based); null = all", None)
    alpha: float = doc("share of models[1:] in [0, 1] at every mixed layer", 0.5)
    alphas: list[float] | None = doc("per-layer α (same length and order as layers)", None)
    head: str = doc("final logits: mix (α-mix of every model's logits) | first (models[0]'s)", "mix")
    head_alpha: float | None = doc("α of the logits mix; null = α of the deepest mixed layer", None)
    slerp_eps: float = doc("slerp falls back to lerp below this angle (radians)", 1e-4)
    regmean_full: bool = doc("regmean: full d×d Gram (else diagonal)", True)
    regmean_shrink: float = doc("regmean: off-diagonal scaling γ of each Gram", 0.9)
    regmean_ridge: float = doc("regmean: ridge λ (relative to tr G / d) inside each Gram", 1e-3)
    calib_file: str | None = doc("calibration text, one document per line; null = the zoo's "
                                 "generated mixed text", None)  # fmt: skip
    calib_samples: int = doc("calibration documents (RegMean Grams and metrics)", 64)
    max_length: int = doc("max tokens per calibration document", 64)
    batch_size: int = doc("batch size of calibration and lm-eval", 16)
    weight_baseline: bool = doc("also build and measure the weight-space merge", True)
    tasks: list[str] = doc("lm-eval task names (registered or from include_path)", factory=list)
    include_path: str | None = doc("folder of local lm-eval task YAMLs", None)
    limit: int | None = doc("lm-eval: max documents per task", None)
    eval_parents: bool = doc("also score each parent alone", True)
    prompts: list[str] = doc("prompts to generate from (greedy)", factory=list)
    max_new_tokens: int = doc("tokens generated per prompt", 16)
    dtype: str = doc("dtype the models are loaded in: " + " | ".join(DTYPES), "float32")
    device: str = doc("torch device", "cpu")
    out_dir: str = doc("output directory", "runs/hidden_merge")

    def __post_init__(self):
        check(len(self.models) >= 2, "models", "needs at least two model directories")
        check_choice(self.op, "op", OPS)
        check_choice(self.head, "head", HEADS)
        check_choice(self.dtype, "dtype", DTYPES)
        check(0.0 <= self.alpha <= 1.0, "alpha", f"{self.alpha} is outside [0, 1]")
        check(self.head_alpha is None or 0.0 <= self.head_alpha <= 1.0, "head_alpha",
              f"{self.head_alpha} is outside [0, 1]")  # fmt: skip
        for a in self.alphas or []:
            check(0.0 <= a <= 1.0, "alphas", f"{a} is outside [0, 1]")
        if self.alphas is not None:
            check(self.layers is not None and len(self.layers) == len(self.alphas), "alphas",
                  "needs layers of the same length")  # fmt: skip
        for i in self.layers or []:
            check(i >= 0, "layers", f"layer {i} is negative")
        check(self.op != "slerp" or len(self.models) == 2, "op", "slerp mixes exactly two models")
        check(0.0 <= self.regmean_shrink <= 1.0, "regmean_shrink", "must be in [0, 1]")
        check(self.regmean_ridge >= 0, "regmean_ridge", "must be >= 0")
        check(self.calib_samples > 0, "calib_samples", "must be > 0")
        check(self.max_length > 1, "max_length", "must be > 1")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")


# --------------------------------------------------------------------------- helpers
def load_models(paths: Sequence[str], dtype: str = "float32", device: str = "cpu"):
    from lsm_dist.checkpoint import load_causal_lm, load_tokenizer
    from lsm_dist.utils import quiet_transformers

    with quiet_transformers():
        models = [load_causal_lm(p, DTYPES[dtype]).to(device).eval() for p in paths]
    return models, load_tokenizer(paths[0])


def calibration_texts(calib_file: str | None, n: int) -> list[str]:
    if calib_file is not None:
        lines = [ln for ln in Path(calib_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"calib_file {calib_file} holds no text")
        return lines[:n]
    from lsm_dist.zoo.tasks import mixed_lm_text

    return mixed_lm_text(n, seed=12345)


def make_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    """Right-padded ``(input_ids, attention_mask)`` batches."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s : s + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length)  # fmt: skip
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


_TASK_MANAGERS: dict[tuple[str | None, bool], object] = {}


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """A cached lm-eval ``TaskManager``. Indexing lm-eval's own ~14K task YAMLs takes tens of
    seconds, so when every task is found in ``include_path`` alone, only that is indexed."""
    from lm_eval.tasks import TaskManager

    def get(defaults: bool):
        key = (include_path, defaults)
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=defaults)
        return _TASK_MANAGERS[key]

    if include_path:
        local = get(False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return get(True)


def lm_eval_scores(model, tokenizer, tasks: Sequence[str], include_path: str | None = None,
                   limit: int | None = None, batch_size: int = 16) -> dict[str, dict]:  # fmt: skip
    """lm-eval on an in-memory model: ``{task: {metric: value, "primary": value}}``."""
    if not tasks:
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = task_manager(tasks, include_path)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                          bootstrap_iters=0, log_samples=False, verbosity="ERROR")  # fmt: skip
    out = {}
    for task, metrics in res["results"].items():
        vals = {k: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k}  # fmt: skip
        primary = next((vals[k] for k in PRIMARY if k in vals), next(iter(vals.values()), math.nan))
        out[task] = {**vals, "primary": primary}
    return out


def _decode(tokenizer, ids: torch.Tensor, start: int) -> str:
    return tokenizer.decode(ids[start:].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------- one run
def run_hidden_merge(cfg: HiddenMergeConfig, models=None, tokenizer=None) -> dict:
    """The run described in the module docstring; returns the ``results.json`` content.
    ``models`` / ``tokenizer`` may be passed in memory (then ``cfg.models`` only names them)."""
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "hidden_merge.resolved.yaml")
    if models is None:
        models, tok = load_models(cfg.models, cfg.dtype, cfg.device)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("run_hidden_merge: pass a tokenizer with in-memory models")
    n_layers = len(models[0].model.layers)
    layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    alpha = cfg.alphas if cfg.alphas is not None else cfg.alpha
    merger = HiddenStateMerger(models, head=cfg.head, slerp_eps=cfg.slerp_eps,
                               regmean_full=cfg.regmean_full, regmean_shrink=cfg.regmean_shrink,
                               regmean_ridge=cfg.regmean_ridge)  # fmt: skip
    merger.set_mix(layers=layers, alpha=alpha)  # validates layers / α before heavy work
    batches = make_batches(tokenizer, calibration_texts(cfg.calib_file, cfg.calib_samples),
                           cfg.max_length, cfg.batch_size)  # fmt: skip
    if cfg.op == "regmean":
        merger.calibrate(batches, layers)
    merger.set_mix(op=cfg.op, head_alpha=cfg.head_alpha)
    weight = None
    if cfg.weight_baseline:
        w_alpha = cfg.alpha if cfg.alphas is None else sum(cfg.alphas) / len(cfg.alphas)
        weight = weight_merge(models, cfg.op, w_alpha,
                              layers=None if cfg.layers is None else layers, calib=batches,
                              slerp_eps=cfg.slerp_eps, regmean_shrink=cfg.regmean_shrink,
                              regmean_ridge=cfg.regmean_ridge)  # fmt: skip
    report = compare_merges(merger, batches, weight)
    module = MergedCausalLM(merger)
    samples = []
    for p in cfg.prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        row = {"prompt": p, "hidden": _decode(tokenizer, module.generate(ids, max_new_tokens=cfg.max_new_tokens)[0], ids.shape[1])}
        if weight is not None:
            g = weight.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            row["weight"] = _decode(tokenizer, g[0], ids.shape[1])
        samples.append(row)
    scores = {}
    if cfg.tasks:
        ev = dict(tasks=cfg.tasks, include_path=cfg.include_path, limit=cfg.limit, batch_size=cfg.batch_size)
        if cfg.eval_parents:
            for i, m in enumerate(models):
                scores[f"model{i}"] = lm_eval_scores(m, tokenizer, **ev)
        scores["hidden"] = lm_eval_scores(module, tokenizer, **ev)
        if weight is not None:
            scores["weight"] = lm_eval_scores(weight, tokenizer, **ev)
    result = {
        "config": to_dict(cfg), "models": [str(m) for m in cfg.models], "op": cfg.op,
        "mix": {str(k): v for k, v in merger.mix.items()}, "head": merger.head,
        "head_alpha": merger.head_alpha, "metrics": report,
        "summary": {"hidden": summarize(report["hidden"], list(merger.mix)),
                    "weight": summarize(report["weight"], list(merger.mix)) if weight is not None else None},
        "scores": scores, "samples": samples, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "report.md", run_markdown(result))
    plot_layer_metrics(report, out / "metrics.png")
    log.info("hidden merge: wrote %s (%.1fs)", out, result["seconds"])
    return result


# --------------------------------------------------------------------------- sweep
def parse_layers(spec, n_layers: int) -> list[int]:
    """``"all"``, ``"a:b"`` (Python slice of the layer indices) or a list of indices."""
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        a, _, b = spec.partition(":")
        return list(range(n_layers))[slice(int(a) if a else None, int(b) if b else None)]
    return [int(i) for i in spec]


def _label(layers: Sequence[int]) -> str:
    ls = list(layers)
    if ls and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def sweep_hidden_vs_weight(models, ops: Sequence[str] = OPS, layer_ranges: Sequence = ("all",),
                           alphas: Sequence[float] = (0.25, 0.5, 0.75), tasks: Sequence[str] = (),
                           out_dir: str | Path = "runs/hidden_sweep", tokenizer=None,
                           include_path: str | None = None, limit: int | None = None,
                           calib_texts: Sequence[str] | None = None, head: str = "mix",
                           batch_size: int = 16, max_length: int = 64,
                           score_parents: bool = True) -> list[dict]:  # fmt: skip
    """Weight merging vs hidden-state merging per operator × layer range × α (see module
    docstring). ``models``: two directories or loaded models (then pass ``tokenizer``).
    Rows: ``op, layers, alpha, method`` (hidden | weight | model0 | model1), the primary
    score per task (and their mean, ``mean_score``, with several tasks; the plot shows it),
    and the metrics summarized over the mixed layers. Note: the hidden merge mixes the
    logits too (``head="mix"``, α of the range) while a weight merge of a partial layer range
    keeps model 0's embeddings and head; over ``"all"`` layers both merge everything."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if all(isinstance(m, (str, Path)) for m in models):
        models, tok = load_models([str(m) for m in models])
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("sweep_hidden_vs_weight: pass a tokenizer with in-memory models")
    for op in ops:
        check_choice(op, "ops", OPS)
    n_layers = len(models[0].model.layers)
    ranges = [parse_layers(r, n_layers) for r in layer_ranges]
    texts = list(calib_texts) if calib_texts is not None else calibration_texts(None, 32)
    batches = make_batches(tokenizer, texts, max_length, batch_size)
    merger = HiddenStateMerger(models, head=head)
    if "regmean" in ops:
        merger.calibrate(batches)
    ev = dict(tasks=list(tasks), include_path=include_path, limit=limit, batch_size=batch_size)
    task_names: list[str] = []

    def scored(row: dict, model) -> dict:
        for t, s in lm_eval_scores(model, tokenizer, **ev).items():
            row[t] = s["primary"]
            if t not in task_names:
                task_names.append(t)
        return row

    rows: list[dict] = []
    if score_parents and tasks:
        for i, m in enumerate(models):
            rows.append(scored({"op": "-", "layers": "-", "alpha": float(i), "method": f"model{i}"}, m))
    for op in ops:
        for layers in ranges:
            for a in alphas:
                merger.set_mix(layers=layers, alpha=a, op=op, head_alpha=a)
                wm = weight_merge(models, op, a, layers=None if len(layers) == n_layers else layers,
                                  calib=batches)  # fmt: skip
                rep = compare_merges(merger, batches, wm)
                for method, model in (("hidden", MergedCausalLM(merger)), ("weight", wm)):
                    row = {"op": op, "layers": _label(layers), "alpha": a, "method": method,
                           **summarize(rep[method], layers)}  # fmt: skip
                    rows.append(scored(row, model))
                log.info("sweep: %s layers %s α=%s done", op, _label(layers), a)
    if len(task_names) > 1:
        for r in rows:
            r["mean_score"] = sum(r[t] for t in task_names) / len(task_names)
        task_names.append("mean_score")
    cols = ["op", "layers", "alpha", "method", *task_names, "mean_midness", "mean_arc_ratio",
            "mean_arc_norm_dev", "mean_off_plane", "mean_cka_a", "mean_cka_b", "last_cka_a",
            "last_cka_b"]  # fmt: skip
    atomic_write_json(out / "sweep.json", {"columns": cols, "rows": rows})
    write_csv(out / "sweep.csv", rows, cols)
    atomic_write_text(out / "sweep.md", "# Hidden-state vs weight merging\n\n" + markdown_table(rows, cols))
    plot_sweep(rows, out / "sweep.png", task_names[-1] if task_names else "last_cka_b")
    return rows
