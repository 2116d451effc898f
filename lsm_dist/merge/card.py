"""The model card of a merged checkpoint: ``README.md`` in Hugging Face model-card form and the
resolved plan ``lsm_merge_plan.yaml`` beside it, written by assembly into the checkpoint
directory (before ``MERGE_COMPLETE.json``).

- YAML front matter: ``base_model`` (the input checkpoints), ``tags: [merge, lsm_dist]``,
  ``library_name: transformers``;
- body: method and space, the inputs with their digests (content in latent space, the files'
  identity in weight space: ``checkpoint.identity_digest``) and the VAE's, the
  parameters (plan-level, per model, per tensor, slices), the VAE, the alignment, the plan
  digest, the project version and where the plan came from (e.g. a mergekit config);
- ``lsm eval`` appends / replaces a results table between two markers
  (:func:`record_scores`), only in cards this module wrote.

Neither file enters a digest: the merge's content digest and ``lsm eval``'s checkpoint
fingerprint cover config.json and the safetensors files, so writing or updating the card
re-scores nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lsm_dist.utils import atomic_write_text, get_logger

CARD = "README.md"
PLAN_FILE = "lsm_merge_plan.yaml"
MARK = "<!-- written by lsm_dist: lsm_dist.merge.card -->"
log = get_logger("lsm.merge")
EVAL_START, EVAL_END = "<!-- lsm eval results: start -->", "<!-- lsm eval results: end -->"


def _version() -> str:
    from lsm_dist import __version__

    return __version__


def plan_yaml(rp) -> str:
    """The resolved plan (every field, defaults included) as a loadable plan YAML."""
    from lsm_dist.merge.plan import plan_to_dict

    head = (f"# The resolved merge plan of this checkpoint (lsm_dist {_version()}, plan digest "
            f"{rp.digest}):\n# `lsm merge {PLAN_FILE}` repeats the merge.\n")
    return head + yaml.safe_dump(plan_to_dict(rp.plan), sort_keys=False, allow_unicode=True)


def _params_lines(rp) -> list[str]:
    from lsm_dist.merge.operators import MergeParams

    plan = rp.plan
    defaults = dataclasses.asdict(MergeParams())
    own = {k: v for k, v in dataclasses.asdict(plan.params).items() if v != defaults.get(k)}
    lines = [f"- `params`: `{json.dumps({k.rstrip('_'): v for k, v in own.items()})}`"
             if own else "- `params`: the defaults"]
    if plan.tensor_params:
        lines.append(f"- `tensor_params` (by tensor / depth): `{json.dumps(plan.tensor_params)}`")
    for m, e in plan.models.items():
        if e.params:
            lines.append(f"- `{m}`: `{json.dumps(e.params)}`")
    for k, s in enumerate(plan.slices or []):
        srcs = ", ".join(f"{x.model}[{x.layers[0]}:{x.layers[1]}]" for x in s.sources)
        extra = f", params `{json.dumps(s.params)}`" if s.params else ""
        lines.append(f"- slice {k}: {srcs}{extra}")
    return lines


def card_text(rp) -> str:
    """README.md of the checkpoint merged by ``rp`` (see module doc)."""
    plan = rp.plan
    used = [m for m in rp.models]
    front = {"base_model": [str(rp.models[m].path) for m in used], "tags": ["merge", "lsm_dist"],
             "library_name": "transformers"}
    space = {"latent": "latent space (LS-Merge: encode, merge, decode with the target's VAE)",
             "weight": "weight space"}[plan.space]
    rest = {"target": "copied from the target", "weight": "merged in weight space"}[plan.rest]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", MARK, "",
             f"# {Path(plan.out_dir).name}", "",
             f"Merged with lsm_dist {_version()}: method "
             f"`{plan.method}` in {space}; tensors outside `{'/'.join(plan.blocks)}` {rest}.", "",
             "## Inputs", "", f"| model | role | path | {'content' if plan.space == 'latent' else 'file'} digest | VAE digest |",
             "|---|---|---|---|---|"]
    for m in used:
        info = rp.models[m]
        role = ", ".join(r for r, on in (("target", m == plan.target), ("base", m == plan.base),
                                        ("input", m in plan.inputs)) if on) or "source"
        lines.append(f"| {m} | {role} | `{info.path}` | `{info.digest}` | `{info.vae_digest or '–'}` |")
    lines += ["", "## Parameters", "", f"- `method`: `{plan.method}`, `space`: `{plan.space}`, "
              f"`inputs`: `{plan.inputs}`, `base`: `{plan.base}`, `target`: `{plan.target}`",
              *_params_lines(rp)]
    if plan.dtype or plan.out_dtype:
        lines.append(f"- `dtype`: `{plan.dtype}`, `out_dtype`: `{plan.out_dtype}`")
    v = getattr(rp, "vocab", None)
    if v is not None:
        lines.append(f"- vocabulary: `{v.source}`, {len(v.tokens)} tokens, {v.size} rows (vocab_size); "
                     f"`tokens`: `{sorted(v.sources)}`, embeddings and head permuted into it per input")
    if plan.chat_template:
        lines.append(f"- chat template: `{plan.chat_template if len(plan.chat_template) < 40 else 'Jinja text'}`")
    vaes = {str(i.vae): i for i in rp.models.values() if i.vae is not None}
    lines += ["", "## VAE", ""]
    if not vaes:
        lines.append("None (weight space).")
    for path, i in vaes.items():
        c = i.vae_cfg
        shape = f"samples {c.tokens}×{c.chunk}, latent {tuple(c.latent_shape)}" if c is not None else ""
        lines.append(f"- `{path}` (digest `{i.vae_digest}`): {shape}")
    a = plan.alignment
    lines += ["", "## Alignment", "", *(_activations_lines(rp.alignment_report) if rp.alignment_report else [
              f"- `{a.method}`" + (f" (reg {a.reg}, max_samples {a.max_samples})" if a.method != "none" else "")
              + (f"; heterogeneous merge, layer map `{plan.layer_map}`" if rp.heterogeneous else "")]),
              *_dropped_lines(rp),
              "", "## Provenance", "",
              f"- plan digest `{rp.digest}`; resolved plan: [`{PLAN_FILE}`]({PLAN_FILE})",
              f"- lsm_dist version {_version()}" + (f"; read from `{plan.origin}`" if plan.origin else ""),
              f"- {len(rp.jobs)} tensor(s) written by the merge, {len(rp.outputs)} in the checkpoint", ""]
    return "\n".join(lines) + "\n"


def _dropped_lines(rp) -> list[str]:
    from lsm_dist.merge.plan import dropped_layers

    out = []
    for m, i in rp.models.items():
        d = dropped_layers(i.layer_map, i.num_layers)
        if d:
            out.append(f"- `{m}`: {len(d)} of its {i.num_layers} layers are read by no target layer "
                       f"(layer map `{i.layer_map}`): `{d}`")
    return out


def _activations_lines(report: dict) -> list[str]:
    """The card's account of a functional alignment (``merge.functional``)."""
    c = report["config"]
    lines = [f"- `activations` (functional alignment, lsm_dist.merge.functional): depth map `{c['depth']}`, "
             f"{c['calibration_items']} calibration items per task beside the English text, unit gains "
             + (f"within {c['max_gain']:g}x of the layer's median" if c.get("max_gain") else "unbounded")
             + (f"; task vector carried relative to `{c['source_base']}`" if c.get("source_base") else ""),
             "- the sources' MLPs (gate / up / down) are transported into the target's basis by OT couplings of "
             "their units' activations; attention, embeddings and norms are the target's (head shapes of "
             "different families do not correspond). Measured outcomes: docs/experiments.md (cross_arch)."]
    for m, r in report["models"].items():
        q = r["quality"]
        mean = {s: sum(v) / len(v) for s, v in q.items() if v}
        lines.append(f"- `{m}` → target: layer map `{r['layer_map']}`; source layers read by no target layer: "
                     f"`{r['dropped_source_layers'] or 'none'}`; {r['positions']} calibration positions; mean |cos| "
                     "of coupled units " + ", ".join(f"{s} {v:.3f}" for s, v in mean.items()))
    return lines


