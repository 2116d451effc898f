"""Functional alignment (``alignment: activations``): carry a model of another family, width and
depth into the target's basis by matching what their units compute, then merge as if the two
were one architecture (in weight space, or encoded by the VAE in latent space).

The paper's aligner (``merge.hetero``) maps the *distribution* of a source tensor's latent
chunks onto the target's; nothing in it makes a source MLP neuron correspond to a target one.
This one follows OTFusion (Singh & Jaggi 2020; Imfeld et al. 2024 for transformers) and aligns
on activations:

1. **Calibration.** Both models read the same text (:func:`calibration_documents`: the English
   text shipped with the package and items of the project's tasks). Their tokenizers differ,
   so hidden states are compared at *word ends*: character offsets where a word ends and both
   tokenizers end a token -- there both models have read exactly the same characters.
2. **Depth.** Each target layer gets one source layer: proportional (``merge.hetero``), or
   ``cka``: the non-decreasing assignment maximizing the summed linear CKA of the layers' MLP
   inputs (dynamic programming). Source layers no target layer reads are reported as dropped.
3. **Units, per paired layer and per site**: the MLP input (after the pre-MLP norm), the MLP
   neurons (the input of ``down_proj``) and the MLP output. Each unit is scaled by its root
   mean square ρ (not centred: the maps are linear and act on the raw activations, whose means
   they must carry too -- with centring, a unit of large mean and small spread, as the
   residual's outlier channels are, was amplified by σ_s/σ_t. Measured: this alone does not
   rescue Gemma-3 → SmolLM2, whose 5 % merge stays destroyed, docs/experiments.md); the cost of pairing target
   unit j with source unit i is ``1 − |cos(j, i)|`` (the cosine of the two units' activation
   vectors over the calibration positions); an exact optimal transport plan Γ with uniform
   marginals (``ot.emd``; a signed permutation when the widths are equal) couples the units,
   and its row-normalized form P (rows sum to 1) with the signs of the cosines and the
   units' scales gives the linear maps ``R_t←s = diag(ρ_t)(P ⊙ S)diag(1/ρ_s)`` and back. Each
   pair's gain ρ_t/ρ_s is bounded within ``max_gain`` (default 2) of the P-weighted median gain
   of the site: a unit the target uses for its massive activations (SmolLM2's layer-11 MLP writes
   channels of RMS 2·10³) otherwise multiplied an ordinary Gemma-3 unit by up to 4·10⁴, and a
   5 % merge reached perplexity 10⁴ (docs/experiments.md).
4. **Transport** of the source MLP of the paired layer into the target's shapes:
   ``gate' = P_n · G_s · R_in(s←t)``, ``up' = R_n(t←s) · U_s · R_in(s←t)``,
   ``down' = R_out(t←s) · D_s · R_n(s←t)`` (the gate keeps its pre-activation scale; signs and
   scales ride on ``up`` / ``down``, the symmetries of a gated MLP). A target transported onto
   itself, or a copy of it with permuted and sign-flipped neurons, comes back exactly.
5. **What is not transported**: attention. Head shapes of different families rarely match
   (SmolLM2: 9 heads of 64, Gemma-3-270M: 4 of 256) and a head mixes rotary pairs that a unit
   coupling would tear apart, so the transported checkpoint keeps the *target's* attention,
   embeddings and norms: a merge with it changes the target's MLPs only.

``source_base``: the source's task vector is carried instead of the source itself -- the
checkpoint written is ``W_t + T(W_source) − T(W_source_base)`` on the MLPs (maps fitted on the
source base), so a task-arithmetic merge adds the transported skill onto the target.

``transport_plan(plan)`` runs this for every non-target operand and returns the plan with those
models replaced by their transported checkpoints (cached in ``utils.cache_root()/aligned/`` under
a digest of both models, the calibration and the settings), plus a report for the model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lsm_dist.config import ConfigError
from lsm_dist.utils import atomic_write_json, get_logger, read_json, sha256_json

log = get_logger("lsm.merge")
ALIGN_VERSION = 3  # bump when the transport changes its output (enters the cache digest)
SITES = ("in", "neurons", "out")
MARKER = "lsm_alignment.json"
MLP = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- calibration
def calibration_documents(task_items: int = 200, seed: int = 0) -> list[str]:
    """The English text (one document per paragraph), then ``task_items`` training items of each
    zoo task family, 20 to a document (``Q: 18+7= A: 25``): what both models read."""
    from lsm_dist.evaluate.tasks import english_documents
    from lsm_dist.zoo import tasks as T

    docs = english_documents()
    for task in T.TASK_NAMES:
        items = T.examples(task, "train", task_items, seed)
        docs += ["\n".join(e.prompt + e.answer for e in items[i : i + 20]) for i in range(0, len(items), 20)]
    return docs


def word_ends(text: str, offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """``{character offset: token index}`` of the tokens that end a word (the character before
    the offset is a letter or digit, the one at it is not, or the text ends)."""
    out = {}
    for i, (a, b) in enumerate(offsets):
        if b > a and text[b - 1].isalnum() and (b == len(text) or not text[b].isalnum()):
            out[b] = i
    return out


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``: Llama, Qwen2, Gemma-3,
    Mistral, ...), each with ``mlp.{gate,up,down}_proj``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(l_, "mlp", None), p) for l_ in layers for p in MLP):
        raise ConfigError(f"alignment: activations: {type(model).__name__} has no model.layers[i].mlp "
                          "with gate_proj / up_proj / down_proj (a gated MLP is what is transported)")
    return layers


@torch.no_grad()
def capture(model_dir: str | Path, docs: Sequence[str], max_tokens: int = 512) -> tuple[list, dict]:
    """Run the model on ``docs``; returns ``(keys, acts)``: ``keys[k] = (doc, char offset)`` of
    every word end, ``acts[layer][site]`` the (N, width) float32 activations there."""
    from lsm_dist.checkpoint import load_causal_lm, load_tokenizer
    from lsm_dist.utils import quiet_transformers

    with quiet_transformers():
        model = load_causal_lm(model_dir, torch.float32).eval()
        tok = load_tokenizer(model_dir)
    layers = decoder_layers(model)
    body = model.model
    max_tokens = min(max_tokens, getattr(model.config, "max_position_embeddings", None) or max_tokens)
    rows: dict[int, dict[str, list]] = {i: {s: [] for s in SITES} for i in range(len(layers))}
    where: list[int] = []
    hooks = []

    def keep(i: int, site: str, output: bool = False):
        def hook(module, args, out=None) -> None:
            x = out if output else args[0]
            rows[i][site].append(x[0, where].float().numpy())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.register_forward_pre_hook(keep(i, "in")))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(keep(i, "neurons")))
        hooks.append(layer.mlp.register_forward_hook(keep(i, "out", output=True)))
    keys: list[tuple[int, int]] = []
    try:
        for d, text in enumerate(docs):
            enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=max_tokens)
            ends = word_ends(text, enc["offset_mapping"])
            if not ends:
                continue
            where[:] = list(ends.values())
            keys += [(d, c) for c in ends]
            body(input_ids=torch.tensor([enc["input_ids"]]), use_cache=False)  # no LM head: not needed
    finally:
        for h in hooks:
            h.remove()
    acts = {i: {s: np.concatenate(v[s]) for s in SITES} for i, v in rows.items()}
    return keys, acts


def shared_rows(keys_t: list, keys_s: list) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the word ends both models saw (same document, same character offset)."""
    pos_s = {k: i for i, k in enumerate(keys_s)}
    both = [(i, pos_s[k]) for i, k in enumerate(keys_t) if k in pos_s]
    if len(both) < 16:
        raise ConfigError(f"alignment: activations: only {len(both)} word ends shared by the two "
                          "tokenizations of the calibration text (need >= 16)")
    it, is_ = zip(*both)
    return np.asarray(it), np.asarray(is_)


