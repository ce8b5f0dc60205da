"""SecAgg+ in simulation: the server's aggregate is FedAvg of the departments' updates, and what
the server receives from any one department is masked beyond recognition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # real Flower simulations: `python -m pytest -m slow`

FEDPRIV = str(Path(sys.executable).parent / "fedpriv")
DEPARTMENTS = 5


@pytest.fixture(scope="module", params=[0, 3], ids=["full-mesh", "2-neighbours"])
def secure_run(tmp_path_factory, request) -> Path:
    out = tmp_path_factory.mktemp("secagg") / "run"
    result = subprocess.run(
        [FEDPRIV, "simulate", "--model", "tiny", "--partition", "iid", "--departments", str(DEPARTMENTS),
         "--rounds", "3", "--batch-size", "32", "--audit-updates", "--secagg-num-shares", str(request.param),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def department_updates(out: Path, server_round: int) -> dict[str, tuple[list[np.ndarray], int]]:
    updates = {}
    for folder in sorted((out / "departments").iterdir()):
        with np.load(folder / "audit" / f"round-{server_round:03d}.npz") as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
            updates[folder.name] = (arrays, int(saved["num_examples"]))
    return updates


def load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.mark.parametrize("server_round", [1, 2, 3])  # the feature mean, the class statistics, a DP-SGD round
def test_secure_aggregate_equals_fedavg_of_the_same_updates(secure_run, server_round):
    updates = department_updates(secure_run, server_round)
    assert len(updates) == DEPARTMENTS
    total = sum(n for _, n in updates.values())
    count = len(next(iter(updates.values()))[0])
    expected = [sum(arrays[i] * n for arrays, n in updates.values()) / total for i in range(count)]
    aggregate = load_arrays(secure_run / "audit" / f"aggregate-round-{server_round:03d}.npz")
    assert max(float(np.abs(want).max()) for want in expected) > 1e-3  # the updates are not trivially zero
    for got, want in zip(aggregate, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)  # SecAgg+ quantization error only


@pytest.mark.parametrize("server_round", [1, 2, 3])
def test_server_never_holds_an_individual_update(secure_run, server_round):
    updates = department_updates(secure_run, server_round)
    for name, (arrays, _) in updates.items():
        update = np.concatenate([a.ravel() for a in arrays])
        masked = np.concatenate([a.ravel() for a in load_arrays(secure_run / "audit" / f"masked-round-{server_round:03d}-{name}.npz")])
        assert masked.shape[0] >= update.shape[0]  # SecAgg+ adds its weight factor in front
        received = masked[-update.shape[0]:].astype(np.float64)
        correlation = np.corrcoef(received, update)[0, 1]
        assert abs(correlation) < 0.25, (name, correlation)  # ~N(0, 1/sqrt(n)) for n = 132 values
        # Masked values are spread over the whole modulus, not around the update's scale.
        assert received.std() > 1e8


def test_every_round_records_secure_aggregation(secure_run):
    metrics = json.loads((secure_run / "metrics.json").read_text())
    assert metrics["secure_aggregation"] is True and metrics["config"]["secagg-num-shares"] in (0, 3)
    for entry in metrics["rounds"]:
        assert entry["secure_aggregation"] is True and entry["secagg_out_of_range"] == 0 and not entry["failures"]
