"""Hugging Face ids in merge plans and mergekit configs, resolved offline from a cache the test
lays out in the hub's own layout; mergekit keys that change nothing; mergekit-multi files."""

import shutil
from pathlib import Path

import pytest

from lsm_dist.config import ConfigError
from lsm_dist.merge.plan import load_plan

SHA = "0123456789abcdef0123456789abcdef01234567"


def lay_out(cache: Path, repo: str, model: Path, revision: str = "main") -> Path:
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snap = root / "snapshots" / SHA
    shutil.copytree(model, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(SHA)
    return snap


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.merge_helpers import build_model, perturbed_expert

    d = tmp_path_factory.mktemp("hub")
    base = build_model("llama", d / "base", 64, 2, 128, seed=0)
    return {"base": base, "a": perturbed_expert(base, d / "a", seed=1)}


def test_mergekit_config_with_hub_ids_runs_offline(pair, tmp_path, monkeypatch):
    from lsm_dist.merge import is_complete, run_merge

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lay_out(cache, "psmathur/orca_mini_v3_13b", pair["base"])
    snap = lay_out(cache, "garage-bAInd/Platypus2-13B", pair["a"])
    cfg = tmp_path / "mk.yml"
    cfg.write_text("name: orca-platy\nmerge_method: slerp\nbase_model: psmathur/orca_mini_v3_13b\n"
                   "models:\n  - model: psmathur/orca_mini_v3_13b\n  - model: garage-bAInd/Platypus2-13B\n"
                   "parameters:\n  t: 0.3\n  int8_mask: true\ndtype: float32\n")
    plan = load_plan(cfg, [f"out_dir={tmp_path / 'out'}"])
    assert plan.model_ref("Platypus2-13B")[0] == snap
    out = run_merge(plan)
    assert is_complete(out)
    card = (out / "README.md").read_text()
    assert "ignored" in card and "name: 'orca-platy'" in card and "int8_mask" in card


def test_uncached_hub_id_names_the_cache_and_the_fetch_command(pair, tmp_path, monkeypatch):
    from lsm_dist.merge import run_merge

    cache = tmp_path / "empty-hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tmp_path / "mk.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {pair['base']}\n    parameters: {{weight: 1.0}}\n"
                   "  - model: someorg/some-model@v2\n    parameters: {weight: 1.0}\n")
    with pytest.raises(ConfigError, match=rf"'someorg/some-model@v2' is not in the Hugging Face cache {cache} and "
                                          r"HF_HUB_OFFLINE is set: fetch it with `huggingface-cli download "
                                          r"someorg/some-model --revision v2"):
        run_merge(load_plan(cfg, [f"out_dir={tmp_path / 'out'}"]))


def test_a_local_path_of_the_same_spelling_wins(pair, tmp_path, monkeypatch):
    from lsm_dist.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("org/name@main")
    (tmp_path / "org").mkdir()
    shutil.copytree(pair["base"], tmp_path / "org" / "name")
    assert not is_hub_id("org/name")
    assert not is_hub_id("./org/name") and not is_hub_id("/abs/path")


def test_mergekit_multi_file_is_named(tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text("name: first\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                   "name: second\nmerge_method: linear\nmodels: [{model: first, parameters: {weight: 1}}]\n")
    with pytest.raises(ConfigError, match=r"holds 2 YAML documents \['first', 'second'\] -- a mergekit-multi file"):
        load_plan(cfg)