# ----------------------------------------------------------------------------- couplings
def _normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit (column) over its root mean square, and the RMS (uncentred: module doc)."""
    x = x.astype(np.float64)
    rms = np.sqrt((x * x).mean(0))
    return x / _safe(rms), rms


@dataclasses.dataclass
class Coupling:
    """Target units (rows) ↔ source units (columns): row-normalized plan ``P`` (rows sum to 1),
    signs ``S`` of the cosines, the units' RMS scales, the mean |cos| of the coupled pairs (the
    quality reported) and ``max_gain``: the bound on a pair's scale ratio ρ_t/ρ_s around the
    median over the coupled pairs (0: unbounded; module doc, step 3)."""

    P: np.ndarray
    S: np.ndarray
    rms_t: np.ndarray
    rms_s: np.ndarray
    quality: float
    max_gain: float = 0.0

    def gains(self) -> np.ndarray:
        """(n_t, n_s): ρ_t/ρ_s of every pair, within ``max_gain`` of the coupled pairs' median
        (the P-weighted median of the log-ratios)."""
        g = np.log(_safe(self.rms_t))[:, None] - np.log(_safe(self.rms_s))[None, :]
        if self.max_gain > 0:
            sup = self.P > 0
            vals, w = g[sup], self.P[sup]
            order = np.argsort(vals)
            cum = np.cumsum(w[order])
            med = vals[order][np.searchsorted(cum, cum[-1] / 2)]
            bound = np.log(self.max_gain)
            g = np.clip(g, med - bound, med + bound)
        return np.exp(g)

    def t_from_s(self, signed: bool = True, scaled: bool = True) -> np.ndarray:
        """(n_t, n_s): a source unit vector → the target units' estimate."""
        M = self.P * self.S if signed else self.P.copy()
        return M * self.gains() if scaled else M

    def s_from_t(self) -> np.ndarray:
        """(n_s, n_t): a target unit vector → the source units' estimate."""
        Q = self.P.T * (self.P.shape[0] / self.P.shape[1])  # columns of Γ, rows summing to 1
        return Q * self.S.T / self.gains().T


