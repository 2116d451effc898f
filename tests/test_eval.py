"""`lsm eval`: generated lm-eval tasks, resumable scoring of zoo checkpoints, failures, reports.

Uses two models of the tiny zoo (the llama base and its reverse expert; ~20 s to build), from
a session ``tiny_zoo`` fixture when conftest has one, else built here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from lsm_dist.config import ConfigError
from lsm_dist.evaluate import plots, report
from lsm_dist.evaluate import run as R
from lsm_dist.evaluate.run import EvalConfig, EvalError, checkpoint_fingerprint, run_eval
from lsm_dist.evaluate.tasks import GROUP, local_task_names, write_tasks
from lsm_dist.zoo import tasks as T

REPO = Path(__file__).resolve().parent.parent
BASE, EXPERT = "llama-tiny-base", "llama-tiny-reverse"
LEAVES = [f"lsm_{f}_{k}" for k in ("mc", "gen") for f in T.TASK_NAMES]
GEN = "exact_match[strip]"


@pytest.fixture(scope="session")
def zoo(request, tmp_path_factory) -> dict[str, Path]:
    try:
        paths = request.getfixturevalue("tiny_zoo")
        if BASE in paths and EXPERT in paths:
            return {n: Path(p) for n, p in paths.items()}
    except pytest.FixtureLookupError:
        pass
    from lsm_dist.zoo.build import build_zoo, load_zoo_config

    cfg = load_zoo_config(REPO / "configs/zoo/tiny.yaml",
                          [f"out_dir={tmp_path_factory.mktemp('zoo')}"])  # fmt: skip
    cfg.models = [m for m in cfg.models if m.name in (BASE, EXPERT)]
    return build_zoo(cfg, progress=False)


def _cfg(zoo, out, **kw) -> EvalConfig:
    base = dict(checkpoints=[f"base={zoo[BASE]}", f"expert={zoo[EXPERT]}"], out_dir=str(out),
                limit=16, n=40, dtype="float32", batch_size=16, progress=False)  # fmt: skip
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def scored(zoo, tmp_path_factory):
    cfg = _cfg(zoo, tmp_path_factory.mktemp("eval"))
    return cfg, run_eval(cfg)


# --------------------------------------------------------------------------- tasks
def test_generated_tasks_load_in_task_manager(tmp_path):
    from lm_eval.tasks import TaskManager

    d = write_tasks(tmp_path, n=12, seed=3)
    tm = TaskManager(include_path=str(d), include_defaults=False)
    assert set(local_task_names()) <= set(tm.all_tasks)
    loaded = tm.load([GROUP])
    assert sorted(loaded["tasks"]) == sorted(LEAVES)
    assert loaded["group_map"][GROUP] == [f"{GROUP}_mc", f"{GROUP}_gen"]
    mc, gen = loaded["tasks"]["lsm_arith_mc"], loaded["tasks"]["lsm_reverse_gen"]
    doc = mc.eval_docs[0]
    assert len(mc.eval_docs) == 12 and mc.OUTPUT_TYPE == "multiple_choice"
    assert mc.doc_to_choice(doc)[mc.doc_to_target(doc)] == doc["answer"]
    assert gen.OUTPUT_TYPE == "generate_until" and gen.doc_to_target(gen.eval_docs[0]) == \
        gen.eval_docs[0]["answer"].strip()  # fmt: skip
    # rows come from the held-out test split; data paths are absolute
    from lsm_dist.zoo.tasks import split_of

    assert all(split_of("arith", key_of_doc(d_)) == "test" for d_ in mc.eval_docs)
    assert str(d) in (d / "lsm_arith_mc.yaml").read_text() and d.is_absolute()


def key_of_doc(doc) -> str:
    from lsm_dist.zoo.tasks import Example, key_of

    return key_of(Example("arith", doc["prompt"], doc["answer"]))


def test_tasks_rewritten_only_when_content_changes(tmp_path):
    d = write_tasks(tmp_path, n=10)
    f = d / "data" / "arith_test.jsonl"
    m0 = f.stat().st_mtime_ns
    write_tasks(tmp_path, n=10)
    assert f.stat().st_mtime_ns == m0
    write_tasks(tmp_path, n=11)
    assert f.stat().st_mtime_ns != m0 and len(f.read_text().splitlines()) == 11


# --------------------------------------------------------------------------- config / names
def test_unknown_task_lists_close_names(tmp_path):
    cfg = EvalConfig(checkpoints=["x=/nonexistent"], tasks=["lsm_arith_mcc"], out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="lsm_arith_mc") as e:
        run_eval(cfg)
    assert "lsm_arith_mcc" in str(e.value)
    # a user folder, without lm-eval's registry: close names come from it too
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_task.yaml").write_text((write_tasks(tmp_path) / "lsm_arith_mc.yaml").read_text()
                                       .replace("task: lsm_arith_mc", "task: my_task"))  # fmt: skip
    with pytest.raises(ConfigError, match="my_task"):
        R.resolve_tasks(["my_tsk"], tmp_path / "tasks", [str(user)], include_defaults=False)
    assert R.resolve_tasks(["my_task", GROUP], tmp_path / "tasks", [str(user)], False) is not None


def test_config_validation():
    with pytest.raises(ConfigError, match="duplicate"):
        EvalConfig(checkpoints=["a=/x", "a=/y"])
    with pytest.raises(ConfigError, match="dtype"):
        EvalConfig(dtype="float8")
    with pytest.raises(ConfigError, match="batch_size"):
        EvalConfig(batch_size=0)
    assert R.parse_checkpoints(["/runs/zoo/m1/", "b=/p"]) == [("m1", Path("/runs/zoo/m1")),
                                                               ("b", Path("/p"))]  # fmt: skip
    with pytest.raises(ConfigError, match="checkpoints"):
        run_eval(EvalConfig(checkpoints=[]))


def test_checkpoint_checks(zoo, tmp_path):
    fp = checkpoint_fingerprint(zoo[EXPERT])
    assert fp["files"] and all("header" in v for v in fp["files"].values())
    with pytest.raises(R.CheckpointError, match="not a directory"):
        checkpoint_fingerprint(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(zoo[EXPERT], bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(R.CheckpointError, match="config.json"):
        checkpoint_fingerprint(bad)


# --------------------------------------------------------------------------- scoring
@pytest.mark.slow
def test_scores_two_checkpoints_and_writes_reports(scored):
    cfg, out = scored
    files = sorted((out / "results").glob("*.json"))
    assert [f.name.split("-")[0] for f in files] == ["base", "expert"]
    for f in files:
        rec = json.loads(f.read_text())
        assert (
            rec["lm_eval"]["results"]["lsm_arith_mc"]["acc,none"]
            == rec["metrics"]["lsm_arith_mc/acc"]
        )
        for task in LEAVES:
            key = f"{task}/acc" if task.endswith("_mc") else f"{task}/{GEN}"
            assert 0.0 <= rec["metrics"][key] <= 1.0, (f.name, key)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["base", "expert"]
    assert all(0.0 <= float(r["lsm_reverse_mc/acc"]) <= 1.0 for r in rows)
    assert "lsm_reverse_mc/acc_stderr" in rows[0]
    md = (out / "results.md").read_text()
    assert "| expert |" in md and "±" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb" / "expert").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_expert_beats_base_on_its_task(scored):
    _, out = scored
    m = {r["checkpoint"]: r for r in csv.DictReader((out / "results.csv").open())}
    # the reverse expert (zoo card: ~0.6 greedy exact match) vs its base (0.0)
    assert float(m["expert"]["lsm_reverse_mc/acc"]) > float(m["base"]["lsm_reverse_mc/acc"]) + 0.3
    assert float(m["expert"][f"lsm_reverse_gen/{GEN}"]) > float(m["base"][f"lsm_reverse_gen/{GEN}"])


@pytest.mark.slow
def test_rerun_uses_cache_and_resumes(scored, monkeypatch):
    cfg, out = scored
    calls: list[str] = []
    real = R.score_checkpoint

    def counting(path, *a, **kw):
        calls.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(R, "score_checkpoint", counting)
    files = sorted((out / "results").glob("*.json"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    run_eval(cfg)
    assert calls == [] and [f.stat().st_mtime_ns for f in files] == mtimes
    # "interrupted" after the first checkpoint: only the missing one is scored again
    expert = next(f for f in files if f.name.startswith("expert-"))
    expert.unlink()
    run_eval(cfg)
    assert calls == [EXPERT] and expert.is_file()
    # another limit is another digest: both are rescored
    run_eval(dataclasses.replace(cfg, limit=8))
    assert calls == [EXPERT, BASE, EXPERT]
    run_eval(cfg)  # both digests stay cached side by side (and the reports are cfg's again)
    assert calls == [EXPERT, BASE, EXPERT]
    assert len(list((out / "results").glob("*.json"))) == 4


@pytest.mark.slow
def test_broken_checkpoint_is_named_and_others_scored(zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(zoo[EXPERT], broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    cfg = _cfg(zoo, tmp_path / "out", tasks=["lsm_reverse_mc"], limit=4,
               checkpoints=[f"broken={broken}", f"missing={tmp_path / 'nope'}",
                            f"good={zoo[EXPERT]}"])  # fmt: skip
    with pytest.raises(EvalError) as e:
        run_eval(cfg)
    msg = str(e.value)
    assert "broken" in msg and shard.name in msg and "truncated" in msg
    assert "missing" in msg and "not a directory" in msg
    assert set(e.value.failures) == {"broken", "missing"}
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["good"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["failures"]) == {"broken", "missing"} and "good" in summary["scored"]


@pytest.mark.slow
def test_evaluate_model_in_memory_matches_checkpoint_run(zoo, scored, tmp_path):
    from transformers import AutoTokenizer

    from lsm_dist.hidden.module import MergedCausalLM
    from lsm_dist.zoo import load_model

    cfg, out = scored
    tok = AutoTokenizer.from_pretrained(zoo[EXPERT])
    expert, base = load_model(zoo[EXPERT]), load_model(zoo[BASE])
    tasks = ["lsm_reverse_mc", "lsm_reverse_gen"]
    res = R.evaluate_model(expert, tok, tasks, task_root=tmp_path, limit=cfg.limit, n=cfg.n)
    got = report.flatten_results(res)
    want = {r["checkpoint"]: r for r in csv.DictReader((out / "results.csv").open())}["expert"]
    for k in ("lsm_reverse_mc/acc", f"lsm_reverse_gen/{GEN}"):
        assert got[k] == pytest.approx(float(want[k]))
    # a hidden-state merger with alpha=0 is model 0: same scores through HFLM
    merged = MergedCausalLM.from_models([expert, base], layers=[0], alpha=0.0)
    res2 = R.evaluate_model(merged, tok, tasks, task_root=tmp_path, limit=cfg.limit, n=cfg.n)
    assert report.flatten_results(res2)["lsm_reverse_mc/acc"] == got["lsm_reverse_mc/acc"]


def test_plot_sweep(tmp_path):
    rows = [{"lambda": lam, "method": m, "lsm_arith_mc/acc": 0.2 + 0.5 * lam,
             "lsm_arith_mc/acc_stderr": 0.05} for m in ("lerp", "lsm") for lam in (0, 0.5, 1)]  # fmt: skip
    p = plots.plot_sweep(rows, tmp_path / "sweep.png", x="lambda", group="method")
    assert p.read_bytes()[:4] == b"\x89PNG"


def _rows(n: int, ppl: bool = True) -> list[dict]:
    """``n`` checkpoints with acc and acc_norm on two tasks, a generative task and perplexity."""
    rows = []
    for i in range(n):
        m = {"t_mc/acc": 0.2 + 0.6 * i / max(n - 1, 1), "t_mc/acc_norm": 0.9, "u_mc/acc_norm": 0.5 - 0.01 * i,
             "g_gen/exact_match[strip]": 0.1 * (i % 3)}
        if ppl:
            m |= {"lsm_english_ppl/word_perplexity": 10.0 ** (1 + i % 5), "lsm_english_ppl/bits_per_byte": 3.0}
        rows.append({"name": f"ckpt-{i}", "metrics": m})
    return rows


def test_task_metrics_one_per_task():
    got = plots.task_metrics(_rows(3))
    assert got == [("t_mc", "t_mc/acc", False), ("u_mc", "u_mc/acc_norm", False),
                   ("g_gen", "g_gen/exact_match[strip]", False),
                   ("lsm_english_ppl", "lsm_english_ppl/word_perplexity", True)]


def test_heatmap_sizes_grow_with_checkpoints(tmp_path):
    import matplotlib.image as mpimg

    h = {}
    for n in (5, 20):
        p = plots.heatmap(_rows(n), tmp_path / f"h{n}.png", roles={"ckpt-0": "base"})
        h[n] = mpimg.imread(p).shape
    assert h[20][1] == h[5][1]  # the same tasks: the same width
    assert h[20][0] - h[5][0] == pytest.approx(15 * 0.3 * 110, abs=2)  # 0.3 in per row at 110 dpi
    p = plots.heatmap(_rows(4, ppl=False), tmp_path / "acc.png")  # no perplexity panel
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_retention_and_report_files(tmp_path):
    rows = [{"name": "base", "metrics": {"a/acc": 0.2, "b/acc": 0.2, "p/word_perplexity": 50.0}},
            {"name": "ea", "metrics": {"a/acc": 0.8, "b/acc": 0.1, "p/word_perplexity": 60.0}},
            {"name": "eb", "metrics": {"a/acc": 0.4, "b/acc": 0.5, "p/word_perplexity": 70.0}},
            {"name": "merge", "metrics": {"a/acc": 0.6, "b/acc": 0.25, "p/word_perplexity": 55.0}}]
    for r, c in zip(rows, (0.9, 0.3, 0.4, 0.6)):  # a task the experts did not learn: the base leads
        r["metrics"]["c/acc"] = c
    tasks, frac = plots.retention(rows, ["ea", "eb"])
    assert tasks == ["a/acc", "b/acc", "c/acc"]  # perplexity is not an accuracy
    assert frac["merge"] == {"a/acc": pytest.approx(0.75), "b/acc": pytest.approx(0.5), "c/acc": pytest.approx(1.5)}
    tasks, frac = plots.retention(rows, ["ea", "eb"], base="base")  # only where an expert beats the base
    assert tasks == ["a/acc", "b/acc"]  # and the share of the gain over the base, as the tables
    assert frac == {"base": {"a/acc": pytest.approx(0.0), "b/acc": pytest.approx(0.0)},
                    "merge": {"a/acc": pytest.approx(0.4 / 0.6), "b/acc": pytest.approx(0.05 / 0.3)}}
    # with standard errors, a gain within two of them is no skill of the expert's: b (0.5 vs
    # 0.2, se 0.1 each: 0.3 > 2 x 0.141) stays, a (0.8 vs 0.2, se 0.3 each: 0.6 < 0.85) goes
    noisy = [{**r, "metrics": {**r["metrics"], "a/acc_stderr": 0.3, "b/acc_stderr": 0.1}} for r in rows]
    assert plots.retention(noisy, ["ea", "eb"], base="base")[0] == ["b/acc"]
    paths = report.write_reports(rows, tmp_path / "with", base="base", experts=["ea", "eb"])
    assert paths["retention"].read_bytes()[:4] == b"\x89PNG" and "lambda" not in paths
    paths = report.write_reports(rows, tmp_path / "without")
    assert "retention" not in paths and not (tmp_path / "without" / "results_retention.png").exists()
    assert paths["png"].is_file()


def test_lambda_sweeps_found_from_merge_plans(tmp_path):
    import yaml

    from lsm_dist.merge.card import PLAN_FILE

    rows = []
    for space in ("latent", "weight"):
        for lam in (0.0, 0.25, 0.5, 1.0):
            d = tmp_path / f"{space}-{lam}"
            d.mkdir()
            plan = {"method": "lerp", "space": space, "decode": "delta", "target": "a", "inputs": ["a", "b"],
                    "params": {"lambda": lam, "seed": 0}, "out_dir": str(d)}  # out_dir differs: ignored
            (d / PLAN_FILE).write_text(yaml.safe_dump(plan))
            rows.append({"name": d.name, "path": str(d), "metrics": {"t/acc": lam / 2, "t/acc_stderr": 0.1}})
    lone = tmp_path / "other"  # another method: not a sweep of its own (one λ)
    lone.mkdir()
    (lone / PLAN_FILE).write_text(yaml.safe_dump({"method": "slerp", "space": "weight",
                                                  "params": {"lambda": 0.5}}))
    rows.append({"name": "other", "path": str(lone), "metrics": {"t/acc": 0.3}})
    rows.append({"name": "a", "path": str(tmp_path / "nowhere"), "metrics": {"t/acc": 0.1}})
    sweep = plots.lambda_sweeps(rows)
    assert sorted({r["merge"] for r in sweep}) == ["latent/delta lerp", "weight lerp"]
    assert sorted(r["lambda"] for r in sweep if r["merge"] == "weight lerp") == [0.0, 0.25, 0.5, 1.0]
    paths = report.write_reports(rows, tmp_path / "eval", base="a", experts=[])
    assert paths["lambda"].read_bytes()[:4] == b"\x89PNG"


def test_roles_must_name_checkpoints():
    with pytest.raises(ConfigError, match="experts"):
        EvalConfig(checkpoints=["a=/x", "b=/y"], experts=["a", "c"])
    with pytest.raises(ConfigError, match="base"):
        EvalConfig(checkpoints=["a=/x"], base="z")
    assert EvalConfig(checkpoints=["a=/x", "b=/y"], base="a", experts=["b"]).experts == ["b"]


@pytest.mark.slow
def test_cli_eval_reuses_results_and_fails_on_broken(scored, monkeypatch, tmp_path, capsys):
    from lsm_dist.cli import main

    cfg, out = scored
    calls: list[str] = []
    monkeypatch.setattr(R, "score_checkpoint", lambda path, *a, **k: calls.append(path))
    common = [
        f"out_dir={out}",
        f"limit={cfg.limit}",
        f"n={cfg.n}",
        "dtype=float32",
        "progress=false",
    ]
    argv = ["eval", "--model", cfg.checkpoints[0], "-m", cfg.checkpoints[1], *common]
    assert main(argv) == 0 and calls == []
    assert "| expert |" in capsys.readouterr().out
    assert (out / "eval.resolved.yaml").is_file()
    assert main(["eval", "-m", f"gone={tmp_path / 'gone'}", *common]) == 1
    assert "gone" in capsys.readouterr().err
    assert main(["eval", "-m", cfg.checkpoints[0], "tasks=[lsm_arith_mcc]", *common]) == 2


def test_reports_are_cumulative_over_the_out_dir(zoo, scored, monkeypatch):
    cfg, out = scored
    calls: list[str] = []
    monkeypatch.setattr(R, "score_checkpoint", lambda path, *a, **kw: calls.append(path) or {})
    run_eval(dataclasses.replace(cfg, checkpoints=[f"base={zoo[BASE]}"]))  # cached: nothing scored
    assert calls == []
    md = (out / "results.md").read_text()
    assert "| base |" in md and "| expert |" in md  # expert: scored by an earlier call
    assert "1 from this call, 1 scored earlier" in md
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["scored"]) == ["base"]
    assert {n: r["from"] for n, r in summary["table"].items()} == {"base": "this call", "expert": "cached"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["base", "expert"]
    # other scoring settings are other numbers: not mixed into this table
    other = report.cumulative_rows(out, [], {**json.loads((out / "results" / sorted(
        p.name for p in (out / "results").glob("base-*.json"))[0]).read_text())["scoring"], "limit": 3})
    assert other == []


def test_merged_checkpoint_card_gets_the_results(zoo, tmp_path, monkeypatch):
    import yaml

    from lsm_dist.merge import MergeParams, MergePlan, load_plan, prepare, run_merge
    from lsm_dist.merge.card import EVAL_START, PLAN_FILE

    plan = MergePlan(models={"base": str(zoo[BASE]), "expert": str(zoo[EXPERT])}, method="lerp",
                     space="weight", params=MergeParams(lambda_=0.5), out_dir=str(tmp_path / "m"),
                     cache_dir=str(tmp_path / "c"))
    model = run_merge(plan)
    card = (model / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "lsm_dist"] and front["library_name"] == "transformers"
    assert front["base_model"] == [str(zoo[BASE]), str(zoo[EXPERT])]
    rp = prepare(plan)
    assert "`lerp` in weight space" in card and rp.digest in card
    assert all(i.digest in card for i in rp.models.values())
    # the resolved plan next to the card is a plan: it resolves to the same merge
    again = load_plan(model / PLAN_FILE)
    assert prepare(again).digest == rp.digest
    cfg = _cfg(zoo, tmp_path / "eval", checkpoints=[f"merged={model}"], limit=4)
    run_eval(cfg)
    card = (model / "README.md").read_text()
    assert card.count(EVAL_START) == 1 and "| lsm_arith_mc/acc |" in card and "Scored as `merged`" in card
    calls: list[str] = []
    monkeypatch.setattr(R, "score_checkpoint", lambda path, *a, **kw: calls.append(path) or {})
    run_eval(cfg)  # the card changed, the checkpoint did not: nothing is re-scored
    assert calls == [] and (model / "README.md").read_text().count(EVAL_START) == 1
