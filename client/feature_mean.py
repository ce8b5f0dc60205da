"""Round 1 with centring: a department's DP release of its feature sum and record count.

The release is the (H + 1,) vector [sum of x, n] over the department's training records, x the
frozen backbone's unit features (``shared.centering`` says what the federation's sum is for).
Adding or removing one record changes it by [x, 1]: L2 sensitivity sqrt(2), so the Gaussian
mechanism adds noise of standard deviation sqrt(2) x sigma to every value, and the ledger records
(sigma, sampling rate 1, 1 step).

Its noise is ``centering-share`` of stage 1's: the whole of stage 1 (this release and the class
statistics after it) is calibrated as one Gaussian release of noise multiplier s, and this one
gets s / sqrt(centering-share); Gaussian precisions add, so the class statistics planned after it
(``plan_stage_one`` on the ledger that now holds it) get about s / sqrt(1 - centering-share), and
stage 1 as a whole ends where it would have without centring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from client.class_statistics import plan_statistics, stage_one_target
from shared.accounting import Mechanism
from shared.config import RunConfig

SENSITIVITY = math.sqrt(2.0)  # one record: [x, 1] with |x| <= 1


@dataclass(frozen=True)
class FeatureMeanPlan:
    noise_multiplier: float  # the noise's standard deviation over the release's L2 sensitivity

    @property
    def mechanisms(self) -> list[Mechanism]:
        return [(self.noise_multiplier, 1.0, 1)]

    def shared_by(self, departments: int) -> FeatureMeanPlan:
        """The share one of ``departments`` adds so that their sum carries this plan's noise."""
        return FeatureMeanPlan(self.noise_multiplier / math.sqrt(departments))


def plan_feature_mean(config: RunConfig, *, budget: float, delta: float, prior: list[Mechanism]) -> FeatureMeanPlan:
    """``centering-share`` of stage 1's noise precision, stage 1 being calibrated from ``prior``."""
    target = stage_one_target(config, budget=budget, delta=delta, before_stage=prior)
    whole = plan_statistics(
        target_epsilon=target, delta=delta, prior=prior, accountant=config.accountant,
        count_share=config.statistics_count_share, count_offset=config.statistics_count_offset,
        full_weight_count=config.statistics_full_weight_count, release_counts=False,
    ).sums_sigma
    return FeatureMeanPlan(whole / math.sqrt(config.centering_share))


def release_feature_mean(
    features: torch.Tensor, *, plan: FeatureMeanPlan | None, generator: torch.Generator | None
) -> torch.Tensor:
    """[sum of ``features`` (N, H), N] with the plan's Gaussian noise; ``plan`` None: exact (--no-dp)."""
    norms = features.norm(dim=1)
    if bool((norms > 1 + 1e-5).any()):  # the sensitivity bound rests on this
        raise ValueError(f"the feature mean needs features of norm <= 1 (largest {float(norms.max()):.4f})")
    exact = torch.cat([features.to(torch.float64).sum(dim=0), torch.tensor([float(len(features))], dtype=torch.float64)])
    if plan is None:
        return exact
    noise = torch.normal(0.0, plan.noise_multiplier * SENSITIVITY, size=exact.shape, generator=generator,
                         dtype=torch.float64)
    return exact + noise
