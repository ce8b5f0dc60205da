"""End to end through the real `fedpriv` command: Flower's simulation engine, DP clients, the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.local.clinc150 import default_location, is_clinc150_dir

FEDPRIV = str(Path(sys.executable).parent / "fedpriv")
TOPICS = {
    "password": "reset my password for the {} account",
    "vpn": "the vpn will not connect from {} today",
    "expense": "reimburse my {} taxi and hotel expenses",
    "room": "book a meeting room on the {} floor",
}
WORDS = ["email", "crm", "home", "office", "london", "berlin", "second", "third", "north", "south", "wiki", "erp"]


def write_federation(tmp_path: Path) -> tuple[Path, Path]:
    rows = ["text,label,department"]
    for department in ("it", "hr", "finance"):
        for label, template in TOPICS.items():
            rows += [f"{template.format(w)} {i},{label},{department}" for i, w in enumerate(WORDS * 2)]
    data = tmp_path / "federation.csv"
    data.write_text("\n".join(rows) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "".join(f"{t.format(w)},{label}\n" for label, t in TOPICS.items() for w in WORDS))
    return data, test


def fedpriv(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([FEDPRIV, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.mark.slow
def test_simulate_tiny_three_departments_stage_one_then_a_dp_sgd_round(tmp_path):
    data, test = write_federation(tmp_path)
    out = tmp_path / "run"
    result = fedpriv("simulate", "--data", str(data), "--test-data", str(test), "--model", "tiny", "--rounds", "3",
                     "--batch-size", "16", "--learning-rate", "2.0", "--epsilon", "8", "--delta", "1e-3",
                     "--lora-r", "4", "--lora-layers", "1",  # stage 2: LoRA in the top layer, on cached states
                     "--no-secagg", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round   3/3" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["dp"] is True
    assert metrics["secure_aggregation"] is False and not any(r["secure_aggregation"] for r in metrics["rounds"])
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert set(metrics["privacy"]) == {"it", "hr", "finance"}
    for ledger in metrics["privacy"].values():
        assert 0 < ledger["epsilon"] <= 8.0 and ledger["delta"] == 1e-3 and ledger["rounds_trained"] == 3
    initial_loss = metrics["initial"]["loss"]
    losses = [r["loss"] for r in metrics["rounds"]]
    assert losses[-1] < initial_loss, (initial_loss, losses)
    assert metrics["final_accuracy_source"] == "server test split"
    assert 0 <= metrics["final_accuracy"] <= 1
    for department in ("it", "hr", "finance"):
        ledger_lines = (out / "departments" / department / "privacy-ledger.jsonl").read_text().splitlines()
        # round 1: the feature mean; round 2: the class-statistics release (counts, then sums); round 3: DP-SGD
        assert [json.loads(line)["mechanism"] for line in ledger_lines] == ["feature-mean", "class-counts", "class-sums",
                                                                            "dp-sgd"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"round-00{r}.safetensors" for r in (1, 2, 3)]
    assert (out / "accuracy_epsilon.png").stat().st_size > 1000

    prediction = fedpriv("predict", "--model", str(out / "model"), "--threshold", "0",  # the nearest label, however unsure
                         "reset my password for the wiki account")
    assert prediction.returncode == 0 and prediction.stdout.split()[0] in TOPICS


@pytest.mark.slow
def test_distributed_noise_through_secagg_stage_one_then_one_step_dp_sgd_rounds(tmp_path):
    data, test = write_federation(tmp_path)
    out = tmp_path / "run"
    result = fedpriv("simulate", "--data", str(data), "--test-data", str(test), "--model", "tiny", "--rounds", "4",
                     "--batch-size", "16", "--epsilon", "8", "--delta", "1e-3", "--distributed-noise", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and all(r["secure_aggregation"] for r in metrics["rounds"])
    for department in ("it", "hr", "finance"):
        lines = [json.loads(line) for line in (out / "departments" / department / "privacy-ledger.jsonl").read_text().splitlines()]
        dp_sgd = [line for line in lines if line["mechanism"] == "dp-sgd"]
        assert len(dp_sgd) == 2 and all(line["steps"] == 1 for line in dp_sgd)  # rounds 3 and 4: one step each
        # 3 departments: simulation trusts the smallest aggregate SecAgg+ unmasks, 2 (its reconstruction threshold)
        assert all(line["noise_shares"] == 2 for line in lines)
        assert lines[-1]["epsilon"] <= 8.0 < lines[-1]["own_epsilon"]


@pytest.mark.slow
def test_default_demo_with_minilm(tmp_path):
    """The README's main command: the built-in synthetic demo on the packaged MiniLM."""
    out = tmp_path / "demo"
    result = fedpriv("simulate", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_accuracy"] > 0.8
    assert all(0 < p["epsilon"] <= 8.0 for p in metrics["privacy"].values())


@pytest.mark.slow
@pytest.mark.skipif(not is_clinc150_dir(default_location()), reason="CLINC150 not found beside the checkout")
def test_clinc150_by_domain_runs_and_learns(tmp_path):
    out = tmp_path / "clinc"
    result = fedpriv("simulate", "--data", str(default_location()), "--rounds", "3", "--out", str(out), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["privacy"]) == 10
    assert metrics["final_accuracy_source"] == "server test split" and metrics["final_accuracy"] > 0.3


def _final_privacy(run: Path) -> dict:
    return {name: (p["epsilon"], p["rounds_trained"], p["status"])
            for name, p in json.loads((run / "metrics.json").read_text())["privacy"].items()}


@pytest.mark.slow
def test_budgets_ledger_report_audit_and_resume_through_the_cli(tmp_path):
    args = ["simulate", "--model", "tiny", "--rounds", "4", "--budget", "finance=5", "--no-secagg"]
    whole = tmp_path / "whole"
    result = fedpriv(*args, "--out", str(whole))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedding done (cached)" in result.stdout  # the records are embedded in view, before the engine starts
    privacy = _final_privacy(whole)
    # finance's own budget (5) is below the run's 8: it takes part in every round, its noise calibrated to 5
    assert privacy["finance"][1] == 4 and 4.95 <= privacy["finance"][0] <= 5.0
    assert all(p[1] == 4 and 7.9 <= p[0] <= 8.0 for name, p in privacy.items() if name != "finance")
    report = (whole / "report.html").read_text()
    assert all(f"<td>{name}</td>" in report for name in privacy)
    manifest = json.loads((whole / "federation" / "manifest.json").read_text())
    scopes = {d["name"]: d["policy"]["label-scope"].split(",") for d in manifest["departments"]}
    assert set(scopes) == set(privacy) and all(len(labels) == 4 for labels in scopes.values())  # the demo's own

    ledger = fedpriv("ledger", str(whole))
    assert ledger.returncode == 0 and "budget" in ledger.stdout
    assert ledger.stdout.count("agrees") == 4  # the server's copy recomputes to every department's epsilon

    audit = fedpriv("audit", str(whole), "--canaries", "400")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    result_json = json.loads((whole / "audit.json").read_text())
    stages = result_json["canary_audit"]["stages"]  # stage 1 and three DP-SGD rounds, each audited
    assert [s["stage"] for s in stages] == ["class-statistics", "dp-sgd"]
    assert all(s["canaries"] == 400 and s["epsilon_lower_bound"] <= s["claimed_epsilon"] <= 8.0 for s in stages)
    assert 0 <= result_json["auc"] <= 1 and result_json["members"] > result_json["non_members"] > 0
    assert result_json["empirical_epsilon"] <= result_json["claimed_epsilon"] and not result_json["violation"]
    assert "TPR at 1% FPR" in (whole / "report.html").read_text()

    # The same run stopped after its second round (SIGTERM, as a CI timeout or an admin would), then resumed.
    stopped = tmp_path / "stopped"
    process = subprocess.Popen([FEDPRIV, *args, "--out", str(stopped)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ))
    feed = stopped / "rounds.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if feed.exists() and len(feed.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    completed_before = len(feed.read_text().splitlines())
    assert completed_before < 4, "the run finished before it could be stopped"
    refused = fedpriv("simulate", "--resume", str(stopped), "--rounds", "9")
    assert refused.returncode == 1 and "keeps its own settings; drop --rounds" in refused.stderr
    resumed = fedpriv("simulate", "--resume", str(stopped))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"continuing after round {completed_before}" in resumed.stdout
    assert [r["round"] for r in json.loads((stopped / "metrics.json").read_text())["rounds"]] == [1, 2, 3, 4]
    for name, (epsilon, rounds, status) in _final_privacy(stopped).items():
        assert epsilon == pytest.approx(privacy[name][0], rel=1e-9) and (rounds, status) == privacy[name][1:]
        lines = (stopped / "departments" / name / "privacy-ledger.jsonl").read_text().splitlines()
        assert len(lines) == privacy[name][1]  # never reset, never paid twice
