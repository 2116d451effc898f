"""`lsm demo`: the whole pipeline from nothing, and what it shows, judged on this machine.

Presets (``preset=``, or the flags ``--zoo`` / ``--quick``):

- ``real`` (the default): the real pretrained SmolLM2-135M-Instruct and two peft LoRA experts
  fine-tuned on it here (arithmetic, string reversal; ``configs/zoo/real.yaml``) → weight
  corpus → VAE (stage 1 autoencoder, stage 2 β-VAE) → merges: weight space (linear, task
  arithmetic, TIES, DARE) and latent space (task arithmetic and DARE with delta decoding, and
  task arithmetic with the paper's direct decoding, to show why delta decoding exists) →
  lm-eval on held-out test rows + word perplexity on a fixed English text. ≤ 30 minutes from
  nothing on 2 cores.
- ``zoo``: the small zoo the project trains from scratch (Llama / Qwen2 / Gemma-3 bases and
  LoRA experts on letter shifting and digit flipping): a fast look at the chain, with more
  merges (lerp, SLERP, TIES, self-merge, heterogeneous OT). Its models are trained on this CPU
  from random weights, and other CPUs round differently: their scores, and so its story, differ
  from machine to machine (docs/evaluation.md).
- ``quick``: the tiny zoo and short runs (CI: the code path, not a result).

Every sentence the demo prints about the outcome is a verdict computed from this run's scores
(``evaluate.verdict``: a difference counts when it exceeds two standard errors of the
difference), never a number copied from another machine; the verdicts are also written to
``<out_dir>/verdicts.json``. The first line after the tables names the content digests of the
base and experts used and how they were built (torch, CPU capability, threads), so two users
can tell at once whether they compare the same models.

Every stage caches its output under ``out_dir`` (the zoo under ``zoo_dir``), so a re-run
after an interruption continues where it stopped, and a re-run with everything built only
re-reads the cached results.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsm_dist.config import check, check_choice, doc
from lsm_dist.console import begin_stage, echo, end_stage, progress
from lsm_dist.evaluate.tasks import DEFAULT_ZOO_MC, MC_TASKS
from lsm_dist.utils import atomic_write_json, atomic_write_text, get_logger

REPO = Path(__file__).resolve().parent.parent
LOG_NAME = "demo.log"  # in out_dir: everything the console does not show (console.session)
VERDICTS = "verdicts.json"  # in out_dir: the verdicts printed, as data
KEEP_BOTH = 0.5  # a merge "keeps both gains" when it keeps at least this share of each
DESTROYED = 10.0  # a model whose word perplexity is this many times the base's is destroyed
PRESETS = {
    # zoo config, base, two experts, held-out model (VAE generalization), hetero source
    "real": dict(zoo_config="configs/zoo/real.yaml", base="smollm2-135m",
                 experts=["smollm2-arith", "smollm2-reverse"], heldout=None, hetero_source="gemma3-270m",
                 # the other family merged into the base: Gemma-3-270M (every shape differs), the
                 # paper's latent OT, delta decoding (docs/experiments.md, cross_arch)
                 hetero=dict(alignment={"method": "gaussian", "reg": 1e-3}, space="latent", lam=0.1),
                 stage1_steps=600, stage2_steps=100, eval_n=100,
                 eval_tasks=["lsm_arith_mc", "lsm_reverse_mc"], ppl=True,
                 # a 135M model costs ~30 CPU-seconds per lm-eval run: the comparisons that matter
                 merges=["weight-lerp", "weight-task-arith", "weight-ties", "weight-dare",
                         "latent-task-arith", "latent-dare", "latent-task-arith-direct", "hetero"]),
    "zoo": dict(zoo_config="configs/zoo/default.yaml", base="llama-base",
                experts=["llama-shift", "llama-flip"], heldout="llama-reverse",
                hetero_source="gemma3-base", stage1_steps=600, stage2_steps=200, eval_n=100,
                eval_tasks=DEFAULT_ZOO_MC, ppl=False,
                merges=["vae-recon-direct", "latent-lerp-direct", "latent-lerp", "latent-task-arith",
                        "latent-ties", "latent-self-merge", "weight-lerp", "weight-slerp",
                        "weight-task-arith", "weight-ties", "weight-dare", "hetero"]),
    "quick": dict(zoo_config="configs/zoo/tiny.yaml", base="llama-tiny-base",
                  experts=["llama-tiny-arith", "llama-tiny-reverse"], heldout=None,
                  hetero_source="qwen2-tiny-base", stage1_steps=60, stage2_steps=20, eval_n=24,
                  eval_tasks=MC_TASKS, ppl=True,  # the path, for CI
                  merges=["vae-recon-direct", "latent-lerp-direct", "latent-lerp", "latent-task-arith",
                          "latent-ties", "latent-dare", "latent-task-arith-direct", "latent-self-merge",
                          "weight-lerp", "weight-slerp", "weight-task-arith", "weight-ties",
                          "weight-dare", "hetero"]),
}
OUT_DIRS = {"real": "runs/demo", "zoo": "runs/demo-zoo", "quick": "runs/demo-quick"}


@dataclass
class DemoConfig:
    preset: str = doc("real (SmolLM2-135M-Instruct and its LoRA experts, configs/zoo/real.yaml; "
                      "≤ 30 minutes from nothing on 2 cores) | zoo (the small zoo trained here from "
                      "scratch: a fast look; its scores depend on the CPU) | quick (tiny zoo, short "
                      "runs: CI)", "real")
    out_dir: str | None = doc("demo run directory (corpus, VAE run, merges, eval); default "
                              "runs/demo, runs/demo-zoo or runs/demo-quick by preset", None)
    zoo_dir: str | None = doc("where the zoo is built / reused (default: the zoo config's out_dir)", None)
    zoo_overrides: list[str] = doc("dotted overrides of the preset's zoo config, e.g. "
                                   "[threads=1,seed_offset=10] (another build of the same recipe)",
                                   factory=list)
    merges: list[str] | None = doc("the merges to run (None: the preset's); a subset of the "
                                   "preset's names", None)
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
                           "None: the preset's (on for real and quick, off for the zoo, whose "
                           "models are not English models)", None)

    def __post_init__(self) -> None:
        check_choice(self.preset, "preset", PRESETS)
        check(0.0 <= self.lambda_ <= 1.0, "lambda_", "must be in [0, 1]")
        check(0.0 <= self.hetero_lambda <= 1.0, "hetero_lambda", "must be in [0, 1]")
        if self.merges is not None:
            for m in self.merges:
                check_choice(m, "merges", self.preset_merges)
        if self.eval_tasks is None:
            self.eval_tasks = list(self.settings["eval_tasks"])
        if self.ppl is None:
            self.ppl = self.settings["ppl"]
        if self.out_dir is None:
            self.out_dir = OUT_DIRS[self.preset]

    @property
    def settings(self) -> dict:
        return PRESETS[self.preset]

    @property
    def preset_merges(self) -> list[str]:
        return list(self.settings["merges"])


def _stage(log, name: str):
    """Log ``name`` ("1/5 model zoo (build or reuse)") and start its console bar ("[1/5] model zoo")."""
    log.info("== %s", name)
    num, _, what = name.partition(" ")
    begin_stage(f"[{num}] {what.split(' (')[0]}".ljust(20))
    return time.perf_counter()


def _plans(cfg: DemoConfig, zoo: dict[str, Path], vae: Path) -> dict[str, dict]:
    p = cfg.settings
    base, (a, b) = p["base"], p["experts"]
    paths = {k: str(zoo[k]) for k in (base, a, b)}
    two = {"models": {a: paths[a], b: paths[b]}, "target": a}
    three = {"models": {base: paths[base], a: paths[a], b: paths[b]}, "target": base, "base": base, "inputs": [a, b]}
    direct = {"space": "latent", "decode": "direct"}  # the paper's W = D(z)
    delta = {"space": "latent", "decode": "delta"}  # W = W_target + D(z) - D(z_target)
    arith = {**three, "method": "task_arithmetic", "params": {"weights": [1.0, 1.0]}}
    dare = {**three, "method": "dare", "params": {"drop_p": 0.5, "seed": 0}}
    plans = {
        "vae-recon-direct": {**two, "method": "lerp", "params": {"lambda": 0.0}, **direct},
        "latent-lerp-direct": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, **direct},
        "latent-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, **delta},
        "latent-task-arith": {**arith, **delta},
        "latent-task-arith-direct": {**arith, **direct},
        "latent-ties": {**three, "method": "ties", "params": {"density": 0.5}, **delta},
        "latent-dare": {**dare, **delta},
        "latent-self-merge": {"models": {a: paths[a]}, "target": a, "method": "self_merge",
                              "params": {"samples": 8, "seed": 0}, **delta},
        "weight-lerp": {**two, "method": "lerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-slerp": {**two, "method": "slerp", "params": {"lambda": cfg.lambda_}, "space": "weight"},
        "weight-task-arith": {**arith, "space": "weight"},
        "weight-ties": {**three, "method": "ties", "params": {"density": 0.5}, "space": "weight"},
        "weight-dare": {**dare, "space": "weight"},
    }
    if p["hetero_source"] in zoo:
        src = p["hetero_source"]
        h = p.get("hetero", {})
        plans["hetero"] = {"models": {base: str(zoo[base]), src: str(zoo[src])}, "target": base,
                           "method": "lerp", "params": {"lambda": h.get("lam", cfg.hetero_lambda)},
                           "space": h.get("space", "latent"), "decode": "delta", "layer_map": "proportional",
                           "alignment": h.get("alignment", {"method": "gaussian", "reg": 1e-3})}
    wanted = cfg.merges if cfg.merges is not None else cfg.preset_merges
    plans = {k: plans[k] for k in wanted if k in plans}
    out = Path(cfg.out_dir)
    for name, plan in plans.items():
        plan.update(vae=str(vae), out_dir=str(out / "merges" / name), cache_dir=str(out / "latent_cache"),
                    overwrite=True,  # the demo's own merge of earlier inputs
                    keep_layers=False)  # the assembled checkpoint holds every merged tensor
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
    p = cfg.settings
    out = Path(cfg.out_dir)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(log, "1/5 model zoo (build or reuse)")
    zoo_over = [*([f"out_dir={cfg.zoo_dir}"] if cfg.zoo_dir else []), *cfg.zoo_overrides]
    wanted = cfg.merges if cfg.merges is not None else cfg.preset_merges
    needed = [p["base"], *p["experts"], *([p["heldout"]] if p["heldout"] else []),
              *([p["hetero_source"]] if p["hetero_source"] and "hetero" in wanted else [])]
    zoo = build_zoo(load_zoo_config(REPO / p["zoo_config"], zoo_over), only=needed)
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
    timings["eval"] = time.perf_counter() - t
    end_stage()

    scores = _scores(eval_dir, cfg.eval_tasks, cfg.ppl)
    trained = {e: trained_tasks(zoo[e]) for e in p["experts"]}
    # the retention table compares merges of both experts (not the one-model self-merge, nor OT)
    of_both = [n for n, pl in plans.items() if set(p["experts"]) <= set(pl["models"])]
    v = verdicts(scores, p["base"], p["experts"], list(plans), of_both, cfg.eval_tasks, trained)
    if "hetero" in plans and "hetero" in scores:
        from lsm_dist.evaluate.tasks import chance_level
        from lsm_dist.evaluate.verdict import versus_target

        chance = {t: chance_level(eval_dir, t[4:-3]) for t in cfg.eval_tasks}
        v["hetero"] = {"merge": "hetero", "source": p["hetero_source"], "target": p["base"],
                       "alignment": plans["hetero"]["alignment"], "space": plans["hetero"]["space"],
                       "lambda": plans["hetero"]["params"]["lambda"], "scores": scores["hetero"],
                       "target_scores": scores[p["base"]],
                       "verdict": versus_target(scores["hetero"], scores[p["base"]], cfg.eval_tasks, chance)}
    v["models"] = model_provenance({m: zoo[m] for m in train_models})
    v["n"] = ecfg.n
    atomic_write_json(out / VERDICTS, v)
    echo()
    echo((eval_dir / "results.md").read_text())
    echo(retention_table(v, p["experts"]))
    echo(verdict_lines(v))
    echo(provenance_line(v["models"]))
    total = time.perf_counter() - t_all
    echo("stage times: " + ", ".join(f"{k} {x:.0f}s" for k, x in timings.items()) + f"; total {total:.0f}s")
    echo(f"outputs: {out} (plans/, merges/<name>/model, eval/results.md|csv|png|_retention.png, {VERDICTS}, "
         f"vae_run/tb{f', {LOG_NAME}: everything not shown here' if (out / LOG_NAME).is_file() else ''})")
    return 0


# ----------------------------------------------------------------------------- verdicts
def _scores(eval_dir: Path, tasks: list[str], ppl: bool) -> dict[str, dict[str, float]]:
    """``{checkpoint: {task: acc, task_se: se, ..., "ppl": word perplexity}}`` of this call."""
    from lsm_dist.evaluate.tasks import PPL_TASK
    from lsm_dist.evaluate.verdict import scores
    from lsm_dist.utils import read_json

    out = {}
    for name, path in read_json(eval_dir / "summary.json")["scored"].items():
        m = read_json(path)["metrics"]
        row = {}
        for t in tasks:
            row[t], row[t + "_se"] = scores(m, f"{t}/acc")
        if ppl:
            row["ppl"] = scores(m, f"{PPL_TASK}/word_perplexity")[0]
        out[name] = row
    return out


def verdicts(sc: dict[str, dict[str, float]], base: str, experts: list[str], merges: list[str],
             of_both: list[str], tasks: list[str], trained: dict[str, list[str]] | None = None) -> dict:
    """Every claim the demo makes, computed from ``sc`` (``_scores``) with
    ``evaluate.verdict``'s rule of noise:

    - ``experts``: each expert's own task (the one it was fine-tuned on, else where it gains
      most), its gain over the base, the standard error of the gain, and whether it is beyond noise;
    - ``retention``: for each merge of both experts, the share of each gain it keeps (None where
      the expert has no gain to keep); ``keeps_both``: the merges keeping ≥ ``KEEP_BOTH`` of each;
    - ``latent_vs_weight``: for each operator run in both spaces (``latent-X`` vs ``weight-X``),
      the per-task comparison on the experts' own tasks and one word (better / within noise /
      worse / mixed);
    - ``direct_vs_delta``: for each ``X-direct`` merge next to ``X``, both perplexities (or mean
      accuracies without perplexity) and whether direct decoding destroyed the model (perplexity
      ≥ ``DESTROYED`` × the base's)."""
    from lsm_dist.evaluate.report import own_tasks
    from lsm_dist.evaluate.verdict import compare, difference, gains, overall, retention

    trained = trained or {}
    mine = [[t for t in tasks if any(t in (f"lsm_{x}_mc", f"lsm_{x}_gen") for x in trained.get(e, []))]
            for e in experts]
    own = dict(zip(experts, own_tasks(sc[base], [sc[e] for e in experts], tasks,
                                      [m[0] if len(m) == 1 else None for m in mine])))
    b = sc[base]
    out: dict = {"base": base, "experts": {}, "retention": {}, "latent_vs_weight": {}, "direct_vs_delta": {}}
    for e in experts:
        t = own[e]
        d, se = difference(sc[e][t], sc[e][t + "_se"], b[t], b[t + "_se"])
        out["experts"][e] = {"task": t, "base": b[t], "expert": sc[e][t], "gain": d, "se": se,
                             "beyond_noise": gains(sc[e][t], sc[e][t + "_se"], b[t], b[t + "_se"])}
    for n in of_both:
        if n in sc:
            keep = [retention(b[own[e]], b[own[e] + "_se"], sc[e][own[e]], sc[e][own[e] + "_se"], sc[n][own[e]])
                    for e in experts]
            out["retention"][n] = {e: (None if math.isnan(k) else k) for e, k in zip(experts, keep)}
    out["keeps_both"] = [n for n, k in out["retention"].items()
                         if all(x is not None and x >= KEEP_BOTH for x in k.values())]
    for n in merges:
        if n.startswith("latent-") and not n.endswith("-direct") and f"weight-{n[7:]}" in sc and n in sc:
            w = f"weight-{n[7:]}"
            per = {own[e]: {"latent": sc[n][own[e]], "weight": sc[w][own[e]],
                            "diff": difference(sc[n][own[e]], sc[n][own[e] + "_se"], sc[w][own[e]],
                                               sc[w][own[e] + "_se"]),
                            "verdict": compare(sc[n][own[e]], sc[n][own[e] + "_se"], sc[w][own[e]],
                                               sc[w][own[e] + "_se"])} for e in experts}
            out["latent_vs_weight"][n[7:]] = {"latent": n, "weight": w, "tasks": per,
                                              "verdict": overall([x["verdict"] for x in per.values()]),
                                              **({"ppl_latent": sc[n]["ppl"], "ppl_weight": sc[w]["ppl"]}
                                                 if "ppl" in b else {})}
        if n.endswith("-direct") and n[: -len("-direct")] in sc and n in sc:
            dl = n[: -len("-direct")]
            rec = {"direct": n, "delta": dl}
            if "ppl" in b:
                rec.update(ppl_direct=sc[n]["ppl"], ppl_delta=sc[dl]["ppl"], ppl_base=b["ppl"],
                           destroyed=bool(sc[n]["ppl"] >= DESTROYED * b["ppl"]) or math.isnan(sc[n]["ppl"]),
                           delta_destroyed=bool(sc[dl]["ppl"] >= DESTROYED * b["ppl"]))
            rec.update(acc_direct=[sc[n][own[e]] for e in experts], acc_delta=[sc[dl][own[e]] for e in experts])
            out["direct_vs_delta"][n] = rec
    return out


def retention_table(v: dict, experts: list[str]) -> str:
    """What every merge of both experts keeps of each expert's gain, best first (Markdown)."""
    from lsm_dist.evaluate.verdict import fmt_share

    ex = v["experts"]
    lines = ["how much of each expert's gain over the base a merge keeps, (merge - base) / (expert - base)"
             " (\"no gain to keep\": the expert's gain is within noise; min: over the gains there are):",
             "| merge | " + " | ".join(f"{e} ({ex[e]['task']})" for e in experts) + " | min |",
             "|---|" + "---|" * (len(experts) + 1)]

    def nan(x):
        return math.nan if x is None else x

    # min: over the experts that have a gain to keep
    rows = [(min((k[e] for e in experts if k[e] is not None), default=math.nan), n, k)
            for n, k in v["retention"].items()]
    for worst, n, k in sorted(rows, key=lambda r: -r[0] if r[0] == r[0] else 1e9):
        lines.append(f"| {n} | " + " | ".join(fmt_share(nan(k[e])) for e in experts) + f" | {fmt_share(worst)} |")
    return "\n".join(lines) + "\n"


def verdict_lines(v: dict) -> str:
    """The verdicts as sentences, each computed from this run (``verdicts``)."""
    se_note = f"n = {v.get('n', '?')} test rows per task; noise = 2 standard errors of a difference"
    lines = [f"verdicts of this run ({se_note}):"]
    for e, x in v["experts"].items():
        lines.append(f"- {e} {'gains' if x['beyond_noise'] else 'does NOT gain'} on its task {x['task']} "
                     f"beyond noise: {x['base']:.2f} -> {x['expert']:.2f} ({x['gain']:+.2f}, noise ±{2 * x['se']:.2f})")
    if v["retention"]:
        keep = v["keeps_both"]
        lines.append(f"- {len(keep)} of {len(v['retention'])} merges keep >= {KEEP_BOTH:.0%} of both gains"
                     + (f": {', '.join(keep)}" if keep else ""))
    for op, x in v["latent_vs_weight"].items():
        parts = ", ".join(f"{t} {d['diff'][0]:+.2f} ± {2 * d['diff'][1]:.2f}" for t, d in x["tasks"].items())
        ppl = (f"; word perplexity {x['ppl_latent']:.3g} vs {x['ppl_weight']:.3g}" if "ppl_latent" in x else "")
        lines.append(f"- latent vs weight space, {op}: {x['verdict']} ({x['latent']} - {x['weight']}: {parts}{ppl})")
    for n, x in v["direct_vs_delta"].items():
        if "ppl_direct" in x:
            what = "destroys the model" if x["destroyed"] else "keeps a usable model"
            lines.append(f"- direct decoding ({n}) {what}: word perplexity {x['ppl_direct']:.3g} vs "
                         f"{x['ppl_delta']:.3g} delta-decoded ({x['delta']}), base {x['ppl_base']:.3g}")
        else:
            lines.append(f"- direct decoding ({n}): accuracy {'/'.join(f'{a:.2f}' for a in x['acc_direct'])} vs "
                         f"{'/'.join(f'{a:.2f}' for a in x['acc_delta'])} delta-decoded ({x['delta']})")
    if "hetero" in v:
        h = v["hetero"]
        ppl = (f", word perplexity {h['scores']['ppl']:.3g} vs {h['target_scores']['ppl']:.3g}"
               if "ppl" in h["scores"] else "")
        align = h["alignment"]["method"] if isinstance(h["alignment"], dict) else h["alignment"]
        lines.append(f"- another family merged in ({h['source']} into {h['target']}: {align} alignment, "
                     f"{h['space']} space, lambda {h['lambda']:g}): {h['verdict']}{ppl}")
    return "\n".join(lines) + "\n"


def model_provenance(paths: dict[str, Path]) -> dict[str, dict]:
    """Per model: its content digest (``checkpoint.content_digest``: config + weights) and how
    it was built (its zoo card: torch, CPU capability, threads; absent for older cards)."""
    from lsm_dist.checkpoint import Checkpoint, content_digest
    from lsm_dist.zoo import read_card

    out = {}
    for name, path in paths.items():
        card = read_card(path) or {}
        with Checkpoint(path) as ck:
            out[name] = {"digest": content_digest(ck), "build": card.get("build")}
    return out


def provenance_line(models: dict[str, dict]) -> str:
    """One line: the digests of the models used and how they were built."""
    digests = ", ".join(f"{n} {m['digest']}" for n, m in models.items())
    builds = {tuple(sorted((m["build"] or {}).items())) for m in models.values()}
    how = "; ".join(", ".join(f"{k} {v}" for k, v in b) or "build not recorded" for b in sorted(builds))
    return f"models used: {digests} (content digests; built with {how})\n"
