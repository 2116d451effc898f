"""`lsm eval`: score checkpoints with lm-eval, resumably, and compare them.

``run_eval(EvalConfig(checkpoints=["base=runs/zoo/llama-base", "runs/merged"]))``:

1. writes the project's task folder (``<out>/tasks/``, see ``evaluate.tasks``) and checks every
   task name with lm-eval's ``TaskManager`` *before* loading any model: an unknown name fails
   listing the closest known names. ``lsm_*`` names resolve in the generated folder (and
   ``include_path``) only, which needs no scan of lm-eval's ~15k bundled YAML files; any
   other name (mmlu, arc_easy, hellaswag, winogrande, gsm8k, ...) passes through unchanged to
   lm-eval's registry (its datasets need the hub, or a populated HF cache);
2. per checkpoint: resolves the path once (symlinks followed: the directory fingerprinted is
   the one loaded and recorded), checks the files (config.json, every safetensors shard named
   by the index, every header entry; pickle weights such as ``pytorch_model.bin`` are refused),
   and, unless cached, refuses weights holding NaN/Inf (naming file and tensor), loads the
   model itself (``checkpoint.load_causal_lm``: ``trust_remote_code=False``, safetensors only)
   and scores the *object* through lm-eval's ``HFLM`` -- no path is ever pasted into an
   lm-eval ``model_args`` string, where a comma would inject arguments. A checkpoint whose
   files change while it is loaded is refused. Results go to
   ``<out>/results/<name>-<digest>.json`` atomically right away. The digest covers
   the checkpoint (config.json, index, safetensors headers and file size + mtime, or with
   ``fingerprint=content`` the sha256 of every weight file; the tokenizer / generation files'
   sha256) and what is scored (tasks and their generated content, limit, few-shot, dtype,
   seed), so a re-run skips finished checkpoints;
3. a checkpoint that fails (missing dir, corrupt weights, bad config, error while scoring) is
   logged naming it, the others are still scored, and ``EvalError`` listing the failures is
   raised at the end -- after ``<out>/results.{md,csv,png}`` and ``<out>/tb/`` are written for
   the checkpoints that were scored;
4. the reports are cumulative: this call's checkpoints, then every other checkpoint cached in
   ``<out>/results/`` with the same scoring settings (``report.cumulative_rows``; results.md says
   how many came from this call; ``summary.json``: ``scored`` = this call, ``table`` = all rows);
   each scored checkpoint with an lsm_dist model card gets its results table in its README.md.

``evaluate_model(model, tokenizer, tasks)`` scores an in-memory module (e.g. a hidden-state
merger behind ``MergedCausalLM``) through lm-eval's ``HFLM``.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import re
import tempfile
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lsm_dist.checkpoint import (
    AUX_FILES,
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
    load_causal_lm,
    load_tokenizer,
    read_safetensors_header,
)
from lsm_dist.config import ConfigError, check, check_choice, doc
from lsm_dist.console import progress
from lsm_dist.evaluate import report
from lsm_dist.evaluate.tasks import GROUP, PREFIX, tasks_digest, write_tasks
from lsm_dist.merge.card import record_scores
from lsm_dist.utils import atomic_write_json, get_logger, read_json, sha256_file, sha256_json

log = get_logger("lsm.eval")
DTYPES = ("auto", "float32", "float16", "bfloat16")
FINGERPRINTS = ("stat", "content")
EVAL_VERSION = 2  # bump when scoring changes results (enters the digests)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class EvalError(RuntimeError):
    """Some checkpoints could not be scored; ``failures`` maps name → message."""

    def __init__(self, failures: dict[str, str], scored: Sequence[str] = ()):
        self.failures = dict(failures)
        lines = [f"  {n}: {msg}" for n, msg in self.failures.items()]
        done = f"; scored: {', '.join(scored)}" if scored else ""
        super().__init__(f"{len(failures)} checkpoint(s) failed{done}\n" + "\n".join(lines))


@dataclasses.dataclass
class EvalConfig:
    checkpoints: list[str] = doc("checkpoints to score: NAME=PATH or PATH (name = dir name)",
                                 factory=list)  # fmt: skip
    tasks: list[str] = doc("lm-eval task / group / tag names; lsm_* from the generated folder, "
                           "anything else passes to lm-eval's registry", factory=lambda: [GROUP])  # fmt: skip
    out_dir: str = doc("run directory: tasks/, results/, results.{md,csv,png}, tb/", "runs/eval")
    num_fewshot: int | None = doc("few-shot examples per prompt (null = each task's default)", None)
    limit: int | float | None = doc(
        "max docs per task (a float < 1 is a fraction); null = all", None
    )
    batch_size: int | str = doc("lm-eval batch size, or 'auto'", 16)
    device: str = doc("cpu | cuda | cuda:N | mps", "cpu")
    dtype: str = doc("weights dtype for scoring: auto | float32 | float16 | bfloat16", "auto")
    seed: int = doc(
        "seed of lm-eval's python / numpy / torch / few-shot RNGs and of the test rows", 0
    )
    n: int = doc("test rows per family in the generated lsm_* tasks", 100)
    rows: str = doc("which rows the generated lsm_* tasks score: test (held out) | validation (train-split "
                    "items: what a search tunes on, so the test rows stay unseen)", "test")
    max_gen_toks: int = doc("max generated tokens in the lsm_*_gen tasks", 8)
    include_path: list[str] = doc("extra folders of lm-eval task YAMLs", factory=list)
    include_defaults: bool = doc("also resolve names in lm-eval's bundled task registry", True)
    allow_task_code: bool = doc("run the Python code task files name (lm-eval's `!function` tags, "
                                "`trust_remote_code`): task folders and YAML handed in are code; "
                                "without this they are refused, naming the file and line", False)
    fingerprint: str = doc("checkpoint digest: stat (headers, sizes, mtimes) | content (sha256)",
                           "stat")  # fmt: skip
    bootstrap_iters: int = doc("lm-eval bootstrap iterations for non-mean metrics' stderr", 1000)
    log_samples: bool = doc("keep per-sample outputs in the result JSON files", False)
    progress: bool = doc("show a progress bar over checkpoints", True)
    base: str | None = doc("name of the base checkpoint the merges start from (for the "
                           "retention plot; optional)", None)  # fmt: skip
    experts: list[str] = doc("names of the expert checkpoints: with them, results_retention.png "
                             "shows each other checkpoint's score as a fraction of the best expert "
                             "per task", factory=list)  # fmt: skip

    def __post_init__(self):
        check(bool(self.tasks), "tasks", "needs at least one task")
        check_choice(self.rows, "rows", ("test", "validation"))
        check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0")
        bs = self.batch_size
        check((isinstance(bs, int) and bs > 0) or (isinstance(bs, str) and bs.startswith("auto")),
              "batch_size", f"{bs!r} must be a positive int or 'auto'")  # fmt: skip
        check(self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
              f"{self.device!r} is not cpu | cuda | cuda:N | mps")  # fmt: skip
        check_choice(self.dtype, "dtype", DTYPES)
        check_choice(self.fingerprint, "fingerprint", FINGERPRINTS)
        check(self.n > 0, "n", "must be > 0")
        check(self.max_gen_toks > 0, "max_gen_toks", "must be > 0")
        check(self.bootstrap_iters >= 0, "bootstrap_iters", "must be >= 0")
        names = [n for n, _ in parse_checkpoints(self.checkpoints)]
        for field, given in (("base", [self.base] if self.base else []), ("experts", self.experts)):
            unknown = [x for x in given if x not in names]
            check(not unknown or not names, field,
                  f"{unknown} not among the checkpoints' names {names}")  # fmt: skip


def parse_checkpoints(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` / ``PATH`` → ``[(name, path)]``; names must be unique file-name safe."""
    out: list[tuple[str, Path]] = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s.rstrip("/")).name, s
        check(bool(_NAME_RE.match(name)), "checkpoints", f"{name!r} (from {s!r}) is not a plain "
              "name: letters, digits, . _ + - (write NAME=PATH)")  # fmt: skip
        check(bool(path), "checkpoints", f"{s!r} has an empty path")
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, "checkpoints", f"duplicate names {dup}; write NAME=PATH")
    return out


