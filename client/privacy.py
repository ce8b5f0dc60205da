"""A department's privacy accounting: noise calibration and the on-disk ledger that survives rounds.

Flower clients are stateless between rounds (flower issue 2216), so the accountant's state lives
in an append-only JSONL ledger in the department's state folder. Each line is one trained round:
the DP-SGD mechanism that ran (noise multiplier, sampling rate, steps) and the epsilon after it.
The accountant is rebuilt from those mechanisms on every round, so nothing is forgotten when the
ClientApp process, the Ray actor or the SuperNode restarts.

Noise is calibrated once per run, from the department's budget and the planned rounds, local
epochs and sampling rate, composed with whatever earlier runs already spent on the same records:
the budget is met at the end of the run, and a round that would exceed it is refused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opacus.accountants import RDPAccountant, create_accountant

from shared.errors import BudgetExhausted, ConfigError, DataError

LEDGER_FILE = "privacy-ledger.jsonl"
MAX_SIGMA = 1e4
EPSILON_TOLERANCE = 0.01
# Opacus' default RDP orders stop at 63, which is loose for small sampling rates or budgets;
# higher orders only ever tighten the (still valid) RDP -> (epsilon, delta) conversion.
RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 256, 4)) + [256, 320, 384, 512, 768, 1024]

Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), Opacus' history format


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    accountant: str

    @property
    def round_mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def poisson_schedule(*, num_records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sampling rate, steps per round) exactly as Opacus' DPDataLoader will run them."""
    batches_per_epoch = math.ceil(num_records / batch_size)
    return 1.0 / batches_per_epoch, batches_per_epoch * local_epochs


def epsilon_of(history: list[Mechanism], *, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:  # identical mechanisms compose by adding steps: exact, and far faster
        merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    prior: list[Mechanism], accountant: str,
) -> float:
    """Smallest noise multiplier (within tolerance) whose composition with ``prior`` stays <= target.

    The same bisection as ``opacus.accountants.utils.get_noise_multiplier``, extended to start from
    an earlier history (Opacus' version assumes a fresh accountant).
    """
    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon - EPSILON_TOLERANCE:
        raise BudgetExhausted(f"earlier runs already spent epsilon {spent:.3f} of this department's {target_epsilon}")
    low, high = 0.0, 10.0
    eps_high = math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > MAX_SIGMA:
            raise BudgetExhausted(f"epsilon={target_epsilon} is too small for {steps} steps at q={sample_rate:.4f}")
        eps_high = epsilon_of(prior + [(high, sample_rate, steps)], delta=delta, accountant=accountant)
    while target_epsilon - eps_high > EPSILON_TOLERANCE:
        mid = (low + high) / 2
        eps = epsilon_of(prior + [(mid, sample_rate, steps)], delta=delta, accountant=accountant)
        if eps < target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


@dataclass(frozen=True)
class LedgerEntry:
    run_id: int
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon: float
    target_epsilon: float
    time: float


class PrivacyLedger:
    """The department's append-only record of every DP mechanism that touched its records."""

    def __init__(self, state_dir: Path, *, department: str) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.department = department
        self.entries = self._read()

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        entries: list[LedgerEntry] = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = LedgerEntry(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(
                    f"{self.path}:{number}: corrupt privacy ledger line ({exc}); refusing to train on a ledger "
                    "that cannot be trusted"
                ) from None
            if entries and entry.epsilon < entries[-1].epsilon - 1e-9 and entry.run_id == entries[-1].run_id:
                raise DataError(f"{self.path}:{number}: epsilon goes down ({entries[-1].epsilon} -> {entry.epsilon})")
            entries.append(entry)
        return entries

    @property
    def history(self) -> list[Mechanism]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def spent(self, *, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta=delta, accountant=accountant)

    def plan(
        self, *, run_id: int, num_records: int, batch_size: int, local_epochs: int, planned_rounds: int,
        target_epsilon: float, delta: float, accountant: str,
    ) -> PrivacyPlan:
        """The run's DP-SGD plan: fixed at the run's first round, read back from the ledger later."""
        problems = []
        if target_epsilon <= 0:
            problems.append(f"department {self.department}: epsilon must be > 0 (got {target_epsilon})")
        if not 0 < delta < 1 / max(num_records, 1):
            problems.append(
                f"department {self.department}: delta={delta} must be below 1/records = 1/{num_records}"
            )
        if problems:
            raise ConfigError(problems, source=f"privacy budget of department {self.department}")
        sample_rate, steps = poisson_schedule(num_records=num_records, batch_size=batch_size, local_epochs=local_epochs)
        this_run = [e for e in self.entries if e.run_id == run_id]
        if this_run:
            sigma = this_run[0].noise_multiplier
        else:
            prior = self.history
            sigma = calibrate_noise(
                target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                steps=steps * planned_rounds, prior=prior, accountant=accountant,
            )
        return PrivacyPlan(sigma, sample_rate, steps, planned_rounds, target_epsilon, delta, accountant)

    def check_round(self, plan: PrivacyPlan) -> float:
        """Epsilon after one more round under ``plan``; raises ``BudgetExhausted`` if over budget."""
        after = epsilon_of(self.history + [plan.round_mechanism], delta=plan.delta, accountant=plan.accountant)
        if after > plan.target_epsilon + 1e-9:
            spent = self.spent(delta=plan.delta, accountant=plan.accountant)
            raise BudgetExhausted(
                f"department {self.department}: one more round would spend epsilon {after:.3f} > budget "
                f"{plan.target_epsilon} (spent so far {spent:.3f})"
            )
        return after

    def record_round(self, *, run_id: int, server_round: int, plan: PrivacyPlan, steps: int) -> LedgerEntry:
        history = self.history + [(plan.noise_multiplier, plan.sample_rate, steps)]
        entry = LedgerEntry(
            run_id=run_id, round=server_round, noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate, steps=steps, accountant=plan.accountant, delta=plan.delta,
            epsilon=epsilon_of(history, delta=plan.delta, accountant=plan.accountant),
            target_epsilon=plan.target_epsilon, time=time.time(),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as ledger:
            ledger.write(json.dumps(asdict(entry)) + "\n")
            ledger.flush()
        self.entries.append(entry)
        return entry
