"""The epsilon lower bound of a privacy audit in one training run (Steinke, Nasr and Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023).

m canaries are each included in the training data independently with probability 1/2. After
training, the auditor scores every canary, guesses "included" for the highest scores and "left
out" for the lowest, and abstains on the rest: r guesses, v of them correct. If the training is
(epsilon, delta)-DP, the number of correct guesses is stochastically dominated by
Binomial(r, e^epsilon / (1 + e^epsilon)) up to a term in delta (their Theorem 3.3), which gives a
p-value for "the training is (epsilon, delta)-DP"; the lower bound is the largest epsilon that the
guesses reject at the stated confidence. Any epsilon the ledger claims must be at least that bound;
a claim below it is a privacy bug (with probability at most 1 - confidence, a false alarm).

The auditor may try several numbers of guesses; each try is tested at (1 - confidence) / tries
(Bonferroni), so the reported bound keeps its confidence however many were tried.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom

GUESS_COUNTS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)  # tried, plus every canary


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least ``correct`` of ``guesses`` right] under the hypothesis of (epsilon, delta)-DP."""
    if not 0 <= correct <= guesses <= canaries or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, epsilon >= 0, delta in [0, 1] "
                         f"(got {correct}, {guesses}, {canaries}, {epsilon}, {delta})")
    q = 1 / (1 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(binom.sf(correct - 1, guesses, q))
    if correct == 0 or delta == 0:
        return min(tail, 1.0)
    # delta's term: the largest average of P[correct - i <= Binomial(r, q) < correct] over i.
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    spread = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + spread * delta * 2 * canaries, 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest epsilon whose p-value stays below 1 - ``confidence`` (0 when none does)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    alpha = 1 - confidence

    def excess(epsilon: float) -> float:
        return p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta) - alpha

    if excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:  # the p-value rises with epsilon and reaches 1 (or 1 - its delta term)
        high *= 2
    return float(brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class AuditBound:
    canaries: int
    guesses: int  # in the best try
    correct: int
    epsilon: float  # the lower bound, at ``confidence`` over every try
    confidence: float
    tries: int


def bound_from_scores(
    scores: Sequence[float], included: Sequence[bool], *, threshold: float, delta: float, confidence: float
) -> AuditBound:
    """Guess "included" above ``threshold`` and "left out" below it, for the k canaries farthest from
    it (k from ``GUESS_COUNTS`` and every canary; ties broken at random, never by membership); the
    best try's bound. The threshold must not depend on which canaries were included: the midpoint
    between the score an included canary adds and none is public (the mechanism's own)."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ValueError("scores and included must be equal-length, non-empty 1-d sequences")
    if not np.all(np.isfinite(scores)) or not math.isfinite(threshold):
        raise ValueError("every canary score and the threshold must be finite")
    m = len(scores)
    tie_break = np.random.default_rng(0).permutation(m)
    order = np.lexsort((tie_break, -np.abs(scores - threshold)))  # most confident first
    guess_in = scores > threshold
    right = guess_in == included
    tries = sorted({k for k in GUESS_COUNTS if k < m} | {m})
    per_try = 1 - (1 - confidence) / len(tries)
    results = []
    for k in tries:
        correct = int(right[order[:k]].sum())
        epsilon = epsilon_lower_bound(canaries=m, guesses=k, correct=correct, delta=delta, confidence=per_try)
        results.append(AuditBound(m, k, correct, epsilon, confidence, len(tries)))
    return max(results, key=lambda r: (r.epsilon, r.guesses))  # no bound at all: the try with every canary
