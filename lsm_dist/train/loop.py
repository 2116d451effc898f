"""The VAE training loop on DeepSpeed ZeRO (stages 1-3) through accelerate.

One function, :func:`run_train`, runs single-process, under ``torchrun`` / ``accelerate
launch`` / ``srun`` (rank and world come from :func:`lsm_dist.dist.read_env`). Steps are
optimizer steps; each takes ``grad_accum`` micro-batches of ``batch_size`` samples per rank.

Curriculum: stage 1 is a deterministic autoencoder (z = mu, loss = recon) for
``stage1_steps`` steps or until val/recon plateaus; stage 2 is the beta-VAE (z sampled,
loss = recon + beta*KL, beta optionally warmed up) for ``stage2_steps`` more. Each stage has
its own linear warm-up + cosine schedule (lr → min_lr).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lsm_dist.config import ConfigError, save_resolved, to_dict
from lsm_dist.console import progress
from lsm_dist.corpus.reader import Corpus, make_loader
from lsm_dist.dist import export_torch_env, read_env
from lsm_dist.model import BLOCK_IDS, TransformerVAE, VAEConfig, per_block_sse, vae_loss
from lsm_dist.train import checkpointing as ck
from lsm_dist.train.config import TrainConfig
from lsm_dist.train.data import EvalSet, TrainStream, blocks_of, choose_holdout, load_eval_set
from lsm_dist.train.metrics import MetricsWriter, peak_flops, rank_logger
from lsm_dist.train.setup import make_accelerator, open_corpus, verify_split
from lsm_dist.utils import atomic_write_json, sha256_json

NBLOCKS = len(BLOCK_IDS)
BLOCK_NAMES = {i: b for b, i in BLOCK_IDS.items()}
# run_dir/PREEMPTED: written (rank 0) when a signal stopped the run after a checkpoint, removed
# when a run starts; slurm/train_vae.sh requeues the job when it finds it
PREEMPTED = "PREEMPTED"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf."""


# ---- schedule ---------------------------------------------------------------------------------
class StageSchedule:
    """lr multiplier of step s (steps taken so far): per stage, linear warm-up then cosine to
    min_lr/lr. A pure function of (s, stage2_start), both in the checkpoint: nothing else to save."""

    def __init__(self, cfg: TrainConfig):
        self.warmup, self.s1, self.s2 = cfg.warmup_steps, cfg.stage1_steps, cfg.stage2_steps
        self.floor = cfg.min_lr / cfg.lr
        self.stage2_start: int | None = 0 if cfg.stage1_steps == 0 else None

    def __call__(self, s: int) -> float:
        if self.stage2_start is None or s < self.stage2_start:
            local, span = s, self.s1
        else:
            local, span = s - self.stage2_start, self.s2
        if local < self.warmup:
            return (local + 1) / (self.warmup + 1)
        prog = min(1.0, (local - self.warmup) / max(1, span - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * prog))


def param_groups(model: torch.nn.Module, weight_decay: float, skip_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, positions); the linear skip path
    (no decay: it is the PCA code) trains at ``lr_scale`` × the schedule's lr."""
    decay, no, skip = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("skip_"):
            skip.append(p)
        else:
            (decay if p.dim() >= 2 and "dec_pos" not in name else no).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no, "weight_decay": 0.0, "lr_scale": 1.0}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "lr_scale": skip_lr_scale})
    return groups


# ---- state --------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0
    stage2_start: int | None = None
    best: float | None = None  # stage-1 plateau tracker on val/recon
    bad: int = 0
    metrics: dict = field(default_factory=dict)

    def stage(self, step: int | None = None) -> int:
        s = self.step if step is None else step
        return 2 if self.stage2_start is not None and s >= self.stage2_start else 1

    def end_step(self, cfg: TrainConfig) -> int:
        start2 = self.stage2_start if self.stage2_start is not None else cfg.stage1_steps
        return start2 + cfg.stage2_steps


def corpus_digest(corpus: Corpus) -> str:
    return corpus.manifest["plan_digest"]


def data_digest(cfg: TrainConfig, corpus: Corpus) -> str:
    return sha256_json([corpus_digest(corpus), cfg.batch_size, cfg.grad_accum, cfg.seed,
                        cfg.shuffle_buffer, cfg.val_fraction])[:16]


