"""The merge engine: encode models into latents, merge (latent or weight space, homogeneous or
heterogeneous with OT alignment), decode per layer, assemble a Hugging Face checkpoint."""

from lsm_dist.merge import selective, spherical, task_vectors  # noqa: F401  (register their operators)
from lsm_dist.merge.assemble import MARKER, AssemblyError, assemble, is_complete
from lsm_dist.merge.decode import run_decode
from lsm_dist.merge.encode import (
    LatentCache,
    encode_names,
    encode_tensor,
    finalize_encode,
    run_encode,
)
from lsm_dist.merge.hetero import (
    AlignConfig,
    align_latents,
    match_latent_shape,
    proportional_layer_map,
    resample_axis,
    resolve_layer_map,
)
from lsm_dist.merge.operators import (
    OPERATORS,
    MergeParams,
    apply_operator,
    get_operator,
    make_generator,
    register_operator,
)
from lsm_dist.merge.plan import MergePlan, ResolvedPlan, load_plan, resolve_plan
from lsm_dist.merge.run import prepare, run_assemble, run_merge

__all__ = [
    "MARKER", "OPERATORS", "AlignConfig", "AssemblyError", "LatentCache", "MergeParams", "MergePlan",
    "ResolvedPlan", "align_latents", "apply_operator", "assemble", "encode_names", "encode_tensor",
    "finalize_encode", "get_operator", "is_complete", "load_plan", "make_generator",
    "match_latent_shape", "prepare", "proportional_layer_map", "register_operator", "resample_axis",
    "resolve_layer_map", "resolve_plan", "run_assemble", "run_decode", "run_encode", "run_merge",
]
