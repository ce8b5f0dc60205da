"""A department's privacy accounting: noise calibration and the on-disk ledger that survives rounds.

Flower clients are stateless between rounds (flower issue 2216), so the accountant's state lives
in an append-only JSONL ledger in the department's state folder. Each line is one trained round:
the DP-SGD mechanism that ran (noise multiplier, sampling rate, steps) and the epsilon after it.
The accountant is rebuilt from those mechanisms on every round, so nothing is forgotten when the
ClientApp process, the Ray actor or the SuperNode restarts.

Noise is calibrated once per run, from the tighter of the run's epsilon (the server's request) and
the department's own budget, over the planned rounds, local epochs and sampling rate, composed
with whatever earlier runs already spent on the same records: a department whose budget is below
the run's epsilon takes part in every round, with more noise. The budget is also enforced
separately: before every round the department computes what the round would cost and refuses a
round that would cross the budget (a budget lowered mid-run stops it at the last round that fits). Every line
carries a running index and the epsilon after it, which is recomputed on start: a broken line,
a gap, a falling epsilon or a number that does not follow from the recorded rounds is refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.accounting import Mechanism, epsilon_of, own_share, recomputed_epsilon
from shared.errors import BudgetExhausted, ConfigError, LedgerError

LEDGER_FILE = "privacy-ledger.jsonl"
MAX_SIGMA = 1e4
EPSILON_TOLERANCE = 0.01


@dataclass(frozen=True)
class PrivacyPlan:
    """One run's DP-SGD mechanism at this department, and the budget it may not cross.

    The noise is calibrated so that the run's planned rounds end at the tighter of ``run_epsilon``
    (the server's request) and ``budget`` (the department's own limit), composed with the
    department's earlier spending; ``budget`` is checked again before every round.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    run_epsilon: float
    budget: float
    delta: float
    accountant: str

    @property
    def round_mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


# A department holding fewer than this many of the run's batches samples this share of its records
# instead: its sampling rate stays at most 1 / SAMPLING_BATCHES (Poisson amplification), while a larger
# department keeps the run's batch-size. The run-wide batch once had to fit the smallest department,
# which left every department sampling its tiny batches (BENCHMARKS.md section 19).
SAMPLING_BATCHES = 4
MIN_TRAIN_RECORDS = SAMPLING_BATCHES  # a batch of at least one record


@dataclass(frozen=True)
class DepartmentBatch:
    """What a department's DP-SGD samples (``expected``) and what it divides its noisy clipped sum by
    (``divisor``; None: Opacus' own expected batch, ``client.dp_training.train_private``)."""

    expected: int
    divisor: int | None


