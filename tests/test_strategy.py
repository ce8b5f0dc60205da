"""FedprivStrategy, one round at a time, from FitRes objects: numbering, sampling once, the early
end, a halted round, the requests it sends, and Flower's SecAgg+ workflow driving it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, Error, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from server.secure_aggregation import AuditedSecAggPlusWorkflow
from server.strategy import FederationEnded
from server.update_checks import describe_failure
from shared import protocol
from tests.rounds import begin, online
from tests.test_hostile_participants import honest, reply, strategy


def declined(name: str, status: str, reason: str = "") -> tuple:
    metrics = {protocol.DEPARTMENT: name, protocol.STATUS: status, protocol.REASON: reason}
    return SimpleNamespace(cid=name), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(honest(0.0)), 0, metrics)


def test_a_resumed_run_numbers_its_rounds_from_the_checkpoint_everywhere(tmp_path):
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps({"round": r, "departments": {}, "failures": []}) + "\n"
                                                   for r in (1, 2, 3)))  # the stopped run's three rounds
    fed = strategy(tmp_path, secagg=False, dp=False, head_init="zeros", num_server_rounds=6, resume_after_round=3)
    instructions = begin(fed, "hr", "it")
    request = protocol.FitRequest.from_config(instructions[0][1].config, department="hr")
    assert request.server_round == 4 and request.aggregate_size == 2 and request.stage == protocol.STAGE_DP_SGD
    assert set(instructions[0][1].config) == set(request.to_config())  # nothing the department has already
    fed.aggregate_fit(1, [reply("hr", honest(0.1), 50), reply("it", honest(0.2), 50)], [])
    assert (tmp_path / "checkpoints" / "round-004.safetensors").is_file() and 4 in fed.recorder.rounds
    evaluate = fed.configure_evaluate(1, fed.latest_parameters, online("hr", "it"))
    assert protocol.EvaluateRequest.from_config(evaluate[0][1].config, department="hr").server_round == 4
    fed.aggregate_evaluate(1, [], [])
    assert [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_the_last_round_asks_for_the_test_split(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=False, head_init="zeros", num_server_rounds=1)
    begin(fed, "hr", "it")
    evaluate = fed.configure_evaluate(1, fed.latest_parameters, online("hr", "it"))
    assert evaluate[0][1].config[protocol.EVALUATION_SPLIT] == protocol.SPLIT_TEST


def test_a_round_samples_its_departments_once(tmp_path):
    fed = strategy(tmp_path, secagg=True, dp=True, head_init="zeros", num_server_rounds=2, fraction_train=0.5)
    manager = online("a", "b", "c", "d", "e", "f")
    first = fed.begin_round(1, manager)  # the SecAgg+ setup stage sizes its neighbourhood from this
    instructions = fed.configure_fit(1, fed.latest_parameters, manager)  # Flower's setup stage, right after
    assert [c.cid for c, _ in instructions] == [c.cid for c in first.asked] and len(first.asked) == 3
    assert fed.begin_round(2, manager) is not first  # the next round samples afresh


def test_the_run_ends_when_too_few_departments_have_budget_left(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=True, head_init="zeros", num_server_rounds=3, min_departments=2)
    begin(fed, "hr", "it", "ops")
    fed.aggregate_fit(1, [declined("hr", protocol.STATUS_BUDGET_EXHAUSTED, "spent"),
                          declined("it", protocol.STATUS_BUDGET_EXHAUSTED, "spent"), reply("ops", honest(0.1), 50)], [])
    with pytest.raises(FederationEnded, match=r"ended before round 2: 1 department\(s\) have budget left, "
                                              r"min-departments is 2 \(budget exhausted: hr, it\)"):
        begin(fed, "hr", "it", "ops", flower_round=2)


def test_departments_out_of_budget_are_not_asked_again(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=True, head_init="zeros", num_server_rounds=3, min_departments=2)
    begin(fed, "hr", "it", "ops")
    fed.aggregate_fit(1, [declined("hr", protocol.STATUS_BUDGET_EXHAUSTED, "spent"),
                          reply("it", honest(0.1), 50), reply("ops", honest(0.1), 50)], [])
    assert sorted(c.cid for c, _ in begin(fed, "hr", "it", "ops", flower_round=2)) == ["it", "ops"]


def test_a_round_whose_fit_stage_never_aggregated_is_a_named_failure(tmp_path):
    fed = strategy(tmp_path, secagg=True, dp=True, head_init="zeros", num_server_rounds=2)
    begin(fed, "hr", "it")  # SecAgg+ halts below its threshold: Flower never calls aggregate_fit
    fed.configure_evaluate(1, fed.latest_parameters, online("hr", "it"))
    assert any("no aggregate this round: secure aggregation halted" in n for n in fed.recorder.rounds[1]["failures"])
    with pytest.raises(RuntimeError, match="never begun"):
        fed.aggregate_fit(2, [], [])


def test_a_failed_department_and_a_crashed_one_are_named(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=True, head_init="zeros", num_server_rounds=2)
    begin(fed, "hr", "it")
    crash = Exception(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="exit code 137"))
    fed.aggregate_fit(1, [declined("hr", protocol.STATUS_FAILED, "request to department hr: 'stage' is missing")], [crash])
    failures = fed.recorder.rounds[1]["failures"]
    assert "client app crashed: exit code 137" in failures
    assert "department hr failed: request to department hr: 'stage' is missing" in failures
    assert describe_failure(TimeoutError("no reply")) == "TimeoutError: no reply"


@pytest.mark.usefixtures("server_task")
def test_flowers_secagg_workflow_drives_the_strategy_to_the_weighted_average(tmp_path):
    from tests.test_secagg_dropouts import LossyGrid, secure_round

    fed = strategy(tmp_path, secagg=True, dp=False, head_init="zeros", num_server_rounds=2, secagg_num_shares=3,
                   min_departments=4)
    rng = np.random.default_rng(1)
    given = {node: rng.uniform(-1, 1, 12).astype(np.float32) for node in range(101, 105)}
    shapes = [(2, 3), (2,), (4,)]

    def as_update(vector: np.ndarray) -> list[np.ndarray]:
        return [vector[:6].reshape(shapes[0]), vector[6:8], vector[8:]]

    workflow = AuditedSecAggPlusWorkflow(config=fed.run_config, audit_dir=None)
    grid = LossyGrid(given, dropped=103, from_stage=Stage.COLLECT_MASKED_VECTORS, to_update=as_update)
    aggregate = secure_round(workflow, grid, strategy=fed, start=[np.zeros(s, np.float32) for s in shapes])
    survivors = [n for n in given if n != 103]
    weights = np.array([n - 100 for n in survivors], dtype=np.float64)
    expected = sum(w * given[n] for w, n in zip(weights, survivors, strict=True)) / weights.sum()
    assert fed.round.number == 1 and len(fed.round.asked) == 4 and workflow.num_shares == 3  # a ring of 3 out of 4
    model = np.concatenate([a.ravel() for a in parameters_to_ndarrays(fed.latest_parameters)])
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in aggregate]), model)
    np.testing.assert_allclose(model[:8], expected[:8], atol=1e-3)  # the strategy added the unmasked average to the head
    assert not model[8:].any()  # and left the centring's statistics alone: a DP-SGD round does not set them
    assert fed.recorder.rounds[1]["aggregate_check"] == "passed"


def test_under_dp_no_department_is_asked_to_evaluate_and_the_round_is_recorded(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=True, head_init="zeros", num_server_rounds=2)
    begin(fed, "hr", "it")
    fed.aggregate_fit(1, [reply("hr", honest(0.1), 100), reply("it", honest(0.1), 100)], [])
    assert fed.configure_evaluate(1, fed.latest_parameters, online("hr", "it")) == []  # they would withhold it
    assert [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1]


def test_the_server_moves_the_model_with_momentum_over_dp_sgd_rounds_and_a_resume_keeps_it(tmp_path):
    from server.federation import resume_parameters

    def run_round(fed, flower_round: int, value: float) -> list[np.ndarray]:
        begin(fed, "hr", "it", flower_round=flower_round)
        parameters, _ = fed.aggregate_fit(flower_round, [reply("hr", honest(value), 50), reply("it", honest(value), 50)], [])
        fed.configure_evaluate(flower_round, parameters, online("hr", "it"))
        fed.aggregate_evaluate(flower_round, [], [])
        return parameters_to_ndarrays(parameters)

    settings = dict(secagg=False, dp=False, head_init="zeros", num_server_rounds=3, server_momentum=0.5)
    fed = strategy(tmp_path / "whole", **settings)
    moved = [run_round(fed, r, value)[1][0] for r, value in ((1, 0.1), (2, 0.2), (3, 0.4))]
    # v1 = 0.1, v2 = 0.5 x 0.1 + 0.2 = 0.25, v3 = 0.5 x 0.25 + 0.4 = 0.525
    np.testing.assert_allclose(moved, [0.1, 0.35, 0.875], rtol=1e-6)

    fed = strategy(tmp_path / "stopped", **settings)
    run_round(fed, 1, 0.1), run_round(fed, 2, 0.2)
    resumed = strategy(tmp_path / "stopped", **settings | {"resume_after_round": 2})
    config = resumed.run_config
    parameters, velocity = resume_parameters(config, backbone_fingerprint="f", names=resumed.parameter_names)
    resumed.latest_parameters, resumed.velocity = ndarrays_to_parameters(parameters), velocity
    assert run_round(resumed, 1, 0.4)[1][0] == pytest.approx(0.875)  # as if it had never stopped

    plain = strategy(tmp_path / "plain", **settings | {"server_momentum": 0.0})
    assert [run_round(plain, r, value)[1][0] for r, value in ((1, 0.1), (2, 0.2))] == pytest.approx([0.1, 0.3])


def test_the_statistics_round_starts_the_server_momentum_afresh(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=False, num_server_rounds=3, server_momentum=0.5, centering_share=0.0)
    fed.velocity = honest(1.0)  # as if earlier DP-SGD rounds had left momentum
    begin(fed, "hr", "it")
    statistics = [np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32), np.array([1.0, 1.0], np.float32), np.zeros(4, np.float32)]
    fed.aggregate_fit(1, [reply("hr", statistics, 1), reply("it", statistics, 1)], [])
    assert fed.velocity is None
    head = parameters_to_ndarrays(fed.latest_parameters)
    begin(fed, "hr", "it", flower_round=2)
    fed.aggregate_fit(2, [reply("hr", honest(0.1), 50), reply("it", honest(0.1), 50)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(fed.latest_parameters)[1], head[1] + 0.1, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.5, 0.9])  # the defaults: local noise, distributed noise (shared.schedule)
def test_one_rounds_aggregate_moves_the_model_by_at_most_one_over_one_minus_the_server_momentum_times_itself(
    tmp_path, momentum,
):
    fed = strategy(tmp_path, secagg=False, dp=False, head_init="zeros", num_server_rounds=80, server_momentum=momentum)
    for flower_round in range(1, 81):  # one round's aggregate of 0.1, then 79 rounds of nothing
        begin(fed, "hr", "it", flower_round=flower_round)
        value = 0.1 if flower_round == 1 else 0.0
        fed.aggregate_fit(flower_round, [reply("hr", honest(value), 50), reply("it", honest(value), 50)], [])
    moved = parameters_to_ndarrays(fed.latest_parameters)[1][0]
    bound = 0.1 / (1 - momentum)  # 0.1 x (1 + m + m^2 + ...): 2x at 0.5, 10x at 0.9
    assert 0.99 * bound < moved <= bound + 1e-6


def test_the_feature_mean_round_sets_the_centring_from_the_sum_and_nothing_else(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=True, num_server_rounds=3)
    assert begin(fed, "hr", "it") and fed.round.stage == protocol.STAGE_FEATURE_MEAN
    scale = fed.run_config.feature_mean_scale
    releases = {"hr": np.array([3.0, 0.0, 1.0, 4.0]), "it": np.array([1.0, 2.0, -1.0, 6.0])}
    # a department also sends values in the head's slots: the feature-mean round ignores them
    updates = {name: [np.full((2, 3), 5.0, np.float32), np.full(2, 5.0, np.float32), (r / scale).astype(np.float32)]
               for name, r in releases.items()}
    fed.aggregate_fit(1, [reply(name, update, 100) for name, update in updates.items()], [])
    head_weight, head_bias, centring = parameters_to_ndarrays(fed.latest_parameters)
    np.testing.assert_allclose(centring, releases["hr"] + releases["it"], rtol=1e-5)  # the sum: [4, 2, 0], 10 records
    assert not head_weight.any() and not head_bias.any() and fed.velocity is None
    assert begin(fed, "hr", "it", flower_round=2) and fed.round.stage == protocol.STAGE_STATISTICS
    assert begin(fed, "hr", "it", flower_round=3) and fed.round.stage == protocol.STAGE_DP_SGD


def test_a_department_cannot_move_the_centring_in_a_statistics_or_dp_sgd_round(tmp_path):
    fed = strategy(tmp_path, secagg=False, dp=False, num_server_rounds=3)
    centring = np.array([1.0, 0.0, 0.0, 2.0], np.float32)
    fed.latest_parameters = ndarrays_to_parameters([np.zeros((2, 3), np.float32), np.zeros(2, np.float32), centring])
    for flower_round in (2, 3):  # the statistics round, then a DP-SGD round, each with a hostile centring slot
        begin(fed, "hr", "it", flower_round=flower_round)
        hostile = honest(0.5)[:2] + [np.full(4, 7.0, np.float32)]
        fed.aggregate_fit(flower_round, [reply("hr", hostile, 1), reply("it", honest(0.5), 1)], [])
        np.testing.assert_array_equal(parameters_to_ndarrays(fed.latest_parameters)[2], centring)


@pytest.mark.parametrize(("rounds", "logit_scale"), [(1, 30.0), (2, 15.0)])
def test_stage_ones_head_is_calibrated_when_final_and_less_confident_when_dp_sgd_follows(tmp_path, rounds, logit_scale):
    fed = strategy(tmp_path, secagg=False, dp=False, num_server_rounds=rounds, centering_share=0.0,
                   ncm_logit_scale=30.0, stage_two_logit_scale=15.0)
    begin(fed, "hr", "it")
    statistics = [np.array([[3.0, 4.0, 0], [0, 0, 2.0]], np.float32), np.zeros(2, np.float32), np.zeros(4, np.float32)]
    fed.aggregate_fit(1, [reply("hr", statistics, 1), reply("it", statistics, 1)], [])
    weight = parameters_to_ndarrays(fed.latest_parameters)[0]
    np.testing.assert_allclose(weight, logit_scale * np.array([[0.6, 0.8, 0], [0, 0, 1.0]]), rtol=1e-6)
