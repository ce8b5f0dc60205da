"""Deployment on loopback through the `fedpriv` commands: a TLS SuperLink with node authentication,
three department SuperNodes, two rounds of the tiny model; a second run stopped and resumed by
the deployed server; an unregistered node and a node with another CA are refused. Every process the test starts is stopped by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.data import write_jsonl
from simulation.local.demo_corpus import demo_records

pytestmark = pytest.mark.slow
FEDPRIV = str(Path(sys.executable).parent / "fedpriv")
DEPARTMENTS = ("finance", "hr", "it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fedpriv(*args, **kwargs):
    return subprocess.run([FEDPRIV, *args], capture_output=True, text=True, env=dict(os.environ), **kwargs)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_tls_authenticated_federation_and_refusals(tmp_path, processes):
    port = free_port()
    records = demo_records()
    for name in DEPARTMENTS:
        write_jsonl([r for r in records if r.department == name], tmp_path / f"{name}.jsonl")
    labels = sorted({r.label for r in records if r.department in DEPARTMENTS})
    (tmp_path / "labels.txt").write_text("\n".join(labels))
    kits = tmp_path / "kits"
    assert fedpriv("provision", "--out", str(kits), "--departments", ",".join(DEPARTMENTS),
                   "--superlink", f"127.0.0.1:{port}").returncode == 0

    log = (tmp_path / "server.out").open("w")
    processes.append(subprocess.Popen([FEDPRIV, "server", "start", "--kit", str(kits / "server"), "--port", str(port)],
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 90
    while "SuperLink up" not in (tmp_path / "server.out").read_text():
        assert processes[0].poll() is None and time.monotonic() < deadline, (tmp_path / "server.out").read_text()
        time.sleep(1)
    policy_kit = kits / DEPARTMENTS[0] / "department.toml"  # one department insists on SecAgg+ and 3 departments
    policy_kit.write_text(policy_kit.read_text() + "\n[policy]\nrequire-secagg = true\nmin-departments = 3\n")
    for name in DEPARTMENTS:
        processes.append(subprocess.Popen(
            [FEDPRIV, "department", "start", "--kit", str(kits / name), "--data", str(tmp_path / f"{name}.jsonl")],
            stdout=(tmp_path / f"{name}.out").open("w"), stderr=subprocess.STDOUT))

    run = fedpriv("run", "--kit", str(kits / "server"), "--labels-file", str(tmp_path / "labels.txt"),
                  "--min-departments", "3", "--rounds", "3", "--model", "tiny", "--batch-size", "32",
                  "--out", str(tmp_path / "run"), timeout=540)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["secure_aggregation"] is True
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert set(metrics["privacy"]) == set(DEPARTMENTS)
    assert all(0 < p["epsilon"] <= 8.0 and p["status"] == "trained" for p in metrics["privacy"].values())
    assert metrics["transport"] == "tls+node-auth"
    assert "on (gRPC over TLS)" in (tmp_path / "run" / "report.html").read_text()
    for name in DEPARTMENTS:  # each department's ledger lives in its own kit's state folder
        lines = [json.loads(line) for line in (kits / name / "state" / "privacy-ledger.jsonl").read_text().splitlines()]
        # stage 1 (the feature mean, then class statistics), then one DP-SGD round
        assert [e["mechanism"] for e in lines] == ["feature-mean", "class-counts", "class-sums", "dp-sgd"]
    # every reply was signed by its department's kit key and verified: no round was refused for its names
    assert not any("not signed" in f for r in metrics["rounds"] for f in r["failures"])
    for name in DEPARTMENTS:  # each department's terminal: one fedpriv line per round it served, not Flower's log
        deadline = time.monotonic() + 10
        while "trained round 3" not in (tmp_path / f"{name}.out").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        shown = (tmp_path / f"{name}.out").read_text()
        assert all(f"{name}: {what}" in shown for what in ("released round 1 (feature mean", "released round 2 (class statistics",
                                                         "trained round 3 (DP-SGD")), shown
        assert (kits / name / "logs" / "supernode.log").stat().st_size > 0
    status = fedpriv("status", "--kit", str(kits / "server"))  # the admin sees the departments by name
    assert status.returncode == 0, status.stdout + status.stderr
    for name in DEPARTMENTS:
        assert re.search(rf"{name}\s+│\s+\d+\s+│\s+online", status.stdout), status.stdout
        assert f"department {name}: online" in (tmp_path / "server.out").read_text()  # the server's terminal names it
    assert re.search(r"completed\s+│\s+3 of 3", status.stdout), status.stdout  # the run this kit started, and its round

    # A second run, stopped (SIGTERM) after its first round and resumed by the deployed server. Its
    # epsilon is 16: the departments already spent 8 on these records, and they compose both runs.
    second = tmp_path / "run2"
    process = subprocess.Popen(
        [FEDPRIV, "run", "--kit", str(kits / "server"), "--labels-file", str(tmp_path / "labels.txt"), "--min-departments",
         "3", "--rounds", "3", "--model", "tiny", "--batch-size", "32", "--epsilon", "16", "--out", str(second)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not ((second / "rounds.jsonl").exists() and (second / "rounds.jsonl").read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    completed_before = len((second / "rounds.jsonl").read_text().splitlines())
    assert completed_before < 3
    resumed = fedpriv("run", "--kit", str(kits / "server"), "--resume", str(second), timeout=540)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after round {completed_before}" in resumed.stdout
    metrics = json.loads((second / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for name in DEPARTMENTS:  # 4 + 4 mechanisms, none released (or paid for) twice, and within the new budget
        lines = [json.loads(line) for line in (kits / name / "state" / "privacy-ledger.jsonl").read_text().splitlines()]
        assert len(lines) == 8 and len({(e["run"], e["round"], e["mechanism"]) for e in lines}) == 8
        assert 8.0 < lines[-1]["epsilon"] <= 16.0

    # A kit from another provisioning: its key is unregistered, and (as is) its CA is wrong too.
    assert fedpriv("provision", "--out", str(tmp_path / "rogue"), "--departments", "finance",
                   "--superlink", f"127.0.0.1:{port}").returncode == 0
    wrong_ca = fedpriv("department", "start", "--kit", str(tmp_path / "rogue" / "finance"),
                       "--data", str(tmp_path / "finance.jsonl"), timeout=120)
    assert wrong_ca.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stdout + wrong_ca.stderr
    (tmp_path / "rogue" / "finance" / "ca.crt").write_bytes((kits / "server" / "ca.crt").read_bytes())
    unregistered = fedpriv("department", "start", "--kit", str(tmp_path / "rogue" / "finance"),
                           "--data", str(tmp_path / "finance.jsonl"), timeout=120)
    assert unregistered.returncode != 0 and "2004" in unregistered.stdout + unregistered.stderr
    assert "No SuperNode found with the given public key" in (kits / "server" / "logs" / "superlink.log").read_text()
