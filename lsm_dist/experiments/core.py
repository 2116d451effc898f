"""The experiment config and the shared machinery: zoo, weight corpora, VAEs (one per
compression ratio, trained once and shared by every experiment), merges, lm-eval scores,
tables (Markdown + CSV) and plots.

Everything heavy is cached: corpora, VAE runs, latents and lm-eval results live in
``shared_dir`` (default ``<out_dir>/../shared``) under content-derived names, so a second
experiment reuses the first one's VAE and scores, and a re-run after an interruption resumes.
VAE training runs in a child process (``python -m lsm_dist.train``): accelerate allows one
DeepSpeed ``Accelerator`` per process, and an experiment may train several VAEs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
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
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from lsm_dist.dist import launch_env
from lsm_dist.evaluate.tasks import DEFAULT_ZOO_MC, MC_TASKS
from lsm_dist.utils import atomic_write_json, atomic_write_text, get_logger, read_json, sha256_json

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("noise", "recon_ratio", "self_merge", "expert_merge", "cross_arch", "blocks")
DECODES = ("delta", "direct")
log = get_logger("lsm.experiments")

# Model roles and run sizes; an ExperimentConfig field left at None takes its preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        zoo_config="configs/zoo/default.yaml",
        train_models=["llama-base", "llama-shift", "llama-flip", "qwen2-base", "gemma3-base"],
        heldout_models=["llama-reverse", "llama-deep-base", "qwen2-reverse", "gemma3-recall"],
        base="llama-base", experts=["llama-shift", "llama-flip"],
        self_merge_models=["llama-shift", "llama-reverse"], recon_models=["llama-base", "llama-reverse"],
        hetero_target="llama-base", hetero_sources=["qwen2-base", "gemma3-base", "llama-deep-base"],
        tokens=8, chunk=64, stage1_steps=800, stage2_steps=200, eval_n=100, samples=[1, 4, 16],
        lambdas=[0.0, 0.05, 0.1, 0.2, 0.5, 1.0],
        methods=["lerp", "soup", "task_arithmetic", "ties", "dare"], eval_tasks=list(DEFAULT_ZOO_MC),
        noise_models=["llama-base"], noise_levels=[0.003, 0.01, 0.03, 0.1, 0.3], ppl=False,
        reverse=False, transfers={}, transfer_variants=[]),
    # the real pretrained SmolLM2-135M-Instruct and its LoRA experts (configs/zoo/real.yaml)
    "real": dict(
        zoo_config="configs/zoo/real.yaml",
        train_models=["smollm2-135m"], heldout_models=[],
        base="smollm2-135m", experts=["smollm2-arith", "smollm2-reverse"],
        self_merge_models=["smollm2-arith"], recon_models=["smollm2-135m"],
        hetero_target="smollm2-135m", hetero_sources=["gemma3-270m"],
        tokens=8, chunk=64, stage1_steps=1500, stage2_steps=200, eval_n=100, samples=[1, 4, 16],
        lambdas=[0.0, 0.05, 0.1, 0.2, 0.5, 1.0],
        methods=["lerp", "task_arithmetic", "ties", "dare"],  # soup [0.5, 0.5] is lerp 0.5
        eval_tasks=["lsm_arith_mc", "lsm_reverse_mc"],
        noise_models=["smollm2-135m", "smollm2-arith"], noise_levels=[0.001, 0.003, 0.01, 0.03, 0.1],
        ppl=True,
        # cross_arch: both directions between the two real families, the paper's latent OT (its
        # variants at λ 0.1) and the functional aligner, and each family's experts carried into the
        # other family's base; one VAE trained on both bases
        reverse=True, hetero_train_models=["smollm2-135m", "gemma3-270m"],
        variants=[{"alignment": "gaussian", "decode": "delta", "lambdas": [0.05, 0.1, 0.2]},
                  {"alignment": "gaussian", "decode": "direct", "lambdas": [0.1]},
                  {"alignment": "emd", "lambdas": [0.1]},
                  {"alignment": "sinkhorn", "lambdas": [0.1], "reg": 0.05, "max_samples": 512},
                  # (no `none` variant: untransported tensors of other shapes cannot merge)
                  {"alignment": "activations", "space": "weight", "lambdas": [0.02, 0.05, 0.1, 0.2]},
                  {"alignment": "activations", "space": "latent", "lambdas": [0.05]}],
        transfers={"smollm2-arith": "smollm2-135m", "smollm2-reverse": "smollm2-135m",
                   "gemma3-arith": "gemma3-270m", "gemma3-reverse": "gemma3-270m"},
        transfer_variants=[{"alignment": "activations", "space": "weight", "lambdas": [0.5, 1.0]},
                           {"alignment": "gaussian", "lambdas": [1.0]}]),
    "quick": dict(
        zoo_config="configs/zoo/tiny.yaml",
        train_models=["llama-tiny-base", "llama-tiny-arith", "llama-tiny-reverse", "qwen2-tiny-base"],
        heldout_models=["gemma3-tiny-base"],
        base="llama-tiny-base", experts=["llama-tiny-arith", "llama-tiny-reverse"],
        self_merge_models=["llama-tiny-arith"], recon_models=["llama-tiny-base"],
        hetero_target="llama-tiny-base", hetero_sources=["qwen2-tiny-base"],
        tokens=4, chunk=32, stage1_steps=30, stage2_steps=10, eval_n=8, samples=[1, 4],
        lambdas=[0.0, 0.1, 1.0], methods=["lerp", "ties"], eval_tasks=list(MC_TASKS),
        noise_models=["llama-tiny-base"], noise_levels=[0.01, 0.1], ppl=True,  # the path, for CI
        reverse=True, transfers={"llama-tiny-reverse": "llama-tiny-base"},
        variants=[{"alignment": "gaussian", "decode": "delta", "lambdas": [0.0, 0.1, 1.0]},
                  {"alignment": "gaussian", "decode": "direct", "lambdas": [0.1]},
                  {"alignment": "activations", "space": "weight", "lambdas": [0.1, 0.5]},
                  {"alignment": "activations", "space": "latent", "lambdas": [0.1], "depth": "cka"}],
        transfer_variants=[{"alignment": "activations", "space": "weight", "lambdas": [1.0]},
                           {"alignment": "gaussian", "lambdas": [1.0]}]),
}


@dataclass
class HeteroVariant:
    """One way of merging a model of another family into a target (cross_arch)."""

    alignment: str = doc("none | gaussian | emd | sinkhorn (the paper's: OT of the source's latents onto "
                         "the target's) | activations (functional: the source's MLP units matched to "
                         "the target's by the cosine of their activations, its weights transported)", "gaussian")
    space: str = doc("latent | weight (weight space needs alignment: activations)", "latent")
    decode: str = doc("latent space: delta | direct", "delta")
    lambdas: list[float] = doc("λ values: W_t + λ(T(W_s) − W_t), or its latent version", factory=lambda: [0.1])
    depth: str = doc("activations: proportional | cka depth map", "proportional")
    reg: float | None = doc("latent OT regularization of this variant (None: alignment_reg)", None)
    max_samples: int | None = doc("latent points per side of this variant's maps (None: "
                                  "alignment_max_samples; sinkhorn's log-domain iterations cost n² each)", None)

    def __post_init__(self) -> None:
        from lsm_dist.merge.hetero import ALIGNMENTS, DEPTHS

        check_choice(self.alignment, "variants.alignment", ALIGNMENTS)
        check_choice(self.space, "variants.space", ("latent", "weight"))
        check_choice(self.decode, "variants.decode", DECODES)
        check_choice(self.depth, "variants.depth", DEPTHS)
        check(self.space == "latent" or self.alignment == "activations", "variants.space",
              "weight space merges another family only after alignment: activations")
        check(bool(self.lambdas) and all(0.0 <= x <= 1.0 for x in self.lambdas), "variants.lambdas",
              f"must be a non-empty list in [0, 1], got {self.lambdas}")

    @property
    def label(self) -> str:
        return "/".join([self.alignment, self.space] + ([self.decode] if self.space == "latent" else [])
                        + (["cka"] if self.depth == "cka" else []))


@dataclass
class ExperimentConfig:
    name: str = doc(f"experiment: {' | '.join(EXPERIMENTS)}", "expert_merge")
    out_dir: str | None = doc("experiment directory (results.md/csv/png, plans, merges); "
                              "default runs/experiments[-quick]/<name>", None)
    shared_dir: str | None = doc("corpora, VAEs, latent cache and lm-eval results shared by the "
                                 "experiments; default <out_dir>/../shared", None)
    quick: bool = doc("tiny zoo, few steps, short lists (tests / CI): preset quick", False)
    preset: str | None = doc("default (the zoo) | quick (tiny zoo) | real (the real SmolLM2-135M "
                             "and its LoRA experts): the values of every field left unset", None)
    models: dict[str, str] = doc("checkpoints by name (a directory, or BASE+ADAPTER for a peft "
                                 "LoRA adapter): looked up before the zoo, so any role below may "
                                 "name a user's model; with zoo_config: none the zoo is never built",
                                 factory=dict)
    zoo_config: str | None = doc("zoo YAML (None: the preset's; 'none': no zoo)", None)
    zoo_dir: str | None = doc("where the zoo is built / reused (default: the zoo config's out_dir)", None)
    tokens: int | None = doc("tokens per weight sample (None: preset)", None)
    chunk: int | None = doc("values per token (None: preset)", None)
    vae_config: str = doc("VAE architecture YAML; tokens/chunk/latent_dim are set here", "configs/vae/demo.yaml")
    vae: dict[str, Any] = doc("VAEConfig field overrides of vae_config (e.g. {skip: none}: the VAE "
                              "without its linear skip path)", factory=dict)
    train_config: str = doc("trainer YAML", "configs/train/tiny.yaml")
    train: dict[str, Any] = doc("TrainConfig field overrides (e.g. {lr: 0.002})",
                                factory=lambda: {"batch_size": 32, "warmup_steps": 50, "lr": 2e-3})
    stage1_steps: int | None = doc("VAE stage-1 (autoencoder) steps (None: preset)", None)
    stage2_steps: int | None = doc("VAE stage-2 (beta-VAE) steps (None: preset)", None)
    ratio: float = doc("compression ratio of the VAE the merge experiments use", 2.0)
    ratios: list[float] = doc("recon_ratio: compression ratios compared", factory=lambda: [1.6, 2.0, 4.0])
    eval_n: int | None = doc("test rows per task family (None: preset)", None)
    eval_tasks: list[str] | None = doc("lm-eval tasks (accuracy columns; None: preset)", None)
    ppl: bool | None = doc("also score word perplexity on the fixed English text (lsm_english_ppl); "
                           "None: the preset's (real and quick: on; default: off, the zoo's models "
                           "are not English models: set ppl=true for your own checkpoints)", None)
    decodes: list[str] = doc("latent merges decoded with: delta (W_t + D(z) - D(z_t)) and/or direct "
                             "(D(z), the paper's)", factory=lambda: list(DECODES))
    encodings: list[str] = doc("expert_merge: latent merges of the weights (full, a VAE trained on the "
                               "training corpus) and/or of the experts' task vectors W - W_base "
                               "(delta, a VAE trained on their delta corpus)", factory=lambda: ["full", "delta"])
    tv_decodes: list[str] = doc("decodes of the task-vector (delta-encoded) merges: direct lands "
                                "W_base + D(z) on the base; delta adds D(z) - D(z_target)",
                                factory=lambda: ["direct"])
    noise_models: list[str] | None = doc("noise: models perturbed", None)
    noise_levels: list[float] | None = doc("noise: relative MSE of the Gaussian noise added to every "
                                           "attention / MLP weight (noise std = sqrt(level)·std of "
                                           "the tensor)", None)
    train_models: list[str] | None = doc("models of the VAE's training corpus", None)
    heldout_models: list[str] | None = doc("models NOT in the training corpus (generalization)", None)
    base: str | None = doc("base model of the experts (task arithmetic / TIES / DARE)", None)
    experts: list[str] | None = doc("two experts fine-tuned from base", None)
    self_merge_models: list[str] | None = doc("self_merge: models self-merged", None)
    recon_models: list[str] | None = doc("recon_ratio: models decoded and scored per ratio "
                                         "(empty: skip the accuracy table)", None)
    hetero_target: str | None = doc("cross_arch: target model", None)
    hetero_sources: list[str] | None = doc("cross_arch: source models of other width/depth/family", None)
    samples: list[int] | None = doc("self_merge: posterior sample counts K", None)
    lambdas: list[float] | None = doc("cross_arch: lambda sweep (0: target through the VAE, 1: OT only)", None)
    methods: list[str] | None = doc("expert_merge: operators compared in latent and weight space", None)
    lambda_: float = doc("lerp lambda of the expert merges (expert_merge, blocks)", 0.5)
    density: float = doc("TIES density", 0.5)
    drop_p: float = doc("DARE drop probability", 0.5)
    delta_weights: list[float] | None = doc("task_arithmetic / ties / dare delta scales (None: 1.0 each)", None)
    alignment: str = doc("cross_arch: the OT alignment of the default variants (gaussian | emd | "
                         "sinkhorn), swept over `lambdas` with every decode of `decodes`", "gaussian")
    alignment_reg: float = doc("cross_arch: latent OT regularization (gaussian: covariance; "
                               "sinkhorn: entropic)", 1e-3)
    alignment_max_samples: int = doc("cross_arch: latent points per side a latent OT map is fitted on", 2048)
    variants: list[HeteroVariant] | None = doc(
        "cross_arch: the merges compared per direction (None: the preset's, else `alignment` over "
        "`lambdas` × `decodes`): [{alignment, space, decode, lambdas, depth}]", None)
    reverse: bool | None = doc("cross_arch: also each source as the target of the target (both "
                               "directions); None: the preset's", None)
    transfers: dict[str, str] | None = doc(
        "cross_arch skill transfer: expert → its base; each expert of a source's family has its "
        "task vector (expert − base) carried into the other family's target (None: the preset's)", None)
    transfer_variants: list[HeteroVariant] | None = doc(
        "cross_arch: how the task vectors are carried: activations → W_t + λ·T(W_e − W_b); latent OT → "
        "z_t + λ(T(z_e) − T(z_b)) (None: the preset's)", None)
    hetero_train_models: list[str] | None = doc("cross_arch: models of the VAE's training corpus "
                                                "(None: the preset's, else train_models)", None)
    max_ppl_increase: float = doc("cross_arch: a merge counts as beating its target only with word "
                                  "perplexity at most this fraction above the target's", 0.10)
    seed: int = doc("seed of posterior samples, DARE masks, eval rows", 0)

    def __post_init__(self) -> None:
        check_choice(self.name, "name", EXPERIMENTS)
        check_choice(self.alignment, "alignment", ("gaussian", "emd", "sinkhorn"))
        if self.preset is None:
            self.preset = "quick" if self.quick else "default"
        check_choice(self.preset, "preset", PRESETS)
        check(not self.quick or self.preset == "quick", "quick", f"contradicts preset {self.preset!r}")
        self.quick = self.preset == "quick"
        for d in self.decodes:
            check_choice(d, "decodes", DECODES)
        for e in self.encodings:
            check_choice(e, "encodings", ("full", "delta"))
        for d in self.tv_decodes:
            check_choice(d, "tv_decodes", DECODES)
        check(bool(self.decodes), "decodes", f"name at least one of {list(DECODES)}")
        for k, v in self.models.items():
            check(bool(k) and "/" not in k and isinstance(v, str) and bool(v), "models",
                  f"{k!r}: {v!r} must be name: path")
        preset = PRESETS[self.preset]
        for key, value in preset.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.variants is None:  # the paper's sweep: one OT aligner, every decode
            self.variants = [{"alignment": self.alignment, "decode": d, "lambdas": list(self.lambdas)}
                             for d in self.decodes]
        self.variants = [v if isinstance(v, HeteroVariant) else from_dict(HeteroVariant, v, "variants")
                         for v in self.variants]
        self.transfer_variants = [v if isinstance(v, HeteroVariant) else from_dict(HeteroVariant, v, "transfer_variants")
                                  for v in self.transfer_variants]
        if self.hetero_train_models is None:
            self.hetero_train_models = list(self.train_models)
        check(self.alignment_reg > 0, "alignment_reg", "must be > 0")
        check(self.alignment_max_samples >= 2, "alignment_max_samples", "must be >= 2")
        check(self.max_ppl_increase >= 0, "max_ppl_increase", "must be >= 0")
        if self.out_dir is None:
            suffix = "" if self.preset == "default" else f"-{self.preset}"
            self.out_dir = f"runs/experiments{suffix}/{self.name}"
        if self.shared_dir is None:
            self.shared_dir = str(Path(self.out_dir).parent / "shared")
        check(len(self.experts) == 2, "experts", f"name two experts, got {self.experts}")
        check(bool(self.ratios) and all(r >= 1.0 for r in self.ratios), "ratios", "must be >= 1")
        check(all(isinstance(k, int) and k >= 1 for k in self.samples), "samples", "must be >= 1")
        check(all(0.0 <= x <= 1.0 for x in self.lambdas), "lambdas", "must be in [0, 1]")
        check(all(x > 0.0 for x in self.noise_levels), "noise_levels", "must be > 0")
        check(0.0 <= self.lambda_ <= 1.0, "lambda_", "must be in [0, 1]")
        check(self.eval_n > 0, "eval_n", "must be > 0")


def vae_model_config(cfg: ExperimentConfig, ratio: float) -> dict[str, Any]:
    """VAE hyper-parameters for compression ``ratio``: the YAML, tokens/chunk, overrides, and
    latent_dim = tokens·chunk / (latent_tokens·ratio), which must come out an integer."""
    from lsm_dist.train.config import resolve_path

    model = {**read_yaml_mapping(resolve_path(cfg.vae_config), "vae_config"),
             "tokens": cfg.tokens, "chunk": cfg.chunk, **cfg.vae}
    latent_tokens = 1 if model.get("pooled") else model["tokens"] // model.get("token_stride", 2)
    dim = model["tokens"] * model["chunk"] / (latent_tokens * ratio)
    check(abs(dim - round(dim)) < 1e-6 and dim >= 1, "ratios",
          f"ratio {ratio} needs latent_dim {model['tokens']}·{model['chunk']}/({latent_tokens}·{ratio}) "
          f"= {dim:g}, not an integer: choose tokens/chunk/token_stride that allow it")
    model["latent_dim"] = int(round(dim))
    return model


class Context:
    """Lazily built zoo / corpora / VAEs, and the merge and eval helpers of one experiment."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.shared = Path(cfg.shared_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._zoo: dict[str, Path] | None = None
        self.timings: dict[str, float] = {}
        self.vae_metrics: dict[float, dict] = {}

    # ---- inputs ------------------------------------------------------------------------
    @property
    def zoo(self) -> dict[str, Path]:
        if self._zoo is None:
            from lsm_dist.train.config import resolve_path
            from lsm_dist.zoo import build_zoo, load_zoo_config

            if str(self.cfg.zoo_config).lower() in ("none", ""):
                self._zoo = {}
            else:
                over = [f"out_dir={self.cfg.zoo_dir}"] if self.cfg.zoo_dir else []
                self._zoo = build_zoo(load_zoo_config(resolve_path(self.cfg.zoo_config), over))
        return self._zoo

    def path(self, model: str) -> str:
        """The checkpoint of ``model``: ``cfg.models`` first, then the zoo."""
        if model in self.cfg.models:
            return self.cfg.models[model]
        if model not in self.zoo:
            raise ConfigError(f"model {model!r} is neither in `models` ({sorted(self.cfg.models)}) nor "
                              f"in the zoo ({sorted(self.zoo)})")
        return str(self.zoo[model])

    def scorable(self, model: str) -> str:
        """A directory lm-eval can load for ``model``: BASE+ADAPTER inputs are materialized once
        (an identity weight-space merge that applies the adapter)."""
        from lsm_dist.adapters import split_model_ref

        path = self.path(model)
        if split_model_ref(path)[1] is None:
            return path
        return str(self.merge(f"{model}-materialized", {"models": {model: path}, "target": model,
                                                         "method": "soup", "params": {"weights": [1.0]},
                                                         "space": "weight"}))

    def corpus(self, kind: str) -> Path:
        """The weight corpus of the training (``train``) or held-out (``heldout``) models, or
        the delta corpus (``delta``) of the experts' task vectors against the base."""
        from lsm_dist.corpus import ConvertConfig, run_convert

        models = {"train": self.cfg.train_models, "heldout": self.cfg.heldout_models,
                  "delta": self.cfg.experts, "hetero": self.cfg.hetero_train_models}[kind]
        base = {"base": self.scorable(self.cfg.base)} if kind == "delta" else {}
        key = sha256_json({"models": {m: self.path(m) for m in models}, **base,
                           "tokens": self.cfg.tokens, "chunk": self.cfg.chunk})[:10]
        out = self.shared / f"corpus-{kind}-{key}"
        if not (out / "manifest.json").is_file():
            run_convert(ConvertConfig(models=[f"{m}={self.scorable(m)}" for m in models], out_dir=str(out),
                                      tokens=self.cfg.tokens, chunk=self.cfg.chunk, block_samples=256,
                                      shard_samples=1024, num_workers=1, overwrite=True, **base))
        return out

    def vae(self, ratio: float | None = None, kind: str = "train") -> Path:
        """The VAE of compression ``ratio`` (default ``cfg.ratio``), trained once and cached, on
        the training corpus (``kind="train"``), on the experts' delta corpus (``"delta"``) or on
        the models of both families of cross_arch (``"hetero"``: ``hetero_train_models``)."""
        cfg = self.cfg
        ratio = cfg.ratio if ratio is None else ratio
        if kind == "hetero" and list(cfg.hetero_train_models) == list(cfg.train_models):
            kind = "train"
        train_c = self.corpus(kind)
        held_c = self.corpus("heldout") if cfg.heldout_models and kind == "train" else None
        s1, s2 = cfg.stage1_steps, cfg.stage2_steps
        total = s1 + s2
        request = {
            "corpus": str(train_c), "model": vae_model_config(cfg, ratio),
            "stage1_steps": s1, "stage2_steps": s2, "seed": cfg.seed,
            "ckpt_every": max(total // 2, 10), "val_every": max(total // 4, 5),
            "log_every": max(total // 10, 5), "cpu_threads": 1, **cfg.train,
        }
        if held_c is not None:
            request["heldout_corpus"] = str(held_c)
        from lsm_dist.train.config import resolve_path

        base = read_yaml_mapping(resolve_path(cfg.train_config), "train_config")
        base.pop("model_config", None)
        request = {**base, **request}
        # over the resolved trainer config, so a changed default (not only a changed request)
        # makes a new VAE instead of reusing a cached one
        from lsm_dist.train.config import PRESENTATION_FIELDS, TrainConfig

        resolved = to_dict(from_dict(TrainConfig, {**request, "run_dir": "-"}))
        for k in PRESENTATION_FIELDS:  # how the run shows itself does not change the VAE
            resolved.pop(k, None)
        digest = sha256_json({"request": resolved, "corpus": read_json(train_c / "manifest.json")["plan_digest"]})[:10]
        run_dir = self.shared / f"vae{'' if kind == 'train' else '-' + kind}-r{ratio:g}-{digest}"
        done = run_dir / "experiment_vae.json"
        if done.is_file() and (run_dir / "vae" / "config.json").is_file():
            self.vae_metrics[ratio] = read_json(done)["metrics"]
            return run_dir / "vae"
        request["run_dir"] = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        from lsm_dist.train.checkpointing import mark_run_dir

        mark_run_dir(run_dir)  # the experiment makes this run directory for lsm train (its request inside)
        req_path = run_dir / "experiment_train.yaml"
        atomic_write_text(req_path, yaml.safe_dump(request, sort_keys=False))
        log.info("training the r=%g VAE (%d+%d steps) in %s", ratio, s1, s2, run_dir)
        t = time.perf_counter()
        # a fresh single-process run: drop any rendezvous this process already holds (an
        # in-process run before it keeps MASTER_PORT listening, and the child would collide)
        env = launch_env()
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
        proc = subprocess.run([sys.executable, "-m", "lsm_dist.train", "--config", str(req_path)],
                              capture_output=True, text=True, env=env, cwd=str(REPO))
        atomic_write_text(run_dir / "experiment_train.log", proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"VAE training failed (exit {proc.returncode}), log "
                               f"{run_dir / 'experiment_train.log'}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        metrics = json.loads(lines[-1]) if lines else {}
        self.timings[f"train r={ratio:g}"] = time.perf_counter() - t
        atomic_write_json(done, {"metrics": metrics, "seconds": time.perf_counter() - t})
        self.vae_metrics[ratio] = metrics
        return run_dir / "vae"

    # ---- merges and scores -------------------------------------------------------------
    def merge(self, label: str, plan: dict[str, Any], vae: Path | None = None) -> Path:
        from lsm_dist.merge.plan import load_plan
        from lsm_dist.merge.run import run_merge

        plan = {**plan, "out_dir": str(self.out / "merges" / label),
                "cache_dir": str(self.shared / "latent_cache"), "overwrite": True,
                "keep_layers": False}
        if plan.get("space", "latent") == "latent":
            plan["vae"] = str(vae or self.vae())
        path = self.out / "plans" / f"{label}.yaml"
        atomic_write_text(path, yaml.safe_dump(plan, sort_keys=False))
        t = time.perf_counter()
        out = run_merge(load_plan(path))
        self.timings["merge"] = self.timings.get("merge", 0.0) + time.perf_counter() - t
        return out

    def scores(self, ckpts: dict[str, str | Path]) -> dict[str, dict[str, float]]:
        """lm-eval accuracy per checkpoint: ``{name: {family: acc, family_se: se, mean: …,
        ppl: word perplexity}}`` (results cached in ``shared_dir/eval`` by checkpoint digest);
        a value naming a model of the experiment (``cfg.models`` / zoo) is scored as that model."""
        from lsm_dist.evaluate.run import EvalConfig, run_eval
        from lsm_dist.evaluate.tasks import PPL_TASK

        t = time.perf_counter()
        out = self.shared / "eval"
        ckpts = {k: (self.scorable(k) if str(v) == self.path_or_none(k) else v) for k, v in ckpts.items()}
        tasks = list(self.cfg.eval_tasks) + ([PPL_TASK] if self.cfg.ppl else [])
        run_eval(EvalConfig(checkpoints=[f"{k}={v}" for k, v in ckpts.items()], tasks=tasks,
                            out_dir=str(out), n=self.cfg.eval_n, batch_size=32, seed=self.cfg.seed))
        scored = read_json(out / "summary.json")["scored"]
        res = {}
        for name in ckpts:
            m = read_json(scored[name])["metrics"]
            row: dict[str, float] = {}
            for task in self.cfg.eval_tasks:
                fam = family(task)
                row[fam] = m.get(f"{task}/acc", math.nan)
                se = m.get(f"{task}/acc_stderr")
                row[fam + "_se"] = math.nan if se is None else float(se)
            accs = [row[family(t)] for t in self.cfg.eval_tasks]
            row["mean"] = sum(accs) / len(accs)
            if self.cfg.ppl:
                row["ppl"] = float(m.get(f"{PPL_TASK}/word_perplexity", math.nan))
            res[name] = row
        self.timings["eval"] = self.timings.get("eval", 0.0) + time.perf_counter() - t
        return res

    def path_or_none(self, model: str) -> str | None:
        try:
            return self.path(model)
        except ConfigError:
            return None

    def expert_task(self, model: str) -> str | None:
        """The one task family ``model`` was fine-tuned on, from its zoo card (None when it has no
        card, several tasks, or one not scored here)."""
        from lsm_dist.zoo import trained_tasks

        tasks = [t for t in trained_tasks(self.path(model)) if t in self.families()]
        return tasks[0] if len(tasks) == 1 else None

    def families(self) -> list[str]:
        return [family(t) for t in self.cfg.eval_tasks]

    def score_cols(self) -> list[str]:
        """Accuracy per family, their mean, and perplexity when scored."""
        return [*self.families(), "mean", *(["ppl"] if self.cfg.ppl else [])]

    def chance_of(self, fam: str) -> float:
        """Accuracy of uniform guessing on task family ``fam`` (NaN for tasks not generated here)."""
        from lsm_dist.evaluate.tasks import chance_level

        return chance_level(self.shared / "eval", fam)

    def chance(self) -> float:
        """Mean accuracy of uniform guessing over the scored families (1/choices per test row
        of the generated lsm_* tasks; NaN for other tasks)."""
        levels = [self.chance_of(fam) for fam in self.families()]
        return sum(levels) / len(levels) if levels else math.nan

    def chance_note(self, rows: list[dict], label) -> str:
        """Which merged / reconstructed rows are within noise of uniform guessing."""
        fams, ch = self.families(), self.chance()
        if math.isnan(ch):
            return "chance level unknown for these tasks."
        at = [label(r) for r in rows if compare(r["mean"], ch, mean_se(r, fams), exact_b=True) == "within noise of"]
        return (f"{len(at)}/{len(rows)} of the merged / reconstructed checkpoints are within noise of chance "
                f"(mean accuracy {ch:.3f} for uniform guessing)" + (f": {', '.join(at)}." if at else "."))


def family(task: str) -> str:
    """``lsm_arith_mc`` → ``arith`` (other task names unchanged)."""
    return task[4:-3] if task.startswith("lsm_") and task.endswith("_mc") else task


# ---- reports ----------------------------------------------------------------------------
def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict], cols: list[str], digits: int = 3) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols])
    return buf.getvalue()


