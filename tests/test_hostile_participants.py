"""Attacks by a hostile department or a curious server; each test fails if its attack works again."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.site_policy import SitePolicy
from server.run_record import RunRecorder
from server.strategy import FedprivStrategy
from server.update_checks import aggregate_problem
from shared import protocol
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.model import trainable_names
from shared.params import get_trainable
from tests.requests import evaluate_request, fit
from tests.rounds import begin
from tests.test_class_statistics import make_department

NAMES = ["head.weight", "head.bias", "centering.statistics"]


def strategy(tmp_path, **settings) -> FedprivStrategy:
    config = RunConfig(labels=("a", "b"), out_dir=str(tmp_path), secagg_max_weight=100, **settings)
    start = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(4, np.float32)]
    return FedprivStrategy(
        config=config, recorder=RunRecorder(tmp_path, config=config, run_id=1), parameter_names=NAMES,
        backbone_fingerprint="f", initial_parameters=ndarrays_to_parameters(start), evaluate_fn=None,
    )


def reply(name: str, update: list[np.ndarray], weight: int) -> tuple[SimpleNamespace, FitRes]:
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight,
                 {protocol.DEPARTMENT: name, protocol.STATUS: protocol.STATUS_TRAINED})
    return SimpleNamespace(cid=name), res


def honest(value: float) -> list[np.ndarray]:
    """A DP-SGD update: the head moves, the centring's statistics (set in round 1 only) do not."""
    return [np.full((2, 3), value, np.float32), np.full(2, value, np.float32), np.zeros(4, np.float32)]


def test_a_department_claiming_a_huge_weight_is_left_out_without_secagg(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=False, head_init="zeros", num_server_rounds=2)
    results = [reply("hr", honest(0.1), 50), reply("it", honest(0.2), 60), reply("evil", honest(-5.0), 10**7)]
    begin(fed, "hr", "it", "evil")
    parameters, _ = fed.aggregate_fit(1, results, [])
    arrays = parameters_to_ndarrays(parameters)
    np.testing.assert_allclose(arrays[0], (0.1 * 50 + 0.2 * 60) / 110, rtol=1e-6)  # evil did not take over
    round_record = fed.recorder.rounds[1]
    assert round_record["departments"]["evil"]["status"] == protocol.STATUS_REJECTED
    assert any("evil" in note and "secagg-max-weight" in note for note in round_record["failures"])


@pytest.mark.parametrize("poison", [math.nan, math.inf, 1e6])
def test_a_nan_infinite_or_huge_update_is_refused_without_secagg(tmp_path, poison):
    fed = strategy(tmp_path, secagg=False, dp=False, head_init="zeros", num_server_rounds=2)
    bad = honest(0.1)
    bad[0][0, 0] = poison
    begin(fed, "hr", "evil")
    parameters, _ = fed.aggregate_fit(1, [reply("hr", honest(0.1), 50), reply("evil", bad, 50)], [])
    assert np.all(np.isfinite(parameters_to_ndarrays(parameters)[0]))
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], 0.1, rtol=1e-6)


