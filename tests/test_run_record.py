"""The run folder's metrics: what the admin reads, including where the final accuracy comes from."""

from __future__ import annotations

import json

from server.run_record import RunRecorder
from shared.config import RunConfig


def test_final_accuracy_prefers_the_server_test_split_then_federated_test(tmp_path):
    recorder = RunRecorder(tmp_path, config=RunConfig(num_server_rounds=2), run_id=5)
    recorder.record_fit(1, departments={"hr": {"status": "trained", "epsilon": 1.5, "delta": 1e-5,
                                               "target_epsilon": 3.0, "dp": True}}, train_loss=1.0)
    recorder.record_evaluation(1, loss=1.2, accuracy=0.5, source="federated validation")
    recorder.flush_round(1)
    recorder.record_fit(2, departments={"hr": {"status": "trained", "epsilon": 3.0, "delta": 1e-5,
                                               "target_epsilon": 3.0, "dp": True}}, train_loss=0.8)
    recorder.record_evaluation(2, loss=0.9, accuracy=0.7, source="federated test")
    recorder.flush_round(2)
    metrics = recorder.finish(state="completed")
    assert metrics["final_accuracy"] == 0.7 and metrics["final_accuracy_source"] == "federated test"
    assert metrics["privacy"]["hr"] == {"rounds_trained": 2, "epsilon": 3.0, "delta": 1e-5, "target_epsilon": 3.0,
                                        "dp": True, "status": "trained"}
    assert [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "completed"
    assert (tmp_path / "accuracy_epsilon.png").exists()

    recorder.record_evaluation(2, loss=0.4, accuracy=0.9, source="server test split")
    recorder.record_evaluation(2, loss=0.9, accuracy=0.7, source="federated test")
    assert recorder.finish(state="completed")["final_accuracy_source"] == "server test split"
