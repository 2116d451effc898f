"""The README's main job, end to end, in its --quick form (tiny zoo, short runs)."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from lsm_dist.cli import main
from lsm_dist.demo import _drop_stale_vae_run
from lsm_dist.utils import get_logger

# what transformers / lm-eval / datasets / deepspeed / git print when nothing silences them
NOISE = ("Loading weights", "Writing model shards", "de-quantizing", "Running loglikelihood",
         "Generating test split", "Processing zero checkpoint", "fatal:", "Traceback", "Warning",
         "WARNING", "INFO", "Token indices", "Setting accelerator", "leaked semaphore", "`pretrained`")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, tiny_zoo, capfd, monkeypatch):
    zoo_dir = Path(next(iter(tiny_zoo.values()))).parent
    monkeypatch.chdir(tmp_path)  # outside a git checkout: lm-eval's `git` calls fail ("fatal: ...")
    monkeypatch.delenv("LSM_VERBOSE", raising=False)
    assert main(["demo", "--quick", f"out_dir={tmp_path / 'demo'}", f"zoo_dir={zoo_dir}"]) == 0
    out, err = capfd.readouterr()  # fd-level: subprocesses and C code included
    assert "| checkpoint |" in out and "stage times:" in out and "of each expert's gain" in out
    kept = out.split("of each expert's gain")[1].split("stage times:")[0]  # the retention table
    assert "| weight-task-arith |" in kept and "| latent-lerp |" in kept
    assert "latent-self-merge" not in kept and "hetero-ot" not in kept  # not merges of both experts
    # the console: one bar per stage (redraws of one line) and the tables, nothing else
    console = out + err
    for noise in NOISE:
        assert noise not in console, (noise, console[:3000])
    lines = [seg.strip() for line in err.splitlines() for seg in line.split("\r") if seg.strip()]
    stages = sorted({ln.split(":")[0].strip() for ln in lines})
    assert stages == ["[1/5] model zoo", "[2/5] weight corpus", "[3/5] VAE training", "[4/5] merges",
                      "[5/5] evaluation"], lines
    n = int(re.search(r"^(\d+) checkpoint\(s\):", out, re.M).group(1))  # the table's count
    assert n >= 12
    assert any(ln.startswith("[5/5] evaluation") and f"{n}/{n}" in ln for ln in lines)  # counts
    assert any(ln.startswith("[3/5] VAE training") and "80/80" in ln and "step/s" in ln for ln in lines)
    assert all(not ln.startswith("|") and "checkpoint(s):" not in ln for ln in lines)  # tables on stdout
    # ... and the log keeps what was silenced, timestamped
    log = (tmp_path / "demo" / "demo.log").read_text()
    for kept in ("Running loglikelihood requests: 100%", "fatal: not a git repository",
                 "INFO lsm.train.rank0: step 80/80", "Processing zero checkpoint",
                 "WARNING lm_eval.models.huggingface", "Loading weights"):
        assert kept in log, kept
    assert all(line[:4].isdigit() and line[10] == " " for line in log.splitlines()), "untimestamped line"
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
    # a VAE run trained on another corpus (the zoo changed since) is dropped before training;
    # one trained on this corpus stays (what a re-run of the demo sees)
    run = tmp_path / "demo" / "vae_run"
    same, other = tmp_path / "same_run", tmp_path / "other_run"
    shutil.copytree(run, same)
    shutil.copytree(run, other)
    for state in (other / "checkpoints").glob("step-*/trainer_state.json"):
        d = json.loads(state.read_text())
        d["data"]["corpus_digest"] = "0" * 16
        state.write_text(json.dumps(d))
    _drop_stale_vae_run(same, tmp_path / "demo" / "corpus", get_logger())
    _drop_stale_vae_run(other, tmp_path / "demo" / "corpus", get_logger())
    assert same.is_dir() and not other.exists()
    _drop_stale_vae_run(tmp_path / "absent", tmp_path / "demo" / "corpus", get_logger())  # nothing there
