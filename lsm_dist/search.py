"""`lsm search -c configs/search/NAME.yaml`: evolve a merge recipe against lm-eval.

A search is a merge plan (``plan``: a plan YAML or mergekit config, the template every candidate
starts from) and a space of its parameters (``space``): per-input weights and densities, λ /
scale, gradients over depth (``anchors`` values interpolated over the layers, optionally for one
kind of tensor: ``filter: mlp``), the method and the space (categorical). Each candidate is one
merge + one lm-eval run on **validation rows** (train-split items: the held-out test rows are
never seen by the search), scored as mean accuracy minus ``ppl_penalty`` × log(ppl / ppl_ref)
where it is worse than the reference's (the template's target), the same rows for every
candidate; random methods get a fixed seed per candidate (recorded).

Strategies (``strategies``): ``cma`` (CMA-ES, the ``cma`` library, bounds [0, 1] on the
normalized parameters; a categorical is a coordinate cut into equal bins) and ``random``
(uniform), each under the same budget of evaluations, in its own sub-directory. Candidates run
as submitit jobs (``executor``: local processes, or a Slurm array on a cluster), ``parallel`` at
a time; latent-space candidates share the latent cache, so only their decode runs. Each
candidate's merged model is deleted once scored unless it is the best so far. ``journal.jsonl``
(one line per finished candidate: parameters, seed, scores, timings) makes a killed or
preempted search resume without redoing a finished candidate (CMA-ES is replayed from its seed
and the journal's fitness values).

At the end the best recipe is written as ``best_plan.yaml`` (and ``best_mergekit.yml`` where
the method and space exist in mergekit), merged once more and scored, with the ``references``
(hand-set plans), on the **test** rows with standard errors; ``results.md`` has the table of
the top candidates and the comparison, ``fitness.png`` fitness vs evaluations per strategy with
the references' validation fitness as horizontal lines.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lsm_dist.config import (
    ConfigError,
    check,
    check_choice,
    doc,
    load_config,
    read_yaml_mapping,
    to_dict,
)
from lsm_dist.sweep import SlurmParams, make_submitit_executor
from lsm_dist.utils import atomic_write_json, atomic_write_text, get_logger, read_json, sha256_json

log = get_logger("lsm.search")
STRATEGIES = ("cma", "random")


@dataclass
class SearchParam:
    """One searched quantity of the plan."""

    key: str = doc("dotted plan key the value goes to: params.scale, params.lambda, params.density, "
                   "models.<id>.params.weight, models.<id>.params.density, method, space, ...")
    low: float | None = doc("lower bound (numbers)", None)
    high: float | None = doc("upper bound (numbers)", None)
    log: bool = doc("search log(value) (bounds > 0)", False)
    choices: list[Any] | None = doc("a categorical: the values (method names, spaces, ...)", None)
    anchors: int = doc("> 0: a gradient over depth, this many anchor values (each searched), "
                       "interpolated over the layers as mergekit's lists are", 0)
    filter: str | None = doc("with anchors: only tensors whose name holds this (mlp, self_attn); the "
                             "others keep the template's value", None)

    def __post_init__(self) -> None:
        check(bool(self.key), "space.key", "must name a plan key")
        if self.choices is not None:
            check(bool(self.choices) and self.anchors == 0, f"space.{self.key}",
                  "a categorical needs choices and no anchors")
            return
        check(self.low is not None and self.high is not None and self.low < self.high, f"space.{self.key}",
              f"needs low < high, got {self.low}, {self.high}")
        check(not self.log or self.low > 0, f"space.{self.key}", "log scale needs low > 0")
        check(self.anchors >= 0, f"space.{self.key}.anchors", "must be >= 0")
        check(self.filter is None or self.anchors > 0, f"space.{self.key}.filter", "only with anchors")

    @property
    def dims(self) -> int:
        return max(self.anchors, 1) if self.choices is None else 1

    def value(self, u: list[float]) -> Any:
        """Normalized coordinates in [0, 1] → the plan value."""
        if self.choices is not None:
            return self.choices[min(int(u[0] * len(self.choices)), len(self.choices) - 1)]
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        vals = [lo + (hi - lo) * min(max(x, 0.0), 1.0) for x in u]
        vals = [round(math.exp(v) if self.log else v, 6) for v in vals]
        return vals if self.anchors else vals[0]


@dataclass
class SearchConfig:
    name: str = doc("the search's name (its directory under runs/search/)", "search")
    plan: str | None = doc("the template: a merge plan YAML or mergekit config every candidate starts from", None)
    plan_overrides: list[str] = doc("dotted overrides of the template (vae=..., space=...)", factory=list)
    space: list[SearchParam] = doc("the searched parameters", factory=list)
    tasks: list[str] = doc("lm-eval tasks of the fitness (lsm_* multiple choice)",
                           factory=lambda: ["lsm_arith_mc", "lsm_reverse_mc"])
    val_n: int = doc("validation rows per task (train-split items; the test rows are never used)", 100)
    test_n: int = doc("held-out test rows per task for the final comparison", 100)
    ppl_penalty: float = doc("fitness − ppl_penalty · max(0, log(ppl / ppl of the template's target)); "
                             "0: no perplexity term", 0.1)
    strategies: list[str] = doc("cma | random, each under the same budget", factory=lambda: ["cma", "random"])
    budget: int = doc("evaluations per strategy", 24)
    popsize: int | None = doc("CMA-ES population (None: cma's default 4 + 3 ln n)", None)
    sigma0: float = doc("CMA-ES initial step on the normalized [0, 1] coordinates", 0.3)
    parallel: int = doc("candidates running at once", 2)
    seed: int = doc("seed of the strategies and of each candidate's random masks (seed + index)", 0)
    references: dict[str, str] = doc("hand-set plans to compare with: name → plan YAML (scored on the "
                                     "validation and the test rows)", factory=dict)
    out_dir: str | None = doc("search directory (default runs/search/<name>)", None)
    executor: str = doc("local | slurm | auto (slurm when sbatch is on PATH) | inline (this process)", "local")
    slurm: SlurmParams = doc("Slurm resources per candidate", factory=SlurmParams)
    keep_all: bool = doc("keep every candidate's merged model (default: only the best so far)", False)
    eval_batch_size: int = doc("lm-eval batch size", 32)

    def __post_init__(self) -> None:
        check(bool(self.plan), "plan", "name the template merge plan (or mergekit config)")
        check(bool(self.space), "space", "name at least one searched parameter")
        keys = [p.key + (f"[{p.filter}]" if p.filter else "") for p in self.space]
        check(len(set(keys)) == len(keys), "space", f"a key is searched twice: {keys}")
        for s in self.strategies:
            check_choice(s, "strategies", STRATEGIES)
        check(bool(self.strategies), "strategies", "name at least one")
        check(self.budget >= 1 and self.parallel >= 1, "budget", "budget and parallel must be >= 1")
        check(self.val_n > 0 and self.test_n > 0, "val_n", "must be > 0")
        check_choice(self.executor, "executor", ["local", "slurm", "auto", "inline"])
        check(all(t.startswith("lsm_") and t.endswith("_mc") for t in self.tasks), "tasks",
              "the fitness uses the generated multiple-choice tasks (lsm_*_mc), which have validation rows")
        if self.out_dir is None:
            self.out_dir = f"runs/search/{self.name}"

    @property
    def dims(self) -> int:
        return sum(p.dims for p in self.space)


def load_search_config(path: str | Path | None, overrides=()) -> SearchConfig:
    return load_config(SearchConfig, path, overrides)


# ----------------------------------------------------------------------------- candidates
def decode(cfg: SearchConfig, u: list[float]) -> dict[str, Any]:
    """Normalized vector → ``{plan key: value}`` (filtered gradients as condition lists)."""
    out: dict[str, Any] = {}
    i = 0
    for p in cfg.space:
        v = p.value(u[i : i + p.dims])
        i += p.dims
        if p.filter:
            out.setdefault(p.key, []).append({"filter": p.filter, "value": v})
        else:
            out[p.key] = v
    return out


def candidate_plan(cfg: SearchConfig, template: dict, values: dict[str, Any], index: int, out: Path) -> dict:
    """The plan mapping of one candidate (template + values, its seed and out_dir)."""
    plan = copy.deepcopy(template)
    for key, v in values.items():
        cur = plan
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = cur.get(part)
            if isinstance(nxt, str) and part in ("models",):
                raise ConfigError(f"space.{key}: models must be mappings in the template")
            if not isinstance(nxt, dict):
                nxt = {"path": nxt} if isinstance(nxt, str) else {}
                cur[part] = nxt
            cur = nxt
        if isinstance(v, list) and v and isinstance(v[0], dict) and "filter" in v[0] and parts[-1] in cur:
            v = [*v, {"value": cur[parts[-1]]}]  # unmatched tensors keep the template's value
        cur[parts[-1]] = v
    plan.setdefault("params", {})["seed"] = cfg.seed + index
    plan.update(out_dir=str(out / "merge"), overwrite=True, keep_layers=False, layout="lsm")
    return plan


def template_plan(cfg: SearchConfig) -> dict:
    """The template as a plan mapping (a mergekit config is translated), validated once."""
    from lsm_dist.config import config_data
    from lsm_dist.merge.plan import MergePlan

    raw = read_yaml_mapping(cfg.plan, "search plan")
    if "merge_method" in raw:
        from lsm_dist.merge.mergekit import plan_data

        raw = plan_data(raw, cfg.plan)
    data = config_data(MergePlan, None, cfg.plan_overrides, what="search plan", data=raw,
                       aliases={"params.lambda": "params.lambda_"})
    data["models"] = {m: (v if isinstance(v, dict) else {"path": v}) for m, v in data["models"].items()}
    return data


# ----------------------------------------------------------------------------- one candidate (a job)
def evaluate_candidate(plan: dict, tasks: list[str], n: int, out: str, ppl_ref: float | None,
                       ppl_penalty: float, batch_size: int = 32, rows: str = "validation",
                       keep_model: bool = True) -> dict:
    """Merge ``plan`` and score it (what one submitit job runs); returns the record."""
    from lsm_dist.evaluate.run import EvalConfig, run_eval
    from lsm_dist.merge.plan import load_plan
    from lsm_dist.merge.run import run_merge

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    path = out_p / "plan.yaml"
    atomic_write_text(path, yaml.safe_dump(plan, sort_keys=False))
    t0 = time.perf_counter()
    model = run_merge(load_plan(path))
    t1 = time.perf_counter()
    from lsm_dist.evaluate.tasks import PPL_TASK

    ev = run_eval(EvalConfig(checkpoints=[f"candidate={model}"], tasks=[*tasks, PPL_TASK], out_dir=str(out_p / "eval"),
                             n=n, rows=rows, batch_size=batch_size, progress=False))
    m = read_json(read_json(ev / "summary.json")["scored"]["candidate"])["metrics"]
    scores = {t: m.get(f"{t}/acc") for t in tasks} | {f"{t}_se": m.get(f"{t}/acc_stderr") for t in tasks}
    scores["ppl"] = m.get(f"{PPL_TASK}/word_perplexity")
    rec = {"scores": scores, "fitness": fitness(scores, tasks, ppl_ref, ppl_penalty), "model": str(model),
           "merge_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2)}
    if not keep_model:
        shutil.rmtree(out_p / "merge", ignore_errors=True)
    return rec


def fitness(scores: dict, tasks: list[str], ppl_ref: float | None, penalty: float) -> float:
    accs = [scores[t] for t in tasks]
    if any(a is None for a in accs):
        return -math.inf
    f = sum(accs) / len(accs)
    ppl = scores.get("ppl")
    if penalty and ppl_ref and ppl and ppl > ppl_ref:
        f -= penalty * math.log(ppl / ppl_ref)
    return f


# ----------------------------------------------------------------------------- strategies
class Strategy:
    """ask() → normalized vectors; tell(vectors, fitness) (maximized)."""

    def __init__(self, kind: str, dims: int, seed: int, popsize: int | None, sigma0: float):
        self.kind, self.dims = kind, dims
        if kind == "cma":
            import cma

            opts = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
            if popsize:
                opts["popsize"] = popsize
            self.es = cma.CMAEvolutionStrategy([0.5] * dims, sigma0, opts)
            self.batch = self.es.popsize
        else:
            import numpy as np

            self.rng = np.random.default_rng(seed)
            self.batch = popsize or 4

    def ask(self) -> list[list[float]]:
        if self.kind == "cma":
            return [list(map(float, x)) for x in self.es.ask()]
        return [list(map(float, self.rng.random(self.dims))) for _ in range(self.batch)]

    def tell(self, xs: list[list[float]], f: list[float]) -> None:
        if self.kind == "cma":
            self.es.tell(xs, [-v if v == v and v != -math.inf else 1e9 for v in f])  # cma minimizes


# ----------------------------------------------------------------------------- the search
def run_search(cfg: SearchConfig) -> Path:
    """Run (or resume) every strategy, then the final comparison; returns results.md."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = sha256_json({k: v for k, v in to_dict(cfg).items() if k not in ("parallel", "executor", "slurm")})[:16]
    marker = out / "search.json"
    if marker.is_file() and read_json(marker).get("digest") != ident:
        raise ConfigError(f"out_dir: {out} holds another search (digest {read_json(marker).get('digest')}, this "
                          f"one {ident}); choose another out_dir")
    atomic_write_json(marker, {"digest": ident, "config": to_dict(cfg)})
    template = template_plan(cfg)
    ref_dir = out / "reference"
    ppl_ref = _reference_ppl(cfg, template, ref_dir)
    for s in cfg.strategies:
        _run_strategy(cfg, s, template, out / s, ppl_ref)
    return _final(cfg, template, out, ppl_ref)


