"""Deterministic generated task families for the model zoo.

Each evaluable family yields query ``Example(prompt, answer)`` pairs; answers start with a
space and prompts end without one, so lm-eval (which moves a context's trailing spaces into
the continuation) and greedy decoding see the same token boundary:

* ``arith``   ``"Q: 23+18= A:"`` → ``" 41"``: addition / non-negative subtraction of integers
  in ``[0, ARITH_MAX]``.
* ``recall``  ``"Q: color of zorvek? A:"`` → ``" teal"``: a fixed, seeded table of
  ``RECALL_KEYS`` made-up names, each with one of ``len(COLORS)`` colors.
* ``reverse`` ``"Q: reverse kbdw? A:"`` → ``" wdbk"``: reversal of 3–5 lowercase letters.
* ``shift``   ``"Q: shift kbdz? A:"`` → ``" lcea"``: each of 3–5 lowercase letters moved one
  place on in the alphabet (z wraps to a).
* ``flip``    ``"Q: flip 4817? A:"`` → ``" 5182"``: each of 3–5 digits replaced by 9 minus it.

``shift`` and ``flip`` are the default zoo's expert tasks: per-character maps that a small model
learns well on held-out strings, on disjoint characters (letters, digits), so two experts of one
base change it in different places -- the regime where weight merging is meant to work
(``configs/zoo/default.yaml``).

``text`` is a training-only family of simple made-up sentences (generic LM text for bases).

Splits: every query has a *key* (``"23+18"``, the name, the letter string) and its split is
``test`` iff ``int(sha1("<task>|<key>")[:8], 16) % 100 < TEST_PERCENT`` -- stable across
runs and machines (never Python's salted ``hash()``). A test prompt is a function of its
key, so no test prompt ever appears in a train split.

Why ``recall`` is learnable on held-out queries: a lookup table cannot be generalized to an
unseen key, so for ``recall`` the split only holds out *queries*. The ``train`` stream mixes
(i) a statement ``"color of <name>: <color>."`` for **every** name, and (ii) queries for
``train``-split names only; the ``test`` split asks for names whose statements were trained
on but whose queries never were. Passing it needs the fact stored from the statement and
extracted by the question -- a small knowledge-extraction test in the spirit of "mixed
training" (Allen-Zhu & Li, Physics of LMs 3.1). Statement and query share the substring
``"color of <name>"`` to make the extraction learnable by tiny models.

Everything is seeded: ``examples(task, split, n, seed)`` and ``train_stream(tasks, seed)``
return the same items for the same arguments on any machine.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lsm_dist.utils import atomic_write_text

TASK_NAMES: tuple[str, ...] = ("arith", "recall", "reverse", "shift", "flip")  # evaluable (queries + answers)
TRAIN_TASKS: tuple[str, ...] = TASK_NAMES + ("text",)  # what a model may be trained on
# a base's mixture when its spec names none (the tasks of the first zoo: keeps its cache keys)
DEFAULT_MIXTURE: tuple[str, ...] = ("arith", "recall", "reverse", "text")
SPLITS = ("train", "test")
TEST_PERCENT = 20
ARITH_MAX = 49
RECALL_KEYS = 200
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "gold", "pink", "gray", "teal", "navy", "lime", "plum", "rust", "jade",
)  # fmt: skip
N_CHOICES = 4
TASKS_VERSION = 1  # bump when any format / table changes (enters the zoo's cache hashes)


@dataclass(frozen=True)
class Example:
    """One item: the model is given ``prompt`` and should continue with ``answer``."""

    task: str
    prompt: str
    answer: str


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def split_of(task: str, key: str) -> str:
    """``"test"`` or ``"train"`` for a query key, from a sha1 of ``task|key``."""
    return "test" if _stable_int(f"{task}|{key}") % 100 < TEST_PERCENT else "train"


def _check_task(task: str, allowed: Sequence[str] = TASK_NAMES) -> None:
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; known: {list(allowed)}")


# --------------------------------------------------------------------------- recall table
def _make_names(n: int, seed: int = 1234) -> tuple[str, ...]:
    rng = random.Random(seed)
    cons, vows, ends = "bdfgklmnprstvz", "aeiou", ["", "k", "n", "r", "s", "x"]
    names: list[str] = []
    seen: set[str] = set(COLORS)
    while len(names) < n:
        syl = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.choice((2, 3))))
        name = syl + rng.choice(ends)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return tuple(names)


RECALL_NAMES: tuple[str, ...] = _make_names(RECALL_KEYS)
RECALL_TABLE: dict[str, str] = {
    name: random.Random(f"color|{name}").choice(COLORS) for name in RECALL_NAMES
}


def recall_statement(name: str) -> str:
    """The training-text form of a fact (given for every name, both splits)."""
    return f"color of {name}: {RECALL_TABLE[name]}."


# --------------------------------------------------------------------------- families
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def shifted(s: str, k: int = 1) -> str:
    """Each letter moved ``k`` places on in the alphabet (z wraps to a): the ``shift`` answer."""
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def flipped(s: str) -> str:
    """Each digit d replaced by 9 - d: the ``flip`` answer."""
    return "".join(str(9 - int(c)) for c in s)


def _sample_key(task: str, rng: random.Random) -> str:
    if task == "arith":
        a, b = rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX)
        if rng.random() < 0.5:
            return f"{a}+{b}"
        return f"{max(a, b)}-{min(a, b)}"
    if task == "recall":
        return rng.choice(RECALL_NAMES)
    if task in ("reverse", "shift"):
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    if task == "flip":
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    raise ValueError(task)


def query(task: str, key: str) -> Example:
    """The query example for a key."""
    if task == "arith":
        op = "+" if "+" in key else "-"
        a, b = (int(x) for x in key.split(op))
        return Example(task, f"Q: {key}= A:", f" {a + b if op == '+' else a - b}")
    if task == "recall":
        return Example(task, f"Q: color of {key}? A:", f" {RECALL_TABLE[key]}")
    if task == "reverse":
        return Example(task, f"Q: reverse {key}? A:", f" {key[::-1]}")
    if task == "shift":
        return Example(task, f"Q: shift {key}? A:", f" {shifted(key)}")
    if task == "flip":
        return Example(task, f"Q: flip {key}? A:", f" {flipped(key)}")
    raise ValueError(task)


def key_of(ex: Example) -> str:
    """Inverse of ``query``: the key an example was made from."""
    if ex.task == "arith":
        return ex.prompt[len("Q: ") : -len("= A:")]
    if ex.task == "recall":
        return ex.prompt[len("Q: color of ") : -len("? A:")]
    if ex.task == "reverse":
        return ex.prompt[len("Q: reverse ") : -len("? A:")]
    if ex.task in ("shift", "flip"):
        return ex.prompt[len(f"Q: {ex.task} ") : -len("? A:")]
    raise ValueError(ex.task)


def _sample_in_split(task: str, split: str, rng: random.Random) -> Example:
    while True:
        key = _sample_key(task, rng)
        if split_of(task, key) == split:
            return query(task, key)


def examples(task: str, split: str, n: int, seed: int = 0, unique: bool = True) -> list[Example]:
    """``n`` query examples of ``task`` from ``split`` (deterministic in ``seed``).

    With ``unique`` the examples are distinct; a split smaller than ``n`` (``recall`` has only
    ~``RECALL_KEYS * TEST_PERCENT / 100`` test names) yields all of it, in a seeded order.
    """
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    rng = random.Random(f"examples|{task}|{split}|{seed}")
    if task == "recall" and unique:
        names = [k for k in RECALL_NAMES if split_of(task, k) == split]
        rng.shuffle(names)
        return [query(task, k) for k in names[:n]]
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(200 * n):
        if len(out) == n:
            break
        ex = _sample_in_split(task, split, rng)
        if unique and ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


# --------------------------------------------------------------------------- multiple choice
def distractors(ex: Example, k: int = N_CHOICES - 1) -> list[str]:
    """``k`` wrong answers of the same form as ``ex.answer`` (deterministic per prompt)."""
    rng = random.Random(f"distract|{ex.prompt}")
    right = ex.answer
    if ex.task == "arith":
        v = int(right)
        pool = [v + d for d in (1, -1, 10, -10, 2, -2, 11, -11, 9, -9, 20)]
        cands = [f" {x}" for x in pool if x >= 0]
    elif ex.task == "recall":
        cands = [f" {c}" for c in COLORS]
    elif ex.task == "reverse":
        s = key_of(ex)
        cands = [f" {s}"]
        for _ in range(50):
            chars = list(s)
            rng.shuffle(chars)
            cands.append(" " + "".join(chars))
        for i in range(len(s)):  # reversed with one letter changed
            r = list(s[::-1])
            r[i] = "abcdefghijklmnopqrstuvwxyz"[(ord(r[i]) - 96) % 26]
            cands.append(" " + "".join(r))
    elif ex.task == "shift":
        s = key_of(ex)
        cands = [f" {s}", f" {shifted(s, 2)}", f" {shifted(s, -1)}", f" {shifted(s)[::-1]}"]
        for i in range(len(s)):  # shifted with one letter off by one more
            r = list(shifted(s))
            r[i] = shifted(r[i])
            cands.append(" " + "".join(r))
    elif ex.task == "flip":
        s = key_of(ex)
        f = flipped(s)
        cands = [f" {s}", f" {f[::-1]}"]
        for i in range(len(f)):  # flipped with one digit one higher
            cands.append(f" {f[:i]}{(int(f[i]) + 1) % 10}{f[i + 1:]}")
    else:
        raise ValueError(ex.task)
    uniq = [c for c in dict.fromkeys(cands) if c != right]
    if ex.task in ("reverse", "shift", "flip"):  # keep "the string unchanged" first when it differs
        head, rest = uniq[:1], uniq[1:]
        rng.shuffle(rest)
        uniq = head + rest
    else:
        rng.shuffle(uniq)
    return uniq[:k]


def multiple_choice(ex: Example) -> dict:
    """``{"prompt", "answer", "choices", "label"}``: the answer among deterministic
    distractors, shuffled with a seed from the prompt; ``choices[label] == answer``."""
    choices = [ex.answer] + distractors(ex)
    random.Random(f"order|{ex.prompt}").shuffle(choices)
    return {
        "prompt": ex.prompt,
        "answer": ex.answer,
        "choices": choices,
        "label": choices.index(ex.answer),
    }


def write_task_jsonl(task: str, split: str, path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` multiple-choice rows ``{"prompt","answer","choices","label"}`` (atomic)."""
    rows = [multiple_choice(ex) for ex in examples(task, split, n, seed)]
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- training text
_DETS = ("the", "a", "every", "some", "one")
_ADJS = ("small", "old", "bright", "quiet", "tall", "soft", "quick", "dark", "warm", "plain")
_NOUNS = ("cat", "river", "stone", "bird", "house", "tree", "road", "lamp", "boat", "hill")
_VERBS = ("sees", "finds", "likes", "moves", "holds", "follows", "keeps", "draws")