def write_card(model_dir: str | Path, rp) -> None:
    """``README.md`` and ``lsm_merge_plan.yaml`` into ``model_dir``; for a plan read from a
    mergekit config, that config as ``mergekit_config.yml`` too (as mergekit-yaml writes it)."""
    d = Path(model_dir)
    atomic_write_text(d / PLAN_FILE, plan_yaml(rp))
    atomic_write_text(d / CARD, card_text(rp))
    origin = rp.plan.origin or ""
    if origin.startswith("mergekit:"):
        src = Path(origin[len("mergekit:"):].split(" (", 1)[0])
        if src.is_file():
            atomic_write_text(d / "mergekit_config.yml", src.read_text())


def results_block(name: str, metrics: Mapping[str, Any]) -> str:
    """The markdown results section for one checkpoint's flat lm-eval metrics."""
    keys = [k for k in metrics if not k.endswith("_stderr") and metrics[k] is not None]
    lines = [EVAL_START, "## Evaluation (lsm eval)", "", f"Scored as `{name}`.", "",
             "| task / metric | value | stderr |", "|---|---|---|"]
    for k in keys:
        se = metrics.get(k + "_stderr")
        lines.append(f"| {k} | {metrics[k]:.4f} | {'–' if se is None else f'{se:.4f}'} |")
    return "\n".join(lines + [EVAL_END]) + "\n"


def record_scores(rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write each scored checkpoint's results into its model card (only cards lsm_dist wrote;
    the section between the markers is replaced, the rest kept). Returns the updated cards."""
    done = []
    for r in rows:
        card = Path(r.get("path", "")) / CARD
        try:
            text = card.read_text()
        except OSError:
            continue
        if MARK not in text:
            continue
        block = results_block(r["name"], r.get("metrics", {}))
        if EVAL_START in text and EVAL_END in text:
            head, rest = text.split(EVAL_START, 1)
            text = head + block + rest.split(EVAL_END, 1)[1].lstrip("\n")
        else:
            text = text.rstrip("\n") + "\n\n" + block
        try:
            atomic_write_text(card, text)
        except OSError as e:  # a read-only checkpoint: the scores are still in results/
            log.warning("model card %s not updated: %s", card, e)
            continue
        done.append(card)
    return done
