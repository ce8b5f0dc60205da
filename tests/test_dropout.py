"""A department that cannot serve a round under SecAgg+ (its records became unreadable) answers a
named failure with weight 0: the round completes, its aggregate is exactly the other departments'
weighted average, and the failure the server records names the department but quotes none of its
records. Departments that really drop out (a host that dies) are tests/test_secagg_dropouts.py (every
stage, and below the reconstruction threshold) and tests/test_network_namespaces.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import RunConfig
from simulation.deploy.launcher import run_simulation
from simulation.local.prepare import DataPlan, partition_data, plan_federation, write_federation

pytestmark = pytest.mark.slow  # real Flower simulations: `python -m pytest -m slow`


def run_with_broken_departments(tmp_path, broken: int) -> tuple[dict, dict, list[str]]:
    out = tmp_path / "run"
    data = partition_data(DataPlan(data=None, test_data=None, partition="iid", departments=5, alpha=0.5, seed=0))
    federation = plan_federation(data, out_dir=out, val_fraction=0.1, test_fraction=0.1,
                                 delta=1e-5, dp=True, seed=0, policies={})
    write_federation(data, federation)
    names = [d.name for d in federation.departments]
    for department in federation.departments[-broken:]:
        (federation.partition_dir / department.file).write_text('{"text": "ok", "label": "vpn_access"}\n{broken\n')
    config = RunConfig(
        model="tiny", num_server_rounds=2, batch_size=32, labels=federation.labels, min_departments=5,
        out_dir=str(out), partition_dir=str(federation.partition_dir), audit_updates=True,
        secagg_max_weight=max(d.train_records for d in federation.departments), secagg_timeout_s=60.0,
    )
    status = run_simulation(run_config=config.to_run_config(), num_departments=5, run_dir=out, on_round=lambda _: None)
    return status, json.loads((out / "metrics.json").read_text()), names


def test_a_department_that_fails_mid_run_leaves_a_correct_aggregate_and_keeps_its_records_home(tmp_path):
    status, metrics, names = run_with_broken_departments(tmp_path, broken=1)
    assert status["state"] == "completed"
    out = tmp_path / "run"
    for entry in metrics["rounds"]:
        assert entry["secure_aggregation"] is True and entry["aggregate_check"] == "passed"
        assert any(f.startswith("department dept-5 failed: its records or its ledger cannot be used") for f in entry["failures"])
        assert not any("broken" in f or "dept-5.jsonl" in f for f in entry["failures"]), entry["failures"]
        survivors = [n for n in names if (out / "departments" / n / "audit" / f"round-{entry['round']:03d}.npz").exists()]
        assert survivors == names[:4]
        weights, deltas = [], []
        for name in survivors:
            with np.load(out / "departments" / name / "audit" / f"round-{entry['round']:03d}.npz") as saved:
                weights.append(int(saved["num_examples"]))
                deltas.append(saved["arr_0"])
        expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        with np.load(out / "audit" / f"aggregate-round-{entry['round']:03d}.npz") as aggregate:
            np.testing.assert_allclose(aggregate["arr_0"], expected, atol=2e-5)