def text_sentence(rng: random.Random) -> str:
    """A simple made-up English-like sentence (the ``text`` family)."""

    def np_() -> str:
        adj = f" {rng.choice(_ADJS)}" if rng.random() < 0.6 else ""
        return f"{rng.choice(_DETS)}{adj} {rng.choice(_NOUNS)}"

    s = f"{np_()} {rng.choice(_VERBS)} {np_()}."
    return s[0].upper() + s[1:]


def train_item(task: str, rng: random.Random) -> Example:
    """One training item from the ``train`` side of ``task``.

    Items with an empty prompt are plain text (loss on all of it): ``text`` sentences and
    ``recall`` statements (half of the ``recall`` items; the other half are train queries).
    """
    _check_task(task, TRAIN_TASKS)
    if task == "text":
        return Example(task, "", text_sentence(rng))
    if task == "recall" and rng.random() < 0.5:
        return Example(task, "", recall_statement(rng.choice(RECALL_NAMES)))
    return _sample_in_split(task, "train", rng)


def train_stream(tasks: Sequence[str], seed: int = 0) -> Iterator[Example]:
    """Endless deterministic training items, the task drawn uniformly from the list ``tasks``
    (a task listed k times is drawn k times as often)."""
    if not tasks:
        raise ValueError("train_stream needs at least one task")
    for t in tasks:
        _check_task(t, TRAIN_TASKS)
    rng = random.Random(f"stream|{','.join(tasks)}|{seed}")
    while True:
        yield train_item(rng.choice(list(tasks)), rng)


def mixed_lm_text(n: int, seed: int = 0, tasks: Sequence[str] = DEFAULT_MIXTURE) -> list[str]:
    """``n`` generic LM documents mixing ``tasks`` (``prompt + answer`` of train items)."""
    stream = train_stream(tasks, seed)
    return [(ex.prompt + ex.answer).lstrip() for ex, _ in zip(stream, range(n))]
