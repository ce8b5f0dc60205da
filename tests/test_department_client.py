"""Integration: a department client runs real DP-SGD rounds on the tiny Transformer, without Flower."""

from __future__ import annotations

import re

import numpy as np
import pytest

from client.department import DepartmentClient
from client.department_data import resolve_department
from client.prepared_data import prepare, shared_classifier
from client.privacy import LEDGER_FILE, PrivacyLedger
from shared import protocol
from shared.config import RunConfig
from shared.data import Record, write_jsonl
from shared.errors import ConfigError
from shared.params import get_trainable
from tests.requests import evaluate_request, failure, fit, fit_request

LABELS = ("expense", "password", "room")
TEXTS = {
    "expense": ["file my taxi expenses", "hotel receipt reimbursement", "expense claim for the trip"],
    "password": ["reset my password", "locked out of my account", "forgot my email password"],
    "room": ["book a meeting room", "reserve the boardroom", "need a room for six"],
}


def department_file(tmp_path, copies=12):
    records = [Record(f"{t} {i}", label) for label, ts in TEXTS.items() for t in ts for i in range(copies)]
    path = tmp_path / "finance.jsonl"
    write_jsonl(records, path)
    return path


def make_client(tmp_path, *, lora_r=0, dp=True, epsilon=5.0, rounds=3, node_extra=None, batch_size=16, **settings):
    config = RunConfig(
        model="tiny", labels=LABELS, batch_size=batch_size, learning_rate=0.5, num_server_rounds=rounds, lora_r=lora_r,
        lora_alpha=8, dp=dp, target_epsilon=epsilon, target_delta=1e-4, out_dir=str(tmp_path / "out"),
        head_init="zeros", **settings,
    )
    node = {"department": "finance", "data-path": str(department_file(tmp_path)), "state-dir": str(tmp_path / "state")}
    node.update(node_extra or {})
    settings = resolve_department(config, node)
    return DepartmentClient(config=config, settings=settings, run_id=42), config


@pytest.mark.parametrize("lora_r", [0, 4])
def test_dp_rounds_account_and_persist_across_client_restarts(tmp_path, lora_r):
    client, config = make_client(tmp_path, lora_r=lora_r)
    start = get_trainable(client.classifier)
    delta, n, metrics = fit(client, start, fit_request(config, 1))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    assert n == config.secagg_max_weight  # under DP every department weighs the same: no clear-text count
    assert 0 < metrics[protocol.EPSILON] < 5.0 and metrics[protocol.NOISE_MULTIPLIER] > 0
    assert any(np.abs(d).max() > 0 for d in delta)  # updates travel as deltas from the received parameters
    params = [s + d for s, d in zip(start, delta, strict=True)]
    np.testing.assert_allclose(get_trainable(client.classifier)[0], params[0], atol=1e-6)

    shared_classifier.cache_clear()  # a new process: nothing in memory survives
    prepare.cache_clear()
    restarted, _ = make_client(tmp_path, lora_r=lora_r)
    eps = [metrics[protocol.EPSILON]]
    for server_round in (2, 3):
        delta, _, metrics = fit(restarted, params, fit_request(config, server_round))
        params = [p + d for p, d in zip(params, delta, strict=True)]
        eps.append(metrics[protocol.EPSILON])
    assert eps == sorted(eps) and 4.95 <= eps[-1] <= 5.0
    assert len(PrivacyLedger(tmp_path / "state", department="finance").entries) == 3

    zero_delta, weight, refused = fit(restarted, params, fit_request(config, 4))
    assert refused[protocol.STATUS] == protocol.STATUS_BUDGET_EXHAUSTED and weight == 0
    assert "budget" in refused[protocol.REASON] and refused[protocol.EPSILON] == pytest.approx(eps[-1])
    assert all(not d.any() for d in zero_delta)

    loss, n_val, evaluation = restarted.evaluate(params, evaluate_request(config, 3))  # under DP: nothing in the clear
    assert (loss, n_val) == (0.0, 0) and evaluation[protocol.EVALUATION_WITHHELD] is True


def test_without_dp_a_department_evaluates_its_validation_then_test_split(tmp_path):
    client, config = make_client(tmp_path, dp=False)
    params = get_trainable(client.classifier)
    loss, n_val, evaluation = client.evaluate(params, evaluate_request(config, 1))
    assert n_val == 11 and 0.0 <= evaluation[protocol.ACCURACY] <= 1.0 and loss > 0
    assert evaluation[protocol.EVALUATION_SPLIT] == protocol.SPLIT_VAL
    _, n_test, final = client.evaluate(params, evaluate_request(config, 1, split=protocol.SPLIT_TEST))
    assert n_test == 11 and final[protocol.EVALUATION_SPLIT] == protocol.SPLIT_TEST


