"""Inference-time "latent merging": compose same-architecture causal LMs by mixing their hidden
states at chosen layers (LERP / SLERP / RegMean), reversibly, with no weight rewrite.

``HiddenStateMerger`` runs the models in lockstep; ``MergedCausalLM`` wraps it for
``transformers`` / lm-eval callers; ``lsm_dist.hidden.metrics`` measures Midness / ArcRatio /
CKA per layer; ``lsm_dist.hidden.weights`` builds the weight-space baselines;
``lsm_dist.hidden.run`` holds the typed config, the end-to-end run and the sweep.
"""

from lsm_dist.hidden.merger import HiddenStateMerger, MergedOutput, check_compatible, layer_states
from lsm_dist.hidden.metrics import compare_merges, layer_metrics, linear_cka
from lsm_dist.hidden.module import MergedCache, MergedCausalLM
from lsm_dist.hidden.ops import OPS, lerp, mix_weights, slerp
from lsm_dist.hidden.weights import weight_merge

__all__ = [
    "OPS",
    "HiddenStateMerger",
    "MergedCache",
    "MergedCausalLM",
    "MergedOutput",
    "check_compatible",
    "compare_merges",
    "layer_metrics",
    "layer_states",
    "lerp",
    "linear_cka",
    "mix_weights",
    "slerp",
    "weight_merge",
]
