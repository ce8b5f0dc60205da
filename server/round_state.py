"""One federated round as the server sees it, from sampling its departments to flushing its record.

Flower counts rounds from 1 in every run, including a resumed one; ``number`` is the run's own
count (a run resumed after round 4 starts at round 5), used for everything a person or a
department sees: checkpoints, the round feed, ledger lines, the request. ``aggregated`` tells a
round whose fit stage ended without results (SecAgg+ halted below its threshold, or every
department failed) from one that produced an outcome, good or rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy

from shared import protocol


@dataclass
class RoundState:
    flower_round: int
    number: int
    stage: str
    asked: list[ClientProxy] = field(default_factory=list)
    aggregated: bool = False


def department_replies(results: list[tuple[ClientProxy, FitRes]]) -> dict[str, dict[str, Any]]:
    """What each department reported this round, by name, as the run record keeps it."""
    departments: dict[str, dict[str, Any]] = {}
    for proxy, res in results:
        m = res.metrics
        departments[str(m.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))] = {
            "status": m.get(protocol.STATUS),
            "epsilon": m.get(protocol.EPSILON),
            "delta": m.get(protocol.DELTA),
            "budget": m.get(protocol.BUDGET),
            "noise_multiplier": m.get(protocol.NOISE_MULTIPLIER),
            "train_loss": m.get(protocol.TRAIN_LOSS),
            "num_examples": res.num_examples,
            "dp": bool(m.get(protocol.DP_ENABLED, True)),
            "reason": m.get(protocol.REASON),
            "secagg_out_of_range": m.get(protocol.OUT_OF_RANGE),
            "ledger_entry": m.get(protocol.LEDGER_ENTRY),
        }
    return departments


DECLINED = (protocol.STATUS_BUDGET_EXHAUSTED, protocol.STATUS_POLICY_REFUSED, protocol.STATUS_FAILED)


def decline_notes(departments: dict[str, dict[str, Any]]) -> list[str]:
    """A named failure for every department that answered without training, with its own reason."""
    notes = []
    for name, reply in departments.items():
        if reply["status"] in DECLINED:
            what = "failed" if reply["status"] == protocol.STATUS_FAILED else f"declined ({reply['status']})"
            notes.append(f"department {name} {what}: {reply['reason'] or 'no reason given'}")
    return notes