# --------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | Path) -> Path:
    """The real path of a checkpoint directory (symlinks followed, once): what is
    fingerprinted, loaded and recorded. ``CheckpointError`` for a missing path or a loop. A
    GGUF file (``*.gguf``, ``PACKAGE:FILE.gguf``) is scored as its cached safetensors import."""
    from lsm_dist.zoo.gguf import import_cached, is_gguf_ref

    if is_gguf_ref(path):
        path = import_cached(str(path))
    try:
        real = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a directory (it does not exist)") from None
    except (OSError, RuntimeError) as e:  # ELOOP; RuntimeError("Symlink loop") before 3.13
        raise CheckpointError(f"{path}: cannot resolve it (symlink loop?): {e}") from None
    if not real.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    return real


def file_identity(path: Path) -> dict[str, list[int]]:
    """(device, inode, size, mtime) of every file in the directory: compared before and
    after loading, so a checkpoint swapped or rewritten meanwhile is never scored."""
    out = {}
    for p in sorted(path.iterdir()):
        try:
            st = p.stat()
        except OSError:
            continue
        if not p.is_dir():
            out[p.name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return out


def checkpoint_fingerprint(path: str | Path, mode: str = "stat") -> dict[str, Any]:
    """Check a HF checkpoint dir and describe it (what its digest is made of).

    Raises ``CheckpointError`` naming the problem: no directory, no / bad ``config.json``,
    an index naming missing shards, no safetensors weights (pickle files are never loaded), or
    a truncated / corrupt safetensors file (every header entry is checked).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CheckpointError(f"{cfg_file} has no model_type")
    fp: dict[str, Any] = {"config": sha256_json(cfg), "files": {}}
    # the files that make the checkpoint: the one rule every reader shares (checkpoint.Checkpoint:
    # the index's shards, else model.safetensors, else every *.safetensors; an index beside a
    # model.safetensors it does not list is refused; pickle weights are never read)
    with Checkpoint(path) as ck:
        files = sorted({Path(t.file).name for t in ck.tensors.values()})
        bad = ck.weight_dtype_problems()
    if bad:
        raise CheckpointError(f"{path}: {bad[0]}")
    index = path / INDEX_NAME
    if index.is_file():
        fp["index"] = sha256_json(json.loads(index.read_text())["weight_map"])
    for f in files:
        p = path / f
        st = p.stat()
        entry: dict[str, Any] = {"size": st.st_size, "header": sha256_json(read_safetensors_header(p)[0])}
        if mode == "content":
            entry["sha256"] = sha256_file(p)
        else:
            entry["mtime_ns"] = st.st_mtime_ns
        fp["files"][f] = entry
    fp["aux"] = {n: sha256_file(path / n) for n in AUX_FILES if n != "config.json" and (path / n).is_file()}
    return fp


# --------------------------------------------------------------------------- tasks
@lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], include_defaults: bool, _digest: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


_CODE = re.compile(r"!function\b|\btrust_remote_code\b")
_INCLUDE = re.compile(r"^\s*include\s*:\s*['\"]?([^'\"#\s]+)")


def task_code_lines(paths: Sequence[str | Path]) -> list[str]:
    """``FILE:LINE: text`` of every line in the task YAML under ``paths`` (folders searched as
    lm-eval does, files as given, and every file their ``include:`` names) that makes lm-eval
    run code: a ``!function`` tag (it imports the module beside the file and calls it) or
    ``trust_remote_code`` (a dataset's own loading script)."""
    todo = []
    for p in map(Path, paths):
        todo += sorted(p.rglob("*.y*ml")) if p.is_dir() else [p]
    seen, out = set(), []
    while todo:
        f = todo.pop(0)
        key = f.resolve() if f.exists() else f
        if key in seen or not f.is_file():
            continue
        seen.add(key)
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _CODE.search(line.split("#", 1)[0]):
                out.append(f"{f}:{i}: {line.strip()}")
            m = _INCLUDE.match(line)
            if m:
                todo.append((f.parent / m.group(1)) if not Path(m.group(1)).is_absolute() else Path(m.group(1)))
    return out


def check_task_code(tasks: Sequence[str], include_path: Sequence[str], allow: bool) -> None:
    """Refuse task files handed in that would run code, unless ``allow`` (module doc, trust model)."""
    given = [*include_path, *(t for t in tasks if t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    lines = task_code_lines(given)
    if lines and not allow:
        raise ConfigError("tasks: task files handed in would run Python code (lm-eval imports and calls "
                          f"it): {'; '.join(lines[:3])}{' ...' if len(lines) > 3 else ''} -- lsm eval runs no "
                          "code it is handed; set allow_task_code=true if you wrote these files and trust them")
    if lines:
        log.warning("eval: allow_task_code: running the code these task files name: %s", "; ".join(lines[:3]))


def resolve_tasks(tasks: Sequence[str], tasks_dir: str | Path, include_path: Sequence[str] = (),
                  include_defaults: bool = True):  # fmt: skip
    """A ``TaskManager`` that knows every name in ``tasks``, else ``ConfigError`` listing the
    closest known names. ``lsm_*`` names and ``include_path`` folders need no scan of
    lm-eval's bundled tasks; other names do (once per process, ~15 s)."""
    paths = tuple(str(Path(p).resolve()) for p in (tasks_dir, *include_path))
    digest = tasks_digest(tasks_dir)
    names = [t for t in tasks if not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    tm = _manager(paths, False, digest)
    missing = [t for t in names if t not in tm.all_tasks]
    full = include_defaults and any(not t.startswith(PREFIX) for t in missing)
    if full:
        tm = _manager(paths, True, digest)
        missing = [t for t in names if t not in tm.all_tasks]
    if missing:
        known = tm.all_tasks
        msgs = []
        for t in missing:
            close = difflib.get_close_matches(t, known, n=5, cutoff=0.6)
            msgs.append(f"{t!r} (closest: {', '.join(close) if close else 'none'})")
        where = ("the generated lsm_* tasks" + (", include_path" if include_path else "")
                 + (" and lm-eval's registry" if full else ""))  # fmt: skip
        raise ConfigError(f"tasks: unknown task name(s) {'; '.join(msgs)} -- searched {where}")
    return tm


def _load_tasks_once(tm, tasks: Sequence[str]) -> None:
    """Load every task's dataset before any model (fails fast e.g. offline hub tasks)."""
    try:
        tm.load(list(tasks))
    except Exception as e:
        raise ConfigError(f"tasks: could not load {list(tasks)}: {type(e).__name__}: {e} "
                          "(hub tasks need network or a populated HF datasets cache)") from None  # fmt: skip


# --------------------------------------------------------------------------- scoring
def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def _simple_evaluate(model: Any, tasks: Sequence[str], tm, *,
                     num_fewshot, limit, batch_size, device, seed, bootstrap_iters,
                     log_samples) -> dict:  # fmt: skip
    import lm_eval

    res = lm_eval.simple_evaluate(
        model=model, tasks=list(tasks), task_manager=tm,  # an LM object: no model_args string
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )  # fmt: skip
    if res is None:  # only on non-zero ranks of a distributed lm-eval run
        raise RuntimeError("lm-eval returned no results on this rank")
    return _jsonable(dict(res))


def score_checkpoint(path: Path, cfg: EvalConfig, tm, tasks: Sequence[str],
                     identity: dict | None = None) -> dict:  # fmt: skip
    """lm-eval results (JSON-safe) of one checkpoint dir, scored as an in-memory ``HFLM``.

    Refuses (``CheckpointError`` naming file and tensor) weights holding NaN/Inf, and a
    directory whose files differ from ``identity`` (:func:`file_identity` taken when it was
    fingerprinted) once the model is loaded."""
    with Checkpoint(path) as ck:
        ck.check_finite()
    model = load_causal_lm(path, _torch_dtype(cfg.dtype)).to(cfg.device).eval()
    tok = load_tokenizer(path)
    if identity is not None and file_identity(Path(path)) != identity:
        raise CheckpointError(f"{path}: files changed while it was being loaded; not scored")
    return _score_lm(model, tok, tasks, tm, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                     batch_size=cfg.batch_size, seed=cfg.seed, bootstrap_iters=cfg.bootstrap_iters,
                     log_samples=cfg.log_samples)  # fmt: skip


def _torch_dtype(name: str):
    import torch

    return name if name == "auto" else getattr(torch, name)


def _score_lm(model, tokenizer, tasks: Sequence[str], tm, *, max_length: int | None = None,
              batch_size: int | str, **kw) -> dict:  # fmt: skip
    """Score an in-memory model through lm-eval's ``HFLM`` (an object, never a path string)."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return _simple_evaluate(lm, tasks, tm, batch_size=batch_size, device=None, **kw)


def default_task_root() -> Path:
    return Path(tempfile.gettempdir()) / "lsm_eval"


def evaluate_model(model, tokenizer, tasks: Sequence[str] = (GROUP,), *,
                   task_root: str | Path | None = None, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int | str = 16, seed: int = 0,
                   n: int = 100, max_gen_toks: int = 8, include_path: Sequence[str] = (),
                   include_defaults: bool = True, bootstrap_iters: int = 1000,
                   log_samples: bool = False, max_length: int | None = None) -> dict:  # fmt: skip
    """Score an in-memory causal LM (a ``PreTrainedModel`` or a module with the same
    interface, e.g. ``MergedCausalLM``) with lm-eval's ``HFLM``; returns the JSON-safe
    lm-eval results (``report.flatten_results`` gives ``{"task/metric": value}``).
    Generated tasks go to ``task_root/tasks`` (default: ``$TMPDIR/lsm_eval``)."""
    tasks_dir = write_tasks(task_root or default_task_root(), n, seed, max_gen_toks=max_gen_toks)
    tm = resolve_tasks(tasks, tasks_dir, include_path, include_defaults)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return _score_lm(model, tokenizer, tasks, tm, max_length=max_length, num_fewshot=num_fewshot,
                         limit=limit, batch_size=batch_size, seed=seed,
                         bootstrap_iters=bootstrap_iters, log_samples=log_samples)  # fmt: skip
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the run
def result_path(out_dir: str | Path, name: str, digest: str) -> Path:
    return Path(out_dir) / "results" / f"{name}-{digest[:16]}.json"


OUT_MARKER = "lsm_eval.json"  # in out_dir: written by lsm eval, so its reports are its own
REPORT_FILES = ("results.md", "results.csv", "results.png", "results_retention.png", "results_lambda.png",
                "summary.json")


def claim_out_dir(out: Path) -> None:
    """``out`` is lsm eval's (its marker), or new: a report file there that lsm eval did not
    write is never replaced. An out_dir of an older version (no marker) is recognized by its
    own summary.json (``scored`` / ``table`` naming result files under ``results/``)."""
    marker = out / OUT_MARKER
    if marker.is_file():
        return
    present = [out / f for f in REPORT_FILES if (out / f).exists() or (out / f).is_symlink()]
    if present:
        try:
            summary = read_json(out / "summary.json")
            ours = (isinstance(summary, dict) and isinstance(summary.get("scored"), dict)
                    and isinstance(summary.get("table"), dict)
                    and all((out / "results").resolve() in Path(str(v)).resolve().parents
                            for v in summary["scored"].values()))
        except (OSError, ValueError):
            ours = False
        if not ours or any(p.is_symlink() for p in present):
            raise ConfigError(f"out_dir: {present[0]} was not written by lsm eval (no {OUT_MARKER} in {out}) "
                              "and would be replaced: move it away or choose another out_dir")
    atomic_write_json(marker, {"written_by": "lsm eval", "reports": list(REPORT_FILES)})


def _cached(path: Path, digest: str) -> dict | None:
    try:
        rec = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("digest") == digest else None


def run_eval(cfg: EvalConfig) -> Path:
    """Score every checkpoint of ``cfg`` (reusing cached results); returns ``cfg.out_dir``.
    Raises ``EvalError`` at the end if any checkpoint failed (the rest are still scored)."""
    ckpts = parse_checkpoints(cfg.checkpoints)
    check(bool(ckpts), "checkpoints", "needs at least one NAME=PATH or PATH")
    check_task_code(cfg.tasks, cfg.include_path, cfg.allow_task_code)
    out = Path(cfg.out_dir)
    claim_out_dir(out)
    tasks_dir = write_tasks(out, cfg.n, cfg.seed, max_gen_toks=cfg.max_gen_toks, rows=cfg.rows)
    tm = resolve_tasks(cfg.tasks, tasks_dir, cfg.include_path, cfg.include_defaults)
    _load_tasks_once(tm, cfg.tasks)
    scoring = {
        "tasks": list(cfg.tasks), "tasks_digest": tasks_digest(tasks_dir),
        "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "dtype": cfg.dtype,
        "seed": cfg.seed, "eval_version": EVAL_VERSION,
    }  # fmt: skip
    rows: list[dict] = []
    failures: dict[str, str] = {}
    bar = progress(ckpts, desc="eval", unit="ckpt", disable=not cfg.progress)
    for name, path in bar:
        bar.set_postfix_str(name)
        try:
            path = resolve_checkpoint(path)
            identity = file_identity(path)
            fp = checkpoint_fingerprint(path, cfg.fingerprint)
        except (CheckpointError, OSError) as e:
            failures[name] = f"cannot load checkpoint: {e}"
            log.error("eval: %s: %s", name, failures[name])
            continue
        digest = sha256_json({"checkpoint": fp, "scoring": scoring})
        rpath = result_path(out, name, digest)
        rec = _cached(rpath, digest)
        if rec is not None:
            log.info("eval: %s: cached %s", name, rpath.name)
        else:
            t0 = time.perf_counter()
            try:
                res = score_checkpoint(path, cfg, tm, cfg.tasks, identity=identity)
            except CheckpointError as e:  # NaN/Inf weights, files changed while loading
                failures[name] = f"not scored: {e}"
                log.error("eval: %s: %s", name, failures[name])
                continue
            except Exception as e:  # noqa: BLE001 -- report it, score the others
                failures[name] = f"scoring {path} failed: {type(e).__name__}: {e}"
                log.error("eval: %s: %s", name, failures[name])
                continue
            finally:
                gc.collect()
                _empty_cuda_cache(cfg.device)
            rec = {
                "name": name, "path": str(path), "digest": digest,
                "seconds": round(time.perf_counter() - t0, 2), "scoring": scoring,
                "fingerprint": fp, "metrics": report.flatten_results(res), "lm_eval": res,
            }  # fmt: skip
            atomic_write_json(rpath, rec)
            log.info("eval: %s scored in %.1fs -> %s", name, rec["seconds"], rpath)
        rows.append(rec)
    table = report.cumulative_rows(out, rows, scoring)  # cumulative over out_dir/results/
    report.write_reports(table, out, base=cfg.base, experts=cfg.experts)
    record_scores(table)  # results into the model cards lsm_dist wrote
    atomic_write_json(out / "summary.json", {
        "scored": {r["name"]: str(result_path(out, r["name"], r["digest"])) for r in rows},
        "table": {r["name"]: {"result": str(result_path(out, r["name"], r["digest"])), "from": r["from"]}
                  for r in table},
        "failures": failures,
    })  # fmt: skip
    if failures:
        raise EvalError(failures, [r["name"] for r in rows])
    return out


def _empty_cuda_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
