"""`lsm demo`: the whole pipeline from nothing, on the small model zoo the project builds.

zoo (train small Llama / Qwen2 / Gemma-3 models and task experts) → weight corpus of the
Llama family → VAE training (stage 1 autoencoder, stage 2 β-VAE) → merges (latent: VAE
reconstruction, lerp, soup, self-merge, heterogeneous OT; weight space: lerp, soup, SLERP,
task arithmetic, TIES, DARE) → lm-eval on the zoo's held-out tasks → one comparison table.

Every stage caches its output under ``out_dir`` (the zoo under ``zoo_dir``), so a re-run
after an interruption continues where it stopped. ``--quick`` uses the tiny zoo and short
runs (CI); the default preset targets ≤ 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsm_dist.config import check, doc
from lsm_dist.utils import atomic_write_text, get_logger

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # zoo config, base, two experts, held-out model (VAE generalization), hetero source
    "default": dict(zoo_config="configs/zoo/default.yaml", base="llama-base",
                    experts=["llama-arith", "llama-recall"], heldout="llama-reverse",
                    hetero_source="gemma3-base", stage1_steps=600, stage2_steps=200, eval_n=100),
    "quick": dict(zoo_config="configs/zoo/tiny.yaml", base="llama-tiny-base",
                  experts=["llama-tiny-arith", "llama-tiny-reverse"], heldout=None,
                  hetero_source="qwen2-tiny-base", stage1_steps=60, stage2_steps=20, eval_n=24),
}


@dataclass
class DemoConfig:
    out_dir: str = doc("demo run directory (corpus, VAE run, merges, eval)", "runs/demo")
    quick: bool = doc("tiny zoo and short runs (CI, ≤ 5 minutes)", False)
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
    eval_tasks: list[str] = doc("lm-eval tasks (default: the zoo's multiple-choice tasks)",
                                factory=lambda: ["lsm_arith_mc", "lsm_recall_mc", "lsm_reverse_mc"])

    def __post_init__(self) -> None:
        check(0.0 <= self.lambda_ <= 1.0, "lambda_", "must be in [0, 1]")
        check(0.0 <= self.hetero_lambda <= 1.0, "hetero_lambda", "must be in [0, 1]")

    @property
    def preset(self) -> dict:
        return PRESETS["quick" if self.quick else "default"]


def _stage(log, name: str):
    log.info("== %s", name)
    return time.perf_counter()


def _plans(cfg: DemoConfig, zoo: dict[str, Path], vae: Path) -> dict[str, dict]:
    p = cfg.preset
    base, (a, b) = p["base"], p["experts"]
    paths = {k: str(zoo[k]) for k in (base, a, b)}
    two = {"models": {a: paths[a], b: paths[b]}, "target": a}
    three = {"models": {base: paths[base], a: paths[a], b: paths[b]}, "target": a, "base": base, "inputs": [a, b]}
    plans = {
        "vae-recon": {**two, "method": "lerp", "params": {"lambda": 0.0}, "space": "latent"},
        "latent-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, "space": "latent"},
        "latent-soup": {**two, "method": "soup", "params": {"weights": [0.5, 0.5]}, "space": "latent"},
        "latent-self-merge": {"models": {a: paths[a]}, "target": a, "method": "self_merge",
                              "params": {"samples": 8, "seed": 0}, "space": "latent"},
        "latent-ties": {**three, "method": "ties", "params": {"density": 0.5}, "space": "latent"},
        "weight-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-soup": {**two, "method": "soup", "params": {"weights": [0.5, 0.5]}, "space": "weight"},
        "weight-slerp": {**two, "method": "slerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-task-arith": {**three, "method": "task_arithmetic", "params": {"weights": [1.0, 1.0]}, "space": "weight"},
        "weight-ties": {**three, "method": "ties", "params": {"density": 0.5}, "space": "weight"},
        "weight-dare": {**three, "method": "dare", "params": {"drop_p": 0.5, "seed": 0}, "space": "weight"},
    }
    if p["hetero_source"] in zoo:
        src = p["hetero_source"]
        plans["hetero-ot"] = {"models": {base: str(zoo[base]), src: str(zoo[src])}, "target": base,
                              "method": "lerp", "params": {"lambda": cfg.hetero_lambda}, "space": "latent",
                              "layer_map": "proportional", "alignment": {"method": "gaussian", "reg": 1e-3}}
    out = Path(cfg.out_dir)
    for name, plan in plans.items():
        plan.update(vae=str(vae), out_dir=str(out / "merges" / name), cache_dir=str(out / "latent_cache"),
                    batch_size=512)
    return plans


def run_demo(cfg: DemoConfig) -> int:
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.evaluate.run import EvalConfig, run_eval
    from lsm_dist.merge.plan import load_plan
    from lsm_dist.merge.run import run_merge
    from lsm_dist.train import load_train_config, run_train
    from lsm_dist.zoo import build_zoo, load_zoo_config

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
    conv = dict(tokens=cfg.tokens, chunk=cfg.chunk, block_samples=256, shard_samples=1024, num_workers=2)
    run_convert(ConvertConfig(models=[f"{m}={zoo[m]}" for m in train_models], out_dir=str(out / "corpus"), **conv))
    print(Corpus(out / "corpus").summary())
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
        f"val_every={max((s1 + s2) // 10, 5)}", f"log_every={max((s1 + s2) // 20, 5)}",
        *([f"heldout_corpus={heldout}"] if heldout else []),
    ])
    metrics = run_train(tcfg)
    vae = Path(metrics["vae"])
    log.info("VAE: %s (val recon %.4g)", vae, metrics.get("val/recon", float("nan")))
    timings["train"] = time.perf_counter() - t

    t = _stage(log, "4/5 merges (latent space and weight-space baselines)")
    plans_dir = out / "plans"
    merged: dict[str, Path] = {}
    for name, plan in _plans(cfg, zoo, vae).items():
        path = plans_dir / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(plan, sort_keys=False))
        merged[name] = run_merge(load_plan(path))
        log.info("merge %-18s -> %s", name, merged[name])
    timings["merge"] = time.perf_counter() - t

    t = _stage(log, "5/5 evaluation (lm-eval, held-out test splits)")
    models = {m: zoo[m] for m in train_models}
    ckpts = [f"{k}={v}" for k, v in {**models, **merged}.items()]
    ecfg = EvalConfig(checkpoints=ckpts, tasks=list(cfg.eval_tasks), out_dir=str(out / "eval"),
                      n=cfg.eval_n or p["eval_n"], batch_size=32)
    table = Path(run_eval(ecfg)) / "results.md"
    timings["eval"] = time.perf_counter() - t

    print()
    print(table.read_text())
    total = time.perf_counter() - t_all
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    print(f"outputs: {out} (plans/, merges/<name>/model, eval/results.md|csv|png, vae_run/tb)")
    return 0