def _safe(sd: np.ndarray) -> np.ndarray:
    return np.where(sd > 0, sd, 1.0)


def couple(a_t: np.ndarray, a_s: np.ndarray, max_gain: float = 0.0) -> Coupling:
    """The exact OT coupling of target units to source units by |cosine| (module doc)."""
    import ot

    zt, rms_t = _normalize(a_t)
    zs, rms_s = _normalize(a_s)
    cos = zt.T @ zs / max(len(zt), 1)
    cost = 1.0 - np.abs(cos)
    nt, ns = cos.shape
    G = ot.emd(np.full(nt, 1.0 / nt), np.full(ns, 1.0 / ns), cost, numItermax=max(10**6, 50 * nt * ns))
    P = G * nt
    S = np.where(cos < 0, -1.0, 1.0)
    return Coupling(P, S, rms_t, rms_s, float((P * np.abs(cos)).sum(1).mean()), max_gain)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two activation matrices over the same rows."""
    x = x.astype(np.float64) - x.mean(0)
    y = y.astype(np.float64) - y.mean(0)
    xy = np.linalg.norm(x.T @ y) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(xy / den) if den > 0 else 0.0


def cka_layer_map(sim: np.ndarray) -> list[int]:
    """The non-decreasing map target layer → source layer maximizing the summed similarity
    ``sim[t, s]`` (dynamic programming over (t, s))."""
    nt, ns = sim.shape
    best = np.full((nt, ns), -np.inf)
    arg = np.zeros((nt, ns), dtype=int)
    best[0] = sim[0]
    for t in range(1, nt):
        run = np.maximum.accumulate(best[t - 1])
        idx = np.zeros(ns, dtype=int)
        for s in range(1, ns):
            idx[s] = s if best[t - 1][s] >= run[s - 1] else idx[s - 1]
        best[t] = run + sim[t]
        arg[t] = idx
    out = [int(best[-1].argmax())]
    for t in range(nt - 1, 0, -1):
        out.append(int(arg[t][out[-1]]))
    return out[::-1]


# ----------------------------------------------------------------------------- transport
def transport_mlp(w: dict[str, torch.Tensor], c_in: Coupling, c_n: Coupling, c_out: Coupling) -> dict[str, np.ndarray]:
    """Source MLP weights ``{gate_proj, up_proj, down_proj}`` → the target's shapes (module doc)."""
    r_in = c_in.s_from_t()  # (d_s, d_t)
    gate = c_n.t_from_s(signed=False, scaled=False) @ w["gate_proj"].double().numpy() @ r_in
    up = c_n.t_from_s() @ w["up_proj"].double().numpy() @ r_in
    down = c_out.t_from_s() @ w["down_proj"].double().numpy() @ c_n.s_from_t()
    return {"gate_proj": gate, "up_proj": up, "down_proj": down}


