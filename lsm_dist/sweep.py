"""Sweeps: a grid over a stage's typed config, run as submitit jobs (Slurm or local).

Kinds (stages) a sweep can run: ``convert``, ``train`` (e.g. compression ratio × β × lr),
``merge`` (e.g. λ × method), ``eval``; :func:`register_kind` adds one.

A sweep file (YAML) names the stage (``kind``), a base config file, overrides shared by all
points and a grid of dotted keys → value lists. Every point becomes the stage's own dataclass
(validated before anything is submitted), gets its own output directory under ``run_dir``
and runs as one submitit job (a Slurm array when the executor is Slurm; multi-node points
with ``slurm.nodes > 1``). Each finished point writes ``result.json``; the sweep gathers
them into ``results.md`` / ``results.csv``. Re-running a sweep resubmits only unfinished
points; a different sweep in the same ``run_dir`` is refused.
"""

from __future__ import annotations

import csv
import importlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lsm_dist.config import ConfigError, check, check_choice, doc, from_dict, load_config, to_dict
from lsm_dist.dist import scrubbed_environ
from lsm_dist.utils import atomic_write_json, atomic_write_text, get_logger, read_json, sha256_json


class Kind(NamedTuple):
    """A sweepable stage: ``module:attr`` references, imported lazily."""

    config: str  # the stage's config dataclass
    run: str  # run(config) -> dict of scalars (what result.json and results.md hold)
    out_field: str  # the config field each point's output directory goes into
    loader: str | None = None  # load(path, overrides) -> config (default: config.load_config)


KINDS: dict[str, Kind] = {
    "convert": Kind("lsm_dist.corpus.plan:ConvertConfig", "lsm_dist.sweep:_run_convert", "out_dir"),
    # load_train_config layers `model.*` over the model_config YAML (grid: model.latent_dim)
    "train": Kind("lsm_dist.train:TrainConfig", "lsm_dist.train:run_train", "run_dir",
                  "lsm_dist.train:load_train_config"),
    # load_plan maps `params.lambda` to the field lambda_ (grid: params.lambda, method)
    "merge": Kind("lsm_dist.merge.plan:MergePlan", "lsm_dist.sweep:_run_merge", "out_dir",
                  "lsm_dist.merge.plan:load_plan"),
    "eval": Kind("lsm_dist.evaluate.run:EvalConfig", "lsm_dist.sweep:_run_eval", "out_dir"),
}


def register_kind(name: str, config: str, run: str, out_field: str, loader: str | None = None) -> None:
    KINDS[name] = Kind(config, run, out_field, loader)


def _resolve(ref: str) -> Any:
    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass
class SlurmParams:
    partition: str | None = doc("Slurm partition (None: the cluster default)", None)
    nodes: int = doc("nodes per sweep point (>1: a multi-node job, one task per GPU/rank)", 1)
    tasks_per_node: int = doc("tasks (ranks) per node", 1)
    cpus_per_task: int = doc("CPUs per task", 1)
    gpus_per_node: int = doc("GPUs per node (0 on CPU clusters)", 0)
    timeout_min: int = doc("time limit per point, minutes", 60)
    array_parallelism: int = doc("how many points may run at once", 16)
    mem_gb: int | None = doc("memory per node in GB (None: cluster default)", None)
    additional: dict[str, Any] = doc("extra sbatch parameters, e.g. {account: abc}", factory=dict)

    def __post_init__(self) -> None:
        for f in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
            check(getattr(self, f) >= 1, f"slurm.{f}", "must be >= 1")
        check(self.gpus_per_node >= 0, "slurm.gpus_per_node", "must be >= 0")


