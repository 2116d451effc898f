"""The README's main job, end to end, in its --quick form (tiny zoo, short runs)."""

import csv
from pathlib import Path

import pytest

from lsm_dist.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, tiny_zoo, capsys):
    zoo_dir = Path(next(iter(tiny_zoo.values()))).parent
    assert main(["demo", "--quick", f"out_dir={tmp_path / 'demo'}", f"zoo_dir={zoo_dir}"]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint |" in out and "stage times:" in out and "of each expert's gain" in out
    rows = list(csv.DictReader((tmp_path / "demo" / "eval" / "results.csv").open()))
    names = {r["checkpoint"] for r in rows}
    expected = {"llama-tiny-base", "llama-tiny-arith", "llama-tiny-reverse", "vae-recon-direct",
                "latent-lerp-direct", "latent-lerp", "latent-task-arith", "latent-ties",
                "latent-self-merge", "weight-lerp", "weight-slerp", "weight-task-arith",
                "weight-ties", "weight-dare", "hetero-ot"}
    assert expected <= names, expected - names
    for r in rows:  # every merged checkpoint was scored with real numbers
        acc = float(r["lsm_reverse_mc/acc"])
        assert 0.0 <= acc <= 1.0
        assert 1.0 < float(r["lsm_english_ppl/word_perplexity"]) < float("inf")
    # the reverse expert beats the base on its own task (trained weights, measurable effect)
    by = {r["checkpoint"]: r for r in rows}
    assert float(by["llama-tiny-reverse"]["lsm_reverse_mc/acc"]) > float(by["llama-tiny-base"]["lsm_reverse_mc/acc"])
    for name in expected - {"llama-tiny-base", "llama-tiny-arith", "llama-tiny-reverse"}:
        assert (tmp_path / "demo" / "merges" / name / "model" / "model.safetensors.index.json").is_file()
    assert list((tmp_path / "demo" / "vae_run" / "tb").rglob("events.out.tfevents.*"))