@dataclasses.dataclass
class Fitted:
    layer_map: list[int]
    couplings: list[tuple[Coupling, Coupling, Coupling]]
    cka: list[float]
    positions: int

    def report(self, n_source: int) -> dict:
        used = set(self.layer_map)
        return {"layer_map": self.layer_map, "dropped_source_layers": [i for i in range(n_source) if i not in used],
                "positions": self.positions, "cka": [round(x, 4) for x in self.cka],
                "quality": {s: [round(c[k].quality, 4) for c in self.couplings] for k, s in enumerate(SITES)}}


def fit(keys_t: list, acts_t: dict, keys_s: list, acts_s: dict, depth: str = "proportional",
        max_gain: float = 0.0) -> Fitted:
    """Layer map and per-layer couplings of the source onto the target from captured activations."""
    from lsm_dist.merge.hetero import proportional_layer_map

    it, is_ = shared_rows(keys_t, keys_s)
    nt, ns = len(acts_t), len(acts_s)

    def cka(t: int, s: int) -> float:
        return linear_cka(acts_t[t]["in"][it], acts_s[s]["in"][is_])

    if depth == "cka":
        sim = np.array([[cka(t, s) for s in range(ns)] for t in range(nt)])
        lmap = cka_layer_map(sim)
    else:
        lmap = proportional_layer_map(nt, ns)
    couplings = [tuple(couple(acts_t[t][site][it], acts_s[s][site][is_], max_gain) for site in SITES)
                 for t, s in enumerate(lmap)]
    return Fitted(lmap, couplings, [cka(t, s) for t, s in enumerate(lmap)], len(it))


def transported_tensors(fitted: Fitted, source, target, base=None) -> dict[str, torch.Tensor]:
    """``{target MLP tensor name: transported weights}`` (target dtype); with ``base`` (the
    source's base checkpoint) the target plus the transported task vector ``T(W_s) − T(W_base)``."""
    out = {}
    for t, (s, cps) in enumerate(zip(fitted.layer_map, fitted.couplings)):
        name = {p: f"model.layers.{t}.mlp.{p}.weight" for p in MLP}
        src = {p: source.read(f"model.layers.{s}.mlp.{p}.weight") for p in MLP}
        moved = transport_mlp(src, *cps)
        if base is not None:
            ref = transport_mlp({p: base.read(f"model.layers.{s}.mlp.{p}.weight") for p in MLP}, *cps)
            moved = {p: target.read(name[p]).double().numpy() + moved[p] - ref[p] for p in MLP}
        for p in MLP:
            info = target.tensors[name[p]]
            x = torch.from_numpy(moved[p])
            if tuple(x.shape) != tuple(info.shape):
                raise ConfigError(f"alignment: activations: {name[p]} transported to {tuple(x.shape)}, "
                                  f"the target has {tuple(info.shape)}")
            out[name[p]] = x.to(target.read(name[p]).dtype)
    return out