def typical_se(rows: list[dict], fams: list[str]) -> float:
    ses = [r[f + "_se"] for r in rows for f in fams if isinstance(r.get(f + "_se"), float) and not math.isnan(r[f + "_se"])]
    return sum(ses) / len(ses) if ses else math.nan


def mean_se(row: dict, fams: list[str]) -> float:
    """Standard error of the mean accuracy over families (independent test sets)."""
    ses = [row.get(f + "_se", math.nan) for f in fams]
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else math.nan


def compare(a: float, b: float, se: float, exact_b: bool = False) -> str:
    """'above' / 'below' / 'within noise of' for a vs b, both measured with standard error se
    (b exact with ``exact_b``): ``evaluate.verdict.compare``'s rule."""
    from lsm_dist.evaluate.verdict import compare as verdict

    return verdict(a, se, b, 0.0 if exact_b else se)


def write_report(ctx: Context, title: str, sections: list[str], observations: list[str],
                 tables: dict[str, tuple[list[dict], list[str]]], t0: float, extra: dict | None = None) -> Path:
    """``results.md`` (settings, tables, observations, times), one CSV per table
    (``results.csv`` for the first) and ``result.json`` with every number."""
    cfg = ctx.cfg
    total = time.perf_counter() - t0
    ctx.timings["total"] = total
    settings = (f"preset {cfg.preset}; zoo `{cfg.zoo_config}`" + (f"; models {cfg.models}" if cfg.models else "")
                + f"; samples {cfg.tokens}×{cfg.chunk} values; VAE `{cfg.vae_config}` "
                f"{cfg.vae or ''} trained {cfg.stage1_steps}+{cfg.stage2_steps} steps on "
                f"{', '.join(cfg.train_models)} (held out: {', '.join(cfg.heldout_models) or 'none'}); lm-eval "
                f"{', '.join(cfg.eval_tasks)} (acc, n={cfg.eval_n} test rows per family, 0-shot)"
                + ("; ppl = word perplexity of lsm_english_ppl (a fixed English text)" if cfg.ppl else ""))
    md = [f"# {title}\n", f"Settings: {settings}.\n"]
    md += sections
    md.append("## Observations\n")
    md += [f"- {o}" for o in observations] + [""]
    md.append("Times: " + ", ".join(f"{k} {v:.0f}s" for k, v in ctx.timings.items()) + "\n")
    path = ctx.out / "results.md"
    atomic_write_text(path, "\n".join(md))
    for i, (stem, (rows, cols)) in enumerate(tables.items()):
        atomic_write_text(ctx.out / ("results.csv" if i == 0 else f"{stem}.csv"), csv_text(rows, cols))
    atomic_write_json(ctx.out / "result.json", {
        "config": to_dict(cfg), "tables": {k: v[0] for k, v in tables.items()},
        "observations": observations, "timings": ctx.timings,
        "vae_metrics": {str(k): v for k, v in ctx.vae_metrics.items()}, **(extra or {})})
    return path


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_fig(fig, path: Path) -> Path:
    from lsm_dist.evaluate.plots import save

    return save(fig, path)  # cropped to what it draws (legends outside the axes included)