def trainer_state(cfg: TrainConfig, prog: Progress, world: int, corpus: Corpus) -> dict:
    return {
        "format": ck.STATE_FORMAT,
        "step": prog.step,
        "stage": prog.stage(),
        "stage2_start": prog.stage2_start,
        "plateau": {"best": prog.best, "bad": prog.bad},
        "data": {"batches_consumed": prog.step * cfg.grad_accum, "batch_size": cfg.batch_size,
                 "grad_accum": cfg.grad_accum, "seed": cfg.seed, "digest": data_digest(cfg, corpus),
                 "corpus": str(Path(corpus.path).resolve()), "corpus_digest": corpus_digest(corpus)},
        "rng": "random_states_<rank>.pkl (python, numpy, torch; written by accelerate.save_state)",
        "world_size": world,
        "model_digest": cfg.model_digest(),
        "model": to_dict(cfg.model),
        "roles": corpus.manifest["roles"],  # role ids the model was trained with (cond)
        "config_digest": sha256_json(to_dict(cfg))[:16],
        "metrics": prog.metrics,
        "time": time.time(),
    }


# ---- collectives -----------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def _block_metrics(prefix: str, sse: torch.Tensor, cnt: torch.Tensor) -> dict[str, float]:
    out = {}
    if cnt.sum() > 0:
        out[f"{prefix}/recon"] = float(sse.sum() / cnt.sum())
    for i in range(NBLOCKS):
        if cnt[i] > 0:
            out[f"{prefix}/recon_{BLOCK_NAMES[i]}"] = float(sse[i] / cnt[i])
    return out


def _cond(batch: dict, model_cfg: VAEConfig, device) -> dict | None:
    if model_cfg.cond == "none":
        return None
    return {k: batch[k].to(device) for k in ("layer", "block", "role")}


@torch.no_grad()
def evaluate(model, ev: EvalSet, batch_size: int, model_cfg: VAEConfig, device, prefix: str
             ) -> dict[str, float]:
    """Plain MSE (z = mu) over this rank's share, all-reduced; per block type too."""
    sse = torch.zeros(NBLOCKS, dtype=torch.float64, device=device)
    cnt = torch.zeros(NBLOCKS, dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, len(ev), batch_size):
        x = ev.x[i:i + batch_size].to(device)
        b = {"layer": ev.layer[i:i + batch_size], "block": ev.block[i:i + batch_size],
             "role": ev.role[i:i + batch_size]}
        out = model(x, cond=_cond(b, model_cfg, device), sample=False)
        s, c = per_block_sse(out["x_hat"], x, b["block"].to(device), NBLOCKS)
        sse += s
        cnt += c
    model.train()
    both = _all_reduce(torch.cat([sse, cnt])).cpu()
    return _block_metrics(prefix, both[:NBLOCKS], both[NBLOCKS:])


class _StopFlag:
    """SIGUSR2 / SIGTERM → checkpoint at the end of the current step and return (preemption)."""

    def __init__(self):
        self.set = False
        self.old = {}
        with contextlib.suppress(ValueError):  # not in the main thread
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.set = True

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