@dataclass
class SweepConfig:
    kind: str = doc(f"stage each point runs: one of {sorted(KINDS)}", "train")
    base: str | None = doc("base config YAML of the stage", None)
    overrides: list[str] = doc("dotted overrides shared by every point", factory=list)
    grid: dict[str, list[Any]] = doc("dotted key -> list of values; points are the cartesian product", factory=dict)
    run_dir: str = doc("sweep directory: one sub-directory per point, results.md/csv", "runs/sweep")
    executor: str = doc("slurm | local | auto (slurm when sbatch is on PATH)", "auto")
    slurm: SlurmParams = doc("Slurm resources per point", factory=SlurmParams)

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", sorted(KINDS))
        check_choice(self.executor, "executor", ["slurm", "local", "auto"])
        for k, v in self.grid.items():
            check(isinstance(v, list) and len(v) > 0, f"grid.{k}", "must be a non-empty list")


def point_name(values: dict[str, Any]) -> str:
    if not values:
        return "point"
    parts = [f"{k.split('.')[-1]}={v}" for k, v in values.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def expand(cfg: SweepConfig) -> list[tuple[str, dict[str, Any], Any]]:
    """Every point as (name, grid values, the stage's validated config dataclass)."""
    kind = KINDS[cfg.kind]
    load = _resolve(kind.loader) if kind.loader else lambda path, ov: load_config(
        _resolve(kind.config), path, ov)
    keys = list(cfg.grid)
    points = []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)) if keys else [()]:
        values = dict(zip(keys, combo))
        name = point_name(values)
        extra = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        out = str(Path(cfg.run_dir) / name)
        try:
            stage_cfg = load(cfg.base, [*cfg.overrides, *extra, f"{kind.out_field}={out}"])
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        points.append((name, values, stage_cfg))
    return points


def claim(cfg: SweepConfig, points: list) -> None:
    """Write sweep.json, refusing a directory that holds another sweep."""
    run = Path(cfg.run_dir)
    ident = {"kind": cfg.kind, "points": {n: to_dict(c) for n, _, c in points}}
    digest = sha256_json(ident)[:16]
    marker = run / "sweep.json"
    if marker.is_file():
        other = read_json(marker).get("digest")
        if other != digest:
            raise ConfigError(
                f"run_dir {run} already holds another sweep (digest {other}, this one {digest}); "
                "use a new run_dir"
            )
    atomic_write_json(marker, {"digest": digest, "kind": cfg.kind, "points": [n for n, _, _ in points]})


def run_point(kind: str, config: dict, out: str) -> dict:
    """What one job runs: rebuild the typed config, run the stage, write result.json.

    In a multi-task job (``slurm.nodes`` × ``slurm.tasks_per_node`` > 1) every task runs this
    as one rank: ``export_torch_env`` turns SLURM_PROCID / SLURM_NTASKS / the first node into
    RANK / WORLD_SIZE / MASTER_ADDR (port from the job id) for torch.distributed's env://.
    A point stopped by a signal (``preempted`` in its result: checkpointed, not finished) gets
    no result.json, so re-running the sweep resumes it.
    """
    from lsm_dist.dist import export_torch_env

    env = export_torch_env()
    spec = KINDS[kind]
    stage_cfg = from_dict(_resolve(spec.config), config)
    result = _resolve(spec.run)(stage_cfg) or {}
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if env.rank == 0 and not result.get("preempted"):
        atomic_write_json(Path(out) / "result.json", result)
    return result


def _run_convert(cfg) -> dict:
    from lsm_dist.corpus.convert import run_convert

    m = run_convert(cfg, progress=False)
    return {"num_samples": m["num_samples"], "shards": len(m["shards"]), "bytes": m["total_bytes"],
            "fixups": sum(t.get("fixups", 0) for t in m["tensors"])}  # format 1 only


def _run_merge(plan) -> dict:
    """One merge (encode → merge → decode → assemble; cached latents are reused across points)."""
    from lsm_dist.merge import run_merge
    from lsm_dist.merge.assemble import MARKER

    model = run_merge(plan)
    rec = read_json(model / MARKER)
    return {"model": str(model), "space": plan.space, "plan_digest": rec.get("plan_digest")}


def _run_eval(cfg) -> dict:
    """Score the checkpoints; one column per ``<checkpoint>/<task>/<metric>`` (no stderr)."""
    from lsm_dist.evaluate.run import run_eval

    out = run_eval(cfg)
    row: dict[str, Any] = {}
    for name, path in read_json(out / "summary.json")["scored"].items():
        for key, v in read_json(path)["metrics"].items():
            if not key.endswith("_stderr"):
                row[f"{name}/{key}"] = v
    return row