def test_no_dp_writes_no_ledger_and_says_so(tmp_path):
    client, config = make_client(tmp_path, dp=False)
    _, _, metrics = fit(client, get_trainable(client.classifier), fit_request(config, 1))
    assert metrics[protocol.DP_ENABLED] is False and protocol.EPSILON not in metrics
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


def test_a_request_with_another_backbone_or_missing_values_is_refused_before_training(tmp_path):
    client, config = make_client(tmp_path)
    start = get_trainable(client.classifier)
    other = fit_request(config, 1) | {protocol.BACKBONE_FINGERPRINT: "another model"}
    reason, _ = failure(client, fit(client, start, other))
    assert "the server's backbone differs from this department's (tiny)" in reason
    incomplete = {k: v for k, v in fit_request(config, 1).items() if k not in (protocol.STAGE, protocol.AGGREGATE_SIZE)}
    reason, _ = failure(client, fit(client, start, incomplete | {protocol.SERVER_ROUND: -1}))
    assert all(f"'{key}'" in reason for key in (protocol.STAGE, protocol.AGGREGATE_SIZE, protocol.SERVER_ROUND))
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


def test_a_department_budget_above_the_run_is_capped_and_a_small_one_trains_with_more_noise(tmp_path):
    client, config = make_client(tmp_path, node_extra={"epsilon": 9.0})
    _, _, metrics = fit(client, get_trainable(client.classifier), fit_request(config, 1))
    assert metrics[protocol.BUDGET] == 5.0  # the run promised 5.0: that holds too
    small, config = make_client(tmp_path / "small", node_extra={"epsilon": 0.5})
    _, weight, trained = fit(small, get_trainable(small.classifier), fit_request(config, 1))
    assert trained[protocol.STATUS] == protocol.STATUS_TRAINED and weight > 0
    assert trained[protocol.NOISE_MULTIPLIER] > metrics[protocol.NOISE_MULTIPLIER]
    assert 0 < trained[protocol.EPSILON] <= 0.5


@pytest.mark.parametrize(("policy", "request_extra", "named"), [
    ({"require-secagg": True}, {}, "require-secagg"),  # a run without SecAgg+
    ({"min-noise-multiplier": 50.0}, {}, "min-noise-multiplier=50.0"),
    ({"max-epsilon-per-round": 0.01}, {}, "max-epsilon-per-round=0.01"),
    ({"min-departments": 3}, {protocol.AGGREGATE_SIZE: 2}, "min-departments=3: this round aggregates only 2"),
])
def test_site_policy_refuses_a_request_that_violates_it(tmp_path, policy, request_extra, named):
    client, config = make_client(tmp_path, node_extra=policy, secagg="require-secagg" not in policy)
    zero, weight, refused = fit(client, get_trainable(client.classifier), fit_request(config, 1) | request_extra)
    assert refused[protocol.STATUS] == protocol.STATUS_POLICY_REFUSED and weight == 0
    assert named in refused[protocol.REASON] and all(not d.any() for d in zero)
    assert not (tmp_path / "state" / LEDGER_FILE).exists()  # nothing trained, nothing spent


def test_site_policy_allows_a_request_within_it(tmp_path):
    client, config = make_client(tmp_path, node_extra={"require-secagg": False, "min-departments": 2,
                                                        "max-epsilon-per-round": 100.0, "min-noise-multiplier": 0.1})
    _, _, metrics = fit(client, get_trainable(client.classifier), fit_request(config, 1) | {protocol.AGGREGATE_SIZE: 2})
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED


def test_site_policy_refuses_a_no_dp_run_when_it_limits_privacy_cost(tmp_path):
    client, config = make_client(tmp_path, dp=False, node_extra={"max-epsilon-per-round": 1.0})
    _, weight, refused = fit(client, get_trainable(client.classifier), fit_request(config, 1))
    assert refused[protocol.STATUS] == protocol.STATUS_POLICY_REFUSED and weight == 0 and "--no-dp" in refused[protocol.REASON]


def test_bad_site_policy_values_are_all_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_client(tmp_path, node_extra={"epsilon": 0.0, "delta": 0.5, "min-departments": 0, "require-secagg": "maybe"})
    text = str(error.value)
    assert "site policy of department finance" in text
    for key in ("epsilon: the budget must be > 0", "delta: must be in (0, 0.0001]", "min-departments: must be >= 1",
                "require-secagg: expected true or false"):
        assert key in text


def test_a_repeated_request_is_answered_from_the_stored_update_without_spending(tmp_path):
    client, config = make_client(tmp_path)
    start = get_trainable(client.classifier)
    first, _, metrics = fit(client, start, fit_request(config, 1))
    again, _, replayed = fit(client, start, fit_request(config, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)) and replayed == metrics
    assert len(PrivacyLedger(tmp_path / "state", department="finance").entries) == 1
    different = [p + 0.1 for p in start]  # other parameters: a new round of training, paid for
    fit(client, different, fit_request(config, 1))
    assert len(PrivacyLedger(tmp_path / "state", department="finance").entries) == 2


