"""The canary audit of the stage-1 release: it sees an exact release leak, it stays below the claim
of a correct release, and it catches a release that adds less noise than its ledger charges."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import client.class_statistics as class_statistics
import simulation.audit.canary as canary_audit
from shared.config import RunConfig
from simulation.audit.one_run import bound_from_scores

LABELS = tuple(f"label-{i}" for i in range(6))


def department_records(count: int = 300, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(count, dim, generator=generator)
    targets = torch.randint(0, len(LABELS), (count,), generator=generator)
    return features / features.norm(dim=1, keepdim=True), targets


def audited(config: RunConfig, *, canaries: int = 360, scope: list[int] | None = None, seed: int = 0):
    features, targets = department_records()
    scores, included, claimed = canary_audit.audit_department_release(
        features, targets, config=config, budget=config.target_epsilon, delta=config.target_delta,
        scope_rows=scope, canaries=canaries, rng=np.random.default_rng(seed))
    return bound_from_scores(scores, included, threshold=0.5, delta=config.target_delta, confidence=0.95), claimed


def test_an_exact_release_gives_away_every_canary():
    bound, claimed = audited(RunConfig(model="tiny", labels=LABELS, dp=False, num_server_rounds=1, centering_share=0.0))
    assert claimed is None and bound.correct == bound.guesses == 360 and bound.epsilon > 3.5


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
@pytest.mark.parametrize("scope", [None, [0, 1, 2]])
def test_a_correct_release_stays_below_its_claim(epsilon, scope):
    config = RunConfig(model="tiny", labels=LABELS, target_epsilon=epsilon, num_server_rounds=1, centering_share=0.0)
    for seed in range(3):
        bound, claimed = audited(config, scope=scope, seed=seed)
        assert claimed == pytest.approx(epsilon, rel=2e-3) and bound.epsilon <= claimed


def test_a_release_with_a_hundredth_of_its_noise_is_caught(monkeypatch):
    """The deliberately broken mechanism: the ledger charges for the plan's noise, the release adds 1%."""
    real = class_statistics.release_statistics

    def broken(*args, plan, **kwargs):
        weak = dataclasses.replace(plan, sums_sigma=plan.sums_sigma / 100, counts_sigma=plan.counts_sigma / 100)
        return real(*args, plan=weak, **kwargs)

    monkeypatch.setattr(canary_audit, "release_statistics", broken)
    bound, claimed = audited(RunConfig(model="tiny", labels=LABELS, target_epsilon=1.0, num_server_rounds=1, centering_share=0.0))
    assert bound.epsilon > claimed, (bound, claimed)


def test_canaries_go_to_the_departments_largest_labels_and_never_past_their_directions():
    targets = torch.tensor([0] * 5 + [2] * 9 + [3] * 1)
    rows = canary_audit.canary_rows(targets, num_labels=4, canaries=6, width=8, rows=None)
    assert sorted(set(rows)) == [0, 2, 3] and rows.count(2) == 2
    assert set(canary_audit.canary_rows(targets, num_labels=4, canaries=4, width=8, rows=[0, 3])) == {0, 3}
    with pytest.raises(ValueError, match="do not fit"):
        canary_audit.canary_rows(targets, num_labels=4, canaries=30, width=8, rows=None)


def audited_training(config: RunConfig, *, state: Path, canaries: int = 200, seed: int = 0):
    from client.department_data import DepartmentData, DepartmentSettings
    from client.site_policy import SitePolicy
    from shared.model import load_backbone
    from simulation.audit.canary_training import audit_department_training
    from simulation.local.demo_corpus import demo_records

    records = [r for r in demo_records() if r.department == "it"]
    settings = DepartmentSettings("it", Path("it.jsonl"), state,
                                  SitePolicy.from_mapping({}, department="it", run=config))
    scores, included, threshold, claimed = audit_department_training(
        backbone=load_backbone("tiny"), settings=settings, data=DepartmentData("it", records, [], []), config=config,
        canaries=canaries, rng=np.random.default_rng(seed))
    return bound_from_scores(scores, included, threshold=threshold, delta=config.target_delta, confidence=0.95), claimed


def training_config(**overrides) -> RunConfig:
    from simulation.local.demo_corpus import demo_records

    labels = tuple(sorted({r.label for r in demo_records()}))
    return RunConfig(model="tiny", labels=labels, num_server_rounds=4, batch_size=32, learning_rate=0.5, **overrides)


@pytest.mark.parametrize("lora", [(0, 0), (8, 1)], ids=["head", "lora-top-layer"])
def test_dp_sgd_rounds_without_noise_give_their_canaries_away(lora, tmp_path):
    bound, claimed = audited_training(training_config(dp=False, lora_r=lora[0], lora_layers=lora[1]), state=tmp_path)
    assert claimed is None and bound.epsilon > 2.0, bound


