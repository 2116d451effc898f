"""``MergedCausalLM``: a ``HiddenStateMerger`` behind the interface that ``transformers``
callers (and lm-eval's ``HFLM(pretrained=module, tokenizer=tok)``) expect of a causal LM.

``forward(input_ids, attention_mask=None, past_key_values=None, use_cache=False)`` returns a
``CausalLMOutputWithPast`` whose ``.logits`` are the merged logits and whose
``.past_key_values`` is a ``MergedCache`` (one DynamicCache per model) when caching;
``.config`` / ``.generation_config`` / ``.name_or_path`` are model 0's; ``.device`` and
``.dtype`` come from model 0's parameters; ``generate`` accepts the HF keywords lm-eval
passes (``max_length`` / ``max_new_tokens``, ``do_sample``, ``temperature``,
``stopping_criteria``, ``pad_token_id``, ``eos_token_id``, ``attention_mask``). The models are
registered as submodules, so ``.eval()`` / ``.to()`` / ``.parameters()`` reach them.
Change the composition with ``module.set_mix(...)`` (forwards to the merger).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lsm_dist.hidden.merger import HiddenStateMerger


class MergedCache(list):
    """One ``DynamicCache`` per model; ``get_seq_length`` is model 0's."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self[0].get_seq_length(layer_idx)


class MergedCausalLM(nn.Module):
    def __init__(self, merger: HiddenStateMerger):
        super().__init__()
        self.merger = merger
        self.models = nn.ModuleList(merger.models)

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], **mix) -> MergedCausalLM:
        return cls(HiddenStateMerger(models, **mix))

    # ---- what HF / lm-eval read
    @property
    def config(self):
        return self.merger.models[0].config

    @property
    def generation_config(self):
        return getattr(self.merger.models[0], "generation_config", None)

    @property
    def name_or_path(self) -> str:
        return getattr(self.merger.models[0], "name_or_path", "") or "hidden-merge"

    @property
    def device(self) -> torch.device:
        return self.merger.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.merger.models[0].parameters()).dtype

    def tie_weights(self, *args, **kwargs) -> None:
        """No-op (lm-eval calls it; each model's own tying is already in place)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def set_mix(self, **kw) -> MergedCausalLM:
        self.merger.set_mix(**kw)
        return self

    # ---- running
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: MergedCache | None = None, use_cache: bool = False,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                **kwargs):  # fmt: skip
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("MergedCausalLM takes input_ids, not inputs_embeds")
        caches = past_key_values
        if caches is None and use_cache:
            caches = MergedCache(self.merger.new_caches())
        out = self.merger.forward(input_ids, attention_mask, caches=caches, position_ids=position_ids,
                                  return_hidden=output_hidden_states)  # fmt: skip
        hidden = tuple(out.hidden) if out.hidden is not None else None
        return CausalLMOutputWithPast(logits=out.logits, past_key_values=caches, hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None,
                 do_sample: bool = False, temperature: float | None = None,
                 stopping_criteria=None, pad_token_id: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, **unused) -> torch.Tensor:  # fmt: skip
        """HF-style ``generate``: returns prompt + continuation ids (B, T + n)."""
        if input_ids is None:
            input_ids = unused.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        gc = self.generation_config
        if max_new_tokens is None:
            if max_length is not None:
                max_new_tokens = max(0, max_length - input_ids.shape[1])
            else:
                max_new_tokens = getattr(gc, "max_new_tokens", None) or 20
        if eos_token_id is None:
            eos_token_id = getattr(gc, "eos_token_id", None) or getattr(self.config, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(gc, "pad_token_id", None) or getattr(self.config, "pad_token_id", None)
        return self.merger.generate(
            input_ids, max_new_tokens=max_new_tokens, greedy=not do_sample,
            attention_mask=attention_mask, use_cache=use_cache, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=temperature or 1.0, generator=generator,
            stopping_criteria=stopping_criteria,
        )  # fmt: skip
