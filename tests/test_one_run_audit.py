"""The one-run audit's bound (Steinke, Nasr and Jagielski 2023), against the authors' reference code and
values worked out by hand from its definition, and its soundness: an exactly epsilon-DP mechanism is flagged above epsilon
no more often than the confidence allows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from simulation.audit.one_run import bound_from_scores, epsilon_lower_bound, p_value


def test_without_delta_the_bound_of_perfect_guesses_has_a_closed_form():
    # all r guesses right: p-value q^r, so the bound is the epsilon with q = (1 - confidence)^(1/r)
    for guesses in (10, 100, 1000):
        q = 0.05 ** (1 / guesses)
        expected = math.log(q / (1 - q))
        found = epsilon_lower_bound(canaries=guesses, guesses=guesses, correct=guesses, delta=0.0, confidence=0.95)
        assert found == pytest.approx(expected, abs=1e-6)
    assert epsilon_lower_bound(canaries=100, guesses=100, correct=100, delta=0, confidence=0.95) == pytest.approx(3.4930, abs=1e-4)


# (canaries m, guesses r, correct v, delta, 1 - confidence) -> the bound that the authors' reference code
# (`get_eps_audit` in privacytrustlab/ml_privacy_meter's audit.py, the paper's own snippet: bisection to
# 1e-5 from below) gives; computed once with that code, which is not part of fedpriv.
REFERENCE_BOUNDS = [
    ((1000, 100, 100, 0.0, 0.05), 3.4929580688476562),
    ((1000, 100, 100, 1e-5, 0.05), 3.4653701782226562),
    ((1000, 1000, 1000, 1e-5, 0.05), 5.782281875610352),
    ((10000, 1000, 900, 1e-5, 0.05), 2.0151901245117188),
    ((5000, 500, 492, 1e-5, 0.05 / 11), 3.02294921875),
    ((5000, 5000, 5000, 1e-5, 0.05 / 11), 5.792261123657227),
    ((1000, 200, 170, 1e-5, 0.05), 1.3974533081054688),
    ((1000, 200, 140, 1e-5, 0.01), 0.47957611083984375),
    ((100, 50, 40, 1e-3, 0.05), 0.7113800048828125),
]


@pytest.mark.parametrize(("case", "reference"), REFERENCE_BOUNDS, ids=[str(c) for c, _ in REFERENCE_BOUNDS])
def test_the_bound_matches_the_authors_reference_code(case, reference):
    canaries, guesses, correct, delta, alpha = case
    found = epsilon_lower_bound(canaries=canaries, guesses=guesses, correct=correct, delta=delta, confidence=1 - alpha)
    assert reference <= found <= reference + 2e-5  # the reference stops within 1e-5 below the root


def test_the_p_value_matches_the_authors_reference_code():
    assert p_value(canaries=1000, guesses=200, correct=170, epsilon=2.0, delta=1e-5) == pytest.approx(0.9237461408288423)
    assert p_value(canaries=100, guesses=50, correct=40, epsilon=1.0, delta=1e-3) == pytest.approx(0.1975553491474494)


def test_the_delta_term_by_hand_for_two_guesses():
    eps, delta, m = 1.0, 1e-3, 10
    q = 1 / (1 + math.exp(-eps))
    tail = q * q  # both right
    spread = max(2 * q * (1 - q), (2 * q * (1 - q) + (1 - q) ** 2) / 2)
    assert p_value(canaries=m, guesses=2, correct=2, epsilon=eps, delta=delta) == pytest.approx(tail + spread * delta * 2 * m)
    one_right = binom.sf(0, 2, q) + 2 * (1 - q) ** 2 / 2 * delta * 2 * m  # i=1: P[B=0]
    assert p_value(canaries=m, guesses=2, correct=1, epsilon=eps, delta=delta) == pytest.approx(one_right)


def test_the_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence():
    bound = lambda correct, delta=1e-5, confidence=0.95: epsilon_lower_bound(  # noqa: E731
        canaries=1000, guesses=200, correct=correct, delta=delta, confidence=confidence)
    assert bound(100) == 0.0  # chance level proves nothing
    assert 0 < bound(140) < bound(170) < bound(200)
    assert bound(170, delta=1e-3) < bound(170, delta=1e-5)
    assert bound(170, confidence=0.99) < bound(170, confidence=0.95)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        p_value(canaries=10, guesses=20, correct=5, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        bound_from_scores([0.0, float("nan")], [True, False], threshold=0.5, delta=1e-5, confidence=0.95)


def test_an_exactly_epsilon_dp_mechanism_is_rarely_flagged_above_its_epsilon():
    """Randomized response at epsilon 1 on 500 canaries, 200 audits: the 95% bound may exceed 1 in
    at most 5% of them (10 expected at most; 20 would be a broken bound)."""
    rng = np.random.default_rng(7)
    epsilon, flagged = 1.0, 0
    keep = 1 / (1 + math.exp(-epsilon))
    for _ in range(200):
        included = rng.random(500) < 0.5
        answer = np.where(rng.random(500) < keep, included, ~included)
        scores = answer + rng.random(500) * 0.1  # ties among equal answers broken at random
        flagged += bound_from_scores(scores, included, threshold=0.55, delta=0.0, confidence=0.95).epsilon > epsilon
    assert flagged <= 20


def test_a_mechanism_that_reveals_membership_gets_a_high_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    result = bound_from_scores(included.astype(float) + rng.normal(0, 0.01, 1000), included, threshold=0.5,
                               delta=1e-5, confidence=0.95)
    assert result.correct == result.guesses == 1000 and result.epsilon > 5.0
