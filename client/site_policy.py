"""A department's own limits, which no server request can override.

A department is the authority over its records. Its local configuration (the SuperNode's node
config in deployment, written from the kit's ``department.toml``; the simulation manifest in
simulation) may set:

    epsilon                 its privacy budget (the run's epsilon applies when it is lower)
    delta                   its delta; at most the run's
    max-epsilon-per-round   refuse a round whose DP-SGD step would cost more epsilon than this
    min-noise-multiplier    refuse a run whose noise multiplier is below this
    require-secagg          refuse to send an update that SecAgg+ does not mask
    min-departments         refuse a round whose aggregate holds fewer departments than this
    distributed-noise       consent to add only a 1/sqrt(min-departments) share of each release's noise,
                            trusting SecAgg+ and the other departments to add theirs (needs
                            min-departments >= 2 and SecAgg+)

A refused request is answered with status "policy-refused", weight 0 and a message naming the
limit; the department never trains for it. ``min-departments`` is checked against the number of
departments the server says it sampled: a server that lies about it is outside what a department
can verify (SecAgg+ itself refuses to unmask below its reconstruction threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from client.privacy import PrivacyPlan

if TYPE_CHECKING:
    from client.class_statistics import StatisticsPlan
    from client.feature_mean import FeatureMeanPlan
from shared.config import RunConfig
from shared.errors import ConfigError

POLICY_KEYS = ("epsilon", "delta", "max-epsilon-per-round", "min-noise-multiplier", "require-secagg", "min-departments",
               "distributed-noise")


@dataclass(frozen=True)
class SitePolicy:
    budget: float
    delta: float
    max_epsilon_per_round: float | None = None
    min_noise_multiplier: float | None = None
    require_secagg: bool = False
    min_departments: int | None = None
    distributed_noise: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, department: str, run: RunConfig) -> SitePolicy:
        """Read the policy keys of ``values`` (other keys are the node's business); collect every problem."""
        problems: list[str] = []

        def number(key: str, kind: type, default: Any) -> Any:
            raw = values.get(key, default)
            if raw is None:
                return None
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                problems.append(f"{key}: expected a number, got {raw!r}")
                return default
            try:
                value = kind(raw)
            except ValueError:
                problems.append(f"{key}: expected a number, got {raw!r}")
                return default
            if not math.isfinite(value):  # NaN would pass every limit below, and switch the checks off
                problems.append(f"{key}: expected a finite number, got {raw!r}")
                return default
            return value

        budget = number("epsilon", float, run.target_epsilon)
        delta = number("delta", float, run.target_delta)
        max_per_round = number("max-epsilon-per-round", float, None)
        min_sigma = number("min-noise-multiplier", float, None)
        min_departments = number("min-departments", int, None)
        def flag(key: str) -> bool:
            raw = values.get(key, False)
            if isinstance(raw, str) and raw.lower() in ("true", "false"):
                raw = raw.lower() == "true"
            if not isinstance(raw, bool):
                problems.append(f"{key}: expected true or false, got {raw!r}")
                return False
            return raw

        require_secagg, distributed_noise = flag("require-secagg"), flag("distributed-noise")
        if distributed_noise and (min_departments is None or min_departments < 2):
            problems.append("distributed-noise: needs min-departments >= 2 (the fewest departments whose noise "
                            "shares must add up in the aggregate)")
        if budget is not None and budget <= 0:
            problems.append(f"epsilon: the budget must be > 0 (got {budget})")
        if delta is not None and not 0 < delta <= run.target_delta:
            problems.append(f"delta: must be in (0, {run.target_delta}] (the run's delta) (got {delta})")
        if max_per_round is not None and max_per_round <= 0:
            problems.append(f"max-epsilon-per-round: must be > 0 (got {max_per_round})")
        if min_sigma is not None and min_sigma < 0:
            problems.append(f"min-noise-multiplier: must be >= 0 (got {min_sigma})")
        if min_departments is not None and min_departments < 1:
            problems.append(f"min-departments: must be >= 1 (got {min_departments})")
        if problems:
            raise ConfigError(problems, source=f"site policy of department {department}")
        return cls(budget, delta, max_per_round, min_sigma, require_secagg, min_departments, distributed_noise)

    def effective_budget(self, run: RunConfig) -> float:
        """The tighter of the department's budget and the run's promise."""
        return min(self.budget, run.target_epsilon)

    def noise_shares(self, *, requested: bool, secagg: bool) -> tuple[int, list[str]]:
        """How many departments' noise shares make up the aggregate's noise (1: local noise), and refusals."""
        if not requested:
            return 1, []
        if not self.distributed_noise:
            return 1, ["distributed-noise: this department has not consented to add only a share of the noise"]
        if not secagg:
            return 1, ["distributed-noise: a noise share protects only inside a SecAgg+ aggregate, and this run has it off"]
        return int(self.min_departments or 1), []

    def refusals_of_request(self, *, secagg: bool, aggregate_size: int) -> list[str]:
        refusals = []
        if self.require_secagg and not secagg:
            refusals.append("require-secagg: this department sends updates only under SecAgg+, and this run has it off")
        if self.min_departments is not None and aggregate_size < self.min_departments:
            refusals.append(
                f"min-departments={self.min_departments}: this round aggregates only {aggregate_size} departments"
            )
        return refusals

    def refusals_of_round(self, plan: PrivacyPlan | StatisticsPlan | FeatureMeanPlan, *, before: float, after: float) -> list[str]:
        refusals = []
        if self.min_noise_multiplier is not None and plan.noise_multiplier < self.min_noise_multiplier:
            refusals.append(
                f"min-noise-multiplier={self.min_noise_multiplier}: this run's plan uses noise multiplier "
                f"{plan.noise_multiplier:.4f}"
            )
        if self.max_epsilon_per_round is not None and after - before > self.max_epsilon_per_round + 1e-9:
            refusals.append(
                f"max-epsilon-per-round={self.max_epsilon_per_round}: this round would cost epsilon {after - before:.4f}"
            )
        return refusals
