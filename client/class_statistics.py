"""Stage 1: a department's one differentially private release of class statistics.

Every record is embedded by the frozen public backbone into a unit vector x (norm 1), so adding or
removing one record changes the department's per-class feature sums by x in one row: L2
sensitivity 1. The department releases, with the Gaussian mechanism,

- noisy per-class record counts (sensitivity 1; noise ``counts_sigma``);
- noisy per-class feature sums (sensitivity 1; noise ``sums_sigma``), each row multiplied by a
  weight read off its noisy count: w = clip((noisy count - ``count_offset`` count-noise
  deviations) / ``full_weight_count``, 0, 1) (default offset 0, full weight at 100 records). A label
  the department does not hold gets weight 0 half the time (an exact zero row) and otherwise a
  weight of the order of the count noise over 100, a label it holds little of a small weight, one
  it holds ``full_weight_count`` records of or more weight 1. The weights are post-processing of
  the noisy counts and multiply the already noised sums, so they cost nothing beyond the two
  mechanisms.

Why weights rather than a yes/no threshold: the federation adds the departments' rows, and a row's
signal grows with its record count while every releasing department adds the same noise, so the
sum is clearest when each department weighs its row by its count (the matched filter). A
threshold of 3 count-noise deviations was right where each label lives in one department (by
domain) and lost whole labels where labels are spread thinly over many (Dirichlet splits at
epsilon 1: no department cleared it); releasing every row drowned the by-domain case in the noise
of nine departments without the label. The weights match the threshold by domain and beat both
under label skew (CLINC150 validation split: ``fedpriv bench --only stage-one-weights``).

The two are sequentially composed Gaussian mechanisms on the whole data set: two ledger lines
(sigma, sampling rate 1, 1 step) in the department's accountant. Their noise comes from one
calibrated sigma s split by precision: 1/s^2 = 1/counts_sigma^2 + 1/sums_sigma^2, ``count_share``
of it to the counts (for Gaussians this split is exact: together they cost what one release at s
costs). A department that declares a label scope releases its scope's sums, weight 1, and no counts.

The release is shaped like the classifier's head, (L, H) sums in the weight and (L,) counts in the
bias, and travels through SecAgg+ like any update (``server.class_statistics`` builds the head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.accounting import Mechanism, epsilon_of
from shared.config import RunConfig
from shared.errors import BudgetExhausted

MAX_SIGMA = 1e4
EPSILON_TOLERANCE = 1e-3


@dataclass(frozen=True)
class StatisticsPlan:
    """The noise of one department's class-statistics release; counts_sigma 0: no counts released."""

    sums_sigma: float
    counts_sigma: float
    count_offset: float  # in count-noise deviations, subtracted from a noisy count before weighing its row
    full_weight_count: float  # the (noisy, offset) record count from which a row has weight 1

    def row_weights(self, noisy_counts: torch.Tensor) -> torch.Tensor:
        """Each row's weight in the release, from its noisy count alone (post-processing)."""
        return ((noisy_counts - self.count_offset * self.counts_sigma) / self.full_weight_count).clamp(0.0, 1.0)

    @property
    def mechanisms(self) -> list[Mechanism]:
        counts = [(self.counts_sigma, 1.0, 1)] if self.counts_sigma else []
        return counts + [(self.sums_sigma, 1.0, 1)]

    def shared_by(self, departments: int) -> StatisticsPlan:
        """The share one of ``departments`` adds so that their sum carries this plan's noise."""
        root = math.sqrt(departments)
        return StatisticsPlan(self.sums_sigma / root, self.counts_sigma / root, self.count_offset, self.full_weight_count)

    @property
    def noise_multiplier(self) -> float:
        """The smallest noise multiplier in the release (what a site policy's minimum is checked against)."""
        return min(sigma for sigma, _, _ in self.mechanisms)


