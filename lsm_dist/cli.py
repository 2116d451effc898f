"""`lsm` — one entry point, one subcommand per stage.

Every stage takes ``--config FILE.yaml`` plus dotted ``key=value`` overrides on top, and
``--help-config`` lists its fields with their documentation. ``demo``, ``eval``, ``merge``,
``zoo`` and ``experiment`` keep a clean console (one progress bar per stage and the result):
everything else goes to a log file in their out_dir (``lsm_dist.console``); ``--verbose`` /
``-v`` or ``LSM_VERBOSE=1`` shows it all.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lsm_dist.config import ConfigError, describe, load_config, resolved_yaml, save_resolved

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (fields of the stage's config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokens=8 blocks=[attn]")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and overrides, print the resolved config and exit (runs nothing)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="full output on the console (also LSM_VERBOSE=1): every log line, library "
                   "progress bar and warning, instead of the log file in out_dir")


def _session(args, log_file: Path):
    """The command's console (``console.session``): quiet into ``log_file`` unless verbose."""
    from lsm_dist.console import session

    return session(log_file, verbose=True if getattr(args, "verbose", False) else None,
                   title="lsm " + " ".join(sys.argv[1:]))


def _dry(args, cfg) -> bool:
    """``--dry-run``: print the resolved config (as the stage would use it); True if so."""
    if not getattr(args, "dry_run", False):
        return False
    print(resolved_yaml(cfg), end="")
    return True


def _load(cls, args, default: Path | None = None):
    if args.help_config:
        print("\n".join(describe(cls)))
        sys.exit(0)
    path = args.config or (str(default) if default is not None and default.is_file() else None)
    return load_config(cls, path, args.overrides)


def cmd_zoo(args) -> int:
    from lsm_dist.zoo.build import ZooConfig, build_zoo, format_zoo_table

    cfg = _load(ZooConfig, args, CONFIGS / "zoo" / "default.yaml")
    if _dry(args, cfg):
        return 0
    with _session(args, Path(cfg.out_dir) / "zoo.log"):
        paths = build_zoo(cfg)
    print(format_zoo_table(paths))
    return 0


def cmd_convert(args) -> int:
    from lsm_dist.corpus.convert import finalize, prepare, run_convert, run_worker
    from lsm_dist.corpus.plan import ConvertConfig
    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.dist import read_env

    cfg = _load(ConvertConfig, args)
    if _dry(args, cfg):
        return 0
    if args.worker:  # one share of a parallel conversion (srun rank or Slurm array task)
        idx, count = read_env().worker_slot()
        prepare(cfg)
        n = run_worker(cfg.out_dir, idx, count)
        print(f"worker {idx}/{count}: wrote {n} shard(s)")
        return 0
    if args.finalize:
        finalize(cfg.out_dir)
    else:
        run_convert(cfg)
    print(Corpus(cfg.out_dir).summary())
    return 0


def cmd_verify(args) -> int:
    from lsm_dist.corpus.verify import verify_corpus

    print(verify_corpus(args.corpus, rebuild=args.rebuild))
    return 0


def cmd_stats(args) -> int:
    from lsm_dist.stats import StatsConfig, run_stats

    cfg = _load(StatsConfig, args)
    if _dry(args, cfg):
        return 0
    summary = run_stats(cfg)
    print(Path(summary).read_text())
    return 0


def cmd_train(args) -> int:
    """`lsm train [--config F] [k=v ...]` (also under torchrun / accelerate launch);
    `lsm train export RUN_DIR [--checkpoint DIR] [--out DIR]` writes the plain VAE."""
    from lsm_dist.train.__main__ import main as train_main

    if args.overrides[:1] == ["export"]:
        extra = [f"--{k}={v}" for k in ("checkpoint", "out") if (v := getattr(args, k))]
        return train_main(args.overrides + extra)
    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    return train_main(argv + (["--help-config"] if args.help_config else [])
                      + (["--dry-run"] if args.dry_run else []))


