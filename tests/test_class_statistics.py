"""Stage 1: the DP class-statistics release, its accounting, and the nearest-class-mean head built from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.class_statistics import StatisticsPlan, class_sums, plan_statistics, release_statistics
from client.department import DepartmentClient
from client.department_data import resolve_department
from client.prepared_data import prepare, shared_classifier
from client.privacy import MECHANISM_CLASS_COUNTS, MECHANISM_CLASS_SUMS, MECHANISM_DP_SGD, PrivacyLedger
from server.class_statistics import federation_sums, nearest_class_mean_head
from shared import protocol
from shared.accounting import epsilon_of
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.params import get_trainable
from tests.requests import failure, fit, fit_request
from tests.test_department_client import LABELS, department_file


def unit_features(count: int, dim: int = 8, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


@pytest.mark.parametrize(("epsilon", "sigma"), [(1.0, 3.765), (3.0, 1.395), (8.0, 0.601)])
def test_sums_only_release_is_calibrated_to_pinned_prv_values(epsilon, sigma):
    plan = plan_statistics(target_epsilon=epsilon, delta=1e-5, prior=[], accountant="prv", count_share=0.1,
                           count_offset=0.5, full_weight_count=100.0, release_counts=False)
    assert plan.counts_sigma == 0 and plan.mechanisms == [(plan.sums_sigma, 1.0, 1)]
    assert plan.sums_sigma == pytest.approx(sigma, abs=0.005)
    assert epsilon_of(plan.mechanisms, delta=1e-5, accountant="prv") <= epsilon + 1e-9


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_counts_and_sums_split_one_gaussian_budget_and_compose_with_earlier_spending(accountant):
    prior = [(1.2, 0.05, 40)]  # an earlier DP-SGD run on the same records
    plan = plan_statistics(target_epsilon=6.0, delta=1e-5, prior=prior, accountant=accountant, count_share=0.1,
                           count_offset=0.5, full_weight_count=100.0, release_counts=True)
    combined = 1 / math.sqrt(1 / plan.counts_sigma**2 + 1 / plan.sums_sigma**2)
    assert plan.counts_sigma == pytest.approx(combined / math.sqrt(0.1))
    assert plan.sums_sigma == pytest.approx(combined / math.sqrt(0.9))
    total = epsilon_of(prior + plan.mechanisms, delta=1e-5, accountant=accountant)
    assert 5.98 <= total <= 6.0


def test_one_record_moves_the_exact_statistics_by_at_most_the_sensitivity():
    features, targets = unit_features(40), torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(1))
    full = release_statistics(features, targets, num_labels=5, plan=None, scope_rows=None, generator=None)
    for removed in range(40):
        keep = torch.arange(40) != removed
        smaller = release_statistics(features[keep], targets[keep], num_labels=5, plan=None, scope_rows=None,
                                     generator=None)
        assert float((full.sums - smaller.sums).norm()) <= 1 + 1e-6  # float32 unit vectors
        assert float((full.counts - smaller.counts).abs().sum()) == 1


def test_features_beyond_unit_norm_are_refused():
    with pytest.raises(ValueError, match="norm <= 1"):
        release_statistics(2 * unit_features(4), torch.zeros(4, dtype=torch.long), num_labels=2, plan=None,
                           scope_rows=None, generator=None)


def test_row_weights_grow_with_the_noisy_count_from_zero_to_one():
    plan = StatisticsPlan(sums_sigma=0.7, counts_sigma=2.0, count_offset=0.5, full_weight_count=100.0)
    weights = plan.row_weights(torch.tensor([-5.0, 1.0, 1.5, 51.0, 101.0, 500.0], dtype=torch.float64))
    assert weights.tolist() == pytest.approx([0.0, 0.0, 0.005, 0.5, 1.0, 1.0])


def test_noise_on_released_rows_has_the_ledger_sigma_and_rows_of_weight_zero_stay_exactly_zero():
    features = unit_features(60)
    targets = torch.tensor([0] * 30 + [1] * 30)  # labels 2 and 3: no records
    plan = StatisticsPlan(sums_sigma=0.7, counts_sigma=2.0, count_offset=0.5, full_weight_count=100.0)
    exact, _ = class_sums(features, targets, num_labels=4)
    noise, empty_rows_released = [], 0
    for seed in range(200):
        release = release_statistics(features, targets, num_labels=4, plan=plan, scope_rows=None,
                                     generator=torch.Generator().manual_seed(seed))
        assert torch.equal(release.weights, plan.row_weights(release.counts))  # read off the released counts only
        assert bool((release.weights[:2] > 0.2).all())  # 30 records: weight about (30 - 1) / 100
        for row in range(4):
            if release.weights[row] == 0:
                assert torch.equal(release.sums[row], torch.zeros(8, dtype=torch.float64))
            else:  # the weight multiplies the already noised sum: the Gaussian mechanism, then post-processing
                noise.append(release.sums[row] / release.weights[row] - exact[row])
                empty_rows_released += row >= 2
        assert release.released_labels == int((release.weights > 0).sum())
    assert float(torch.cat(noise).std()) == pytest.approx(0.7, rel=0.05)
    assert 0.2 * 400 < empty_rows_released < 0.42 * 400  # P(noise > 0.5 deviations) = 0.31, each with a tiny weight


def test_a_declared_scope_releases_its_rows_only_and_no_counts():
    plan = StatisticsPlan(sums_sigma=0.5, counts_sigma=0.0, count_offset=0.5, full_weight_count=100.0)
    release = release_statistics(unit_features(10), torch.zeros(10, dtype=torch.long), num_labels=3, plan=plan,
                                 scope_rows=[0, 2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(release.counts, torch.zeros(3, dtype=torch.float64))
    assert release.weights.tolist() == [1.0, 0.0, 1.0]  # the declared rows, whole
    assert torch.equal(release.sums[1], torch.zeros(8, dtype=torch.float64)) and release.released_labels == 2
    assert bool((release.sums[2] != 0).all())  # noise only: the scope's empty label


def test_without_noise_the_federated_head_equals_the_centralized_one():
    features = unit_features(90)
    targets = torch.randint(0, 6, (90,), generator=torch.Generator().manual_seed(3))
    parts = [slice(0, 20), slice(20, 55), slice(55, 90)]
    scale = 40 / 8.0  # secagg-max-weight / clipping range, as RunConfig.statistics_scale
    scaled = [release_statistics(features[p], targets[p], num_labels=6, plan=None, scope_rows=None,
                                 generator=None).sums.numpy() / scale for p in parts]
    average = [np.mean(scaled, axis=0)]  # what SecAgg+ (equal weights) or FedAvg hands the server
    federated = nearest_class_mean_head(federation_sums(average, departments=3, scale=scale)[0], logit_scale=30)
    pooled, _ = class_sums(features, targets, num_labels=6)
    central = nearest_class_mean_head(pooled.numpy(), logit_scale=30)
    np.testing.assert_allclose(federated[0], central[0], atol=1e-6)
    assert np.all(federated[1] == 0)
    rows = np.linalg.norm(federated[0], axis=1)
    np.testing.assert_allclose(rows[np.bincount(targets.numpy(), minlength=6) > 0], 30, rtol=1e-5)


def test_stage_one_composes_with_dp_sgd_in_the_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="hr")
    plan = StatisticsPlan(sums_sigma=1.5, counts_sigma=4.5, count_offset=0.5, full_weight_count=100.0)
    names = [MECHANISM_CLASS_COUNTS, MECHANISM_CLASS_SUMS]
    ledger.record(run="r", server_round=1, mechanisms=list(zip(names, plan.mechanisms, strict=True)),
                  accountant="prv", delta=1e-5, budget=8.0)
    ledger.record(run="r", server_round=2, mechanisms=[(MECHANISM_DP_SGD, (2.0, 0.1, 10))], accountant="prv",
                  delta=1e-5, budget=8.0)
    reread = PrivacyLedger(tmp_path, department="hr")  # recomputed and checked on read
    assert [e.mechanism for e in reread.entries] == names + [MECHANISM_DP_SGD]
    expected = epsilon_of([(4.5, 1.0, 1), (1.5, 1.0, 1), (2.0, 0.1, 10)], delta=1e-5, accountant="prv")
    assert reread.entries[-1].epsilon == pytest.approx(expected)
    assert reread.entries[1].epsilon < reread.entries[-1].epsilon


def statistics_request(config: RunConfig) -> dict:
    return fit_request(config, 1, stage=protocol.STAGE_STATISTICS)


def make_department(tmp_path, **settings) -> tuple[DepartmentClient, RunConfig]:
    shared_classifier.cache_clear()
    prepare.cache_clear()
    config = RunConfig(**{"model": "tiny", "labels": LABELS, "batch_size": 16, "target_delta": 1e-4,
                          "secagg_max_weight": 200, "out_dir": str(tmp_path / "out")} | settings)
    node = {"department": "finance", "data-path": str(department_file(tmp_path)), "state-dir": str(tmp_path / "state")}
    return DepartmentClient(config=config, settings=resolve_department(config, node), run_id=7), config


def test_a_department_releases_once_and_a_repeated_request_does_not_pay_twice(tmp_path):
    client, config = make_department(tmp_path, target_epsilon=3.0)
    start = get_trainable(client.classifier)
    arrays, weight, metrics = fit(client, start, statistics_request(config))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED and weight == config.secagg_max_weight
    assert metrics[protocol.EPSILON] == pytest.approx(3.0, abs=0.01)
    assert protocol.TRAIN_LOSS not in metrics and metrics[protocol.OUT_OF_RANGE] == 0
    assert max(float(np.abs(a).max()) for a in arrays) <= config.secagg_clipping_range
    ledger = PrivacyLedger(tmp_path / "state", department="finance")
    assert [e.mechanism for e in ledger.entries] == [MECHANISM_CLASS_COUNTS, MECHANISM_CLASS_SUMS]

    again, _, _ = fit(client, start, statistics_request(config))  # the server asks again (a resumed run)
    assert len(PrivacyLedger(tmp_path / "state", department="finance").entries) == 2
    for first, second in zip(arrays, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_dp_sgd_after_stage_one_is_calibrated_to_the_rest_of_the_run_epsilon(tmp_path):
    client, config = make_department(tmp_path, target_epsilon=4.0, num_server_rounds=3, statistics_share=0.5,
                                     centering_share=0.0)
    start = get_trainable(client.classifier)
    _, _, first = fit(client, start, statistics_request(config))
    assert first[protocol.EPSILON] == pytest.approx(2.0, abs=0.01)
    for server_round in (2, 3):
        _, weight, metrics = fit(client, start, statistics_request(config) | {
            protocol.SERVER_ROUND: server_round, protocol.STAGE: protocol.STAGE_DP_SGD})
        assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED and weight == config.secagg_max_weight
    assert 3.9 <= metrics[protocol.EPSILON] <= 4.0


def test_a_department_whose_ledger_lost_lines_the_server_holds_refuses(tmp_path):
    client, config = make_department(tmp_path, target_epsilon=4.0, num_server_rounds=3)
    start = get_trainable(client.classifier)
    fit(client, start, statistics_request(config))
    path = tmp_path / "state" / "privacy-ledger.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # the attack: drop the last line, spend again
    anchored = statistics_request(config) | {protocol.SERVER_ROUND: 2, protocol.STAGE: protocol.STAGE_DP_SGD,
                                             protocol.LEDGER_INDEXES: '{"finance": 2}'}
    reason, _ = failure(client, fit(client, start, anchored))
    assert "lines were removed" in reason  # a ledger error quotes no record: the server learns why
    assert len(PrivacyLedger(tmp_path / "state", department="finance").entries) == 1  # nothing spent


def test_distributed_noise_needs_the_departments_consent(tmp_path):
    client, config = make_department(tmp_path, distributed_noise=True)
    _, weight, metrics = fit(client, get_trainable(client.classifier), statistics_request(config))
    assert metrics[protocol.STATUS] == protocol.STATUS_POLICY_REFUSED and weight == 0
    assert "has not consented" in metrics[protocol.REASON]
    assert not (tmp_path / "state" / "privacy-ledger.jsonl").exists()  # nothing spent


def test_distributed_noise_is_refused_without_secagg():
    with pytest.raises(ConfigError, match="distributed-noise needs SecAgg"):
        RunConfig(distributed_noise=True, secagg=False)
    from client.site_policy import SitePolicy

    with pytest.raises(ConfigError, match="min-departments >= 2"):
        SitePolicy.from_mapping({"distributed-noise": True}, department="hr", run=RunConfig())
    policy = SitePolicy.from_mapping({"distributed-noise": True, "min-departments": 4}, department="hr", run=RunConfig())
    assert policy.noise_shares(requested=True, secagg=False)[1]  # refused on a plain round too


def test_a_consenting_department_adds_its_share_and_its_ledger_records_both_epsilons(tmp_path):
    shared_classifier.cache_clear()
    prepare.cache_clear()
    config = RunConfig(model="tiny", labels=LABELS, batch_size=16, target_delta=1e-4, secagg_max_weight=200,
                       out_dir=str(tmp_path / "out"), target_epsilon=3.0, distributed_noise=True)
    node = {"department": "finance", "data-path": str(department_file(tmp_path)), "state-dir": str(tmp_path / "state"),
            "distributed-noise": "true", "min-departments": 4}
    client = DepartmentClient(config=config, settings=resolve_department(config, node), run_id=7)
    arrays, _, metrics = fit(client, get_trainable(client.classifier), statistics_request(config) | {protocol.AGGREGATE_SIZE: 4})
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    entry = PrivacyLedger(tmp_path / "state", department="finance").entries[-1]
    assert entry.mechanism == MECHANISM_CLASS_SUMS and entry.noise_shares == 4  # all rows, no counts
    assert entry.epsilon == pytest.approx(3.0, abs=0.01)  # against the aggregate of >= 4 departments
    own = epsilon_of([(entry.noise_multiplier / 2, 1.0, 1)], delta=1e-4, accountant="prv")
    assert entry.own_epsilon == pytest.approx(own) and own > 2 * entry.epsilon
    # the noise it added is the 1/sqrt(4) share: compare with the exact sums it would release without noise
    features, targets = client_features(client, config)
    exact, _ = class_sums(features, targets, num_labels=len(LABELS))
    noise = arrays[0].astype(np.float64) * config.statistics_scale - exact.numpy()
    assert float(noise.std()) == pytest.approx(entry.noise_multiplier / 2, rel=0.35)


def client_features(client, config):
    from client.prepared_data import train_features

    return train_features(client.settings, config, prepare(client.settings, config))


def test_under_distributed_noise_a_declared_scope_still_adds_a_noise_share_to_every_row(tmp_path):
    """The attack this closes: with shares only on its scope's rows, a label that one department alone
    declares would carry one 1/sqrt(m) share in the aggregate, not a whole release's noise, and the
    epsilon its ledger records against the aggregate would not hold."""
    from shared.data import Record, write_jsonl
    from tests.test_department_client import TEXTS

    shared_classifier.cache_clear()
    prepare.cache_clear()
    scope = ("expense", "password")
    write_jsonl([Record(f"{t} {i}", label) for label in scope for t in TEXTS[label] for i in range(12)],
                tmp_path / "finance.jsonl")
    config = RunConfig(model="tiny", labels=LABELS, batch_size=16, target_delta=1e-4, secagg_max_weight=200,
                       out_dir=str(tmp_path / "out"), target_epsilon=3.0, distributed_noise=True)
    node = {"department": "finance", "data-path": str(tmp_path / "finance.jsonl"), "state-dir": str(tmp_path / "state"),
            "distributed-noise": "true", "min-departments": 4, "label-scope": ",".join(scope)}
    client = DepartmentClient(config=config, settings=resolve_department(config, node), run_id=7)
    arrays, _, metrics = fit(client, get_trainable(client.classifier), statistics_request(config) | {protocol.AGGREGATE_SIZE: 4})
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    entry = PrivacyLedger(tmp_path / "state", department="finance").entries[-1]
    assert entry.noise_shares == 4
    outside = arrays[0][LABELS.index("room")]  # not in its scope: no records, but its share of the noise
    assert np.all(outside != 0) and float(outside.std()) * config.statistics_scale == pytest.approx(
        entry.noise_multiplier / 2, rel=0.35)
