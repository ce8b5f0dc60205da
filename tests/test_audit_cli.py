"""`fedpriv audit --canaries` through the real CLI on tiny simulations: a run without DP visibly
leaks, a DP run stays below its claim and is left untouched, and a release that adds a hundredth
of the noise its ledger charges exits 2 with "privacy bug"."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import client.class_statistics as class_statistics
import simulation.audit.canary as canary_audit
from simulation.cli.main import app

pytestmark = pytest.mark.slow
FEDPRIV = str(Path(sys.executable).parent / "fedpriv")
UNCHANGED_BY_AN_AUDIT = {"audit.json", "report.html"}


def simulate(out: Path, *extra: str) -> None:
    done = subprocess.run([FEDPRIV, "simulate", "--model", "tiny", "--rounds", "2", "--no-secagg", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in UNCHANGED_BY_AN_AUDIT}


def test_the_canary_audit_sees_a_leak_bounds_a_private_run_and_catches_a_broken_release(tmp_path, monkeypatch):
    exact, private = tmp_path / "no-dp", tmp_path / "eps-1"
    simulate(exact, "--no-dp")
    simulate(private, "--epsilon", "1")

    leaked = subprocess.run([FEDPRIV, "audit", str(exact), "--canaries", "400"], capture_output=True, text=True,
                            env=dict(os.environ))
    assert leaked.returncode == 0, leaked.stdout + leaked.stderr
    [result] = json.loads((exact / "audit.json").read_text())["canary_audit"]["stages"]  # stage 1 only (feature mean, class statistics)
    assert result["claimed_epsilon"] is None and result["correct_guesses"] == result["guesses"] == 400
    assert result["epsilon_lower_bound"] >= 2.0

    before = digests(private)
    bounded = subprocess.run([FEDPRIV, "audit", str(private), "--canaries", "400"], capture_output=True, text=True,
                             env=dict(os.environ))
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr
    result = json.loads((private / "audit.json").read_text())
    [stage] = result["canary_audit"]["stages"]
    assert stage["epsilon_lower_bound"] <= stage["claimed_epsilon"] <= 1.0 + 1e-3
    assert not result["violation"] and "canary audit" in (private / "report.html").read_text()
    assert digests(private) == before  # the audit's canaries never reach the run's model, ledgers or checkpoints

    real = class_statistics.release_statistics

    def broken(*args, plan, **kwargs):  # the ledger charges for the plan's noise; the release adds 1% of it
        weak = dataclasses.replace(plan, sums_sigma=plan.sums_sigma / 100, counts_sigma=plan.counts_sigma / 100)
        return real(*args, plan=weak, **kwargs)

    monkeypatch.setattr(canary_audit, "release_statistics", broken)
    caught = CliRunner().invoke(app, ["audit", str(private), "--canaries", "400"])
    assert caught.exit_code == 2, caught.output
    assert "privacy bug" in caught.output
    assert json.loads((private / "audit.json").read_text())["violation"] is True
    assert "a privacy bug" in (private / "report.html").read_text()


def test_more_canaries_than_the_releases_hold_are_refused_by_name(tmp_path):
    run = tmp_path / "run"
    simulate(run)
    refused = subprocess.run([FEDPRIV, "audit", str(run), "--canaries", "5000"], capture_output=True, text=True,
                             env=dict(os.environ))
    assert refused.returncode == 1 and "--canaries 5000" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr and not (run / "audit.json").exists()