# ---- the loop -----------------------------------------------------------------------------------
def run_train(cfg: TrainConfig) -> dict:
    """Train (or resume) the VAE described by ``cfg``; returns the final metrics (every rank)."""
    env = read_env()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    run_dir = Path(cfg.run_dir)

    # fail fast, before any process group: corpora, shapes, resume target, digests
    corpus = open_corpus(cfg.corpus, "corpus", cfg.model)
    heldout = open_corpus(cfg.heldout_corpus, "heldout_corpus", cfg.model) if cfg.heldout_corpus else None
    delta = corpus.manifest.get("delta")  # a delta corpus: the VAE codes task vectors of its base
    if heldout is not None and (heldout.manifest.get("delta") or {}).get("base_digest") != (delta or {}).get("base_digest"):
        raise ConfigError(f"heldout_corpus {cfg.heldout_corpus} and corpus {cfg.corpus} are not both weights, "
                          "or not task vectors of the same base")
    if cfg.model.delta is not None and cfg.model.delta != delta:
        raise ConfigError(f"model.delta={cfg.model.delta} but corpus {cfg.corpus} records {delta}")
    cfg.model.delta = delta
    if cfg.stage1_plateau.patience > 0 and cfg.val_fraction == 0:
        raise ConfigError("stage1_plateau.patience: needs validation samples (val_fraction > 0)")
    ck.claim_run_dir(run_dir)
    resume_from = ck.find_resume(run_dir, cfg.resume)
    if resume_from is not None:
        saved = ck.read_state(resume_from)
        ck.check_compatible(saved, resume_from, cfg.model_digest(), env.world_size)
        ck.check_same_corpus(saved, resume_from, Path(corpus.path).resolve(), corpus_digest(corpus))
        ck.check_pickles(resume_from)  # before any process group: a refused file fails fast

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    export_torch_env(env, single_process=True)
    acc, ds, ds_path = make_accelerator(cfg, env, bf16)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    device = acc.device
    log = rank_logger(run_dir, rank)
    if main:
        ck.mark_run_dir(run_dir)
        save_resolved(cfg, run_dir / "config.yaml")
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        for p in ck.clean_partial(run_dir):
            log.info("removed %s (a checkpoint save killed before it completed)", p)
    log.info("rank %d/%d on %s, ZeRO-%s (%s), %s, corpus %s: %d samples", rank, world, device,
             ds["zero_optimization"]["stage"], ds_path, "bf16" if bf16 else "fp32", corpus.path,
             corpus.num_samples)
    if cfg.verify_corpus:
        verify_split(corpus, rank, world)

    # model, optimizer, schedule
    torch.manual_seed(cfg.seed)
    model = TransformerVAE(cfg.model)
    holdout = choose_holdout(corpus, cfg.val_fraction, cfg.seed)
    if cfg.model.skip != "none" and cfg.skip_init == "pca" and resume_from is None:
        keys = [(ti, start) for ti, start, _n, _b in blocks_of(corpus) if (ti, start) not in holdout]
        fit = load_eval_set(corpus, keys, cfg.skip_init_samples, cfg.seed).x
        kept = model.init_skip_pca(fit)
        log.info("linear skip path initialized as the PCA code of %d training samples "
                 "(keeps %.1f%% of their energy)", len(fit), 100 * kept)
    nparams = model.num_parameters()
    flops_per_sample = model.flops_per_sample(training=True)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.skip_lr_scale), lr=cfg.lr,
                            betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    schedule = StageSchedule(cfg)
    engine, _ = acc.prepare(model, opt)
    log.info("VAE %.2fM parameters, %.1f MFLOP/sample (train), compression %.2fx",
             nparams / 1e6, flops_per_sample / 1e6, cfg.model.compression_ratio)

    prog = Progress(stage2_start=schedule.stage2_start)
    if resume_from is not None:
        state = ck.load_checkpoint(acc, resume_from)
        prog = Progress(step=state["step"], stage2_start=state["stage2_start"],
                        best=state["plateau"]["best"], bad=state["plateau"]["bad"],
                        metrics=state.get("metrics", {}))
        schedule.stage2_start = prog.stage2_start
        if state["data"]["digest"] != data_digest(cfg, corpus):
            log.warning("resume: batch / seed / shuffle / val_fraction settings (or, for a checkpoint "
                        "from before corpus digests were recorded, the corpus) changed since the "
                        "checkpoint: the data stream will not continue exactly")
        log.info("resumed from %s at step %d (stage %d)", resume_from, prog.step, prog.stage())

    val = load_eval_set(corpus, sorted(holdout), cfg.val_max_samples, cfg.seed).shard(rank, world)
    held = (load_eval_set(heldout, None, cfg.val_max_samples, cfg.seed,
                          roles=corpus.manifest["roles"]).shard(rank, world)
            if heldout is not None else None)
    stream = TrainStream(corpus, cfg.batch_size, exclude=holdout, rank=rank, world_size=world,
                         seed=cfg.seed, resampled=True, shuffle_buffer=cfg.shuffle_buffer,
                         start_batches=prog.step * cfg.grad_accum)
    with torch.random.fork_rng(devices=[]):  # DataLoader.__iter__ draws a base seed from the
        # global RNG: keep it out of it
        batches = iter(make_loader(stream, cfg.num_workers, kind=cfg.loader))
    # a fresh start over a dead run's records (killed before its first complete checkpoint):
    # they are dropped (step -1), as a resume drops those past its checkpoint
    writer = MetricsWriter(run_dir, main, prog.step if resume_from is not None else -1)
    peak = peak_flops(device)
    stop = _StopFlag()
    last_ckpt = resume_from
    eval_bs = max(cfg.batch_size, 1)

    def validate() -> dict[str, float]:
        out = {}
        if cfg.val_fraction > 0:
            out |= evaluate(engine, val, eval_bs, cfg.model, device, "val")
        if held is not None:
            out |= evaluate(engine, held, eval_bs, cfg.model, device, "heldout")
        return out

    def checkpoint() -> Path:
        path = ck.save_checkpoint(acc, run_dir, prog.step, trainer_state(cfg, prog, world, corpus),
                                  cfg.keep_last_k)
        log.info("checkpoint %s", path)
        return path

    # on the device (NCCL reduces device tensors; no host sync per micro-batch)
    win = torch.zeros(5 + 2 * NBLOCKS, dtype=torch.float64, device=device)  # loss recon kl micro n sse cnt
    one = torch.ones(1, dtype=torch.float64, device=device)
    win_time, t_log, data_wait, last_logged = 0.0, time.perf_counter(), 0.0, prog.step
    grad_norm = float("nan")
    bar = progress(total=prog.end_step(cfg), initial=prog.step, desc="train", unit="step",
                   disable=not (main and cfg.progress))
    try:
        if main and prog.step == 0:
            writer.log(0, "stage", {"train/stage": 1.0 if prog.stage2_start != 0 else 2.0})
        while prog.step < prog.end_step(cfg):
            stage = prog.stage()
            beta = 0.0 if stage == 1 else _beta(cfg, prog.step - prog.stage2_start)
            lr = cfg.lr * schedule(prog.step)  # the lr is a function of (step, stage2_start)
            _set_lr(engine, opt, lr)
            t0 = time.perf_counter()
            bad = torch.zeros(2, dtype=torch.float64, device=device)  # [non-finite, stop requested]
            for _ in range(cfg.grad_accum):
                td = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - td
                x = batch["x"].to(device, non_blocking=True)
                if cfg.debug_nan_at_step == prog.step + 1 and rank == 0:
                    x = x * float("nan")
                with acc.accumulate(engine):
                    out = engine(x, cond=_cond(batch, cfg.model, device), sample=stage == 2)
                    losses = vae_loss(out, x, beta=beta, kind=cfg.recon,
                                      **_recon_kw(cfg))
                    acc.backward(losses["loss"])
                vals = torch.stack([losses["loss"].detach(), losses["recon"].detach(),
                                    losses["kl"].detach()]).double()
                bad[0] = torch.maximum(bad[0], (~torch.isfinite(vals)).any().double())
                sse, cnt = per_block_sse(out["x_hat"], x, batch["block"].to(device), NBLOCKS)
                win += torch.cat([vals, one, one * x.shape[0], sse, cnt])
            prog.step += 1
            bar.update()
            if bar.total != prog.end_step(cfg):  # stage 1 plateaued: fewer steps
                bar.set_total(prog.end_step(cfg))
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            if gn is not None and not math.isfinite(grad_norm):
                bad[0] = 1.0
            bad[1] = 1.0 if stop.set else 0.0
            bad = _all_reduce(bad, torch.distributed.ReduceOp.MAX).cpu()  # the one sync per step
            if bad[0] > 0:
                msg = (f"training diverged: the loss or gradient norm is NaN/Inf at step "
                       f"{prog.step} (stage {stage}); no checkpoint was written for this state. "
                       f"Last good checkpoint: {last_ckpt or 'none'} (resume=auto restarts from it; "
                       f"lower lr or check the corpus)")
                log.error(msg)
                raise TrainingDiverged(msg)
            win_time += time.perf_counter() - t0

            end = prog.end_step(cfg)
            if prog.step % cfg.log_every == 0 or prog.step == end:
                tot = _all_reduce(win.clone()).cpu()
                n = max(tot[3].item(), 1.0)
                sps = tot[4].item() / max(win_time, 1e-9)
                # train/recon (+ _attn, _mlp) is the plain MSE (comparable with val/recon and
                # across loss kinds); train/recon_loss is the objective's term (e.g. mse_tail)
                m = {"train/loss": tot[0].item() / n, "train/recon_loss": tot[1].item() / n,
                     "train/kl": tot[2].item() / n, "train/beta": beta,
                     "train/lr": lr, "train/grad_norm": grad_norm,
                     "train/stage": float(stage), "perf/samples_per_s": sps,
                     "perf/tokens_per_s": sps * cfg.model.tokens,
                     # this rank's wait for its next batch, per optimizer step in the window
                     "perf/data_wait_ms": 1e3 * data_wait / max(prog.step - last_logged, 1)}
                m |= _block_metrics("train", tot[5:5 + NBLOCKS], tot[5 + NBLOCKS:])
                if peak:
                    m["perf/mfu"] = sps * flops_per_sample / (peak * world)
                if device.type == "cuda":
                    m["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                writer.log(prog.step, "train", m)
                bar.set_postfix_str(f"stage {stage} loss {m['train/loss']:.4g}")
                prog.metrics |= m
                log.info("step %d/%d stage %d loss %.6g mse %.6g kl %.4g lr %.3g gnorm %.3g "
                         "%.1f samples/s (%.0fs)", prog.step, end, stage, m["train/loss"],
                         m["train/recon"], m["train/kl"], m["train/lr"], grad_norm, sps,
                         time.perf_counter() - t_log)
                win.zero_()
                win_time, data_wait, last_logged = 0.0, 0.0, prog.step

            if (cfg.val_every and prog.step % cfg.val_every == 0) or prog.step == end:
                vm = validate()
                if vm:
                    writer.log(prog.step, "val", vm)
                    prog.metrics |= vm
                    log.info("step %d %s", prog.step,
                             " ".join(f"{k} {v:.6g}" for k, v in vm.items()))
                if stage == 1 and cfg.stage1_plateau.patience and "val/recon" in vm:
                    update_plateau(prog, vm["val/recon"], cfg)
                    if prog.bad >= cfg.stage1_plateau.patience and prog.step < cfg.stage1_steps:
                        log.info("stage 1 plateaued at step %d (val/recon %.6g)", prog.step, prog.best)
                        _start_stage2(prog, schedule, writer)
            if prog.stage2_start is None and prog.step >= cfg.stage1_steps:
                _start_stage2(prog, schedule, writer)

            final = prog.step >= prog.end_step(cfg)
            if (cfg.ckpt_every and prog.step % cfg.ckpt_every == 0) or final or bad[1] > 0:
                last_ckpt = checkpoint()
            if bad[1] > 0 and not final:
                log.info("stop requested (signal): checkpointed step %d, exiting", prog.step)
                if main:
                    atomic_write_json(run_dir / PREEMPTED, {"step": prog.step,
                                                            "checkpoint": str(last_ckpt)})
                return {**prog.metrics, "step": prog.step, "stage": prog.stage(),
                        "checkpoint": str(last_ckpt), "preempted": True}

        if last_ckpt is None or ck.read_state(last_ckpt)["step"] != prog.step:
            last_ckpt = checkpoint()
        result = {**prog.metrics, "step": prog.step, "stage": prog.stage(),
                  "checkpoint": str(last_ckpt)}
        if cfg.export:
            if main:
                result["vae"] = str(ck.export_vae(run_dir, last_ckpt))
                log.info("exported the VAE to %s", result["vae"])
            acc.wait_for_everyone()
        if main:
            writer.log(prog.step, "final", dict(prog.metrics), tb=False)  # summary: jsonl only
        return result
    finally:
        bar.close()
        stop.restore()
        writer.close()
        # a local operation (no collective): frees the rendezvous so a later run in this process
        # (notebook, demo, tests) starts from a clean accelerate / torch.distributed state
        if torch.distributed.is_initialized():  # DeepSpeed's call also drops its cached groups
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


# ---- helpers ------------------------------------------------------------------------------------
def _recon_kw(cfg: TrainConfig) -> dict:
    if cfg.recon == "mse_tail":
        return {"tail_weight": cfg.tail_weight}
    if cfg.recon == "huber":
        return {"huber_delta": cfg.huber_delta}
    return {}


def _beta(cfg: TrainConfig, local_step: int) -> float:
    if cfg.beta_warmup_steps <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, (local_step + 1) / cfg.beta_warmup_steps)


def update_plateau(prog: Progress, value: float, cfg: TrainConfig) -> None:
    if prog.best is None or value < prog.best * (1.0 - cfg.stage1_plateau.min_rel_improvement):
        prog.best, prog.bad = value if prog.best is None else min(value, prog.best), 0
    else:
        prog.bad += 1
        prog.best = min(prog.best, value)


def _set_lr(engine, opt, lr: float) -> None:
    # looked up every time: loading a checkpoint replaces the optimizer's param_groups list
    for groups in (opt.param_groups, getattr(engine.optimizer, "param_groups", [])):
        for g in groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def _start_stage2(prog: Progress, schedule: StageSchedule, writer: MetricsWriter) -> None:
    prog.stage2_start = prog.step
    schedule.stage2_start = prog.step
    writer.log(prog.step, "stage", {"train/stage": 2.0})
