"""The canary audit of the stage-1 release: it sees an exact release leak, it stays below the claim
of a correct release, and it catches a release that adds less noise than its ledger charges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import client.class_statistics as class_statistics
import simulation.canary_audit as canary_audit
from shared.config import RunConfig
from shared.one_run_audit import bound_from_scores

LABELS = tuple(f"label-{i}" for i in range(6))


def department_records(count: int = 300, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(count, dim, generator=generator)
    targets = torch.randint(0, len(LABELS), (count,), generator=generator)
    return features / features.norm(dim=1, keepdim=True), targets


def audited(config: RunConfig, *, canaries: int = 360, scope: list[int] | None = None, seed: int = 0):
    features, targets = department_records()
    scores, included, claimed = canary_audit.audit_department_release(
        features, targets, config=config, budget=config.target_epsilon, delta=config.target_delta,
        scope_rows=scope, canaries=canaries, rng=np.random.default_rng(seed))
    return bound_from_scores(scores, included, threshold=0.5, delta=config.target_delta, confidence=0.95), claimed


def test_an_exact_release_gives_away_every_canary():
    bound, claimed = audited(RunConfig(model="tiny", labels=LABELS, dp=False, num_server_rounds=1))
    assert claimed is None and bound.correct == bound.guesses == 360 and bound.epsilon > 3.5


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
@pytest.mark.parametrize("scope", [None, [0, 1, 2]])
def test_a_correct_release_stays_below_its_claim(epsilon, scope):
    config = RunConfig(model="tiny", labels=LABELS, target_epsilon=epsilon, num_server_rounds=1)
    for seed in range(3):
        bound, claimed = audited(config, scope=scope, seed=seed)
        assert claimed == pytest.approx(epsilon, rel=2e-3) and bound.epsilon <= claimed


def test_a_release_with_a_hundredth_of_its_noise_is_caught(monkeypatch):
    """The deliberately broken mechanism: the ledger charges for the plan's noise, the release adds 1%."""
    real = class_statistics.release_statistics

    def broken(*args, plan, **kwargs):
        weak = class_statistics.StatisticsPlan(plan.sums_sigma / 100, plan.counts_sigma / 100, plan.threshold)
        return real(*args, plan=weak, **kwargs)

    monkeypatch.setattr(canary_audit, "release_statistics", broken)
    bound, claimed = audited(RunConfig(model="tiny", labels=LABELS, target_epsilon=1.0, num_server_rounds=1))
    assert bound.epsilon > claimed, (bound, claimed)


def test_canaries_go_to_the_departments_largest_labels_and_never_past_their_directions():
    targets = torch.tensor([0] * 5 + [2] * 9 + [3] * 1)
    rows = canary_audit.canary_rows(targets, num_labels=4, canaries=6, width=8, rows=None)
    assert sorted(set(rows)) == [0, 2, 3] and rows.count(2) == 2
    assert set(canary_audit.canary_rows(targets, num_labels=4, canaries=4, width=8, rows=[0, 3])) == {0, 3}
    with pytest.raises(ValueError, match="do not fit"):
        canary_audit.canary_rows(targets, num_labels=4, canaries=30, width=8, rows=None)
