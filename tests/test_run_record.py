"""The run folder: metrics, the server's ledger copies, the report and `fedpriv ledger`, resume bookkeeping."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from server.ledger_view import ledger_rows
from server.report import write_report
from server.run_folder import ledger_copy_path, read_ledger_copy
from server.run_record import RunRecorder
from shared.accounting import epsilon_of
from shared.config import RunConfig
from shared.errors import DataError


def ledger_line(index, epsilon=None, sigma=1.2, q=0.1, steps=10, round_=None):
    history = [(sigma, q, steps)] * index
    eps = epsilon if epsilon is not None else epsilon_of(history, delta=1e-5, accountant="rdp")
    return json.dumps({"index": index, "run": "r", "round": round_ or index, "noise_multiplier": sigma,
                       "sample_rate": q, "steps": steps, "accountant": "rdp", "delta": 1e-5, "epsilon": eps,
                       "budget": 3.0, "time": 0.0})


def two_rounds(tmp_path, config=None):
    recorder = RunRecorder(tmp_path, config=config or RunConfig(num_server_rounds=3), run_id=5)
    for server_round, accuracy in ((1, 0.5), (2, 0.7)):
        recorder.record_fit(server_round, departments={
            "hr": {"status": "trained", "epsilon": json.loads(ledger_line(server_round))["epsilon"], "delta": 1e-5,
                   "budget": 3.0, "dp": True,
                   "ledger_entry": ledger_line(server_round)},
            "it": {"status": "budget-exhausted", "epsilon": 1.0, "delta": 1e-5, "budget": 1.0, "dp": True,
                   "reason": "one more round would spend 1.3 > its budget 1.0"},
        }, train_loss=1.0 / server_round)
        recorder.record_evaluation(server_round, loss=1.0, accuracy=accuracy, source="federated validation")
        recorder.flush_round(server_round)
    return recorder


def test_final_accuracy_prefers_the_server_test_split_then_federated_test(tmp_path):
    recorder = two_rounds(tmp_path)
    metrics = recorder.finish(state="completed")
    assert metrics["final_accuracy"] == 0.7 and metrics["final_accuracy_source"] == "federated validation"
    assert metrics["privacy"]["hr"] == {"rounds_trained": 2, "last_trained_round": 2,
                                        "epsilon": json.loads(ledger_line(2))["epsilon"],
                                        "delta": 1e-5, "budget": 3.0, "dp": True, "status": "trained", "reason": None}
    assert metrics["privacy"]["it"]["status"] == "budget-exhausted" and metrics["privacy"]["it"]["rounds_trained"] == 0
    assert [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "completed"
    write_report(tmp_path)
    assert (tmp_path / "accuracy_epsilon.png").exists()

    recorder.record_evaluation(2, loss=0.4, accuracy=0.9, source="server test split")
    recorder.record_evaluation(2, loss=0.9, accuracy=0.7, source="federated test")
    assert recorder.finish(state="completed")["final_accuracy_source"] == "server test split"


def test_server_keeps_a_copy_of_each_ledger_once_per_line_and_checks_it(tmp_path):
    recorder = two_rounds(tmp_path)
    # a resumed run asks again for a round the server had received but not completed: the department re-sends
    recorder.record_fit(2, departments={"hr": {"status": "trained", "ledger_entry": ledger_line(2)}}, train_loss=0.5)
    copy = read_ledger_copy(ledger_copy_path(tmp_path, "hr"))
    assert [line["index"] for line in copy] == [1, 2]  # a replayed line is not copied twice
    recorder.finish(state="completed")
    rows = {row.department: row for row in ledger_rows(tmp_path)}
    assert rows["hr"].check == "agrees" and rows["hr"].rounds_trained == 2
    assert rows["hr"].epsilon == pytest.approx(copy[-1]["epsilon"])
    assert rows["it"].status == "budget exhausted" and rows["it"].budget == 1.0

    ledger_copy_path(tmp_path, "hr").write_text(ledger_line(1) + "\n" + ledger_line(2, epsilon=0.01) + "\n")
    assert next(r for r in ledger_rows(tmp_path) if r.department == "hr").check.startswith("MISMATCH")


def test_the_admin_sees_both_guarantees_of_a_distributed_noise_ledger_and_a_forged_own_epsilon(tmp_path):
    import math

    from simulation.cli.admin import ledger_table

    sigma, shares = 1.2, 4
    own = epsilon_of([(sigma / math.sqrt(shares), 0.1, 10)] * 2, delta=1e-5, accountant="rdp")
    lines = [json.loads(ledger_line(i, sigma=sigma)) | {"noise_shares": shares, "own_epsilon": None} for i in (1, 2)]
    lines[-1]["own_epsilon"] = own
    recorder = RunRecorder(tmp_path, config=RunConfig(num_server_rounds=3), run_id=5)
    for line in lines:
        recorder.record_fit(line["round"], departments={"hr": {
            "status": "trained", "epsilon": line["epsilon"], "delta": 1e-5, "budget": 3.0, "dp": True,
            "ledger_entry": json.dumps(line)}}, train_loss=1.0)
        recorder.flush_round(line["round"])
    recorder.finish(state="completed")
    row = ledger_rows(tmp_path)[0]
    assert row.check == "agrees" and row.own_epsilon == pytest.approx(own) and own > 2 * row.epsilon
    assert "own epsilon" in [column.header for column in ledger_table(tmp_path).columns]
    write_report(tmp_path)
    assert "own epsilon" in (tmp_path / "report.html").read_text()

    lines[-1]["own_epsilon"] = row.epsilon  # a department that claims its share protects as much as the sum
    ledger_copy_path(tmp_path, "hr").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert ledger_rows(tmp_path)[0].check.startswith("MISMATCH: own epsilon")


def test_a_ledger_without_distributed_noise_shows_one_guarantee(tmp_path):
    from simulation.cli.admin import ledger_table

    two_rounds(tmp_path).finish(state="completed")
    assert "own epsilon" not in [column.header for column in ledger_table(tmp_path).columns]


def test_report_has_a_row_per_department_and_the_protections(tmp_path):
    two_rounds(tmp_path).finish(state="completed")
    write_report(tmp_path)
    report = (tmp_path / "report.html").read_text()
    assert "<td>hr</td>" in report and "<td>it</td>" in report
    assert "budget exhausted" in report and "on (Flower SecAgg+, every department with every other)" in report and "<svg" in report
    assert "n/a: in-process simulation" in report and "No audit was run" in report
    verdict = report.split("<div class='verdict'>", 1)[1].split("</div>", 1)[0]  # first thing after the title
    assert "<b>completed</b>: final accuracy <b>0.7000</b> (federated validation)" in verdict
    assert "<span class='badge on'>differential privacy: on</span>" in verdict
    assert "<span class='badge na'>TLS: n/a</span>" in verdict
    assert "<span class='badge spent'>it: epsilon 1.00 of 1 (spent)</span>" in verdict  # exhausted: red
    hr_epsilon = json.loads(ledger_line(2))["epsilon"]
    state = "near" if hr_epsilon >= 0.9 * 3.0 else "within"
    assert f"<span class='badge {state}'>hr: epsilon {hr_epsilon:.2f} of 3 ({state})</span>" in verdict
    assert "<tr><th></th><th></th></tr>" not in report and "n/a:</td>" not in report  # no empty header, no "n/a:" cells
    assert report.count('id="epsilon-') == 2 and report.count('id="spent-') == 2  # a line and a bar per department


def test_budget_states_colour_the_verdict():
    from server.ledger_view import LedgerRow, budget_state

    def row(epsilon, budget=8.0, status="active"):
        return LedgerRow("d", epsilon, budget, 1e-5, 1, status, "agrees")

    assert [budget_state(row(e)) for e in (3.0, 7.3, 7.995, 8.0)] == ["within", "near", "spent", "spent"]
    assert budget_state(row(2.0, status="budget exhausted")) == "spent"
    assert budget_state(row(2.0, status="refused by policy: require-secagg")) == "refused"
    assert budget_state(row(None, None, "no DP")) == "no DP"


def test_a_resumed_recorder_keeps_the_completed_rounds(tmp_path):
    two_rounds(tmp_path).finish(state="failed", message="interrupted")
    resumed = RunRecorder(tmp_path, config=dataclasses.replace(RunConfig(num_server_rounds=3), resume_after_round=2),
                          run_id=6)
    assert sorted(resumed.rounds) == [1, 2]
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2
    with pytest.raises(DataError, match=r"rounds \[3\] are not in the round feed"):
        RunRecorder(tmp_path, config=dataclasses.replace(RunConfig(num_server_rounds=4), resume_after_round=3),
                    run_id=7)


@pytest.mark.parametrize(("lines", "finding"), [
    ([1, 3], "lines missing before ledger lines [3]"),
    ([1, 2, 2], "repeat"),
    ([1], "last reported epsilon"),  # the copy lost its last line: the department reported more spending
])
def test_the_ledger_view_finds_dropped_and_repeated_lines(tmp_path, lines, finding):
    two_rounds(tmp_path).finish(state="completed")
    ledger_copy_path(tmp_path, "hr").write_text("".join(ledger_line(i) + "\n" for i in lines))
    check = next(r for r in ledger_rows(tmp_path) if r.department == "hr").check
    assert check.startswith("MISMATCH") and finding in check


def test_a_broken_line_in_the_servers_copy_is_named_not_a_traceback(tmp_path):
    two_rounds(tmp_path).finish(state="completed")
    ledger_copy_path(tmp_path, "hr").write_text(ledger_line(1) + "\n{broken\n")
    with pytest.raises(DataError, match=r"hr.jsonl:2: not a ledger line"):
        ledger_rows(tmp_path)


def test_a_resumed_run_starts_from_the_initial_model_only_when_no_earlier_round_changed_it():
    from types import SimpleNamespace

    from server.federation import resumes_a_trained_model
    from shared.config import RunConfig

    config = RunConfig(num_server_rounds=4, resume_after_round=2)
    halted = {1: {"round": 1, "aggregate_check": None}, 2: {"round": 2, "aggregate_check": "rejected"}}
    assert not resumes_a_trained_model(config, SimpleNamespace(rounds=halted))
    trained = {**halted, 2: {"round": 2, "aggregate_check": "passed"}}
    assert resumes_a_trained_model(config, SimpleNamespace(rounds=trained))
    later = {**halted, 3: {"round": 3, "aggregate_check": "passed"}}  # after the resume point: not used
    assert not resumes_a_trained_model(config, SimpleNamespace(rounds=later))


def test_every_decline_is_a_named_failure_of_its_round(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from shared import protocol
    from tests.rounds import begin
    from tests.test_hostile_participants import honest, strategy

    def declined(name, status, reason):
        metrics = {protocol.DEPARTMENT: name, protocol.STATUS: status, protocol.REASON: reason}
        return SimpleNamespace(cid=name), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(honest(0.0)), 0, metrics)

    fed = strategy(tmp_path, secagg=False, dp=True, head_init="zeros", num_server_rounds=2)
    begin(fed, "hr", "it")
    parameters, _ = fed.aggregate_fit(1, [
        declined("hr", protocol.STATUS_BUDGET_EXHAUSTED, "one more round would spend epsilon 8.2 > its budget 8.0"),
        declined("it", protocol.STATUS_POLICY_REFUSED, "require-secagg: this round runs without SecAgg+"),
    ], [])
    assert parameters is None
    failures = fed.recorder.rounds[1]["failures"]
    assert "department hr declined (budget-exhausted): one more round would spend epsilon 8.2 > its budget 8.0" in failures
    assert "department it declined (policy-refused): require-secagg: this round runs without SecAgg+" in failures