@pytest.mark.parametrize("poison", [math.nan, 1e6])
def test_a_poisoned_secagg_aggregate_is_rejected_and_the_model_kept(tmp_path, poison):
    fed = strategy(tmp_path, secagg=True, dp=True, head_init="zeros", num_server_rounds=2)
    before = parameters_to_ndarrays(fed.latest_parameters)
    unmasked = honest(0.1)  # under SecAgg+ every result carries the same unmasked average
    unmasked[1][0] = poison
    results = [reply("hr", unmasked, 100), reply("it", unmasked, 100)]
    begin(fed, "hr", "it")
    parameters, _ = fed.aggregate_fit(1, results, [])
    assert parameters is None
    for a, b in zip(parameters_to_ndarrays(fed.latest_parameters), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fed.recorder.rounds[1]["aggregate_check"] == "rejected"
    assert any("rejected aggregate" in note for note in fed.recorder.rounds[1]["failures"])
    assert not (tmp_path / "checkpoints").exists()  # nothing damaged was saved


def test_honest_aggregates_pass_the_check():
    assert aggregate_problem(honest(7.9), bound=8.0) == ""
    assert "NaN" in aggregate_problem([np.array([np.nan])], bound=8.0)


def test_a_crafted_evaluation_model_reads_nothing_back_under_dp(tmp_path):
    client, config = make_department(tmp_path)
    crafted = get_trainable(client.classifier)
    crafted[trainable_names(client.classifier).index("head.bias")][:] = [0.0, 50.0, 0.0]  # the probe: a head that answers one label whatever the input
    replies = [client.evaluate(crafted, evaluate_request(config)) for _ in range(2)]
    for loss, count, metrics in replies:
        assert (loss, count) == (0.0, 0) and metrics[protocol.EVALUATION_WITHHELD] is True
        assert protocol.ACCURACY not in metrics


def test_a_server_that_skips_secagg_in_a_secagg_run_gets_nothing(tmp_path):
    from tests.requests import failure
    from tests.test_class_statistics import statistics_request

    client, config = make_department(tmp_path)  # the run config says SecAgg+ (the default)
    plain = fit(client, get_trainable(client.classifier), statistics_request(config), masked=False)
    reason, _ = failure(client, plain)  # zeros, weight 0, and why
    assert "the run uses SecAgg+, but this request did not arrive through it" in reason
    assert not (tmp_path / "state" / "privacy-ledger.jsonl").exists()  # nothing released, nothing spent


@pytest.mark.parametrize("setting", ["target_epsilon", "target_delta", "learning_rate", "statistics_share"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_run_settings_are_refused_by_name(setting, value):
    with pytest.raises(ConfigError, match=setting.replace("_", "-")):
        RunConfig(**{setting: value})


@pytest.mark.parametrize("key", ["epsilon", "max-epsilon-per-round", "min-noise-multiplier", "delta"])
def test_a_nan_budget_or_policy_is_refused_by_name(key):
    with pytest.raises(ConfigError, match=key):
        SitePolicy.from_mapping({key: "nan"}, department="hr", run=RunConfig())


@pytest.mark.parametrize(("names", "why"), [(["h r", "h_r"], "share one folder"), (["HR", "hr"], "share one folder"),
                                            (["../../x"], "may not start with '.'"), (["a/b"], "'/'")])
def test_department_names_that_collide_or_climb_out_are_refused(tmp_path, names, why):
    from shared.data import Record, write_jsonl
    from simulation.local.prepare import DataPlan, partition_data

    data = tmp_path / "data.csv"
    write_jsonl([Record(f"text {i} {n}", ["x", "y"][i % 2], n) for n in names for i in range(6)], data.with_suffix(".jsonl"))
    with pytest.raises(Exception, match=why) as refused:
        partition_data(DataPlan(data=data.with_suffix(".jsonl"), test_data=None, partition="column", departments=None,
                                alpha=0.5, seed=0))
    assert "department" in str(refused.value)


def test_a_department_writes_its_state_for_its_user_only(tmp_path):
    import os

    from client.client_app import client_fn
    from tests.test_class_statistics import statistics_request

    client, config = make_department(tmp_path)
    context = SimpleNamespace(run_config=config.to_run_config(), run_id=7, node_config={
        "department": "finance", "data-path": str(client.settings.data_path), "state-dir": str(client.settings.state_dir)})
    previous = os.umask(0o022)
    try:
        client_fn(context)  # what a ClientApp process runs first
        fit(client, get_trainable(client.classifier), statistics_request(config))
    finally:
        os.umask(previous)
    written = [p for p in client.settings.state_dir.rglob("*")]
    assert any(p.name.startswith("features-") for p in written) and any(p.suffix == ".jsonl" for p in written)
    for path in [client.settings.state_dir, *written]:
        assert path.stat().st_mode & 0o077 == 0, path  # embeddings of private records, the ledger, updates


def signed_reply(tmp_path, *, key_of: str, claims: str, status: str = protocol.STATUS_TRAINED):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from shared.reply_signature import reply_message, sign

    keys = {}
    for name in ("hr", "it"):
        private = ec.generate_private_key(ec.SECP384R1())
        (tmp_path / f"{name}.key").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        keys[name] = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH).decode()
    proxy, res = reply(claims, honest(0.1), 100)
    message = reply_message(run="run-1", server_round=1, department=claims, status=status, ledger="")
    res.metrics[protocol.SIGNATURE] = sign(message, private_key=tmp_path / f"{key_of}.key")
    return keys, (proxy, res)


@pytest.mark.parametrize("secagg", [False, True])
def test_a_node_with_one_departments_key_cannot_reply_as_another(tmp_path, secagg):
    import json

    keys, impostor = signed_reply(tmp_path, key_of="it", claims="hr")
    fed = strategy(tmp_path, secagg=secagg, dp=True, head_init="zeros", num_server_rounds=2, run_uid="run-1",
                   department_keys=json.dumps(keys))
    begin(fed, "hr", "it")
    parameters, _ = fed.aggregate_fit(1, [impostor], [])
    assert parameters is None  # nothing of the impostor's reached the model
    assert any("'hr' is not signed by that department's provisioned key" in n for n in fed.recorder.rounds[1]["failures"])

    (tmp_path / "g").mkdir()
    keys, honest_reply = signed_reply(tmp_path / "g", key_of="hr", claims="hr")
    fed = strategy(tmp_path / "g", secagg=secagg, dp=True, head_init="zeros", num_server_rounds=2, run_uid="run-1",
                   department_keys=json.dumps(keys))
    begin(fed, "hr", "it")
    parameters, _ = fed.aggregate_fit(1, [honest_reply], [])
    assert parameters is not None and fed.recorder.rounds[1]["aggregate_check"] == "passed"


def test_zero_departments_is_refused_not_read_as_the_default():
    from simulation.local.prepare import DataPlan, partition_data

    with pytest.raises(ConfigError, match="--departments must be >= 1"):
        partition_data(DataPlan(data=None, test_data=None, partition="iid", departments=0, alpha=0.5, seed=0))
