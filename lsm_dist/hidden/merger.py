"""Inference-time composition of same-architecture causal LMs by mixing hidden states.

``HiddenStateMerger(models, layers=[...], alpha=..., op=...)`` runs N Hugging Face causal LMs
in lockstep, layer by layer: embeddings of every model → for each decoder layer ``i``, each
model's own layer ``model.model.layers[i]`` (its own attention mask, rotary embedding and KV
cache) → if ``i`` is a chosen layer, the residual-stream states that the layer output are
mixed (``lsm_dist.hidden.ops``) and the mix **replaces the state of every model**, so every
model's later layers continue from the mixed state → each model's final norm and head.

Final logits (``head``):
  * ``"mix"`` (default): ``Σ_i w_i · logits_i`` with ``w = mix_weights(N, head_alpha)``
    (linear mix of logits, not probabilities; after Gemma's soft-capping);
  * ``"first"``: model 0's head only; models 1..N−1 then stop after the deepest mixed layer
    (their later layers cannot affect the output), which saves compute.
``head_alpha`` defaults to the α of the deepest mixed layer (0 when no layer is mixed).

``α = 0`` everywhere (and ``head_alpha = 0``) reproduces model 0's logits exactly; α = 1 at
every layer follows model 1's stream. ``set_mix`` changes the composition with no reload; a
KV cache filled under one composition must not be reused under another (``generate`` makes
fresh caches every call). Positions come from the attention mask (``arange`` minus the row's
leading pads), so left- and right-padded batches score like their unbatched rows; generation
appends after the last column, so batched prompts must be left-padded (as with HF).
Supported stacks: ``model.model.{embed_tokens, layers, norm, rotary_emb}`` + ``lm_head``
(Llama, Qwen2/3, Mistral, Gemma-3 text, ...) with full and sliding-window attention layers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lsm_dist.hidden.ops import OPS, GramStats, RegMean, lerp, mix_weights, slerp

HEADS = ("mix", "first")
_CHECKED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def _cfg(model) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def check_compatible(models: Sequence[nn.Module]) -> None:
    """Same model_type, hidden_size, layer count and vocabulary, else ValueError naming both."""
    if len(models) < 2:
        raise ValueError(f"need at least two models, got {len(models)}")
    ref = _cfg(models[0])
    for i, m in enumerate(models[1:], 1):
        cfg = _cfg(m)
        for f in _CHECKED_FIELDS:
            a, b = getattr(ref, f, None), getattr(cfg, f, None)
            if a != b:
                raise ValueError(f"models[{i}] has {f}={b!r} but models[0] has {f}={a!r}: "
                                 "hidden-state merging needs the same architecture")  # fmt: skip


class _Stack:
    """One model's decoder stack, callable one layer at a time."""

    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        need = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or any(not hasattr(inner, a) for a in need) or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__}: unsupported architecture (expected "
                             "model.model.{embed_tokens,layers,norm,rotary_emb} and lm_head)")  # fmt: skip
        self.model, self.inner, self.cfg = model, inner, _cfg(model)
        n = len(inner.layers)
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * n)
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown or getattr(self.cfg, "use_bidirectional_attention", False):
            raise ValueError(f"{type(model).__name__}: unsupported layer types {sorted(unknown)}")
        self.per_type_rope = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        self.softcap = getattr(self.cfg, "final_logit_softcapping", None)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def prepare(self, input_ids, attention_mask, position_ids, cache, depth: int):
        """Embeddings, the masks and rotary embeddings needed by layers ``< depth``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders = {"full_attention": create_causal_mask,
                    "sliding_attention": create_sliding_window_causal_mask}  # fmt: skip
        emb = self.inner.embed_tokens(input_ids)
        types = sorted(set(self.layer_types[:depth]))
        masks = {t: builders[t](config=self.cfg, inputs_embeds=emb, attention_mask=attention_mask,
                                past_key_values=cache, position_ids=position_ids) for t in types}  # fmt: skip
        if self.per_type_rope:
            rope = {t: self.inner.rotary_emb(emb, position_ids, t) for t in types}
        else:
            pe = self.inner.rotary_emb(emb, position_ids)
            rope = dict.fromkeys(types, pe)
        return emb, masks, rope

    def layer(self, i: int, h, masks, rope, position_ids, cache):
        t = self.layer_types[i]
        out = self.inner.layers[i](h, attention_mask=masks[t], position_embeddings=rope[t],
                                   position_ids=position_ids, past_key_values=cache)  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    def head(self, h):
        logits = self.model.lm_head(self.inner.norm(h))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclasses.dataclass
class MergedOutput:
    """``logits`` (B, T, V); ``caches`` (one DynamicCache per model, or None); with
    ``return_hidden``: ``hidden[i]`` = model 0's stream after layer i (post-mix) and
    ``pre_mix[i][k]`` = model k's output of layer i before mixing (None past its depth)."""

    logits: torch.Tensor
    caches: list | None = None
    hidden: list[torch.Tensor] | None = None
    pre_mix: list[list[torch.Tensor | None]] | None = None


