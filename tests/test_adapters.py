"""peft LoRA adapters as inputs: the lazily adapted checkpoint equals peft's own
merge_and_unload, adapters merge through `lsm merge` (both the `lora:` field and mergekit's
BASE+ADAPTER form), and bad adapters fail naming the file or tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lsm_dist.adapters import AdapterError, LoraAdapter, open_model, split_model_ref
from lsm_dist.checkpoint import Checkpoint
from lsm_dist.config import ConfigError
from lsm_dist.merge import MergeParams, MergePlan, run_merge
from tests.merge_helpers import build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: int = 8, dtype=torch.float32,
                 **extra) -> Path:
    """A real peft LoRA adapter of ``base`` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                          init_lora_weights=False, **extra))
    pm.save_pretrained(str(out))
    return out


def merged_reference(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = build_model("llama", d / "base", 32, 2, 64, seed=0)
    return {"dir": d, "base": base, "a": make_adapter(base, d / "lora-a", 1),
            "b": make_adapter(base, d / "lora-b", 2, r=2, alpha=4, use_rslora=True)}


@pytest.mark.parametrize("name", ["a", "b"])
def test_adapted_checkpoint_equals_peft_merge_and_unload(lora_zoo, name):
    ref = merged_reference(lora_zoo["base"], lora_zoo[name])
    ck = open_model(lora_zoo["base"], lora_zoo[name])
    adapted = [n for n in ck.tensors if n in ck.adapter.modules]
    assert len(adapted) == 2 * 7
    for n in ck.tensors:
        assert torch.equal(ck.read(n), ref[n]), n
        rows = torch.cat(list(ck.iter_rows(n, max_elems=100)))
        assert torch.equal(rows, ref[n]), n


def test_bf16_base_matches_peft(tmp_path):
    base = build_model("llama", tmp_path / "base", 32, 2, 64, seed=3, dtype=torch.bfloat16)
    ad = make_adapter(base, tmp_path / "ad", 4, dtype=torch.bfloat16)
    ref = merged_reference(base, ad, dtype=torch.bfloat16)
    ck = open_model(base, ad)
    for n in ck.adapter.modules:
        assert ck.read(n).dtype == torch.bfloat16
        assert torch.equal(ck.read(n), ref[n]), n


def test_split_model_ref(lora_zoo, tmp_path):
    base, a = str(lora_zoo["base"]), str(lora_zoo["a"])
    assert split_model_ref(f"{base}+{a}") == (base, a)
    assert split_model_ref(base) == (base, None)
    plus = tmp_path / "x+y"
    plus.mkdir()
    assert split_model_ref(str(plus)) == (str(plus), None)  # an existing path is never split
    assert split_model_ref(f"{base}+/nonexistent") == (f"{base}+/nonexistent", None)


def test_weight_merge_of_adapters_equals_merge_of_materialized(lora_zoo, tmp_path):
    """task arithmetic of two adapters given as inputs == of their merged checkpoints."""
    from transformers import AutoModelForCausalLM

    mat = {}
    for k in ("a", "b"):
        ref = merged_reference(lora_zoo["base"], lora_zoo[k])
        model = AutoModelForCausalLM.from_pretrained(str(lora_zoo["base"]), dtype=torch.float32)
        model.load_state_dict(ref)
        model.save_pretrained(str(tmp_path / f"mat-{k}"))
        mat[k] = tmp_path / f"mat-{k}"
    common = dict(base="base", method="task_arithmetic", space="weight", cache_dir=str(tmp_path / "c"),
                  params=MergeParams(weights=[0.7, 0.6]))
    base = str(lora_zoo["base"])
    p1 = MergePlan(models={"base": base, "a": {"path": base, "lora": str(lora_zoo["a"])},
                           "b": f"{base}+{lora_zoo['b']}"}, out_dir=str(tmp_path / "m1"), **common)
    p2 = MergePlan(models={"base": base, "a": str(mat["a"]), "b": str(mat["b"])},
                   out_dir=str(tmp_path / "m2"), **common)
    out1, out2 = Checkpoint(run_merge(p1)), Checkpoint(run_merge(p2))
    assert set(out1.tensors) == set(out2.tensors)
    for n in out1.tensors:
        assert torch.equal(out1.read(n), out2.read(n)), n
    rec = json.loads((tmp_path / "m1" / "merge_plan.json").read_text())
    assert rec["models"]["a"]["lora"] == str(lora_zoo["a"])


def test_adapter_digest_enters_the_plan(lora_zoo, tmp_path):
    """A changed adapter is a new merge (its files are part of the model's content digest)."""
    from lsm_dist.merge.plan import resolve_plan

    base = str(lora_zoo["base"])
    ad = tmp_path / "ad"
    ad.mkdir()
    for f in lora_zoo["a"].iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    plan = dict(models={"base": base, "a": {"path": base, "lora": str(ad)}}, base="base",
                method="task_arithmetic", space="weight", out_dir=str(tmp_path / "o"))
    d1 = resolve_plan(MergePlan(**plan)).digest
    w = load_file(str(ad / "adapter_model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] * 2
    save_file(w, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert resolve_plan(MergePlan(**plan)).digest != d1


# ---------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_adapter_for_another_base_names_the_tensor(lora_zoo, tmp_path):
    other = build_model("llama", tmp_path / "other", 48, 2, 64, seed=5)  # another width
    with pytest.raises(AdapterError, match=r"model\.layers\.0\..*_proj\.weight.*another model"):
        open_model(other, lora_zoo["a"])
    deeper = build_model("llama", tmp_path / "shallow", 32, 1, 64, seed=6)  # fewer layers
    with pytest.raises(AdapterError, match=r"model\.layers\.1\..*does not have"):
        open_model(deeper, lora_zoo["a"])
    plan = MergePlan(models={"base": str(other), "a": {"path": str(other), "lora": str(lora_zoo["a"])}},
                     base="base", method="task_arithmetic", space="weight", out_dir=str(tmp_path / "o"))
    from lsm_dist.merge.plan import resolve_plan

    with pytest.raises(ConfigError, match=r"models\.a: cannot open .*LoRA"):
        resolve_plan(plan)


@pytest.mark.parametrize("edit, match", [
    ({"r": None}, r"lacks \['r'\]"),
    ({"lora_alpha": None, "target_modules": []}, r"lacks \['lora_alpha', 'target_modules'\]"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"r": 8}, "has rank 4"),
])
def test_bad_adapter_config_names_the_file(lora_zoo, tmp_path, edit, match):
    ad = _copy(lora_zoo["a"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(edit)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=match) as e:
        LoraAdapter(ad)
    assert str(ad) in str(e.value)


def test_bad_adapter_files(lora_zoo, tmp_path):
    ad = _copy(lora_zoo["a"], tmp_path / "ad")
    w = load_file(str(ad / "adapter_model.safetensors"))
    k = next(n for n in w if n.endswith("lora_B.weight"))
    save_file({n: v for n, v in w.items() if n != k}, str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="without its pair"):
        LoraAdapter(ad)
    save_file({**w, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lora_embedding_A.*not a LoRA A/B weight"):
        LoraAdapter(ad)
    (ad / "adapter_model.safetensors").unlink()
    (ad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match=r"missing \(found \['adapter_model.bin'\]: only safetensors"):
        LoraAdapter(ad)
    (ad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        LoraAdapter(ad)
    with pytest.raises(AdapterError, match="does not exist"):
        LoraAdapter(tmp_path / "nope")


def test_adapter_inputs_convert_to_a_corpus(lora_zoo, tmp_path):
    """`lsm convert models=[id=BASE+ADAPTER]`: the corpus holds the adapted weights (verify
    --rebuild compares them with the adapted source); with base= it holds the task vectors
    scale·B·A the adapter implies."""
    from lsm_dist.corpus import ConvertConfig, run_convert
    from lsm_dist.corpus.reader import Corpus
    from lsm_dist.corpus.verify import verify_corpus

    ref = f"{lora_zoo['base']}+{lora_zoo['a']}"
    kw = dict(tokens=4, chunk=32, block_samples=8, shard_samples=24)
    run_convert(ConvertConfig(models=[f"a={ref}"], out_dir=str(tmp_path / "c"), **kw), progress=False)
    assert "14 of 14 compared bit for bit" in verify_corpus(tmp_path / "c", rebuild=True)
    ad = open_model(lora_zoo["base"], lora_zoo["a"])
    c = Corpus(tmp_path / "c")
    name = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(c.rebuild(c.find("a", name)), ad.read(name))
    run_convert(ConvertConfig(models=[f"a={ref}"], base=str(lora_zoo["base"]), out_dir=str(tmp_path / "d"), **kw),
                progress=False)
    d = Corpus(tmp_path / "d")
    tau = ad.read(name).float() - Checkpoint(lora_zoo["base"]).read(name).float()
    assert torch.equal(d.rebuild(d.find("a", name)), tau)
    assert torch.allclose(tau, ad.adapter.delta(name), atol=1e-6)
