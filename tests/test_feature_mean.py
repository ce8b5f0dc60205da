"""Round 1's DP feature mean and the centring built from it: calibration, sensitivity, noise, the
ledger across stage 1, non-private equality with the pooled computation, and a hostile centre."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.class_statistics import class_sums, release_statistics
from client.feature_mean import SENSITIVITY, FeatureMeanPlan, plan_feature_mean, release_feature_mean
from client.prepared_data import prepare
from client.privacy import MECHANISM_CLASS_COUNTS, MECHANISM_CLASS_SUMS, MECHANISM_DP_SGD, MECHANISM_FEATURE_MEAN, PrivacyLedger
from server.class_statistics import federation_sums
from shared import protocol
from shared.accounting import epsilon_of
from shared.centering import FeatureCentering
from shared.config import RunConfig
from shared.params import get_trainable
from tests.requests import fit, fit_request
from tests.test_class_statistics import make_department, unit_features


@pytest.mark.parametrize(("epsilon", "sigma"), [(1.0, 3.765), (8.0, 0.601)])
def test_the_feature_mean_gets_its_share_of_stage_ones_pinned_noise(epsilon, sigma):
    config = RunConfig(target_epsilon=epsilon, num_server_rounds=2, centering_share=0.05)
    plan = plan_feature_mean(config, budget=epsilon, delta=1e-5, prior=[])
    assert plan.noise_multiplier == pytest.approx(sigma / math.sqrt(0.05), rel=2e-3)  # 16.8 / 2.69
    assert epsilon_of(plan.mechanisms, delta=1e-5, accountant="prv") < epsilon / 3


def test_one_record_moves_the_exact_release_by_at_most_the_sensitivity():
    features = unit_features(30)
    full = release_feature_mean(features, plan=None, generator=None)
    assert full[-1] == 30
    for removed in range(30):
        smaller = release_feature_mean(features[torch.arange(30) != removed], plan=None, generator=None)
        assert float((full - smaller).norm()) <= SENSITIVITY + 1e-6
    with pytest.raises(ValueError, match="norm <= 1"):
        release_feature_mean(2 * features, plan=None, generator=None)


def test_the_release_noise_has_the_ledger_sigma_times_the_sensitivity():
    features = unit_features(50)
    exact = release_feature_mean(features, plan=None, generator=None)
    plan = FeatureMeanPlan(0.8)
    noise = torch.stack([release_feature_mean(features, plan=plan, generator=torch.Generator().manual_seed(s)) - exact
                         for s in range(300)])
    assert float(noise.std()) == pytest.approx(0.8 * math.sqrt(2), rel=0.05)
    assert float(FeatureMeanPlan(0.8).shared_by(4).noise_multiplier) == pytest.approx(0.4)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=9, max_size=9),
       seed=st.integers(0, 10_000))
def test_whatever_centre_a_server_sends_centred_features_keep_norm_at_most_one(values, seed):
    centering = FeatureCentering(8)
    with torch.no_grad():
        centering.statistics.copy_(torch.tensor(values))
    features = unit_features(16, seed=seed)
    centred = centering(features)
    assert bool(torch.isfinite(centred).all()) and float(centred.norm(dim=1).max()) <= 1 + 1e-5
    assert float(centering.centre.norm()) <= 1 + 1e-6
    if values[-1] < 1:  # no records behind it (before round 1): the identity
        assert torch.equal(centred, features)


def test_without_noise_the_federation_centres_and_sums_as_one_party_would():
    features = unit_features(90) * 0.5 + torch.nn.functional.normalize(torch.ones(8), dim=0) * 0.5  # a common direction
    features = torch.nn.functional.normalize(features, dim=1)
    targets = torch.randint(0, 4, (90,), generator=torch.Generator().manual_seed(2))
    parts, scale = [slice(0, 30), slice(30, 75), slice(75, 90)], 12.5
    average = [np.mean([release_feature_mean(features[p], plan=None, generator=None).numpy() / scale for p in parts], axis=0)]
    centering = FeatureCentering(8)
    with torch.no_grad():
        centering.statistics.copy_(torch.tensor(federation_sums(average, departments=3, scale=scale)[0]))
    torch.testing.assert_close(centering.centre, features.mean(dim=0), rtol=1e-5, atol=1e-6)
    federated = sum(release_statistics(centering(features[p]), targets[p], num_labels=4, plan=None, scope_rows=None,
                                       generator=None).sums for p in parts)
    central = torch.nn.functional.normalize(features - features.mean(dim=0), dim=1)
    torch.testing.assert_close(federated, class_sums(central, targets, num_labels=4)[0], rtol=1e-5, atol=1e-5)


def test_stage_one_with_the_feature_mean_ends_where_it_would_without_and_dp_sgd_gets_the_rest(tmp_path):
    client, config = make_department(tmp_path, target_epsilon=4.0, num_server_rounds=4, statistics_share=0.5)
    start = get_trainable(client.classifier)
    arrays, weight, first = fit(client, start, fit_request(config, 1, stage=protocol.STAGE_FEATURE_MEAN))
    assert first[protocol.STATUS] == protocol.STATUS_TRAINED and weight == config.secagg_max_weight
    assert first[protocol.EPSILON] < 0.5  # 5% of stage 1's noise precision
    released = arrays[-1] * config.feature_mean_scale  # the centring's slot; every other slot is zero
    sigma = PrivacyLedger(tmp_path / "state", department="finance").entries[0].noise_multiplier * SENSITIVITY
    records = len(prepare(client.settings, config).department.train)
    assert all(not a.any() for a in arrays[:-1]) and abs(released[-1] - records) < 6 * sigma
    assert first[protocol.OUT_OF_RANGE] == 0
    again, _, _ = fit(client, start, fit_request(config, 1, stage=protocol.STAGE_FEATURE_MEAN))  # asked again
    np.testing.assert_array_equal(again[-1], arrays[-1])
    _, _, second = fit(client, start, fit_request(config, 2, stage=protocol.STAGE_STATISTICS))
    assert second[protocol.EPSILON] == pytest.approx(2.0, abs=0.01)  # stage 1's share of 4, as without the mean
    for server_round in (3, 4):
        _, _, metrics = fit(client, start, fit_request(config, server_round))
        assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    ledger = PrivacyLedger(tmp_path / "state", department="finance")
    assert [e.mechanism for e in ledger.entries] == [MECHANISM_FEATURE_MEAN, MECHANISM_CLASS_COUNTS,
                                                     MECHANISM_CLASS_SUMS, MECHANISM_DP_SGD, MECHANISM_DP_SGD]
    assert 3.9 <= ledger.entries[-1].epsilon <= 4.0


def test_the_largest_departments_release_is_not_clipped_by_secagg(tmp_path):
    """Simulations set secagg-max-weight to the largest department's record count: its count alone
    would sit at the edge of SecAgg+'s range, where half of its noise draws would be clipped."""
    probe, _ = make_department(tmp_path / "probe")
    records = len(prepare(probe.settings, probe.config).department.train)
    for attempt in range(4):
        client, config = make_department(tmp_path / str(attempt), secagg_max_weight=records, target_epsilon=8.0)
        arrays, _, metrics = fit(client, get_trainable(client.classifier),
                                 fit_request(config, 1, stage=protocol.STAGE_FEATURE_MEAN))
        assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED and metrics[protocol.OUT_OF_RANGE] == 0
        assert abs(float(arrays[-1][-1])) <= config.secagg_clipping_range / 2 + 0.5