def positions_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids of the last ``q_len`` tokens: ``arange − (leading pads of the row)``,
    clamped at 0. Left-padded rows thus get the positions of their unpadded selves, and
    right-padded (or unpadded) rows get ``arange``, exactly as a plain HF forward does."""
    mask = attention_mask.long()
    lead = (mask.cumsum(-1) == 0).sum(-1, keepdim=True)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) - lead
    return pos.clamp_min(0)[:, -q_len:]


class HiddenStateMerger:
    """Mix the hidden states of ``models`` at ``layers`` with ``op`` (see module docstring).

    ``alpha``: one α for every chosen layer, a list (one per layer, same order) or a
    ``{layer: α}`` mapping. ``regmean`` needs ``calibrate(...)`` on text first; its knobs are
    ``regmean_full`` (full d×d or diagonal Gram), ``regmean_shrink`` (γ), ``regmean_ridge`` (λ).
    """

    def __init__(self, models: Sequence[nn.Module], layers: Iterable[int] = (),
                 alpha: float | Sequence[float] | dict[int, float] = 0.5, op: str = "lerp",
                 head: str = "mix", head_alpha: float | None = None, slerp_eps: float = 1e-4,
                 regmean_full: bool = True, regmean_shrink: float = 0.9,
                 regmean_ridge: float = 1e-3):  # fmt: skip
        check_compatible(models)
        self.models = list(models)
        self.stacks = [_Stack(m) for m in self.models]
        self.num_layers = len(self.stacks[0].inner.layers)
        self.slerp_eps = slerp_eps
        self.regmean_full, self.regmean_shrink, self.regmean_ridge = (
            regmean_full, regmean_shrink, regmean_ridge)  # fmt: skip
        self.grams: GramStats | None = None
        self.op, self.head, self.head_alpha, self.mix = "lerp", "mix", 0.0, {}
        self._alpha = alpha if isinstance(alpha, (int, float)) else 0.5  # for set_mix(layers=...)
        self._head_alpha: float | None = None  # None: α of the deepest mixed layer
        self._regmean: dict[int, RegMean] = {}
        self.set_mix(layers=layers, alpha=alpha, op=op, head=head, head_alpha=head_alpha)

    # ------------------------------------------------------------------ composition
    def set_mix(self, layers: Iterable[int] | None = None,
                alpha: float | Sequence[float] | dict[int, float] | None = None,
                op: str | None = None, head: str | None = None,
                head_alpha: float | str | None = None) -> HiddenStateMerger:  # fmt: skip
        """Change the composition in place (None keeps the current value; ``head_alpha="auto"``
        returns to "α of the deepest mixed layer"); returns self."""
        op = self.op if op is None else op
        if op not in OPS:
            raise ValueError(f"op: {op!r} is not one of {list(OPS)}")
        if op == "slerp" and len(self.models) != 2:
            raise ValueError(f"op: slerp mixes exactly two models, got {len(self.models)}")
        head = self.head if head is None else head
        if head not in HEADS:
            raise ValueError(f"head: {head!r} is not one of {list(HEADS)}")
        if isinstance(alpha, dict):
            if layers is not None and sorted(layers) != sorted(alpha):
                raise ValueError(f"layers {sorted(layers)} differ from alpha's keys {sorted(alpha)}")
            layers = list(alpha)
        layers = list(self.mix) if layers is None else [int(i) for i in layers]
        for i in layers:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"layer {i} is out of range [0, {self.num_layers - 1}]")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {layers} contain duplicates")
        if alpha is None:
            old = list(self.mix.values())
            alpha = dict(self.mix) if len(set(old)) > 1 else (old[0] if old else self._alpha)
            if isinstance(alpha, dict) and set(alpha) != set(layers):
                raise ValueError("give alpha when changing layers under per-layer alphas")
        if isinstance(alpha, dict):
            alphas = [float(alpha[i]) for i in layers]
        elif isinstance(alpha, (int, float)):
            alphas = [float(alpha)] * len(layers)
        else:
            alphas = [float(a) for a in alpha]
            if len(alphas) != len(layers):
                raise ValueError(f"{len(alphas)} alphas given for {len(layers)} layers {layers}")
        if head_alpha == "auto":
            setting = None
        elif head_alpha is None:
            setting = self._head_alpha
        else:
            setting = float(head_alpha)
        for a in alphas + ([setting] if setting is not None else []):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha {a} is outside [0, 1]")
        mix = dict(sorted(zip(layers, alphas)))
        if op == "regmean":
            self._regmean = self._build_regmean(mix)
        self.op, self.head, self.mix, self._head_alpha = op, head, mix, setting
        self.head_alpha = setting if setting is not None else (mix[max(mix)] if mix else 0.0)
        if len(set(alphas)) == 1:
            self._alpha = alphas[0]
        return self

    def _build_regmean(self, mix: dict[int, float]) -> dict[int, RegMean]:
        need = [i for i in mix if self.grams is None or not all(
            self.grams.has(k, i) for k in range(len(self.models)))]  # fmt: skip
        if need:
            raise ValueError(f"op regmean: no calibration statistics for layer(s) {need}; "
                             "call calibrate(input_ids, ...) first")  # fmt: skip
        assert self.grams is not None
        n = len(self.models)
        return {i: RegMean([self.grams.gram(k, i) for k in range(n)], mix_weights(n, a),
                           self.grams.full, self.regmean_shrink, self.regmean_ridge)
                for i, a in mix.items()}  # fmt: skip

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                  layers: Iterable[int] | None = None) -> GramStats:  # fmt: skip
        """RegMean second moments of each model **run alone** on ``(input_ids, mask)`` batches,
        over non-padding tokens, for ``layers`` (default: every layer)."""
        layers = set(range(self.num_layers) if layers is None else layers)
        self.grams = GramStats(full=self.regmean_full)
        for ids, mask in batches:
            for k, model in enumerate(self.models):
                hs = layer_states(model, ids.to(self.device), None if mask is None else mask.to(self.device))
                for i in layers:
                    self.grams.add(k, i, hs[i], mask)
        if self.op == "regmean":
            self._regmean = self._build_regmean(self.mix)
        return self.grams

    def _mix(self, i: int, hs: list[torch.Tensor]) -> torch.Tensor:
        a = self.mix[i]
        if a == 0.0:
            return hs[0]
        if a == 1.0 and len(hs) == 2:
            return hs[1]
        if self.op == "lerp":
            return lerp(hs, a)
        if self.op == "slerp":
            return slerp(hs[0], hs[1], a, self.slerp_eps)
        return self._regmean[i](hs)

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def depths(self) -> list[int]:
        """Layers each model runs: all, except models 1.. under ``head="first"``."""
        last = max(self.mix) + 1 if self.mix else 0
        return [self.num_layers] + [self.num_layers if self.head == "mix" else last] * (len(self.models) - 1)

    def new_caches(self) -> list:
        return [s.new_cache() for s in self.stacks]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                caches: list | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> MergedOutput:  # fmt: skip
        """One lockstep pass. With ``caches`` (from ``new_caches``), they are extended in
        place; ``attention_mask`` then covers past + new tokens (HF convention)."""
        input_ids = input_ids.to(self.device)
        q = input_ids.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, q)
            else:
                past = caches[0].get_seq_length() if caches is not None else 0
                position_ids = torch.arange(past, past + q, device=self.device).unsqueeze(0)
        depths = self.depths()
        run = [k for k, d in enumerate(depths) if d > 0]
        states, ctx = {}, {}
        for k in run:
            cache = caches[k] if caches is not None else None
            emb, masks, rope = self.stacks[k].prepare(input_ids, attention_mask, position_ids, cache, depths[k])
            states[k], ctx[k] = emb, (masks, rope, cache)
        hidden, pre = ([], []) if return_hidden else (None, None)
        for i in range(self.num_layers):
            live = [k for k in run if depths[k] > i]
            for k in live:
                masks, rope, cache = ctx[k]
                states[k] = self.stacks[k].layer(i, states[k], masks, rope, position_ids, cache)
            if pre is not None:
                pre.append([states[k] if k in live else None for k in range(len(self.models))])
            if i in self.mix:
                m = self._mix(i, [states[k] for k in range(len(self.models))])
                for k in live:
                    states[k] = m.to(states[k].dtype)
            if hidden is not None:
                hidden.append(states[0])
        logits = self.stacks[0].head(states[0])
        if self.head == "mix":
            w = mix_weights(len(self.models), self.head_alpha)
            if w[0] != 1.0:
                logits = sum(wk * self.stacks[k].head(states[k]).float() for k, wk in enumerate(w))
        return MergedOutput(logits=logits, caches=caches, hidden=hidden, pre_mix=pre)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, greedy: bool = True,
                 attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 stopping_criteria=None) -> torch.Tensor:  # fmt: skip
        """Append up to ``max_new_tokens`` tokens (greedy, or sampled at ``temperature``).

        With ``use_cache`` every model keeps its own DynamicCache and each step feeds one
        token; without, the full sequence is recomputed each step (same tokens). Rows that
        emitted ``eos_token_id`` (or stopped by ``stopping_criteria(ids, scores)``) continue
        with ``pad_token_id``; returns prompt + new tokens, (B, T + n)."""
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)).long()
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        caches = self.new_caches() if use_cache else None
        step_in = ids
        for _ in range(max_new_tokens):
            if caches is not None:
                logits = self.forward(step_in, mask, caches=caches).logits[:, -1]
            else:
                logits = self.forward(ids, mask).logits[:, -1]
            logits = logits.float()
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            step_in = nxt[:, None]
            if eos:
                done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if stopping_criteria is not None:
                stop = torch.as_tensor(stopping_criteria(ids, logits), device=ids.device)
                done |= stop.expand_as(done).bool()
            if done.all():
                break
        return ids


@torch.no_grad()
def layer_states(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """The residual-stream output of every decoder layer of ``model`` run alone, captured by
    forward hooks on ``model.model.layers[i]`` (positions from the mask, as in the merger)."""
    layers = _Stack(model).inner.layers
    out: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i):
        def fn(_mod, _inp, output):
            out[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        kw = {}
        if attention_mask is not None:
            kw = {"attention_mask": attention_mask,
                  "position_ids": positions_from_mask(attention_mask, input_ids.shape[1])}  # fmt: skip
        model(input_ids=input_ids, use_cache=False, **kw)
    finally:
        for h in handles:
            h.remove()
    return out  # type: ignore[return-value]