def _reference_ppl(cfg: SearchConfig, template: dict, ref_dir: Path) -> float | None:
    """The perplexity the penalty is relative to: the template's target, scored once."""
    from lsm_dist.evaluate.run import EvalConfig, run_eval
    from lsm_dist.evaluate.tasks import PPL_TASK
    from lsm_dist.merge.plan import load_plan

    path = ref_dir / "template.yaml"
    atomic_write_text(path, yaml.safe_dump({**template, "out_dir": str(ref_dir / "unused")}, sort_keys=False))
    plan = load_plan(path)
    target = plan.model_path(plan.target)
    ev = run_eval(EvalConfig(checkpoints=[f"target={target}"], tasks=[PPL_TASK], out_dir=str(ref_dir / "eval"),
                             progress=False, batch_size=cfg.eval_batch_size))
    m = read_json(read_json(ev / "summary.json")["scored"]["target"])["metrics"]
    return m.get(f"{PPL_TASK}/word_perplexity")


def _journal(path: Path) -> dict[int, dict]:
    recs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            recs[r["index"]] = r
    return recs


def _run_strategy(cfg: SearchConfig, kind: str, template: dict, sdir: Path, ppl_ref: float | None) -> None:
    sdir.mkdir(parents=True, exist_ok=True)
    jpath = sdir / "journal.jsonl"
    done = _journal(jpath)
    strat = Strategy(kind, cfg.dims, cfg.seed, cfg.popsize, cfg.sigma0)
    best = max((r["fitness"] for r in done.values()), default=-math.inf)
    index = 0
    holder: dict = {}  # the submitit executor, made once
    while index < cfg.budget:
        xs = strat.ask()
        full = len(xs)
        xs = xs[: cfg.budget - index]
        fits: list[float | None] = [None] * len(xs)
        pending = []
        for k, x in enumerate(xs):
            i = index + k
            if i in done:  # replayed from the journal: same vector (same seed, same tells)
                fits[k] = done[i]["fitness"]
                continue
            values = decode(cfg, x)
            cand_dir = sdir / f"cand-{i:04d}"
            pending.append((k, i, x, values, candidate_plan(cfg, template, values, i, cand_dir), cand_dir))
        for chunk in [pending[j : j + cfg.parallel] for j in range(0, len(pending), cfg.parallel)]:
            results = _run_chunk(cfg, chunk, ppl_ref, sdir, holder)
            for (k, i, x, values, _plan, cand_dir), res in zip(chunk, results):
                rec = {"index": i, "strategy": kind, "x": x, "values": values, "seed": cfg.seed + i, **res}
                fits[k] = rec["fitness"]
                if rec["fitness"] > best:
                    prev = [r for r in _journal(jpath).values() if r.get("kept")]
                    best = rec["fitness"]
                    rec["kept"] = True
                    for r in prev if not cfg.keep_all else []:  # only the best so far keeps its model
                        shutil.rmtree(Path(r["model"]).parent, ignore_errors=True)
                        r["kept"] = False
                elif not cfg.keep_all:
                    shutil.rmtree(cand_dir / "merge", ignore_errors=True)
                with open(jpath, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[i] = rec
                log.info("search %s: candidate %d fitness %.4f (best %.4f)", kind, i, rec["fitness"], best)
        if len(xs) == full:  # the last, partial generation is not told (nothing is asked after it)
            strat.tell(xs, [float(f) for f in fits])
        index += len(xs)


def _run_chunk(cfg: SearchConfig, chunk: list, ppl_ref, sdir: Path, holder: dict) -> list[dict]:
    """Evaluate a chunk of candidates at once; the global NumPy RNG (which CMA-ES draws from) is
    kept as it was, so a resumed search asks the same candidates again."""
    import numpy as np

    state = np.random.get_state()
    try:
        return _submit(cfg, chunk, ppl_ref, sdir, holder)
    finally:
        np.random.set_state(state)


def _submit(cfg: SearchConfig, chunk: list, ppl_ref, sdir: Path, holder: dict) -> list[dict]:
    args = [(plan, cfg.tasks, cfg.val_n, str(cand_dir), ppl_ref, cfg.ppl_penalty, cfg.eval_batch_size)
            for _k, _i, _x, _v, plan, cand_dir in chunk]
    if cfg.executor == "inline":
        return [evaluate_candidate(*a) for a in args]
    from lsm_dist.dist import scrubbed_environ

    if "ex" not in holder:
        holder["ex"] = make_submitit_executor(cfg.executor, cfg.slurm, sdir / "submitit", "lsm-search")
    ex = holder["ex"]
    with scrubbed_environ():
        jobs = [ex.submit(evaluate_candidate, *a) for a in args]
    out = []
    for (_k, i, *_), j in zip(chunk, jobs):
        try:
            out.append(j.result())
        except Exception as e:  # a failed candidate is recorded with the worst fitness, the search goes on
            from lsm_dist.sweep import failure_summary

            log.warning("search: candidate %d failed: %s", i, failure_summary(j, e))
            out.append({"fitness": -math.inf, "error": str(e)[-500:], "scores": {}, "model": ""})
    return out


# ----------------------------------------------------------------------------- the result
def _final(cfg: SearchConfig, template: dict, out: Path, ppl_ref: float | None) -> Path:
    """Best recipe → plan (+ mergekit) YAML, merged and scored on the test rows beside the
    references; results.md, results.csv, fitness.png."""
    recs = [r for s in cfg.strategies for r in _journal(out / s / "journal.jsonl").values()]
    ok = [r for r in recs if r["fitness"] != -math.inf]
    check(bool(ok), "search", f"no candidate of {out} finished; see the journals")
    best = max(ok, key=lambda r: r["fitness"])
    plan = candidate_plan(cfg, template, best["values"], best["index"], out / "best")
    plan["origin"] = (f"lsm search {cfg.name}: candidate {best['index']} of {cfg.budget} by {best['strategy']} "
                      f"(validation fitness {best['fitness']:.4f}, seed {best['seed']})")
    atomic_write_text(out / "best_plan.yaml", yaml.safe_dump(plan, sort_keys=False))
    mk = to_mergekit(plan)
    if mk is not None:
        head = ["# the best recipe as a mergekit config (lsm search); where it differs from best_plan.yaml:"]
        head += [f"#   - {d}" for d in mk[1]] or ["#   nowhere: mergekit computes the same merge"]
        atomic_write_text(out / "best_mergekit.yml", "\n".join(head) + "\n" + yaml.safe_dump(mk[0], sort_keys=False))
    test = {"searched": evaluate_candidate(plan, cfg.tasks, cfg.test_n, str(out / "best"), ppl_ref, cfg.ppl_penalty,
                                           cfg.eval_batch_size, rows="test")}
    refs_val = {}
    for name, ref in cfg.references.items():
        rp = {**read_yaml_mapping(ref, f"references.{name}")}
        if "merge_method" in rp:
            from lsm_dist.merge.mergekit import plan_data

            rp = plan_data(rp, ref)
        rp.update(out_dir=str(out / "references" / name / "merge"), overwrite=True, keep_layers=False)
        refs_val[name] = evaluate_candidate(rp, cfg.tasks, cfg.val_n, str(out / "references" / name / "val"),
                                            ppl_ref, cfg.ppl_penalty, cfg.eval_batch_size)
        test[name] = evaluate_candidate(rp, cfg.tasks, cfg.test_n, str(out / "references" / name / "test"),
                                        ppl_ref, cfg.ppl_penalty, cfg.eval_batch_size, rows="test")
    _plot(cfg, out, refs_val)
    return _report(cfg, out, recs, best, test, refs_val)


def to_mergekit(plan: dict) -> tuple[dict, list[str]] | None:
    """The plan as a mergekit config where mergekit has its method and it is a weight-space merge
    of plain checkpoints (None otherwise), and what mergekit would compute differently from it
    (the project's settings that mergekit's syntax cannot say; empty: the same merge). A
    setting with filter conditions keeps the plan's value as its catch-all (the plan's rule)."""
    from lsm_dist.merge.mergekit import METHODS
    from lsm_dist.merge.task_vectors import FAMILY

    method = plan.get("method")
    if plan.get("space", "latent") != "weight" or method not in METHODS:
        return None
    rev = {v: k for k, v in METHODS[method].items() if v}
    models = plan["models"]
    if any(isinstance(m, dict) and m.get("lora") for m in models.values()):
        return None
    typed = {k: v for k, v in (plan.get("params") or {}).items() if k != "seed"}
    differ = []
    how, consensus = FAMILY.get(method, (None, False, False, ()))[:2]
    if consensus and typed.get("sign_tie", "zero") != "positive":
        differ.append("sign election at an exact zero sum: none here (sign_tie: zero), + in mergekit")
    if how == "magnitude" and typed.get("tie_break", "spread") != "argsort":
        differ.append("entries tied at the density threshold: a hash order of positions here (tie_break: "
                      "spread), torch's argsort order in mergekit")
    if how in ("random", "della"):
        differ.append("random masks: another random stream than mergekit's (equal in distribution)")
    rescale = typed.pop("rescale", None) or ("inverse" if how in ("random", "della") else "none")
    if how is not None and "rescale" in rev:
        if rescale == "inverse":
            differ.append("kept entries rescaled by 1 / keep probability here (rescale: inverse); mergekit "
                          "rescales to the L1 norm or not at all")
        elif rescale == "l1":
            typed["rescale"] = True
    for key in ("tie_break", "sign_tie"):
        typed.pop(key, None)
    if plan.get("rest", "target") != "weight" and plan.get("slices") is None:
        differ.append("tensors outside attention / MLP (embeddings, norms, head) copied from the target "
                      "here (rest: target), merged by mergekit")
    if plan.get("blocks", "both") not in ("both", ["attn", "mlp"]) or plan.get("include") or plan.get("exclude"):
        differ.append("blocks / include / exclude select tensors here; mergekit merges every tensor")
    if "density" in rev and "density" not in typed:
        typed["density"] = 0.5  # the project's default (mergekit's: 1)

    def params(d: dict) -> dict:
        return {rev[k]: v for k, v in (d or {}).items() if k in rev}

    out = {"merge_method": method, "models": []}
    base = plan.get("base")
    for mid, m in models.items():
        path = m["path"] if isinstance(m, dict) else m
        if mid == base:
            out["base_model"] = path
            continue
        out["models"].append({"model": path, "parameters": params(m.get("params") if isinstance(m, dict) else {})})
    shared = dict(typed)
    for k, v in (plan.get("tensor_params") or {}).items():
        conds = [v] if isinstance(v, dict) else v
        if (k in typed and isinstance(conds, list) and conds and all(isinstance(c, dict) for c in conds)
                and not any(c.get("filter") in (None, "*") for c in conds)):
            v = [*conds, {"value": typed[k]}]  # where no filter matches: the plan's typed value
        shared[k] = v
    if shared := params(shared):
        out["parameters"] = shared
    if plan.get("dtype"):
        out["dtype"] = plan["dtype"]
    return out, differ


def _plot(cfg: SearchConfig, out: Path, refs_val: dict) -> None:
    from lsm_dist.evaluate.plots import _plt, palette, save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = palette(len(cfg.strategies) + len(refs_val))
    for c, s in zip(colors, cfg.strategies):
        recs = sorted(_journal(out / s / "journal.jsonl").values(), key=lambda r: r["index"])
        f = [r["fitness"] if r["fitness"] != -math.inf else math.nan for r in recs]
        run_best = [max([x for x in f[: i + 1] if x == x], default=math.nan) for i in range(len(f))]
        ax.plot(range(1, len(f) + 1), f, "o", ms=3, color=c, alpha=0.5)
        ax.plot(range(1, len(f) + 1), run_best, "-", color=c, label=f"{s} (best so far)")
    for c, (name, r) in zip(colors[len(cfg.strategies):], refs_val.items()):
        ax.axhline(r["fitness"], color=c, ls="--", lw=1, label=f"{name} (hand-set)")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("validation fitness")
    ax.set_title(f"lsm search {cfg.name}: fitness vs evaluations", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    save(fig, out / "fitness.png")


def _report(cfg: SearchConfig, out: Path, recs: list, best: dict, test: dict, refs_val: dict) -> Path:
    from lsm_dist.evaluate.verdict import compare

    tasks = cfg.tasks
    top = sorted((r for r in recs if r["fitness"] != -math.inf), key=lambda r: -r["fitness"])[:10]
    lines = [f"# lsm search {cfg.name}", "",
             f"Template `{cfg.plan}`; {cfg.budget} evaluations per strategy ({', '.join(cfg.strategies)}), "
             f"{cfg.val_n} validation rows per task (train-split items), fitness = mean accuracy − "
             f"{cfg.ppl_penalty} · max(0, log(ppl / target's ppl)).", "", "## Top candidates (validation)", "",
             "| strategy | # | fitness | " + " | ".join(tasks) + " | ppl | values |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for r in top:
        sc = r["scores"]
        lines.append(f"| {r['strategy']} | {r['index']} | {r['fitness']:.4f} | "
                     + " | ".join(f"{sc.get(t, float('nan')):.3f}" for t in tasks)
                     + f" | {sc.get('ppl') or float('nan'):.4g} | `{json.dumps(r['values'])}` |")
    lines += ["", "## Held-out test rows: the searched recipe vs the hand-set ones", "",
              "| merge | validation fitness | " + " | ".join(tasks) + " | mean | ppl |",
              "|---|---|" + "---|" * len(tasks) + "---|---|"]
    for name, r in test.items():
        sc = r["scores"]
        mean = sum(sc[t] for t in tasks) / len(tasks)
        vf = best["fitness"] if name == "searched" else refs_val[name]["fitness"]
        lines.append(f"| {name} | {vf:.4f} | " + " | ".join(f"{sc[t]:.3f} ± {sc[t + '_se'] or 0:.3f}" for t in tasks)
                     + f" | {mean:.3f} | {sc.get('ppl') or float('nan'):.4g} |")
    obs = []
    s = test["searched"]["scores"]
    se_s = math.sqrt(sum((s[t + "_se"] or 0) ** 2 for t in tasks)) / len(tasks)
    mean_s = sum(s[t] for t in tasks) / len(tasks)
    for name, r in test.items():
        if name == "searched":
            continue
        sc = r["scores"]
        mean_r = sum(sc[t] for t in tasks) / len(tasks)
        se_r = math.sqrt(sum((sc[t + "_se"] or 0) ** 2 for t in tasks)) / len(tasks)
        c = compare(mean_s, se_s, mean_r, se_r)
        obs.append(f"the searched recipe ({mean_s:.3f}, ppl {s.get('ppl') or float('nan'):.4g}) is {c} "
                   f"{name} ({mean_r:.3f}, ppl {sc.get('ppl') or float('nan'):.4g}) on the held-out test rows' mean "
                   "accuracy (2 standard errors of the difference)")
    for st in cfg.strategies:
        f = [r["fitness"] for r in recs if r["strategy"] == st and r["fitness"] != -math.inf]
        if f:
            obs.append(f"{st}: best validation fitness {max(f):.4f} of {len(f)} finished evaluations")
    lines += ["", "## Observations", "", *[f"- {o}." for o in obs], "",
              "Best recipe: `best_plan.yaml`" + (" and `best_mergekit.yml`" if (out / "best_mergekit.yml").is_file()
                                                   else "") + "; fitness vs evaluations: `fitness.png`."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "result.json", {"best": best, "test": test, "references_validation": refs_val,
                                            "observations": obs})
    return out / "results.md"
