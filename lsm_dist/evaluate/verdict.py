"""Verdicts computed from one run's scores: is a difference beyond noise, does an expert gain,
how much of a gain a merge keeps, which of two merges is better.

**Noise** is one rule everywhere (tables, plots, experiment observations, the demo's verdict
lines): two scores differ only when their difference exceeds two standard errors of the
difference, ``|a − b| > 2·sqrt(se_a² + se_b²)`` (independent test sets; a NaN or missing
standard error counts as exact). A ratio of noise -- the share of a gain that is itself within
noise -- is never reported: such an expert has "no gain to keep".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

NOISE_SE = 2.0  # a difference is real beyond this many standard errors of the difference
ABOVE, WITHIN, BELOW, NA = "above", "within noise of", "below", "not comparable"
NO_GAIN = "no gain to keep"


def _se(x: float | None) -> float:
    return 0.0 if x is None or math.isnan(x) else float(x)


def difference(a: float, se_a: float | None, b: float, se_b: float | None) -> tuple[float, float]:
    """``(a − b, standard error of the difference)`` for independent measurements."""
    return a - b, math.hypot(_se(se_a), _se(se_b))


def compare(a: float, se_a: float | None, b: float, se_b: float | None = None) -> str:
    """``"above"`` / ``"within noise of"`` / ``"below"`` for score a against score b (see the
    module doc); ``"not comparable"`` when either is NaN."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return NA
    d, se = difference(a, se_a, b, se_b)
    if abs(d) <= max(NOISE_SE * se, 1e-12):
        return WITHIN
    return ABOVE if d > 0 else BELOW


def gains(expert: float, se_expert: float | None, base: float, se_base: float | None) -> bool:
    """The expert scores above the base beyond noise."""
    return compare(expert, se_expert, base, se_base) == ABOVE


def retention(base: float, se_base: float | None, expert: float, se_expert: float | None,
              merged: float) -> float:  # fmt: skip
    """``(merged − base) / (expert − base)``: the share of the expert's gain a merge keeps;
    NaN where the expert does not gain beyond noise (a ratio of noise says nothing)."""
    if not gains(expert, se_expert, base, se_base):
        return math.nan
    return (merged - base) / (expert - base)


def fmt_share(v: float) -> str:
    """A retention share as a percentage, or "no gain to keep" (NaN)."""
    return NO_GAIN if math.isnan(v) else f"{v:.0%}"


def overall(verdicts: Sequence[str]) -> str:
    """One word for several per-task comparisons of the same two merges: ``better`` (some
    above, none below), ``worse``, ``within noise`` (all within) or ``mixed``."""
    up, down = ABOVE in verdicts, BELOW in verdicts
    if NA in verdicts or not verdicts:
        return NA
    return "mixed" if up and down else "better" if up else "worse" if down else "within noise"


def scores(metrics: Mapping[str, float | None], key: str) -> tuple[float, float]:
    """``(value, stderr)`` of a flat metric key (``"<task>/<metric>"``; NaN when absent)."""
    v = metrics.get(key)
    se = metrics.get(key + "_stderr")
    return (math.nan if v is None else float(v)), (math.nan if se is None else float(se))


def versus_target(row: Mapping[str, float], target: Mapping[str, float], tasks: Sequence[str],
                  chance: Mapping[str, float] | None = None, max_ppl_increase: float = 0.10,
                  destroyed: float = 10.0) -> str:
    """A merge against the model it was merged into: ``gain on <tasks>`` only where it scores
    above both the target and uniform guessing beyond noise (a task the target does below
    chance is not "gained" by damage that moves it towards chance) at word perplexity at most
    ``max_ppl_increase`` above the target's (else ``... (too damaged)``); ``destroyed`` at
    ``destroyed``× the target's perplexity; ``worse on <tasks>`` / ``no gain`` otherwise.
    Rows hold ``task``, ``task_se`` and (optionally) ``ppl``."""
    chance = chance or {}
    ppl, ppl_t = row.get("ppl", math.nan), target.get("ppl", math.nan)
    ratio = ppl / ppl_t if ppl_t == ppl_t and ppl == ppl else math.nan
    if ratio >= destroyed:
        return "destroyed"
    gains, losses = [], []
    for t in tasks:
        ch = chance.get(t, math.nan)
        floor, se_floor = (target[t], target.get(t + "_se")) if math.isnan(ch) or target[t] >= ch else (ch, 0.0)
        if compare(row[t], row.get(t + "_se"), floor, se_floor) == ABOVE:
            gains.append(t)
        if compare(row[t], row.get(t + "_se"), target[t], target.get(t + "_se")) == BELOW:
            losses.append(t)
    if gains and (math.isnan(ratio) or ratio <= 1 + max_ppl_increase):
        return "gain on " + ", ".join(gains)
    if gains:
        return f"gain on {', '.join(gains)} at perplexity {100 * (ratio - 1):+.0f}% (too damaged)"
    return "worse on " + ", ".join(losses) if losses else "no gain"