def cmd_demo(args) -> int:
    from lsm_dist.demo import LOG_NAME, DemoConfig, run_demo

    flags = [f for f in ("zoo", "quick", "real") if getattr(args, f)]
    if len(flags) > 1:
        print(f"lsm demo: --{' and --'.join(flags)} exclude each other", file=sys.stderr)
        return 2
    over = [*args.overrides, *(f"preset={f}" for f in flags)]
    cfg = _load(DemoConfig, argparse.Namespace(**{**vars(args), "overrides": over}))
    if _dry(args, cfg):
        return 0
    save_resolved(cfg, Path(cfg.out_dir) / "demo.resolved.yaml")
    with _session(args, Path(cfg.out_dir) / LOG_NAME):
        return run_demo(cfg)


def _load_plan(args):
    from lsm_dist.merge.plan import MergePlan, load_plan

    if args.help_config:
        print("\n".join(describe(MergePlan)))
        sys.exit(0)
    overrides = list(args.overrides)
    path = args.config
    if overrides and "=" not in overrides[0]:  # `lsm merge PLAN.yaml [k=v ...]`
        if path:
            raise ConfigError(f"give the plan once: --config {path} or {overrides[0]}, not both")
        path, overrides = overrides[0], overrides[1:]
    if overrides and "=" not in overrides[0]:  # `lsm merge CONFIG OUT`: mergekit-yaml's form and layout
        overrides = [f"out_dir={overrides[0]}", "layout=mergekit", *overrides[1:]]
    if not path:
        raise ConfigError("a merge plan is required: lsm merge PLAN.yaml (a plan or a mergekit config) "
                          "or --config PLAN.yaml")
    return load_plan(path, [*_mergekit_flags(args), *overrides])


def _mergekit_flags(args) -> list[str]:
    """mergekit-yaml's flags, as plan overrides (so lsm merge stands where mergekit-yaml stood)."""
    if getattr(args, "trust_remote_code", False):
        raise ConfigError("--trust-remote-code: lsm_dist never runs a model's own code; drop the flag")
    if getattr(args, "no_safe_serialization", False):
        raise ConfigError("--no-safe-serialization: lsm_dist writes safetensors only (never pickles)")
    out = []
    if getattr(args, "cuda", False):
        out.append("device=cuda")
    if getattr(args, "allow_crimes", False):
        out.append("allow_crimes=true")
    if getattr(args, "copy_tokenizer", None) is not None:
        out.append(f"copy_tokenizer={str(args.copy_tokenizer).lower()}")
    if getattr(args, "out_shard_size", None):  # mergekit counts parameters (1K / 5M / 5B): 2 bytes each
        m = re.fullmatch(r"\s*([0-9.]+)\s*([KkMmBb]?)\s*", args.out_shard_size)
        if m is None:
            raise ConfigError(f"--out-shard-size {args.out_shard_size!r}: a parameter count such as 5B, 500M or 1000000")
        n = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()]
        out.append(f"max_shard_size={int(n * 2)}")
    if getattr(args, "random_seed", None) is not None:
        out.append(f"params.seed={args.random_seed}")
    return out


def cmd_encode(args) -> int:
    from lsm_dist.dist import read_env
    from lsm_dist.merge import finalize_encode, prepare, run_encode

    plan = _load_plan(args)
    if _dry(args, plan):
        return 0
    rp = prepare(plan)
    if args.finalize:
        caches = finalize_encode(rp)
        print("\n".join(f"{m}: {c.dir}" for m, c in caches.items()))
        return 0
    worker = read_env().worker_slot() if args.worker else (0, 1)
    s = run_encode(rp, worker=worker, finalize=not args.worker)
    print(f"encode worker {worker[0]}/{worker[1]}: {s['encoded']} tensor(s) encoded, {s['reused']} reused")
    return 0


def cmd_merge(args) -> int:
    from lsm_dist.dist import read_env
    from lsm_dist.merge import prepare, run_decode, run_merge

    plan = _load_plan(args)
    if _dry(args, plan):
        return 0
    if args.worker:  # this rank's / array task's layer files (encode must be finalized)
        idx, count = read_env().worker_slot()
        s = run_decode(prepare(plan), worker=(idx, count))
        print(f"merge worker {idx}/{count}: {s['written']} layer file(s) written, {s['skipped']} already done")
        return 0
    from lsm_dist.merge.plan import WORK_DIR, check_out_dir

    check_out_dir(plan)  # before merge.log goes into out_dir: never into an input named as out_dir
    log_dir = Path(plan.out_dir) / (WORK_DIR if plan.layout == "mergekit" else "")
    with _session(args, log_dir / "merge.log"):
        model = run_merge(plan, bar=True)
    print(model)
    return 0