def test_dp_sgd_rounds_stay_below_their_claim_and_a_hundredth_of_the_noise_is_caught(monkeypatch, tmp_path):
    config = training_config(target_epsilon=1.0)
    bound, claimed = audited_training(config, state=tmp_path)
    assert 0 < claimed < 1.0 and bound.epsilon <= claimed  # the DP-SGD rounds' share of the run's epsilon

    import simulation.audit.canary_training as canary_training

    real = canary_training.train_private

    def broken(*, plan, **kwargs):  # the ledger records the plan's noise; Opacus gets 1% of it
        return real(plan=dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 100), **kwargs)

    monkeypatch.setattr(canary_training, "train_private", broken)
    bound, claimed = audited_training(config, state=tmp_path)
    assert bound.epsilon > claimed, (bound, claimed)


def test_a_deployed_department_audits_itself_without_touching_its_state(tmp_path):
    from typer.testing import CliRunner

    from shared.data import write_jsonl
    from simulation.cli.main import app
    from simulation.deploy.launcher import write_run_config
    from simulation.deploy.provisioning import provision
    from simulation.local.demo_corpus import demo_records

    kit = provision(tmp_path / "kits", departments=["it", "hr"], hosts=["127.0.0.1"], superlink="127.0.0.1:9093",
                    approved_fab_sha256="ab" * 32).department_kits["it"]
    write_jsonl([r for r in demo_records() if r.department == "it"], tmp_path / "it.jsonl")
    run_config = write_run_config(training_config(target_epsilon=2.0).to_run_config(), tmp_path / "run_config.toml")
    result = CliRunner().invoke(app, ["department", "audit", "--kit", str(kit), "--data", str(tmp_path / "it.jsonl"),
                                      "--run-config", str(run_config), "--canaries", "100", "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    import json

    stages = json.loads((tmp_path / "a.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["class-statistics", "dp-sgd"]
    assert all(s["canaries"] == 100 and s["epsilon_lower_bound"] <= s["claimed_epsilon"] <= 2.0 for s in stages)
    assert not (kit / "state").exists()  # its ledger and caches are the real run's, never the audit's

    missing = CliRunner().invoke(app, ["department", "audit", "--kit", str(kit), "--data", str(tmp_path / "it.jsonl"),
                                       "--run-config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "nope.toml" in missing.output and "Traceback" not in missing.output


def test_a_deployed_run_is_audited_from_what_its_departments_found_on_their_own_hosts(tmp_path):
    import json

    from typer.testing import CliRunner

    from server.run_folder import RUN_CONFIG_FILE
    from simulation.cli.main import app
    from simulation.deploy.gathered_audit import DEPARTMENT_AUDITS
    from simulation.deploy.launcher import write_run_config
    from tests.test_run_record import two_rounds

    config = RunConfig(labels=("a", "b"), out_dir=str(tmp_path), transport="tls+node-auth", num_server_rounds=3)
    two_rounds(tmp_path, config=config).finish(state="completed")
    write_run_config(config.to_run_config(), tmp_path / RUN_CONFIG_FILE)
    runner = CliRunner()
    missing = runner.invoke(app, ["audit", str(tmp_path)])
    assert missing.exit_code == 1 and "fedpriv department audit" in " ".join(missing.output.split())

    def stage(bound, claim):
        return {"stage": "class-statistics", "audited": "stage 1 release", "canaries": 1000, "guesses": 100,
                "correct_guesses": 90, "epsilon_lower_bound": bound, "confidence": 0.95, "claimed_epsilon": claim,
                "violation": False}

    audits = tmp_path / DEPARTMENT_AUDITS
    audits.mkdir()
    (audits / "hr.json").write_text(json.dumps({"stages": [stage(2.5, 6.4)], "violation": False}))
    (audits / "it.json").write_text(json.dumps({"stages": [stage(1.0, 6.4)], "violation": False}))
    passed = runner.invoke(app, ["audit", str(tmp_path)])
    assert passed.exit_code == 0, passed.output
    assert "department hr" in passed.output and "department it" in passed.output
    report = (tmp_path / "report.html").read_text()
    assert "department hr, on its own host" in report and "consistent with the claimed guarantee" in report

    (audits / "it.json").write_text(json.dumps({"stages": [stage(7.0, 6.4)], "violation": False}))  # it says no bug
    caught = runner.invoke(app, ["audit", str(tmp_path)])
    assert caught.exit_code == 2 and "privacy bug" in caught.output  # the bound is checked, not the file's word
    (audits / "it.json").write_text('{"stages": [{"stage": "x"}]}')
    broken = runner.invoke(app, ["audit", str(tmp_path)])
    assert broken.exit_code == 1 and "it.json: not a department's canary audit" in " ".join(broken.output.split())