def department_batch(*, num_records: int, batch_size: int, distributed: bool = False) -> DepartmentBatch:
    """The run's ``batch_size``, or a quarter of the records (at least 1) below four batches.

    A department sampling less than the run's batch divides by the run's batch (public, the same
    for every department), so its update carries the same noise as the others' and moves the model
    by its share of the records; one sampling the run's batch divides by its own expected batch, as
    every department did before. Distributed noise always divides by the run's batch: the SecAgg+
    sum must be one step over a public divisor.
    """
    expected = max(1, min(batch_size, num_records // SAMPLING_BATCHES))
    return DepartmentBatch(expected, batch_size if distributed or expected < batch_size else None)


def poisson_schedule(*, num_records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sampling rate, steps per round) exactly as Opacus' DPDataLoader will run them."""
    batches_per_epoch = math.ceil(num_records / batch_size)
    return 1.0 / batches_per_epoch, batches_per_epoch * local_epochs


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
    index: int  # 1, 2, 3, ... over the whole file: a removed line shows as a gap
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon: float  # after this round, over every line up to and including it
    budget: float
    time: float
    mechanism: str = "dp-sgd"  # or "feature-mean" / "class-counts" / "class-sums": the Gaussian releases of stage 1
    # distributed noise: the department added noise_multiplier / sqrt(noise_shares), trusting SecAgg+
    # and noise_shares - 1 other departments for the rest. epsilon is against the aggregate;
    # own_epsilon is what its release alone would guarantee should it ever be unmasked.
    noise_shares: int = 1
    own_epsilon: float | None = None


MECHANISM_DP_SGD = "dp-sgd"
MECHANISM_CLASS_COUNTS = "class-counts"
MECHANISM_CLASS_SUMS = "class-sums"
MECHANISM_FEATURE_MEAN = "feature-mean"  # round 1 with centring: [feature sum, record count] (client.feature_mean)


class PrivacyLedger:
    """The department's append-only record of every DP mechanism that touched its records."""

    def __init__(self, state_dir: Path, *, department: str) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.department = department
        self.entries = self._read()

    def _refuse(self, number: int, why: str) -> LedgerError:
        return LedgerError(
            f"{self.path}:{number}: {why}; department {self.department} refuses to train on a privacy ledger "
            "it cannot trust (restore it from a backup, or compare with the server's copy in the run folder)"
        )

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
                raise self._refuse(number, f"corrupt ledger line ({exc})") from None
            if entry.index != len(entries) + 1:
                raise self._refuse(number, f"entry {len(entries) + 1} is missing (this line is entry {entry.index})")
            previous = entries[-1] if entries else None
            if (previous and (previous.accountant, previous.delta) == (entry.accountant, entry.delta)
                    and entry.epsilon < previous.epsilon - 1e-9):
                raise self._refuse(number, f"epsilon goes down ({previous.epsilon} -> {entry.epsilon})")
            entries.append(entry)
        if entries:
            last = entries[-1]
            recomputed = recomputed_epsilon(_mechanisms(entries), recorded=last.epsilon, delta=last.delta,
                                            accountant=last.accountant)
            if recomputed is not None:
                raise self._refuse(
                    len(entries),
                    f"the recorded epsilon {last.epsilon} does not follow from the recorded rounds ({recomputed:.6f})",
                )
        return entries

    def check_anchor(self, server_index: int) -> None:
        """Refuse a ledger shorter than the copy the server holds: its last lines were removed.

        The department's own file cannot tell a removed last line from one never written; the
        server's copy of the lines it was sent is the external anchor (``protocol.LEDGER_INDEXES``).
        """
        if server_index > len(self.entries):
            raise LedgerError(
                f"{self.path}: holds {len(self.entries)} ledger line(s) but the server holds line {server_index} of "
                f"department {self.department}'s ledger: lines were removed; department {self.department} refuses "
                "to spend on a ledger that forgets spending (restore it from a backup or the server's copy)"
            )

    @property
    def history(self) -> list[Mechanism]:
        return _mechanisms(self.entries)

    def history_without(self, *, run: str, mechanism: str) -> list[Mechanism]:
        """The history less ``run``'s lines of ``mechanism``: what the ledger held before that run began it."""
        return _mechanisms([e for e in self.entries if not (e.run == run and e.mechanism == mechanism)])

    def spent(self, *, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta=delta, accountant=accountant)

    def plan(
        self, *, run: str, num_records: int, batch_size: int, local_epochs: int, planned_rounds: int,
        run_epsilon: float, budget: float, delta: float, accountant: str, one_step_rounds: bool = False,
    ) -> PrivacyPlan:
        """The run's DP-SGD plan: fixed at the run's first round, read back from the ledger later.

        ``one_step_rounds``: each round is a single Poisson-sampled step (distributed noise:
        ``client.dp_training.train_private``'s noise shares), not ``local_epochs`` epochs of them.
        """
        problems = []
        for name, value in (("the run's epsilon", run_epsilon), ("budget epsilon", budget)):
            if value <= 0:
                problems.append(f"department {self.department}: {name} must be > 0 (got {value})")
        if not 0 < delta < 1 / max(num_records, 1):
            problems.append(
                f"department {self.department}: delta={delta} must be below 1/records = 1/{num_records}"
            )
        if problems:
            raise ConfigError(problems, source=f"privacy budget of department {self.department}")
        sample_rate, steps = poisson_schedule(num_records=num_records, batch_size=batch_size, local_epochs=local_epochs)
        steps = 1 if one_step_rounds else steps
        # Distributed noise: the SecAgg+ sum gives every department in it the same noise, which protects
        # each at its ledger's epsilon only if they all add shares of one multiplier. Calibrated at its own
        # sampling rate, a department with more records (a lower rate) would add less and leave a smaller
        # one short (8.92 where its ledger said 7.99: README, privacy section). So every department
        # calibrates at the largest rate any may sample, 1 / SAMPLING_BATCHES, and accounts its own:
        # departments of one budget and history add the same multiplier, and a larger one spends less.
        calibration_rate = 1.0 / SAMPLING_BATCHES if one_step_rounds else sample_rate
        this_run = [e for e in self.entries if e.run == run and e.mechanism == MECHANISM_DP_SGD]
        if this_run:
            sigma = this_run[0].noise_multiplier
        else:
            sigma = calibrate_noise(
                target_epsilon=min(run_epsilon, budget), delta=delta, sample_rate=calibration_rate,
                steps=steps * planned_rounds, prior=self.history, accountant=accountant,
            )
        return PrivacyPlan(sigma, sample_rate, steps, planned_rounds, run_epsilon, budget, delta, accountant)

    def cost_of_round(self, plan: PrivacyPlan) -> tuple[float, float]:
        """(epsilon now, epsilon after one more round under ``plan``)."""
        before = self.spent(delta=plan.delta, accountant=plan.accountant)
        after = epsilon_of(self.history + [plan.round_mechanism], delta=plan.delta, accountant=plan.accountant)
        return before, after

    def check_round(self, plan: PrivacyPlan) -> tuple[float, float]:
        """``cost_of_round``, or ``BudgetExhausted`` if the round would cross the department's budget."""
        before, after = self.cost_of_round(plan)
        if after > plan.budget + 1e-9:
            raise BudgetExhausted(
                f"department {self.department}: one more round would spend epsilon {after:.3f} > its budget "
                f"{plan.budget} (spent so far {before:.3f})"
            )
        return before, after

    def record_round(
        self, *, run: str, server_round: int, plan: PrivacyPlan, steps: int, noise_shares: int = 1,
    ) -> LedgerEntry:
        mechanism = (MECHANISM_DP_SGD, (plan.noise_multiplier, plan.sample_rate, steps))
        return self.record(run=run, server_round=server_round, mechanisms=[mechanism], accountant=plan.accountant,
                           delta=plan.delta, budget=plan.budget, noise_shares=noise_shares)[-1]

    def record(
        self, *, run: str, server_round: int, mechanisms: list[tuple[str, Mechanism]], accountant: str,
        delta: float, budget: float, noise_shares: int = 1,
    ) -> list[LedgerEntry]:
        """Append one line per mechanism that ran in this round, all in one write."""
        history, entries = list(self.history), list[LedgerEntry]()
        own = [own_share(m, noise_shares=e.noise_shares) for e, m in zip(self.entries, history, strict=True)]
        shared = noise_shares > 1 or any(e.noise_shares > 1 for e in self.entries)
        for name, (sigma, rate, steps) in mechanisms:
            history.append((sigma, rate, steps))
            own.append(own_share((sigma, rate, steps), noise_shares=noise_shares))
            entries.append(LedgerEntry(
                index=len(self.entries) + len(entries) + 1, run=run, round=server_round, noise_multiplier=sigma,
                sample_rate=rate, steps=steps, accountant=accountant, delta=delta,
                epsilon=epsilon_of(history, delta=delta, accountant=accountant),
                budget=budget, time=time.time(), mechanism=name, noise_shares=noise_shares,
                own_epsilon=epsilon_of(own, delta=delta, accountant=accountant) if shared else None,
            ))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write(2) with O_APPEND: a process killed mid-round leaves the round's lines whole or absent.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, "".join(json.dumps(asdict(e)) + "\n" for e in entries).encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self.entries.extend(entries)
        return entries


def _mechanisms(entries: list[LedgerEntry]) -> list[Mechanism]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