def cmd_assemble(args) -> int:
    from lsm_dist.merge import prepare, run_assemble

    plan = _load_plan(args)
    if _dry(args, plan):
        return 0
    print(run_assemble(prepare(plan)))
    return 0


def cmd_eval(args) -> int:
    """`lsm eval [--config F] [--model NAME=DIR ...] [checkpoints=[...]] [tasks=[...]] [k=v ...]`:
    score checkpoints with lm-eval (resumable); prints <out_dir>/results.md."""
    from lsm_dist.evaluate.run import EvalConfig, EvalError, run_eval

    cfg = _load(EvalConfig, args)
    cfg.checkpoints = [*cfg.checkpoints, *(args.model or [])]
    cfg.__post_init__()  # validate the names added by --model
    if _dry(args, cfg):
        return 0
    out = Path(cfg.out_dir)
    save_resolved(cfg, out / "eval.resolved.yaml")
    try:
        with _session(args, out / "eval.log"):
            run_eval(cfg)
    except EvalError as e:
        if (out / "results.md").is_file():
            print((out / "results.md").read_text())
        print(f"lsm eval: {e}", file=sys.stderr)
        return 1
    print((out / "results.md").read_text())
    return 0


def cmd_search(args) -> int:
    """`lsm search -c configs/search/<name>.yaml [k=v ...]`: evolve a merge recipe against
    lm-eval (CMA-ES and random search, submitit jobs, resumable); prints <out_dir>/results.md."""
    from lsm_dist.search import SearchConfig, run_search

    return _run_and_print(args, _load(SearchConfig, args), "search.log", run_search)


def _run_and_print(args, cfg, log_name: str, run) -> int:
    """``--dry-run``, or ``run(cfg)`` inside the console session of ``out_dir/log_name``, then
    print the report (a path) it returns."""
    if _dry(args, cfg):
        return 0
    with _session(args, Path(cfg.out_dir) / log_name):
        result = run(cfg)
    print(Path(result).read_text())
    return 0


def cmd_experiment(args) -> int:
    """`lsm experiment -c configs/experiments/<name>.yaml [--quick] [k=v ...]`: one of the
    paper's experiments at small scale; prints <out_dir>/results.md."""
    from lsm_dist.experiments import ExperimentConfig, load_experiment_config, run_experiment

    if args.help_config:
        print("\n".join(describe(ExperimentConfig)))
        return 0
    cfg = load_experiment_config(args.config, [*args.overrides, *(["quick=true"] if args.quick else [])])
    return _run_and_print(args, cfg, "experiment.log", run_experiment)