def write_transported(target_dir: Path, tensors: dict[str, torch.Tensor], out: Path, record: dict) -> Path:
    """The target checkpoint with ``tensors`` replaced, saved into ``out`` (atomically: a temp
    sibling renamed when complete, :data:`MARKER` last)."""
    from lsm_dist.checkpoint import load_causal_lm, load_tokenizer
    from lsm_dist.utils import quiet_transformers

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            model = load_causal_lm(target_dir, "auto")
            state = model.state_dict()
            missing = sorted(set(tensors) - set(state))
            if missing:
                raise ConfigError(f"alignment: activations: target {target_dir} has no tensor(s) {missing[:3]}")
            with torch.no_grad():
                for k, v in tensors.items():
                    state[k].copy_(v)
            model.save_pretrained(str(tmp), max_shard_size="2GB")
            load_tokenizer(target_dir).save_pretrained(str(tmp))
        atomic_write_json(tmp / MARKER, record)
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier one of ours (cache entry without a valid marker)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- the plan step
def transport_plan(plan):
    """``plan`` (``alignment.method: activations``) with every non-target operand replaced by its
    checkpoint transported onto the target (cached); returns ``(new_plan, report)``."""
    from lsm_dist.adapters import open_model
    from lsm_dist.checkpoint import content_digest
    from lsm_dist.merge.hetero import AlignConfig
    from lsm_dist.merge.plan import memo_dir
    from lsm_dist.utils import cache_root

    a = plan.alignment
    tid = plan.target
    sb = a.source_base
    if sb is not None and sb not in plan.models:
        raise ConfigError(f"alignment.source_base: {sb!r} is not a model of this plan; known: {list(plan.models)}")
    for m in plan.models:
        if plan.model_ref(m)[1] is not None:
            raise ConfigError(f"alignment: activations: models.{m} is a LoRA adapter on a base; give the "
                              "merged checkpoint (the adapter applied) instead")
    docs = calibration_documents(a.calibration_items)
    calib = sha256_json(docs)[:16]
    opened = {m: open_model(*plan.model_ref(m)) for m in plan.models}
    digests = {m: content_digest(ck, memo_dir(plan)) for m, ck in opened.items()}
    sources = [m for m in plan.operands if m != tid and m != sb]
    acts: dict[str, tuple] = {}

    def activations(m: str) -> tuple:
        if m not in acts:
            log.info("alignment: reading the calibration text with %s", m)
            acts[m] = capture(opened[m].path, docs)
        return acts[m]

    report, models = {}, dict(plan.models)
    for m in sources:
        fit_on = sb or m  # the maps are fitted on the source base when a task vector is carried
        key = sha256_json({"v": ALIGN_VERSION, "target": digests[tid], "source": digests[m],
                           "fit_on": digests[fit_on], "base": digests[sb] if sb else None,
                           "calibration": calib, "depth": a.depth, "items": a.calibration_items,
                           "max_gain": a.max_gain})[:16]
        out = cache_root() / "aligned" / key
        rec = None
        with contextlib.suppress(OSError, ValueError):
            rec = read_json(out / MARKER)
        if not (isinstance(rec, dict) and rec.get("key") == key):
            fitted = fit(*activations(tid), *activations(fit_on), depth=a.depth, max_gain=a.max_gain)
            tensors = transported_tensors(fitted, opened[m], opened[tid], opened[sb] if sb else None)
            rec = {"key": key, "target": tid, "source": m, "source_base": sb, "depth": a.depth, "max_gain": a.max_gain,
                   "calibration": calib, **fitted.report(opened[fit_on].num_layers)}
            log.info("alignment: %s -> %s: layer map %s, dropped source layers %s", m, tid,
                     rec["layer_map"], rec["dropped_source_layers"])
            write_transported(opened[tid].path, tensors, out, rec)
        report[m] = {k: v for k, v in rec.items() if k != "key"}
        models[m] = dataclasses.replace(plan.models[m], path=str(out), lora=None)
    for ck in opened.values():
        ck.close()
    new = dataclasses.replace(plan, models=models, alignment=AlignConfig(method="none"),
                              layer_map="proportional")
    return new, report


def dropped_note(report: dict) -> list[str]:
    """Console / card lines: which source layers no target layer reads."""
    out = []
    for m, r in report.items():
        if r.get("dropped_source_layers"):
            out.append(f"{m}: {len(r['dropped_source_layers'])} of its layers are read by no target layer "
                       f"(depth map {r['depth']}): {r['dropped_source_layers']}")
    return out

