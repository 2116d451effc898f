"""The output vocabulary of a merge (mergekit's ``tokenizer_source`` / ``tokenizer:`` /
``chat_template``), with mergekit 0.1.5's semantics (``mergekit/tokenizer/build.py``,
``embed.py``, ``merge.py``):

- the output tokenizer is the base's (``base``), a model's (``<model id>``), or the union
  (``union``: the base's tokenizer plus every other model's tokens it lacks, appended, as
  added tokens), plus the ``tokens:`` it lacks; its size, rounded up to ``pad_to_multiple_of``,
  is the output ``vocab_size``;
- per model, a permutation: output token id → that model's row of the token (``-1``: it lacks
  the token);
- every tensor with a vocabulary axis (embeddings and LM head, axis 0) is permuted per input into
  the output vocabulary before the merge operator runs (:meth:`Vocabulary.permute`): a token the
  input has → its row; one it lacks (or a ``force``-d one) → a default, the same for every input
  of the tensor: the row of the one input that has it, else the base's, else the mean of those
  that have it (zeros if none has it); a ``tokens:`` entry names the default instead (a model's
  row of this token, another token's row of a model, or zeros); padding rows are the mean of the
  token rows;
- the tokenizer (and ``chat_template``) is written into the merged model (:func:`write_tokenizer`).

Where mergekit 0.1.5 depends on the iteration order of a Python set or a Rust hash map (the model
order of a union, the order in which one model's ordinary tokens are appended; the base model
when none is given), lsm takes the config's order and token ids, so the output is the same every
run; where mergekit fails late (a KeyError, an assertion, NotImplementedError), lsm refuses the
plan before any tensor is read, naming the token and model. Tokenizers are read from
``tokenizer.json`` / ``tokenizer.model`` (sentencepiece) files with ``trust_remote_code`` off.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lsm_dist.config import ConfigError, check, doc
from lsm_dist.utils import get_logger, read_json, sha256_json

log = get_logger("lsm.merge")
SOURCES = ("base", "union", "model")
VOCAB_ROLES = ("embed", "lm_head")  # global tensors whose axis 0 is the vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
ABSENT, BEYOND = -1, -2  # permutation entries: the model lacks the token / has it past its vocab_size


@dataclass
class TokenSource:
    """Where a token's row comes from (mergekit's ``tokenizer.tokens.<token>``)."""

    source: str | dict[str, Any] | None = doc(
        "a model id (that model's row of this token) | {kind: model_token, model: <id>, token: <str>} "
        "or {kind: model_token, model: <id>, token_id: <int>} (a row of that model's own vocabulary) | "
        "{kind: zero} | null (no default: every input must have the token)", None)
    force: bool = doc("use the source's row in every input, also in those that have the token", False)

    def __post_init__(self) -> None:
        s = self.source
        if isinstance(s, dict):
            kind = s.get("kind")
            check(kind in ("zero", "model_token"), "source.kind", f"{kind!r} is not zero or model_token")
            keys = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}[kind]
            extra = sorted(set(s) - keys)
            check(not extra, "source", f"unknown key(s) {extra} for kind {kind}")
            if kind == "model_token":
                check(isinstance(s.get("model"), str), "source.model", f"expected a model id, got {s.get('model')!r}")
                check(("token" in s) != ("token_id" in s), "source", "give exactly one of token or token_id")
                check("token" not in s or isinstance(s["token"], str), "source.token", "expected a string")
                check("token_id" not in s or (isinstance(s["token_id"], int) and s["token_id"] >= 0),
                      "source.token_id", f"expected a token id >= 0, got {s.get('token_id')!r}")

    @property
    def model(self) -> str | None:
        """The model this source reads a row of (None: zeros or no source)."""
        return self.source.get("model") if isinstance(self.source, dict) else self.source


@dataclass
class TokenizerPlan:
    """The output vocabulary (mergekit's ``tokenizer_source`` and ``tokenizer:``)."""

    source: str = doc("base (the base's tokenizer; the target's without a base) | union (the base's plus "
                      "every other model's tokens it lacks) | model (the tokenizer of `model`)", "base")
    model: str | None = doc("source: model: the model id whose tokenizer is the output's", None)
    tokens: dict[str, TokenSource] = doc("token → where its row comes from (added to the output "
                                         "tokenizer when it lacks the token)", factory=dict)
    pad_to_multiple_of: int | None = doc("round the output vocab_size up to a multiple of this; the "
                                         "padding rows are the mean of the token rows", None)

    def __post_init__(self) -> None:
        check(self.source in SOURCES, "source", f"{self.source!r} is not one of {list(SOURCES)}")
        check((self.source == "model") == (self.model is not None), "model",
              "name the model (a model id) exactly when source is model")
        p = self.pad_to_multiple_of
        check(p is None or (isinstance(p, int) and p > 0), "pad_to_multiple_of", f"must be a positive integer, got {p!r}")

    def check_models(self, models, where: str = "tokenizer") -> None:
        """Every model this block names is one of ``models``."""
        known = list(models)
        check(self.model is None or self.model in known, f"{where}.model",
              f"{self.model!r} is not a model of this plan; models: {known}")
        for tok, ts in self.tokens.items():
            check(ts.model is None or ts.model in known, f"{where}.tokens[{tok!r}].source",
                  f"{ts.model!r} is not a model of this plan; models: {known}")


# ----------------------------------------------------------------------------- tokenizers
def tokenizer_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def has_tokenizer(path: Path) -> bool:
    return any((tokenizer_dir(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path, what: str):
    """The fast tokenizer saved with a model (``tokenizer.json`` or a sentencepiece
    ``tokenizer.model``), local files only, no remote code."""
    d = tokenizer_dir(path)
    check(has_tokenizer(path), what, f"{d} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    from lsm_dist.checkpoint import load_tokenizer as load

    try:
        return load(d)
    except Exception as e:  # transformers raises many kinds; the message names the file
        raise ConfigError(f"{what}: cannot load the tokenizer in {d}: {type(e).__name__}: {e}") from None


def config_vocab_size(config: dict | None) -> int | None:
    v = (config or {}).get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _union(base_tok, toks: dict[str, Any], sizes: dict[str, int]):
    """mergekit's build_union_tokenizer: the base's tokenizer (a copy) plus the other models' tokens
    (ordinary ones first, then added tokens with their settings), models in order, tokens by id."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for mid, tok in toks.items():
        size = sizes[mid]
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size:
                log.warning("tokenizer: token %r of %s has id %d >= its vocab_size %d: left out", t, mid, i, size)
            else:
                out_vocab.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items(), key=lambda kv: kv[0]):
            if i < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's tokenizer stays as it is
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False, local_files_only=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


# ----------------------------------------------------------------------------- the vocabulary
@dataclass
class Vocabulary:
    """The resolved output vocabulary and each model's permutation into it (enters the plan digest)."""

    source: str  # base | union | model:<id>
    tokens: list[str]  # output token of each id
    size: int  # output rows: len(tokens) rounded up to pad_to_multiple_of
    perms: dict[str, list[int]]  # model -> its row of each output token (ABSENT, BEYOND)
    sources: dict[str, TokenSource]  # the plan's `tokens:` entries
    model_token_rows: dict[str, int]  # `tokens:` entries of kind model_token -> the row they name
    rows: dict[str, int | None]  # model -> its config vocab_size (None: unknown)
    tokenizer: Any = field(default=None, repr=False, compare=False)  # written at assembly
    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # (models, base) -> defaults

    def digest(self) -> str:
        return sha256_json({"source": self.source, "tokens": self.tokens, "size": self.size, "perms": self.perms,
                            "sources": {t: [s.source, s.force] for t, s in self.sources.items()},
                            "model_token_rows": self.model_token_rows})[:16]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def _perm_tensors(self) -> dict[str, torch.Tensor]:
        return {m: torch.tensor(p, dtype=torch.long) for m, p in self.perms.items()}

    def defaults(self, models: list[str], base: str | None, what: str) -> dict[int, tuple]:
        """Output token id → its default row for a tensor whose inputs are ``models`` (mergekit's
        order) with base ``base``: ("row", model, row) | ("mean", [(model, row), ...]) | ("zero",).
        Only tokens some input lacks, and forced ones. Raises ConfigError where mergekit 0.1.5 fails."""
        key = (tuple(models), base)
        if key in self._memo:
            return self._memo[key]
        perms = torch.stack([self._perm_tensors[m] for m in models])  # (models, tokens)
        for k, m in enumerate(models):
            bad = (perms[k] == BEYOND).nonzero().flatten()
            if bad.numel():
                raise ConfigError(f"tokenizer: {what}: {m}'s tokenizer has token {self.tokens[int(bad[0])]!r} (and "
                                  f"{bad.numel() - 1} more) at an id >= its vocab_size {self.rows[m]}: it has no row "
                                  "for it (mergekit 0.1.5 fails on this with a KeyError)")
        present = perms >= 0
        need = set((~present.all(0)).nonzero().flatten().tolist())
        need |= {self._index[t] for t, s in self.sources.items() if s.force and t in self._index}
        out: dict[int, tuple] = {}
        for i in sorted(need):
            tok = self.tokens[i]
            has = [m for k, m in enumerate(models) if present[k, i]]
            user = self.sources.get(tok)
            if user is None:
                if len(has) == 1:
                    out[i] = ("row", has[0], self.perms[has[0]][i])
                elif not has:
                    log.warning("tokenizer: token %r is in no input of %s: its row is zeros", tok, what)
                    out[i] = ("zero",)
                elif base in models and base in has:
                    out[i] = ("row", base, self.perms[base][i])
                else:
                    out[i] = ("mean", [(m, self.perms[m][i]) for m in has])
                continue
            where = f"tokenizer.tokens[{tok!r}].source"
            s = user.source
            check(s is not None, where, f"{what}: the inputs {[m for m in models if m not in has]} lack the token "
                  f"(or it is forced) and no source is given (mergekit 0.1.5 fails on this: NotImplementedError)")
            if isinstance(s, dict) and s["kind"] == "zero":
                out[i] = ("zero",)
                continue
            m = user.model
            check(m in models, where, f"{what}: reads a row of {m!r}, which is not an input of this tensor "
                  f"({models}); mergekit 0.1.5 fails on this too")
            if isinstance(s, dict):
                out[i] = ("row", m, self.model_token_rows[tok])
            else:
                check(self.perms[m][i] >= 0, where, f"{m} has no token {tok!r} to take its row from "
                      "(name one of its tokens with {kind: model_token, model, token})")
                out[i] = ("row", m, self.perms[m][i])
        self._memo[key] = out
        return out

    def permute(self, tensors: dict[str, torch.Tensor], base: str | None, what: str) -> dict[str, torch.Tensor]:
        """mergekit's PermutedVocabulary (vocabulary axis 0): every input in the output
        vocabulary, in the inputs' promoted dtype; ``tensors`` in mergekit's model order."""
        models = list(tensors)
        shape = tuple(tensors[models[0]].shape[1:])
        for m, x in tensors.items():
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"{what}: non-vocabulary dimensions differ: {m} {tuple(x.shape)}, "
                                 f"{models[0]} {tuple(tensors[models[0]].shape)}")
        dtype = tensors[models[0]].dtype
        for x in tensors.values():
            dtype = torch.promote_types(dtype, x.dtype)
        defaults: dict[int, torch.Tensor] = {}
        for i, d in self.defaults(models, base, what).items():
            if d[0] == "mean":  # as mergekit: summed in model order in `dtype`, then divided
                e = torch.zeros(shape, dtype=dtype)
                for m, r in d[1]:
                    e = e + tensors[m][r]
                e /= len(d[1])
            elif d[0] == "row":
                e = tensors[d[1]][d[2]]
            else:
                e = torch.zeros(shape, dtype=dtype)
            defaults[i] = e.to(dtype)
        n = len(self.tokens)
        forced = torch.tensor([self._index[t] for t, s in self.sources.items() if s.force and t in self._index],
                              dtype=torch.long)
        out = {}
        for m in models:
            p = self._perm_tensors[m]
            own = p >= 0
            own[forced] = False
            new = torch.zeros((self.size, *shape), dtype=dtype)
            ids = own.nonzero().flatten()
            new[ids] = tensors[m][p[ids]].to(dtype)
            fill = [i for i in defaults if not own[i]]
            if fill:
                new[torch.tensor(fill, dtype=torch.long)] = torch.stack([defaults[i] for i in fill])
            if self.size > n:  # padding rows: the mean of the token rows (mergekit, after Hewitt)
                new[n:] = torch.mean(new[:n], dim=0)
            out[m] = new
        return out


def _model_config(plan, mid: str, checkpoints) -> dict:
    if mid in checkpoints:
        return checkpoints[mid].config or {}
    f = tokenizer_dir(plan.model_ref(mid)[0]) / "config.json"
    return read_json(f) if f.is_file() else {}


def build_vocabulary(plan, checkpoints) -> Vocabulary:
    """The output tokenizer of ``plan.tokenizer`` and every model's permutation into it
    (mergekit's build_tokenizer); reads only tokenizer files and the models' configs."""
    cfg = plan.tokenizer
    tbase = plan.base or plan.target
    models = list(plan.models)
    rows = {m: config_vocab_size(_model_config(plan, m, checkpoints)) for m in models}
    path = {m: plan.model_ref(m)[0] for m in models}
    base_tok = load_tokenizer(path[tbase], f"models.{tbase} (tokenizer base)")
    base_vocab = base_tok.get_vocab()
    size = rows[tbase] or len(base_vocab)
    beyond = sorted((i, t) for t, i in base_vocab.items() if i >= size)
    if beyond:
        raise ConfigError(f"models.{tbase}: its tokenizer holds {len(beyond)} token(s) at ids >= its vocab_size "
                          f"{size} (e.g. {beyond[0][1]!r} at {beyond[0][0]}): mergekit strips them from the base's "
                          "tokenizer (BPE only); not supported here")
    toks = {tbase: base_tok}
    for m in models:
        if m == tbase:
            continue
        if not has_tokenizer(path[m]):  # as mergekit: the base's vocabulary is assumed
            log.warning("tokenizer: models.%s (%s) has no tokenizer: its vocabulary is taken to be %s's",
                        m, tokenizer_dir(path[m]), tbase)
            continue
        toks[m] = load_tokenizer(path[m], f"models.{m}")
    if cfg.source == "base":
        out = base_tok  # the same object: the tokens added below are the base's too (as mergekit)
    elif cfg.source == "union":
        out = _union(base_tok, toks, {m: rows[m] or t.vocab_size for m, t in toks.items()})
    else:
        out = load_tokenizer(path[cfg.model], f"tokenizer.model ({cfg.model})")  # a fresh copy, as mergekit
    have = set(out.get_vocab())
    for t in cfg.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    ids = sorted(vocab.values())
    check(ids == list(range(len(ids))), "tokenizer", f"the output tokenizer's ids are not 0..{len(ids) - 1} "
          f"(a gap or a token named twice), so its rows cannot be laid out")
    tokens = [""] * len(ids)
    for t, i in vocab.items():
        tokens[i] = t
    vocabs = {m: t.get_vocab() for m, t in toks.items()}  # after the additions (the base's, with source base)
    perms = {}
    for m in models:
        mv = vocabs.get(m, vocabs[tbase])
        n = rows[m] or len(mv)
        perms[m] = [ABSENT if (j := mv.get(t)) is None else (j if j < n else BEYOND) for t in tokens]
    mt_rows = {}
    for t, s in cfg.tokens.items():
        if not (isinstance(s.source, dict) and s.source["kind"] == "model_token"):
            continue
        m, where = s.source["model"], f"tokenizer.tokens[{t!r}].source"
        mv = vocabs.get(m, vocabs[tbase])
        if "token" in s.source:
            check(s.source["token"] in mv, where, f"{m}'s tokenizer has no token {s.source['token']!r}")
            r = mv[s.source["token"]]
        else:
            r = s.source["token_id"]
        n = rows[m] or len(mv)
        check(r < n, where, f"token id {r} is outside the {n} rows of {m}")
        mt_rows[t] = r
    pad = cfg.pad_to_multiple_of
    n_out = len(tokens) + (-len(tokens) % pad if pad else 0)
    return Vocabulary(cfg.source if cfg.model is None else f"model:{cfg.model}", tokens, n_out, perms, dict(cfg.tokens), mt_rows, rows, out)


# ----------------------------------------------------------------------------- chat template
def builtin_templates() -> dict[str, Path]:
    """mergekit's built-in chat templates (name → file), read from an installed mergekit (data
    files only, its code is not imported); empty without one."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    d = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"
    return {p.stem: p for p in sorted(d.glob("*.jinja"))} if d.is_dir() else {}


def resolve_chat_template(plan) -> str | None:
    """The Jinja text ``plan.chat_template`` sets (mergekit's _set_chat_template): ``auto`` →
    the template most models carry (ties: the first in plan order; None when none has one), a
    built-in name → its file, else the text itself (which must hold ``{`` and be 20+ characters)."""
    t = plan.chat_template
    if not t:
        return None
    if t == "auto":
        found = []
        for m in plan.models:
            path = plan.model_ref(m)[0]
            if not has_tokenizer(path):
                continue
            tpl = load_tokenizer(path, f"models.{m}").chat_template
            if isinstance(tpl, dict):
                tpl = tpl.get("default")
            if tpl:
                found.append(tpl.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(t) < 256 and "\n" not in t and "{" not in t:
        builtins = builtin_templates()
        if t in builtins:
            return builtins[t].read_text()
    known = sorted(builtin_templates()) or "none: mergekit, which ships them, is not installed"
    check(len(t) >= 20 and "{" in t, "chat_template",
          f"{t!r} is neither auto, a built-in template ({known}) nor a Jinja template")
    return t


def write_tokenizer(rp, out_dir: Path) -> None:
    """The merged model's tokenizer files: the built vocabulary's tokenizer, else the target's
    re-saved (a chat template is set), with the chat template, as mergekit writes them."""
    if rp.vocab is not None:
        tok = rp.vocab.tokenizer
    else:
        t = rp.plan.target
        tok = load_tokenizer(rp.models[t].path, f"models.{t}")
    if rp.chat_template is not None:
        tok.chat_template = rp.chat_template
    tok.save_pretrained(str(out_dir))