def test_secagg_weight_and_range_checks(tmp_path):
    client, config = make_client(tmp_path, secagg_clipping_range=1e-4, secagg_max_weight=86)
    secure = fit_request(config, 1)
    _, _, metrics = fit(client, get_trainable(client.classifier), secure, masked=True)
    assert metrics[protocol.OUT_OF_RANGE] > 0  # a tiny clipping range: SecAgg+ would clip, and we say so
    client, config = make_client(tmp_path / "small", secagg_max_weight=50)
    reason, _ = failure(client, fit(client, get_trainable(client.classifier), secure, masked=True))
    assert "department finance has 86 training records, more than secagg-max-weight=50" in reason
    weak = secure | {protocol.SECAGG_MASKS: "mt19937"}  # a server that does not unmask with cryptographic masks
    reason, _ = failure(client, fit(client, get_trainable(client.classifier), weak, masked=True))
    assert "32-bit" in reason


def test_too_small_department_is_named(tmp_path):
    client, config = make_client(tmp_path)
    write_jsonl([Record("a", "expense"), Record("b", "room")], client.settings.data_path)
    prepare.cache_clear()
    reason, log = failure(client, fit(client, get_trainable(client.classifier), fit_request(config, 1)))
    assert re.search("department finance .* needs at least 4 for training", log) and "DataError" in reason


def test_only_a_simulation_shares_a_feature_cache(tmp_path):
    config = RunConfig(model="tiny", labels=LABELS, feature_cache=str(tmp_path / "shared-cache"),
                       partition_dir=str(tmp_path / "federation"), out_dir=str(tmp_path / "out"))
    (tmp_path / "federation").mkdir()
    (tmp_path / "federation" / "manifest.json").write_text(
        '{"departments": [{"name": "finance", "file": "finance.jsonl", "records": 3}]}')
    simulated = resolve_department(config, {"partition-id": 0})
    assert simulated.feature_cache == tmp_path / "shared-cache"
    deployed = resolve_department(config, {"department": "finance", "data-path": "x.csv", "state-dir": str(tmp_path / "s")})
    assert deployed.feature_cache == tmp_path / "s" / "feature-cache"  # the server cannot point it elsewhere


def test_each_round_a_department_serves_is_one_line_of_its_activity_log(tmp_path):
    from client.activity import ACTIVITY_FILE

    client, config = make_client(tmp_path, node_extra={"epsilon": 4.0})
    fit(client, get_trainable(client.classifier), fit_request(config, 1))
    line = (tmp_path / "state" / ACTIVITY_FILE).read_text().splitlines()[-1]
    assert "finance: trained round 1 (DP-SGD, run " in line and "epsilon" in line and "of 4" in line
    assert f"{len(client_records(client)):,} records" in line


def client_records(client):
    from client.prepared_data import prepare

    return prepare(client.settings, client.config).department.train


def test_a_deployed_department_reads_its_file_with_its_own_column_names(tmp_path):
    import json


    client, config = make_client(tmp_path)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"body": json.loads(line)["text"], "queue": json.loads(line)["label"]}) + "\n"
                               for line in department_file(tmp_path).read_text().splitlines()))
    mapped, _ = make_client(tmp_path / "mapped", node_extra={"data-path": str(renamed), "text-column": "body",
                                                             "label-column": "queue"})
    _, _, metrics = fit(mapped, get_trainable(mapped.classifier), fit_request(config, 1))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    unmapped, _ = make_client(tmp_path / "unmapped", node_extra={"data-path": str(renamed)})
    reason, log = failure(unmapped, fit(unmapped, get_trainable(unmapped.classifier), fit_request(config, 1)))
    assert "missing or empty" in log and "missing or empty" not in reason  # a data error's text stays home


def test_a_later_round_on_cached_features_never_loads_the_backbone(tmp_path):
    """In deployment every message starts a fresh process: a head-only round reads its cached features,
    so it must not spend a second loading the Transformer (nor importing transformers) it does not run."""
    from shared.model import load_backbone

    client, config = make_client(tmp_path)
    start = get_trainable(client.classifier)
    delta, _, metrics = fit(client, start, fit_request(config, 1))  # embeds its records once: loads the backbone
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED

    shared_classifier.cache_clear()  # a new process
    prepare.cache_clear()
    load_backbone.cache_clear()
    restarted, _ = make_client(tmp_path)
    params = [s + d for s, d in zip(start, delta, strict=True)]
    _, _, metrics = fit(restarted, params, fit_request(config, 2))
    assert metrics[protocol.STATUS] == protocol.STATUS_TRAINED
    assert "_loaded" not in load_backbone("tiny").__dict__  # model and tokenizer never touched
