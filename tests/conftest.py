"""Shared fixtures. Each stage's tests build what they need from tiny configs."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _clean_dist_env():
    """In-process training (a test's or a module fixture's) exports a rendezvous (MASTER_PORT...)
    while its store may still listen on that port: keep it out of every other test and of the
    processes tests start (a child would take the port as the user's and fail to bind it)."""
    for k in RENDEZVOUS:
        os.environ.pop(k, None)
    yield
    for k in RENDEZVOUS:
        os.environ.pop(k, None)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local Slurm cluster (tools/slurm-local.sh start); skip without it, or fail under
    LSM_REQUIRE_SLURM=1 (CI)."""
    from tests.test_slurm_local import _cluster_problem

    problem = _cluster_problem()
    if problem:
        if os.environ.get("LSM_REQUIRE_SLURM") == "1":
            pytest.fail(f"LSM_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny model zoo (configs/zoo/tiny.yaml) built once per session: ``{name: model_dir}``.

    Real HF causal LMs (1 llama base + 2 experts, 1 qwen2, 1 gemma3) with the zoo tokenizer.
    """
    from pathlib import Path

    from lsm_dist.zoo import build_zoo, load_zoo_config

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "zoo" / "tiny.yaml"
    out = tmp_path_factory.mktemp("tiny_zoo")
    return build_zoo(load_zoo_config(cfg_path, [f"out_dir={out}"]), progress=False)
