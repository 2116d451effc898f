"""``run_merge(plan) -> Path``: resolve → encode → merge + decode → assemble.

Latent space: every operand model is encoded (cached), each target tensor is merged in
latent space and decoded with the target's VAE, tensor by tensor, layer file by layer file.
Weight space (the baselines): the same operators on the weight tensors, then assembly.
Memory is bounded by one tensor's working set (the operands' latents or weights of one
tensor, its samples) plus the VAE(s).

In one process the stages run back to back. Across ranks / Slurm array tasks, run them as
separate steps, each splitting its work with ``read_env().worker_slot()``::

    lsm encode -c plan.yaml --worker      # every task: its share of (model, tensor) pairs
    lsm encode -c plan.yaml --finalize    # once: check and write the latent manifests
    lsm merge  -c plan.yaml --worker      # every task: its share of the layer files
    lsm assemble -c plan.yaml             # once: the HF checkpoint + MERGE_COMPLETE.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lsm_dist.merge.assemble import assemble, is_complete, remove_own_layers
from lsm_dist.merge.card import write_card
from lsm_dist.merge.decode import group_done, merge_weight_rows, merge_weight_tensor, run_decode
from lsm_dist.merge.encode import run_encode
from lsm_dist.merge.plan import (
    MergePlan,
    ResolvedPlan,
    check_out_dir,
    load_plan,
    parse_size,
    resolve_plan,
    write_plan_record,
)
from lsm_dist.merge.vocab import write_tokenizer
from lsm_dist.utils import get_logger

log = get_logger("lsm.merge")


def prepare(plan: MergePlan | str | Path, overrides: Sequence[str] = ()) -> ResolvedPlan:
    """Load (if a path) and resolve a plan, then claim its out_dir (all checks; no heavy work,
    except the one-time transport of ``alignment: activations``, cached, after the checks of
    the out_dir)."""
    if not isinstance(plan, MergePlan):
        plan = load_plan(plan, overrides)
    report = None
    if plan.alignment.method == "activations":
        from lsm_dist.config import to_dict
        from lsm_dist.merge.functional import dropped_note, transport_plan

        check_out_dir(plan)
        original = to_dict(plan.alignment)
        plan, models = transport_plan(plan)
        report = {"config": original, "models": models}
        for line in dropped_note(models):
            log.warning("alignment: %s", line)
    rp = resolve_plan(plan)
    rp.alignment_report = report
    write_plan_record(rp)
    return rp


def run_assemble(rp: ResolvedPlan, direct: bool = False, bar: bool = False) -> Path:
    """Assemble ``out_dir/model`` from the layer files; ``direct``: merge the tensors whose layer
    file is not written as the checkpoint is written (weight space, one process: each merged
    tensor written once, by row blocks where the method allows)."""
    if is_complete(rp.model_dir, rp.digest):
        return rp.model_dir
    groups = {g: [j.name for j in jobs] for g, jobs in rp.groups.items()}
    t = rp.models[rp.plan.target]
    # mergekit writes the tokenizer it built (or, for a chat template, the target's re-saved)
    # instead of copying the target's tokenizer files
    built = rp.vocab is not None or bool(rp.plan.chat_template and rp.plan.copy_tokenizer)
    if rp.plan.chat_template and not built:
        log.warning("chat_template: no tokenizer is written (copy_tokenizer: false), so neither is the template")

    def extra(tmp: Path) -> None:
        if built:
            write_tokenizer(rp, tmp)
        write_card(tmp, rp)

    compute, computed = None, ()
    if direct:
        if rp.plan.space != "weight":
            raise ValueError("a direct assembly merges in weight space only (latent merges write layer files)")
        done = {g for g in groups if rp.layers_dir.is_dir() and group_done(rp, g)}
        computed = [n for g, names in groups.items() if g not in done for n in names]
        groups = {g: groups[g] for g in done}
        jobs = {j.name: j for js in rp.groups.values() for j in js}
        checkpoints = {m: i.open() for m, i in rp.models.items()}

        def compute(name: str):
            rows = merge_weight_rows(rp, jobs[name], checkpoints)
            return merge_weight_tensor(rp, jobs[name], checkpoints) if rows is None else rows

    out = assemble(t.open(), rp.layers_dir, rp.model_dir, rp.digest,
                   parse_size(rp.plan.max_shard_size), groups,
                   extra={"method": rp.plan.method, "space": rp.plan.space},
                   outputs=rp.outputs, config_patch=rp.config_patch,
                   write_extra=extra, copy_tokenizer=rp.plan.copy_tokenizer and not built,
                   compute=compute, computed=computed, bar=bar, release=not rp.plan.keep_layers)
    if not rp.plan.keep_layers:  # the checkpoint holds every merged tensor: the layer files go
        remove_own_layers(rp.layers_dir)
    return out


def run_merge(plan: MergePlan | str | Path, overrides: Sequence[str] = (), bar: bool = False) -> Path:
    """The whole merge in this process; returns ``out_dir/model`` (finished and checked).
    ``bar``: console bars over the encoded tensors and the layer files (``lsm merge``)."""
    rp = prepare(plan, overrides)
    if is_complete(rp.model_dir, rp.digest):
        log.info("merge %s: already complete in %s", rp.digest, rp.model_dir)
        return rp.model_dir
    if rp.plan.space == "weight" and not rp.plan.keep_layers:
        # one process, weight space: merged as the checkpoint is written (no layer files)
        return run_assemble(rp, direct=True, bar=bar)
    vaes: dict = {}
    if rp.plan.space == "latent":
        s = run_encode(rp, vaes=vaes, bar=bar)
        log.info("encode: %d tensor(s) encoded, %d reused from the cache", s["encoded"], s["reused"])
    s = run_decode(rp, vaes=vaes, bar=bar)
    log.info("merge: %d layer file(s) written, %d already done", s["written"], s["skipped"])
    return run_assemble(rp)
