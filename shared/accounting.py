"""Epsilon of a sequence of DP-SGD mechanisms: the one computation server and departments share.

A department spends by it (``client.privacy``); the admin checks the server's copy of the
ledgers with it (``fedpriv ledger``), so both sides always agree on what a history costs.
"""

from __future__ import annotations

import functools
import math
import warnings

from opacus.accountants import RDPAccountant, create_accountant

# Opacus' default RDP orders stop at 63, which is loose for small sampling rates or budgets;
# higher orders only ever tighten the (still valid) RDP -> (epsilon, delta) conversion.
RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 256, 4)) + [256, 320, 384, 512, 768, 1024]

Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), Opacus' history format;
# a Gaussian mechanism on the whole data set (the class statistics) is (sigma, 1.0, 1)


def own_share(mechanism: Mechanism, *, noise_shares: int) -> Mechanism:
    """A mechanism as one department's own release under distributed noise: 1/sqrt(noise_shares) of its noise."""
    sigma, rate, steps = mechanism
    return (sigma / math.sqrt(noise_shares), rate, steps)


def epsilon_of(history: list[Mechanism], *, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:  # identical mechanisms compose by adding steps: exact, and far faster
        merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
    return _epsilon(tuple(sorted((sigma, rate, steps) for (sigma, rate), steps in merged.items())), delta, accountant)


def recomputed_epsilon(history: list[Mechanism], *, recorded: float, delta: float, accountant: str) -> float | None:
    """None when ``recorded`` is what ``history`` costs; otherwise the epsilon it does cost.

    The one check of a recorded epsilon: a department runs it on its own ledger before it spends,
    the admin on the server's copy (``fedpriv ledger``).
    """
    recomputed = epsilon_of(history, delta=delta, accountant=accountant)
    return None if math.isclose(recomputed, recorded, rel_tol=1e-6, abs_tol=1e-9) else recomputed


# A department asks for the same history several times a round (what it has spent, what the round
# would cost, what it just recorded) and a PRV evaluation takes ~0.2 s: remember the answers.
@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    with warnings.catch_warnings():
        # PRV sizes its discretisation domain with an internal RDP bound on Opacus' default orders,
        # which warns for large noise multipliers; a loose domain only widens the (still valid) grid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # A Gaussian release without subsampling (sampling rate 1: the class statistics) makes PRV's
        # subsampling formula take log(0) on a branch np.where then discards.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus.accountants.analysis.prv")
        return float(acc.get_epsilon(delta=delta))
