"""benchmarks/gpu_suite.sh: the one script a lent GPU machine runs, kept working on the CPU
(--smoke: every section end to end with tiny sizes), and refusing to pretend without CUDA."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_suite_smoke_runs_every_section(tmp_path):
    p = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["smoke"] and res["errors"] == {}
    t = res["trainer"]
    assert t["samples_per_s"] > 0 and t["plain_fp32_eager_samples_per_s"] > 0 and t["compiled_ceiling_samples_per_s"] > 0
    assert t["data_wait_ms_per_step"] is not None and t["data_wait_ms_per_step"] >= 0
    assert res["reader"]["samples_per_s"] > 0 and res["reader"]["ratio_to_trainer"] > 0
    e = res["encode_decode"]
    assert e["encode_s"] > 0 and e["decode_s"] > 0 and e["ratio_to_raw_copy"] > 0
    assert res["ties"]["lsm_rc"] == 0 and res["ties"]["mergekit_rc"] == 0 and res["ties"]["ratio"] > 0
    assert "Name" in (tmp_path / "profile.txt").read_text()  # the profiler's table
    for line in ("trainer:", "reader:", "encode+decode", "ties:", "profile:"):
        assert line in p.stdout, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_suite_without_cuda_refuses_the_full_run(tmp_path):
    p = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    assert not (tmp_path / "gpu_suite.json").exists()
