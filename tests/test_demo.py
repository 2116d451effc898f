"""The README's main job, end to end, in its --quick form (tiny zoo, short runs: the code path),
and its verdicts on a constructed case. The real chain and its verdicts: tests/test_demo_real.py."""

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
    assert "| latent-self-merge |" not in kept and "| hetero |" not in kept  # not merges of both experts
    # verdicts computed from this run, as sentences and as data; the models named by digest
    assert "verdicts of this run" in out and "latent vs weight space, task-arith:" in out
    assert re.search(r"^models used: llama-tiny-base [0-9a-f]{16}, ", out, re.M)
    v = json.loads((tmp_path / "demo" / "verdicts.json").read_text())
    assert set(v["experts"]) == {"llama-tiny-arith", "llama-tiny-reverse"} and v["n"] == 24
    assert {"latent-lerp-direct", "latent-task-arith-direct"} <= set(v["direct_vs_delta"])
    assert v["models"]["llama-tiny-base"]["build"]["threads"] == 1
    # the other family's merge, judged against its target
    assert v["hetero"]["source"] == "qwen2-tiny-base" and v["hetero"]["verdict"]
    assert "another family merged in (qwen2-tiny-base into llama-tiny-base" in out
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
                "latent-lerp-direct", "latent-lerp", "latent-task-arith", "latent-ties", "latent-dare",
                "latent-task-arith-direct",
                "latent-self-merge", "weight-lerp", "weight-slerp", "weight-task-arith",
                "weight-ties", "weight-dare", "hetero"}
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


def test_verdicts_of_a_constructed_run():
    """The demo's verdicts from scores built by hand: a gain within noise is no gain to keep (the
    table says so, never a ratio of noise); retention, latent-vs-weight and direct-vs-delta
    follow the one rule of noise (2 standard errors of the difference)."""
    from lsm_dist.demo import retention_table, verdict_lines, verdicts

    def row(t1, t2, ppl, se=0.04):
        return {"t1": t1, "t1_se": se, "t2": t2, "t2_se": se, "ppl": ppl}

    sc = {"base": row(0.30, 0.70, 10.0), "e1": row(0.90, 0.70, 11.0), "e2": row(0.30, 0.75, 10.5),
          "latent-task-arith": row(0.80, 0.72, 12.0), "weight-task-arith": row(0.60, 0.72, 12.5),
          "latent-task-arith-direct": row(0.25, 0.25, 5e6), "latent-dare": row(0.86, 0.70, 11.0),
          "weight-dare": row(0.84, 0.70, 11.0)}
    merges = ["latent-task-arith", "weight-task-arith", "latent-task-arith-direct", "latent-dare", "weight-dare"]
    v = verdicts(sc, "base", ["e1", "e2"], merges, merges, ["t1", "t2"], {"e1": ["t1"], "e2": ["t2"]})
    assert v["experts"]["e1"]["beyond_noise"] and v["experts"]["e1"]["task"] == "t1"
    assert v["experts"]["e1"]["gain"] == pytest.approx(0.6)
    assert v["experts"]["e1"]["se"] == pytest.approx((2 * 0.04**2) ** 0.5)
    assert not v["experts"]["e2"]["beyond_noise"]  # +0.05 < 2·0.057
    assert v["retention"]["latent-task-arith"] == {"e1": pytest.approx(0.5 / 0.6), "e2": None}
    assert v["keeps_both"] == []  # e2 has no gain: no merge keeps "both"
    table = retention_table(v, ["e1", "e2"])
    assert "| latent-task-arith | 83% | no gain to keep | 83% |" in table  # min over the real gains
    assert "| latent-task-arith-direct | -8% | no gain to keep | -8% |" in table  # below the base: < 0
    assert table.count("no gain to keep") == 1 + 5  # the header's note, then every e2 cell
    lw = v["latent_vs_weight"]
    assert lw["task-arith"]["verdict"] == "better"  # 0.80 vs 0.60 on t1, 0.72 vs 0.72 on t2
    assert lw["dare"]["verdict"] == "within noise"
    d = v["direct_vs_delta"]["latent-task-arith-direct"]
    assert d["destroyed"] and not d["delta_destroyed"] and d["delta"] == "latent-task-arith"
    text = verdict_lines(v)
    assert "e2 does NOT gain" in text and "e1 gains" in text and "destroys the model" in text
    assert "latent vs weight space, task-arith: better" in text