def cmd_hidden_merge(args) -> int:
    """`lsm hidden-merge [-c F] models=[A,B] [op=slerp layers=[2,3] alpha=0.5 tasks=[...] ...]`:
    inference-time merge by mixing hidden states, with metrics vs a weight merge; prints
    <out_dir>/report.md."""
    from lsm_dist.hidden.run import HiddenMergeConfig, run_hidden_merge

    cfg = _load(HiddenMergeConfig, args)
    if _dry(args, cfg):
        return 0
    run_hidden_merge(cfg)
    print((Path(cfg.out_dir) / "report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsm", description="LS-Merge at cluster scale")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("zoo", help="build (or reuse) the small trained model zoo")
    _add_common(s)
    s.set_defaults(func=cmd_zoo)

    s = sub.add_parser("convert", help="checkpoints -> weight corpus (WebDataset shards + manifest)")
    _add_common(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--worker", action="store_true", help="write only this rank's / array task's shards")
    g.add_argument("--finalize", action="store_true", help="write manifest.json once every shard exists")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("verify", help="check a corpus: manifest, sizes, sha256 (and rebuild tensors)")
    s.add_argument("corpus")
    s.add_argument("--rebuild", action="store_true",
                   help="also rebuild every tensor, bit for bit against its source checkpoint when present")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("stats", help="weight statistics per tensor (paper Table 1 / Fig. 2)")
    _add_common(s)
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("train", help="train the VAE (DeepSpeed ZeRO via accelerate); `train export RUN_DIR`")
    _add_common(s)
    s.add_argument("--checkpoint", help="export: step directory (default: the newest complete one)")
    s.add_argument("--out", help="export: output directory (default: RUN_DIR/vae)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("encode", help="merge plan: encode its models into cached per-tensor latents")
    _add_common(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--worker", action="store_true", help="encode only this rank's / array task's tensors")
    g.add_argument("--finalize", action="store_true", help="check every tensor is encoded, write manifests")
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("merge", help="run a merge plan or mergekit config (lsm merge PLAN.yaml [k=v ...]): "
                       "encode -> merge -> decode -> assemble")
    _add_common(s)
    s.add_argument("--worker", action="store_true",
                   help="only this rank's / array task's layer files (after `lsm encode --finalize`)")
    mk = s.add_argument_group("mergekit-yaml's flags (lsm merge CONFIG OUT stands where mergekit-yaml CONFIG OUT did)")
    mk.add_argument("--cuda", action="store_true", help="device=cuda")
    mk.add_argument("--allow-crimes", action="store_true", help="allow_crimes=true")
    mk.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=None,
                    help="copy the target's tokenizer (the default)")
    mk.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="copy_tokenizer=false")
    mk.add_argument("--out-shard-size", help="max_shard_size (e.g. 5B, 2GB)")
    mk.add_argument("--random-seed", type=int, help="params.seed (the random methods' seed)")
    mk.add_argument("--trust-remote-code", action="store_true", help="refused: no model code is ever run")
    mk.add_argument("--no-safe-serialization", action="store_true", help="refused: safetensors only")
    for flag in ("--lazy-unpickle", "--no-write-model-card", "--clone-tensors", "--safe-serialization",
                 "--low-cpu-memory", "--lazy-loader", "--quiet", "--read-to-gpu"):
        mk.add_argument(flag, action="store_true", help="accepted, no effect here")
    mk.add_argument("--lora-merge-cache", help="accepted, no effect here (adapters are applied lazily)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("assemble", help="merged layer files + target -> checked HF checkpoint")
    _add_common(s)
    s.set_defaults(func=cmd_assemble)

    s = sub.add_parser("eval", help="score checkpoints with lm-eval: tables, plot, TensorBoard")
    _add_common(s)
    s.add_argument("--model", "-m", action="append", metavar="NAME=DIR",
                   help="a checkpoint to score (repeatable; added to checkpoints=[...])")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("demo", help="the end-to-end demo: the real SmolLM2-135M-Instruct and its "
                       "LoRA experts, merged in weight and latent space, scored, with verdicts")
    _add_common(s)
    s.add_argument("--zoo", action="store_true",
                   help="the small zoo trained here from scratch (a fast look; its scores depend on the CPU)")
    s.add_argument("--quick", action="store_true", help="tiny zoo, short runs (CI: the code path)")
    s.add_argument("--real", action="store_true", help="the real model (the default; kept for old scripts)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("search", help="evolve a merge recipe against lm-eval (CMA-ES / random search, "
                       "submitit jobs, resumable)")
    _add_common(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("experiment", help="a paper experiment at small scale: table, CSV, plot")
    _add_common(s)
    s.add_argument("--quick", action="store_true", help="tiny zoo, few steps (tests / CI)")
    s.set_defaults(func=cmd_experiment)

    s = sub.add_parser("hidden-merge", help="inference-time merge: mix hidden states (lerp/slerp/regmean)")
    _add_common(s)
    s.set_defaults(func=cmd_hidden_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"lsm {args.command}: invalid config: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lsm {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # disk full, symlink loops, permissions: no traceback
        from lsm_dist.errors import os_error_message

        msg = os_error_message(e)
        if msg is None:
            raise
        print(f"lsm {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