def plan_statistics(
    *, target_epsilon: float, delta: float, prior: list[Mechanism], accountant: str, count_share: float,
    count_offset: float, full_weight_count: float, release_counts: bool,
) -> StatisticsPlan:
    """The release whose composition with ``prior`` ends as close to ``target_epsilon`` as the tolerance allows."""

    def plan(sigma: float) -> StatisticsPlan:
        if not release_counts:
            return StatisticsPlan(sigma, 0.0, count_offset, full_weight_count)
        return StatisticsPlan(sigma / math.sqrt(1 - count_share), sigma / math.sqrt(count_share), count_offset,
                              full_weight_count)

    def cost(sigma: float) -> float:
        return epsilon_of(prior + plan(sigma).mechanisms, delta=delta, accountant=accountant)

    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon - EPSILON_TOLERANCE:
        raise BudgetExhausted(f"earlier releases already spent epsilon {spent:.3f} of {target_epsilon}")
    low, high = 0.0, 1.0
    while cost(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_SIGMA:
            raise BudgetExhausted(f"epsilon={target_epsilon} is too small for a class-statistics release")
    while high - low > EPSILON_TOLERANCE * high:
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) > target_epsilon else (low, mid)
    return plan(high)


def stage_one_target(config: RunConfig, *, budget: float, delta: float, before_stage: list[Mechanism]) -> float:
    """The epsilon a department's ledger may reach by the end of stage 1 (feature mean and class
    statistics together): what it may still spend (its own budget when that is below the run's
    epsilon), of which ``statistics-share`` when DP-SGD rounds follow. ``before_stage``: its ledger
    before this run's stage 1 began."""
    target = min(budget, config.target_epsilon)
    if config.dp_sgd_rounds:
        before = epsilon_of(before_stage, delta=delta, accountant=config.accountant)
        target = before + config.statistics_share * (target - before)
    return target


def plan_stage_one(
    config: RunConfig, *, budget: float, delta: float, prior: list[Mechanism], before_stage: list[Mechanism],
    release_counts: bool,
) -> StatisticsPlan:
    """A department's class-statistics release in ``config``'s run: the rest of stage 1's epsilon
    (``stage_one_target``) after ``prior``, which holds this run's feature-mean release if it had one."""
    return plan_statistics(
        target_epsilon=stage_one_target(config, budget=budget, delta=delta, before_stage=before_stage), delta=delta,
        prior=prior, accountant=config.accountant, count_share=config.statistics_count_share,
        count_offset=config.statistics_count_offset, full_weight_count=config.statistics_full_weight_count,
        release_counts=release_counts,
    )


@dataclass(frozen=True)
class Release:
    sums: torch.Tensor  # (L, H): weight x noisy sum on rows of positive weight, exact zeros elsewhere
    counts: torch.Tensor  # (L,): noisy counts (zeros when none are released)
    weights: torch.Tensor  # (L,): each row's weight in [0, 1]

    @property
    def released_labels(self) -> int:
        return int((self.weights > 0).sum())


def class_sums(features: torch.Tensor, targets: torch.Tensor, *, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-class sums (L, H) and counts (L,) of ``features`` (N, H) with labels ``targets`` (N,)."""
    sums = torch.zeros(num_labels, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, targets, features.to(torch.float64))
    counts = torch.bincount(targets, minlength=num_labels).to(torch.float64)
    return sums, counts


def release_statistics(
    features: torch.Tensor, targets: torch.Tensor, *, num_labels: int, plan: StatisticsPlan | None,
    scope_rows: list[int] | None, generator: torch.Generator | None,
) -> Release:
    """The department's release; ``plan`` None: exact statistics of every label (a --no-dp baseline)."""
    norms = features.norm(dim=1)
    if bool((norms > 1 + 1e-5).any()):  # the sensitivity bound rests on this
        raise ValueError(f"class statistics need features of norm <= 1 (largest {float(norms.max()):.4f})")
    sums, counts = class_sums(features, targets, num_labels=num_labels)
    if plan is None:
        return Release(sums, counts, torch.ones(num_labels, dtype=torch.float64))

    def noise(*shape: int, sigma: float) -> torch.Tensor:
        return torch.normal(0.0, sigma, size=shape, generator=generator, dtype=torch.float64)

    if scope_rows is not None:
        weights = torch.zeros(num_labels, dtype=torch.float64)
        weights[scope_rows] = 1.0
        noisy_counts = torch.zeros(num_labels, dtype=torch.float64)
    else:
        noisy_counts = counts + noise(num_labels, sigma=plan.counts_sigma)
        weights = plan.row_weights(noisy_counts)
    rows = weights > 0
    noisy_sums = torch.zeros_like(sums)
    noisy_sums[rows] = sums[rows] + noise(int(rows.sum()), sums.shape[1], sigma=plan.sums_sigma)
    return Release(weights[:, None] * noisy_sums, noisy_counts, weights)
