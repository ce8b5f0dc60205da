"""The admin's view of every department's privacy spending in a run folder (`fedpriv ledger`).

Read from the server's copy of the departments' ledger lines (``ledgers/``) and the run's
metrics. Where the copy holds a department's whole history (its first line has index 1), the
epsilon is recomputed from the recorded mechanisms with the same accountant the department used,
so the admin does not have to take the department's arithmetic on trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from server.run_folder import ledger_copy_path, read_ledger_copy, read_metrics
from shared import protocol
from shared.accounting import own_share, recomputed_epsilon

STATUS_WORDS = {protocol.STATUS_TRAINED: "active", protocol.STATUS_BUDGET_EXHAUSTED: "budget exhausted",
                protocol.STATUS_POLICY_REFUSED: "refused by policy", protocol.STATUS_FAILED: "failed (see the round's failures)"}
NEAR_SHARE = 0.9  # a budget spent to this share or more is "near"
SPENT_TOLERANCE = 0.01  # the calibration lands within this of the budget: that budget is spent


def budget_state(row: LedgerRow) -> str:
    """spent / refused / near / within / no DP: how a department's budget stands, for colour and verdicts."""
    if row.epsilon is None:
        return "no DP"
    if row.status.startswith(STATUS_WORDS[protocol.STATUS_POLICY_REFUSED]):
        return "refused"
    if row.status == STATUS_WORDS[protocol.STATUS_BUDGET_EXHAUSTED] or (row.budget is not None and row.epsilon >= row.budget - SPENT_TOLERANCE):
        return "spent"
    if row.budget is not None and row.epsilon >= NEAR_SHARE * row.budget:
        return "near"
    return "within"


@dataclass(frozen=True)
class LedgerRow:
    department: str
    epsilon: float | None  # None: no DP in this run
    budget: float | None
    delta: float | None
    rounds_trained: int
    status: str
    check: str  # what recomputing the copy's epsilon found
    # distributed noise: the guarantee of the department's own releases, should one be unmasked alone
    # (its recorded own_epsilon, recomputed like epsilon); None where every line added the whole noise
    own_epsilon: float | None = None


def ledger_rows(run_dir: Path) -> list[LedgerRow]:
    metrics = read_metrics(run_dir)
    rows = []
    for name, summary in sorted(metrics["privacy"].items()):
        copy = read_ledger_copy(ledger_copy_path(run_dir, name))
        status = STATUS_WORDS.get(summary.get("status"), str(summary.get("status")))
        if summary.get("dp") is False:
            rows.append(LedgerRow(name, None, None, None, summary["rounds_trained"], "no DP", "-"))
            continue
        epsilon = copy[-1]["epsilon"] if copy else summary.get("epsilon")
        check = _check(copy)
        reported = summary.get("epsilon")
        if check == "agrees" and reported is not None and not math.isclose(reported, epsilon, rel_tol=1e-6, abs_tol=1e-9):
            # the department reported spending the copy does not hold: its last lines are missing
            check = f"MISMATCH: the department last reported epsilon {reported:.4f}, the copy ends at {epsilon:.4f}"
        budget = summary.get("budget")
        if summary.get("status") == protocol.STATUS_TRAINED and budget is not None and epsilon >= budget - SPENT_TOLERANCE:
            status = "budget spent (as planned)"  # trained its last round: nothing is left for another run
        rows.append(LedgerRow(
            name, epsilon, budget, summary.get("delta"), summary["rounds_trained"],
            status if summary.get("status") != protocol.STATUS_POLICY_REFUSED else f"{status}: {summary.get('reason')}",
            check, copy[-1].get("own_epsilon") if copy else None,
        ))
    return rows


def _check(copy: list[dict]) -> str:
    if not copy:
        return "no ledger lines reported"
    if copy[0]["index"] != 1:
        return f"copy starts at ledger line {copy[0]['index']} (earlier spending not seen by this server)"
    repeated = [e["index"] for previous, e in zip(copy, copy[1:], strict=False) if e["index"] <= previous["index"]]
    if repeated:
        return f"MISMATCH: ledger lines {repeated} repeat or go backwards in the copy"
    gaps = [e["index"] for previous, e in zip(copy, copy[1:], strict=False) if e["index"] != previous["index"] + 1]
    if gaps:
        return f"MISMATCH: lines missing before ledger lines {gaps} (removed, or replies the server did not receive)"
    last = copy[-1]
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in copy]
    mismatch = recomputed_epsilon(history, recorded=last["epsilon"], delta=last["delta"], accountant=last["accountant"])
    if mismatch is not None:
        return f"MISMATCH: recomputed {mismatch:.4f}"
    if last.get("own_epsilon") is not None:  # each line's noise was a 1/sqrt(noise_shares) share
        own = [own_share(m, noise_shares=e.get("noise_shares", 1)) for e, m in zip(copy, history, strict=True)]
        mismatch = recomputed_epsilon(own, recorded=last["own_epsilon"], delta=last["delta"], accountant=last["accountant"])
        if mismatch is not None:
            return f"MISMATCH: own epsilon recomputed {mismatch:.4f}"
    return "agrees"