def make_executor(cfg: SweepConfig, folder: Path):
    return make_submitit_executor(cfg.executor, cfg.slurm, folder, f"lsm-{cfg.kind}")


def make_submitit_executor(kind: str, s: SlurmParams, folder: Path, job_name: str):
    """A submitit executor: ``local`` processes, or ``slurm`` (``auto``: slurm when sbatch is on
    PATH) with the resources of ``s``."""
    import shutil

    import submitit

    if kind == "auto":
        kind = "slurm" if shutil.which("sbatch") else "local"
    if kind == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=s.timeout_min, tasks_per_node=s.tasks_per_node, nodes=1)
        return ex
    ex = submitit.SlurmExecutor(folder=str(folder))
    params = dict(
        nodes=s.nodes, ntasks_per_node=s.tasks_per_node, cpus_per_task=s.cpus_per_task,
        time=s.timeout_min, array_parallelism=s.array_parallelism, job_name=job_name,
        signal_delay_s=120,
    )
    if s.partition:
        params["partition"] = s.partition
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb}GB"
    if s.additional:
        params["additional_parameters"] = dict(s.additional)
    ex.update_parameters(**params)
    return ex


def run_sweep(cfg: SweepConfig, wait: bool = True) -> list[dict]:
    """Submit unfinished points; with ``wait`` gather every point's result into a table."""
    log = get_logger()
    points = expand(cfg)
    run = Path(cfg.run_dir)
    claim(cfg, points)
    todo = [(n, v, c) for n, v, c in points if not (run / n / "result.json").is_file()]
    log.info("sweep %s: %d point(s), %d to run", run, len(points), len(todo))
    jobs = []
    if todo:
        ex = make_executor(cfg, run / "submitit")
        out_field = KINDS[cfg.kind].out_field
        with scrubbed_environ(), ex.batch():  # jobs get their own rendezvous, not ours
            for n, _, c in todo:
                jobs.append((n, ex.submit(run_point, cfg.kind, to_dict(c), getattr(c, out_field))))
        atomic_write_json(run / "jobs.json", {n: j.job_id for n, j in jobs})
    if not wait:
        return []
    failures = []
    for n, j in jobs:
        try:
            res = j.results()[0]  # a multi-task point returns one result per task; rank 0's first
        except Exception as e:  # a failed point is reported; the others are still gathered
            failures.append(f"{n}: {failure_summary(j, e)}")
            continue
        if isinstance(res, dict) and res.get("preempted"):
            failures.append(f"{n}: preempted at step {res.get('step')} (checkpointed; run the sweep "
                            "again to resume it)")
    rows = gather(cfg, points)
    if failures:
        raise RuntimeError(f"sweep {run}: {len(failures)} point(s) failed: " + "; ".join(failures))
    return rows


def failure_summary(job, err: Exception, lines: int = 15) -> str:
    """The job's error plus the tail of its stderr log, so a failed point can be diagnosed from
    the exception alone (CI logs, sweep drivers that only print the error)."""
    msg = str(err).strip()
    head = msg.splitlines()[-1] if msg else repr(err)
    try:
        tail = Path(job.paths.stderr).read_text(errors="replace").strip().splitlines()[-lines:]
    except (OSError, AttributeError):
        tail = []
    return head + ("\n    " + "\n    ".join(tail) if tail else "")


def gather(cfg: SweepConfig, points: list) -> list[dict]:
    run = Path(cfg.run_dir)
    rows = []
    for n, values, _ in points:
        p = run / n / "result.json"
        if p.is_file():
            rows.append({"point": n, **values, **read_json(p)})
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(run / "results.csv", buf.getvalue())
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        atomic_write_text(run / "results.md", "\n".join(md) + "\n")
    return rows


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    return load_config(SweepConfig, path, overrides)


__all__ = ["KINDS", "SlurmParams", "SweepConfig", "expand", "gather", "load_sweep", "register_kind", "run_sweep"]
