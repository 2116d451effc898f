"""benchmarks/bench_scale.py at a toy shape, every stage, so the scale benchmark cannot rot: the
generated pair has the architecture's exact names and shapes, the latent merge runs as Slurm array
tasks on the local cluster, and every figure the docs quote is recorded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_generated_shapes_are_the_architectures():
    from bench_scale import SHAPES, tensor_specs

    specs = {n: s for n, s, _, _ in tensor_specs(SHAPES["qwen2-7b"])}
    assert specs["model.layers.27.mlp.down_proj.weight"] == (3584, 18944)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)  # 4 KV heads of 128
    assert specs["model.layers.0.self_attn.q_proj.bias"] == (3584,) and specs["lm_head.weight"] == (152064, 3584)
    assert sum(__import__("math").prod(s) for s in specs.values()) == pytest.approx(7.6e9, rel=0.01)
    llama = {n: s for n, s, _, _ in tensor_specs(SHAPES["llama-3b"])}
    assert "lm_head.weight" not in llama and llama["model.layers.0.self_attn.k_proj.weight"] == (1024, 3072)
    assert sum(__import__("math").prod(s) for s in llama.values()) == pytest.approx(3.21e9, rel=0.01)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_bench_scale_toy_runs_every_stage(tmp_path, slurm_cluster):
    p = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--shape", "toy", "--workdir", str(tmp_path / "w"),
                        "--methods", "linear", "ties", "dare_ties"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "w" / "bench_scale.json").read_text())
    assert res["errors"] == {}
    with safe_open(str(next((tmp_path / "w" / "B").glob("*.safetensors"))), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {__import__("torch").bfloat16}  # noqa: SIM118
    for stage in ("convert", "train", "merge", "encode_decode", "forward"):
        r = res[stage]
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 0, stage
    assert res["convert"]["samples_per_s"] > 0 and res["forward"]["finite"]
    assert {t["stage"] for t in res["merge"]["array_tasks"]} >= {"encode", "merge"}
    assert len([t for t in res["merge"]["array_tasks"] if t["stage"] == "merge"]) == 2  # two array tasks
    for key in ("merge", "encode_decode"):  # latents + output on disk, no second copy; bf16 means only
        r = res[key]
        assert r["latent_dtype"] == "bfloat16" and r["latent_bytes"] > 0 and r["encode_params_per_s"] > 0, key
        assert res["targets"]["disk_growth_le_latents_plus_output"][key], (key, r["disk_growth_bytes"])
    assert res["encode_decode"]["latent_bytes"] < 0.75 * res["merge"]["latent_bytes"]  # one model's latents
    # rates count what went through the VAE: the weight tensors, not the embeddings (merged in weight space)
    from bench_scale import SHAPES, tensor_specs

    total = sum(__import__("math").prod(s) for _, s, _, _ in tensor_specs(SHAPES["toy"]))
    assert 0 < res["encode_decode"]["encoded_params"] < total and res["merge"]["encoded_params"] == 2 * res["encode_decode"]["encoded_params"]
    assert res["train_paper"]["1_rank"]["per_rank_peak_rss_mib"] and len(res["train_paper"]["2_rank"]["per_rank_peak_rss_mib"]) == 2
    assert set(res["targets"]["rss_within_bound"]) >= {"convert", "merge", "weight_ties"}
    for m in ("linear", "ties", "dare_ties"):  # the same mergekit config through both tools
        r = res["weight"][m]
        assert r["lsm"]["wall_s"] > 0 and r["mergekit"]["peak_rss_mib"] > 0 and r["compared"]["same_names"], m
    assert res["targets"]["weight_bit_equal_mergekit"] == {"linear": True, "ties": True, "dare_ties": None}
