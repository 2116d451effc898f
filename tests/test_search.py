"""lsm search on the tiny zoo: CMA-ES and random search under one budget, candidates as submitit
jobs (local processes, and a Slurm array on the local cluster), kill -> resume without redoing a
finished candidate, the best recipe written and scored on the held-out test rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, zoo: dict, **kw) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "models": {"base": {"path": str(zoo["llama-tiny-base"])},
                   "arith": {"path": str(zoo["llama-tiny-arith"]), "params": {"weight": 1.0}},
                   "rev": {"path": str(zoo["llama-tiny-reverse"]), "params": {"weight": 1.0}}},
        "target": "base", "base": "base", "inputs": ["arith", "rev"], "method": "task_arithmetic",
        "params": {"density": 1.0}, "space": "weight", "out_dir": str(tmp_path / "ref")}))
    cfg = {"name": "tiny", "plan": str(plan), "tasks": ["lsm_arith_mc", "lsm_reverse_mc"], "val_n": 8, "test_n": 8,
           "strategies": ["cma", "random"], "budget": 4, "popsize": 4, "parallel": 2, "executor": "local",
           "out_dir": str(tmp_path / "search"), "eval_batch_size": 8, "references": {"hand-set": str(plan)},
           "space": [{"key": "method", "choices": ["task_arithmetic", "ties", "dare_ties"]},
                     {"key": "models.arith.params.weight", "low": 0.2, "high": 1.5},
                     {"key": "params.density", "low": 0.3, "high": 1.0},
                     {"key": "tensor_params.scale", "anchors": 2, "low": 0.5, "high": 1.5, "filter": "mlp"}], **kw}
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _journal(d: Path) -> list[dict]:
    f = d / "journal.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_search_runs_resumes_and_reports(tiny_zoo, tmp_path):
    cfg = _config(tmp_path, tiny_zoo)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # start, kill once a candidate has finished, resume
    proc = subprocess.Popen([sys.executable, "-m", "lsm_dist.cli", "search", "-c", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not _journal(tmp_path / "search" / "cma") and time.time() - t0 < 600 and proc.poll() is None:
        time.sleep(0.5)
    assert _journal(tmp_path / "search" / "cma"), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["index"]: r for r in _journal(tmp_path / "search" / "cma")}
    res = subprocess.run([sys.executable, "-m", "lsm_dist.cli", "search", "-c", str(cfg)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "search"
    for s in ("cma", "random"):
        recs = _journal(out / s)
        assert sorted(r["index"] for r in recs) == [0, 1, 2, 3], s  # the budget, none redone
        assert all(r["seed"] == r["index"] for r in recs)  # a fixed seed per candidate, recorded
        kept = [p for p in (out / s).glob("cand-*/merge/model")]
        assert len(kept) <= 2  # only the best so far keeps its model (+ one being replaced)
    for i, r in first.items():  # the resumed CMA-ES asked the same candidates again
        again = next(x for x in _journal(out / "cma") if x["index"] == i)
        assert again["values"] == r["values"] and again["fitness"] == r["fitness"]
    best = yaml.safe_load((out / "best_plan.yaml").read_text())
    assert best["origin"].startswith("lsm search tiny: candidate") and best["space"] == "weight"
    md = (out / "results.md").read_text()
    assert "## Held-out test rows" in md and "| hand-set |" in md and "| searched |" in md
    assert (out / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"searched", "hand-set"}
    # the test rows are never what the search scored: validation rows are train-split items
    val = (out / "cma" / "cand-0000" / "eval" / "tasks" / "data" / "arith_test.jsonl").read_text()
    test = (out / "best" / "eval" / "tasks" / "data" / "arith_test.jsonl").read_text()
    assert not set(val.splitlines()) & set(test.splitlines())


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_search_on_slurm(tiny_zoo, tmp_path, slurm_cluster):
    from lsm_dist.search import load_search_config, run_search

    cfg = load_search_config(_config(tmp_path, tiny_zoo, strategies=["random"], budget=2, references={}),
                             ["executor=slurm"])
    run_search(cfg)
    assert len(_journal(tmp_path / "search" / "random")) == 2
    assert list((tmp_path / "search" / "random" / "submitit").glob("*_log.out"))


def test_best_recipe_as_mergekit_keeps_filtered_gradients_and_names_differences():
    """A filtered gradient of the scale keeps the plan's scale as its catch-all (it was dropped:
    mergekit would have merged every other tensor at λ 1), and best_mergekit.yml names what
    mergekit computes differently; none where the plan uses mergekit's semantics."""
    from lsm_dist.merge.mergekit import plan_data
    from lsm_dist.search import to_mergekit

    plan = {"models": {"b": {"path": "/m/b"}, "x": {"path": "/m/x", "params": {"weight": 1.2}}},
            "base": "b", "target": "b", "inputs": ["x"], "method": "ties", "space": "weight",
            "params": {"density": 0.3, "scale": 0.9, "seed": 4},
            "tensor_params": {"scale": [{"filter": "mlp", "value": [1.2, 0.8]}]}}
    mk, differ = to_mergekit(plan)
    assert mk["parameters"]["lambda"] == [{"filter": "mlp", "value": [1.2, 0.8]}, {"value": 0.9}]
    assert mk["parameters"]["density"] == 0.3 and "rescale" not in mk["parameters"]
    assert plan_data(mk)["tensor_params"]["scale"][-1] == {"value": 0.9}
    assert any("sign_tie" in d for d in differ) and any("tie_break" in d for d in differ)
    assert any("rest: target" in d for d in differ)
    same = {**plan, "rest": "weight", "params": {**plan["params"], "sign_tie": "positive", "tie_break": "argsort"}}
    assert to_mergekit(same)[1] == []
    dare = {**same, "method": "dare_ties"}
    assert any("1 / keep probability" in d for d in to_mergekit(dare)[1])
    assert to_mergekit({**dare, "params": {**dare["params"], "rescale": "l1"}})[0]["parameters"]["rescale"] is True
    assert to_mergekit({**plan, "space": "latent"}) is None
