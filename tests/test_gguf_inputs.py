"""GGUF files wherever a checkpoint goes: a path or PACKAGE:FILE (a file in an installed package,
or chunk packages assembled as data and checked against the package's SHA256SUMS), imported once
into a cached safetensors checkpoint keyed by the file's sha256."""

import hashlib
import json
import sys

import pytest
import torch

from lsm_dist.config import ConfigError
from tests.helpers import write_tiny_gguf


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_is_a_merge_input_and_an_eval_checkpoint(tmp_path, cache):
    from lsm_dist.checkpoint import Checkpoint
    from lsm_dist.evaluate.run import resolve_checkpoint
    from lsm_dist.merge import MergeParams, MergePlan, run_merge

    g = tmp_path / "m.gguf"
    ref = write_tiny_gguf(g)
    out = run_merge(MergePlan(models={"a": str(g), "b": str(g)}, space="weight", params=MergeParams(lambda_=0.5),
                              out_dir=str(tmp_path / "o")))
    with Checkpoint(out) as ck:  # lerp of a model with itself is the model, bit for bit
        for n, t in ref.items():
            assert torch.equal(ck.read(n), t.float()), n
    imported = list((cache / "gguf-import").iterdir())
    assert len(imported) == 1 and json.loads((imported[0] / "lsm_gguf_import.json").read_text())["sha256"] == \
        hashlib.sha256(g.read_bytes()).hexdigest()
    assert resolve_checkpoint(str(g)) == imported[0].resolve()  # eval scores the same cached import


def test_chunk_packages_are_assembled_as_data_and_checked(tmp_path, cache, monkeypatch):
    from lsm_dist.zoo.gguf import resolve_gguf

    g = tmp_path / "whole.gguf"
    write_tiny_gguf(g)
    data = g.read_bytes()
    site = tmp_path / "site"
    glue = site / "tinygguf"
    (glue / "data").mkdir(parents=True)
    (glue / "__init__.py").write_text("raise SystemExit('package code must never run')\n")
    (glue / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  tiny.gguf\n")
    cut = len(data) // 2
    for i, part in enumerate((data[:cut], data[cut:])):
        d = site / f"tinygguf_part{i + 1}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise SystemExit('package code must never run')\n")
        (d / f"tiny.gguf.part{i:02d}").write_bytes(part)
    monkeypatch.syspath_prepend(str(site))
    path = resolve_gguf("tinygguf:tiny.gguf")
    assert path.read_bytes() == data and cache in path.parents
    assert "tinygguf" not in sys.modules  # found, never imported
    # a chunk changed: the checksum refuses the assembly
    (site / "tinygguf_part2" / "data" / "tiny.gguf.part01").write_bytes(data[cut:-1] + b"x")
    path.unlink()
    with pytest.raises(ConfigError, match=r"tinygguf:tiny.gguf: the assembled chunks have sha256 .* reinstall"):
        resolve_gguf("tinygguf:tiny.gguf")
    # a missing chunk is named
    (site / "tinygguf_part2" / "data" / "tiny.gguf.part01").rename(site / "tinygguf_part2" / "data" / "tiny.gguf.part02")
    with pytest.raises(ConfigError, match=r"chunk\(s\) \[1\] of 3 are missing"):
        resolve_gguf("tinygguf:tiny.gguf")
