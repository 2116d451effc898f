"""submitit sweeps over typed configs: real local Slurm (array) and submitit's local executor."""

import json
import os
from pathlib import Path

import pytest
import torch

from lsm_dist.config import ConfigError
from lsm_dist.sweep import SweepConfig, expand, run_sweep
from tests.helpers import llama_tensors, write_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sw") / "m", llama_tensors(layers=2, dtype=torch.bfloat16))


def sweep(tmp_path, model, executor, **kw):
    base = tmp_path / "base.yaml"
    base.write_text(f"models: [{model}]\nblock_samples: 8\nshard_samples: 32\n")
    return SweepConfig(kind="convert", base=str(base), grid={"tokens": [2, 4], "chunk": [32]},
                       run_dir=str(tmp_path / "sweep"), executor=executor, **kw)


def check_results(cfg):
    rows = run_sweep(cfg)
    assert [(r["tokens"], r["chunk"]) for r in rows] == [(2, 32), (4, 32)]
    for r in rows:  # real outputs, not exit codes: the corpus of each point exists and adds up
        manifest = json.loads(Path(cfg.run_dir, r["point"], "manifest.json").read_text())
        assert manifest["num_samples"] == r["num_samples"] > 0
        assert manifest["settings"]["tokens"] == r["tokens"]
    assert rows[0]["num_samples"] > rows[1]["num_samples"]  # half the sample size, more samples
    text = Path(cfg.run_dir, "results.md").read_text()
    assert "tokens=2_chunk=32" in text and "num_samples" in text
    return rows


def test_sweep_local_executor_resume_and_refusal(tmp_path, model):
    cfg = sweep(tmp_path, model, "local")
    rows = check_results(cfg)
    jobs = os.path.getmtime(f"{cfg.run_dir}/jobs.json")
    assert run_sweep(cfg) == rows  # finished points are not run again
    assert os.path.getmtime(f"{cfg.run_dir}/jobs.json") == jobs
    other = sweep(tmp_path, model, "local")
    other.grid = {"tokens": [8]}
    with pytest.raises(ConfigError, match="already holds another sweep"):
        run_sweep(other)


def test_invalid_point_fails_before_submission(tmp_path, model):
    cfg = sweep(tmp_path, model, "local")
    cfg.grid = {"tokens": [4, 0]}
    with pytest.raises(ConfigError, match=r"sweep point tokens=0: tokens: must be positive"):
        expand(cfg)
    with pytest.raises(ConfigError, match="kind"):
        SweepConfig(kind="nope")


@pytest.mark.slurm
def test_sweep_on_slurm_array(tmp_path, model, slurm_cluster):
    cfg = sweep(tmp_path, model, "slurm")
    cfg.slurm.timeout_min = 5
    check_results(cfg)
    ids = json.loads(Path(cfg.run_dir, "jobs.json").read_text())
    assert all("_" in j for j in ids.values()), ids  # one array, one task per point
