"""Conversion as a real Slurm array job + afterok manifest step (local cluster)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from lsm_dist.corpus import ConvertConfig, run_convert
from tests.helpers import llama_tensors, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def test_array_conversion_equals_local(tmp_path, slurm_cluster):
    m = write_checkpoint(tmp_path / "m", llama_tensors(layers=4, hidden=64, inter=128, dtype=torch.bfloat16))
    args = [f"models=[{m}]", "tokens=4", "chunk=32", "block_samples=16", "shard_samples=64"]
    cfg = tmp_path / "convert.yaml"
    cfg.write_text("blocks: [attn, mlp]\n")
    ref = run_convert(ConvertConfig(models=[str(m)], out_dir=str(tmp_path / "ref"), tokens=4, chunk=32,
                                    block_samples=16, shard_samples=64), progress=False)
    out = tmp_path / "slurm"
    env = os.environ | {"LSM_SBATCH_ARGS": f"--chdir={REPO} --output={tmp_path}/%x-%A_%a.out --time=5",
                        "LSM_REPO": str(REPO)}
    res = subprocess.run(["bash", "slurm/submit_convert.sh", "3", str(cfg), *args, f"out_dir={out}"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    fin = res.stdout.split()[-1]
    # wait for the manifest step (it depends on the whole array)
    subprocess.run(["bash", "-c", f"while squeue -h -j {fin} -o %T 2>/dev/null | grep -qvE 'COMPLETED|FAILED|CANCELLED|^$'; do sleep 0.5; done"],
                   timeout=240, check=True)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("lsm-convert-*.out")))
    assert (out / "manifest.json").is_file(), logs
    assert sum("worker " in line and "wrote" in line for line in logs.splitlines()) == 3, logs
    for f in (tmp_path / "ref").glob("shard-*.tar"):
        assert f.read_bytes() == (out / f.name).read_bytes()
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    assert len(ref["shards"]) >= 3
