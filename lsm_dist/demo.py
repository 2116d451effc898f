"""`lsm demo`: the whole pipeline from nothing, on models the project builds.

zoo (small Llama / Qwen2 / Gemma-3 models trained on generated tasks and their LoRA experts; or,
with ``--real``, the real pretrained SmolLM2-135M-Instruct and its LoRA experts) → weight corpus
→ VAE training (stage 1 autoencoder, stage 2 β-VAE) → merges (latent space, delta-decoded:
lerp, task arithmetic, TIES, self-merge, heterogeneous OT; the paper's direct decoding of
the VAE reconstruction and of the lerp for contrast; weight space: lerp, SLERP, task
arithmetic, TIES, DARE) → lm-eval on the held-out tasks (+ perplexity on a fixed English text)
→ one comparison table and how much of each expert's gain every merge keeps.

Every stage caches its output under ``out_dir`` (the zoo under ``zoo_dir``), so a re-run
after an interruption continues where it stopped. ``--quick`` uses the tiny zoo and short
runs (CI); the default preset targets ≤ 15 minutes and ``--real`` ≤ 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsm_dist.config import check, doc
from lsm_dist.console import begin_stage, echo, end_stage, progress
from lsm_dist.evaluate.tasks import DEFAULT_ZOO_MC, MC_TASKS
from lsm_dist.utils import atomic_write_text, get_logger

REPO = Path(__file__).resolve().parent.parent
LOG_NAME = "demo.log"  # in out_dir: everything the console does not show (console.session)
PRESETS = {
    # zoo config, base, two experts, held-out model (VAE generalization), hetero source
    "default": dict(zoo_config="configs/zoo/default.yaml", base="llama-base",
                    experts=["llama-shift", "llama-flip"], heldout="llama-reverse",
                    hetero_source="gemma3-base", stage1_steps=600, stage2_steps=200, eval_n=100,
                    eval_tasks=DEFAULT_ZOO_MC, ppl=False),
    "quick": dict(zoo_config="configs/zoo/tiny.yaml", base="llama-tiny-base",
                  experts=["llama-tiny-arith", "llama-tiny-reverse"], heldout=None,
                  hetero_source="qwen2-tiny-base", stage1_steps=60, stage2_steps=20, eval_n=24,
                  eval_tasks=MC_TASKS, ppl=True),  # the path, for CI
    "real": dict(zoo_config="configs/zoo/real.yaml", base="smollm2-135m",
                 experts=["smollm2-arith", "smollm2-reverse"], heldout=None, hetero_source=None,
                 stage1_steps=600, stage2_steps=100, eval_n=100,
                 eval_tasks=["lsm_arith_mc", "lsm_reverse_mc"], ppl=True,
                 # a 135M model costs ~1 CPU-minute per lm-eval run: the comparison that matters
                 merges=["vae-recon-direct", "latent-lerp", "latent-task-arith", "latent-ties",
                         "latent-self-merge", "weight-lerp", "weight-task-arith", "weight-ties",
                         "weight-dare"]),
}


@dataclass
class DemoConfig:
    out_dir: str | None = doc("demo run directory (corpus, VAE run, merges, eval); default "
                              "runs/demo (runs/demo-real with --real)", None)
    quick: bool = doc("tiny zoo and short runs (CI, ≤ 5 minutes)", False)
    real: bool = doc("the real pretrained SmolLM2-135M-Instruct and its LoRA experts "
                     "(configs/zoo/real.yaml; ≤ 30 minutes on 2 cores, cached)", False)
    zoo_dir: str | None = doc("where the zoo is built / reused (default: the zoo config's out_dir)", None)
    tokens: int = doc("tokens per sample of the corpus / VAE", 8)
    chunk: int = doc("values per token", 64)
    vae_config: str = doc("VAE architecture YAML", "configs/vae/demo.yaml")
    train_config: str = doc("trainer YAML (steps are set by the preset unless given here)", "configs/train/tiny.yaml")
    stage1_steps: int | None = doc("stage-1 (autoencoder) steps; None: the preset's", None)
    stage2_steps: int | None = doc("stage-2 (β-VAE) steps; None: the preset's", None)
    lambda_: float = doc("λ of the two-model lerp / slerp merges", 0.5)
    hetero_lambda: float = doc("λ of the heterogeneous OT merge (paper: 0.05-0.2)", 0.1)
    eval_n: int | None = doc("held-out test rows per task family; None: the preset's", None)
    eval_tasks: list[str] | None = doc("lm-eval tasks (None: the preset's multiple-choice tasks)", None)
    ppl: bool | None = doc("also score word perplexity on a fixed English text (lsm_english_ppl); "
                           "None: the preset's (on with --real and --quick, off for the zoo, whose "
                           "models are not English models)", None)

    def __post_init__(self) -> None:
        check(0.0 <= self.lambda_ <= 1.0, "lambda_", "must be in [0, 1]")
        check(0.0 <= self.hetero_lambda <= 1.0, "hetero_lambda", "must be in [0, 1]")
        check(not (self.quick and self.real), "real", "--quick and --real exclude each other")
        if self.eval_tasks is None:
            self.eval_tasks = list(self.preset["eval_tasks"])
        if self.ppl is None:
            self.ppl = self.preset["ppl"]
        if self.out_dir is None:
            self.out_dir = "runs/demo-real" if self.real else "runs/demo"

    @property
    def preset(self) -> dict:
        return PRESETS["quick" if self.quick else "real" if self.real else "default"]


def _stage(log, name: str):
    """Log ``name`` ("1/5 model zoo (build or reuse)") and start its console bar ("[1/5] model zoo")."""
    log.info("== %s", name)
    num, _, what = name.partition(" ")
    begin_stage(f"[{num}] {what.split(' (')[0]}".ljust(20))
    return time.perf_counter()


def _plans(cfg: DemoConfig, zoo: dict[str, Path], vae: Path) -> dict[str, dict]:
    p = cfg.preset
    base, (a, b) = p["base"], p["experts"]
    paths = {k: str(zoo[k]) for k in (base, a, b)}
    two = {"models": {a: paths[a], b: paths[b]}, "target": a}
    three = {"models": {base: paths[base], a: paths[a], b: paths[b]}, "target": base, "base": base, "inputs": [a, b]}
    direct = {"space": "latent", "decode": "direct"}  # the paper's W = D(z)
    delta = {"space": "latent", "decode": "delta"}  # W = W_target + D(z) - D(z_target)
    plans = {
        "vae-recon-direct": {**two, "method": "lerp", "params": {"lambda": 0.0}, **direct},
        "latent-lerp-direct": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, **direct},
        "latent-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, **delta},
        "latent-task-arith": {**three, "method": "task_arithmetic", "params": {"weights": [1.0, 1.0]}, **delta},
        "latent-ties": {**three, "method": "ties", "params": {"density": 0.5}, **delta},
        "latent-self-merge": {"models": {a: paths[a]}, "target": a, "method": "self_merge",
                              "params": {"samples": 8, "seed": 0}, **delta},
        "weight-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-slerp": {**two, "method": "slerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-task-arith": {**three, "method": "task_arithmetic", "params": {"weights": [1.0, 1.0]}, "space": "weight"},
        "weight-ties": {**three, "method": "ties", "params": {"density": 0.5}, "space": "weight"},
        "weight-dare": {**three, "method": "dare", "params": {"drop_p": 0.5, "seed": 0}, "space": "weight"},
    }
    if p["hetero_source"] in zoo:
        src = p["hetero_source"]
        plans["hetero-ot"] = {"models": {base: str(zoo[base]), src: str(zoo[src])}, "target": base,
                              "method": "lerp", "params": {"lambda": cfg.hetero_lambda}, **delta,
                              "layer_map": "proportional", "alignment": {"method": "gaussian", "reg": 1e-3}}
    if p.get("merges"):
        plans = {k: v for k, v in plans.items() if k in p["merges"]}
    out = Path(cfg.out_dir)
    for name, plan in plans.items():
        plan.update(vae=str(vae), out_dir=str(out / "merges" / name), cache_dir=str(out / "latent_cache"),
                    batch_size=4096, overwrite=True)  # the demo's own merge of earlier inputs
    return plans


def _drop_stale_vae_run(run_dir: Path, corpus: Path, log) -> None:
    """Remove the demo's VAE run if its checkpoints were trained on another corpus (the zoo
    changed since): resuming it is refused, and the demo wrote it. Anything else stays."""
    import shutil

    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.train.checkpointing import trained_corpus_digest
    from lsm_dist.train.loop import corpus_digest

    old = trained_corpus_digest(run_dir)
    if old is not None and old != corpus_digest(Corpus(corpus)):
        log.info("demo: %s was trained on another corpus (digest %s): training a new VAE", run_dir, old)
        shutil.rmtree(run_dir)


def run_demo(cfg: DemoConfig) -> int:
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.evaluate.run import EvalConfig, run_eval
    from lsm_dist.evaluate.tasks import PPL_TASK
    from lsm_dist.merge.plan import load_plan
    from lsm_dist.merge.run import run_merge
    from lsm_dist.train import load_train_config, run_train
    from lsm_dist.zoo import build_zoo, load_zoo_config, trained_tasks

    log = get_logger()
    p = cfg.preset
    out = Path(cfg.out_dir)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(log, "1/5 model zoo (build or reuse)")
    zoo_over = [f"out_dir={cfg.zoo_dir}"] if cfg.zoo_dir else []
    zoo = build_zoo(load_zoo_config(REPO / p["zoo_config"], zoo_over))
    timings["zoo"] = time.perf_counter() - t

    t = _stage(log, "2/5 weight corpus (lsm convert)")
    train_models = [p["base"], *p["experts"]]
    # overwrite: a corpus of an earlier zoo in the demo's own out_dir is replaced (convert only
    # removes files a conversion wrote); so are the VAE run and the merges made from it
    conv = dict(tokens=cfg.tokens, chunk=cfg.chunk, block_samples=256, shard_samples=1024, num_workers=2,
                overwrite=True)
    run_convert(ConvertConfig(models=[f"{m}={zoo[m]}" for m in train_models], out_dir=str(out / "corpus"), **conv))
    log.info("%s", Corpus(out / "corpus").summary())
    heldout = None
    if p["heldout"]:
        heldout = str(out / "corpus-heldout")
        run_convert(ConvertConfig(models=[f"{p['heldout']}={zoo[p['heldout']]}"], out_dir=heldout, **conv))
    timings["convert"] = time.perf_counter() - t

    t = _stage(log, "3/5 VAE training (stage 1 autoencoder, stage 2 beta-VAE)")
    s1 = cfg.stage1_steps or p["stage1_steps"]
    s2 = cfg.stage2_steps or p["stage2_steps"]
    tcfg = load_train_config(REPO / cfg.train_config, [
        f"corpus={out / 'corpus'}", f"run_dir={out / 'vae_run'}", f"model_config={REPO / cfg.vae_config}",
        f"stage1_steps={s1}", f"stage2_steps={s2}", f"ckpt_every={max(s1 + s2, 10) // 4}",
        f"val_every={max((s1 + s2) // 10, 5)}", f"log_every={max((s1 + s2) // 20, 5)}", "progress=true",
        *([f"heldout_corpus={heldout}"] if heldout else []),
    ])
    _drop_stale_vae_run(Path(tcfg.run_dir), out / "corpus", log)
    metrics = run_train(tcfg)
    vae = Path(metrics["vae"])
    log.info("VAE: %s (val recon %.4g)", vae, metrics.get("val/recon", float("nan")))
    timings["train"] = time.perf_counter() - t

    t = _stage(log, "4/5 merges (latent space and weight-space baselines)")
    plans_dir = out / "plans"
    merged: dict[str, Path] = {}
    plans = _plans(cfg, zoo, vae)
    # the retention table compares merges of both experts (not the one-model self-merge, nor OT)
    of_both = [n for n, pl in plans.items() if set(p["experts"]) <= set(pl["models"])]
    for name, plan in progress(plans.items(), unit="merge"):
        path = plans_dir / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(plan, sort_keys=False))
        merged[name] = run_merge(load_plan(path))
        log.info("merge %-18s -> %s", name, merged[name])
    timings["merge"] = time.perf_counter() - t

    t = _stage(log, "5/5 evaluation (lm-eval, held-out test splits" + (", English perplexity)" if cfg.ppl else ")"))
    models = {m: zoo[m] for m in train_models}
    ckpts = [f"{k}={v}" for k, v in {**models, **merged}.items()]
    tasks = list(cfg.eval_tasks) + ([PPL_TASK] if cfg.ppl else [])
    ecfg = EvalConfig(checkpoints=ckpts, tasks=tasks, out_dir=str(out / "eval"),
                      n=cfg.eval_n or p["eval_n"], batch_size=32, base=p["base"], experts=list(p["experts"]))
    eval_dir = Path(run_eval(ecfg))
    table = eval_dir / "results.md"
    timings["eval"] = time.perf_counter() - t
    end_stage()

    echo()
    echo(table.read_text())
    echo(retention_summary(eval_dir, p["base"], p["experts"], of_both, cfg.eval_tasks,
                           {e: trained_tasks(zoo[e]) for e in p["experts"]}))
    total = time.perf_counter() - t_all
    echo("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    echo(f"outputs: {out} (plans/, merges/<name>/model, eval/results.md|csv|png|_retention.png, vae_run/tb"
         f"{f', {LOG_NAME}: everything not shown here' if (out / LOG_NAME).is_file() else ''})")
    return 0


def retention_summary(eval_dir: Path, base: str, experts: list[str], merges: list[str],
                      tasks: list[str], trained: dict[str, list[str]] | None = None) -> str:
    """What every merge keeps of each expert's gain over the base on that expert's own task,
    ``(merge − base) / (expert − base)``, best first (the demo's last table). An expert's own
    task: the one of ``tasks`` it was fine-tuned on (``trained``: its zoo card's tasks), else
    the one where it gains most."""
    from lsm_dist.evaluate.report import gain_retention, own_tasks
    from lsm_dist.utils import read_json

    scored = read_json(eval_dir / "summary.json")["scored"]
    metrics = {n: read_json(p)["metrics"] for n, p in scored.items()}
    acc = {n: {t: float(m.get(f"{t}/acc", "nan")) for t in tasks} for n, m in metrics.items()}
    trained = trained or {}
    mine = [[t for t in tasks if any(t in (f"lsm_{x}_mc", f"lsm_{x}_gen") for x in trained.get(e, []))]
            for e in experts]
    own = dict(zip(experts, own_tasks(acc[base], [acc[e] for e in experts], tasks,
                                      [m[0] if len(m) == 1 else None for m in mine])))
    lines = ["how much of each expert's gain over the base a merge keeps, (merge - base) / (expert - base):",
             "| merge | " + " | ".join(f"{e} ({own[e]})" for e in experts) + " | min |",
             "|---|" + "---|" * (len(experts) + 1)]
    rows = []
    for n in merges:
        if n not in acc:
            continue
        keep = gain_retention(acc[base], [acc[e] for e in experts], acc[n], [own[e] for e in experts])
        rows.append((min(keep), n, keep))
    for worst, n, keep in sorted(rows, key=lambda r: -r[0] if r[0] == r[0] else 1e9):
        lines.append(f"| {n} | " + " | ".join(f"{k:.0%}" for k in keep) + f" | {worst:.0%} |")
    return "\n".join(lines) + "\n"
