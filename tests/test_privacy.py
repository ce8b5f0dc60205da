"""The department's accountant and ledger: known values, calibration, persistence, enforcement."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.privacy import (
    PrivacyLedger,
    calibrate_noise,
    epsilon_of,
    poisson_schedule,
)
from shared.errors import BudgetExhausted, ConfigError, DataError


def test_rdp_epsilon_matches_opacus_reference_value():
    # opacus/tests/accountants_test.py: sigma=1.5, q=0.04, 90 epochs -> epsilon 7.32911117143 at delta=1e-5
    assert epsilon_of([(1.5, 0.04, int(90 / 0.04))], delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143)


def test_composition_over_rounds_equals_one_long_run():
    per_round = [(1.5, 0.04, 225)] * 10
    assert epsilon_of(per_round, delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143)


def test_calibration_matches_opacus_reference_and_never_exceeds():
    # opacus/tests/accountants_test.py: get_noise_multiplier(8, 1e-5, q=0.04, 90 epochs) -> 1.425307617;
    # both bisections stop anywhere within 0.01 of the target epsilon, so sigma agrees to ~1%.
    sigma = calibrate_noise(target_epsilon=8, delta=1e-5, sample_rate=0.04, steps=2250, prior=[], accountant="rdp")
    assert sigma == pytest.approx(1.425307617, rel=1e-2)
    assert 7.99 <= epsilon_of([(sigma, 0.04, 2250)], delta=1e-5, accountant="rdp") <= 8.0


def test_prv_accountant_is_tighter_than_rdp():
    history = [(1.0, 0.01, 1000)]
    assert epsilon_of(history, delta=1e-5, accountant="prv") < epsilon_of(history, delta=1e-5, accountant="rdp")


def test_poisson_schedule_matches_opacus_loader():
    assert poisson_schedule(num_records=1000, batch_size=256, local_epochs=2) == (0.25, 8)


def _plan(ledger, run="7", rounds=5, epsilon=4.0, budget=None):
    return ledger.plan(run=run, num_records=1000, batch_size=100, local_epochs=1, planned_rounds=rounds,
                       run_epsilon=epsilon, budget=budget or epsilon, delta=1e-5, accountant="rdp")


def _train_rounds(ledger, plan, rounds, run="7"):
    for r in range(1, rounds + 1):
        ledger.check_round(plan)
        ledger.record_round(run=run, server_round=r, plan=plan, steps=plan.steps_per_round)


def test_budget_is_met_at_the_end_and_the_next_round_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="hr")
    plan = _plan(ledger)
    _train_rounds(ledger, plan, 5)
    assert 3.99 <= ledger.entries[-1].epsilon <= 4.0
    with pytest.raises(BudgetExhausted, match="department hr"):
        ledger.check_round(plan)


def test_ledger_survives_a_restart_and_keeps_the_run_plan(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="it")
    plan = _plan(ledger)
    _train_rounds(ledger, plan, 2)
    restarted = PrivacyLedger(tmp_path, department="it")
    assert restarted.entries == ledger.entries
    assert _plan(restarted) == plan  # same noise multiplier for the rest of the run
    assert restarted.spent(delta=1e-5, accountant="rdp") == pytest.approx(ledger.entries[-1].epsilon)


def test_a_second_run_composes_with_the_first(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="it")
    first = _plan(ledger, run="1", epsilon=4.0)
    _train_rounds(ledger, first, 5, run="1")
    second = _plan(ledger, run="2", epsilon=6.0)
    _train_rounds(ledger, second, 5, run="2")
    # The second run is calibrated against the whole history: the total lands on the new budget.
    assert 5.99 <= ledger.entries[-1].epsilon <= 6.0
    alone = epsilon_of([second.round_mechanism] * 5, delta=1e-5, accountant="rdp")
    assert alone > 2.0  # composition is sub-additive, but the second run alone is not "free"
    with pytest.raises(BudgetExhausted):
        _plan(ledger, run="3", epsilon=6.0)


def test_bad_budgets_are_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="finance")
    with pytest.raises(ConfigError, match="1/records = 1/1000"):
        ledger.plan(run="1", num_records=1000, batch_size=100, local_epochs=1, planned_rounds=1,
                    run_epsilon=1.0, budget=1.0, delta=0.01, accountant="rdp")
    with pytest.raises(ConfigError, match="budget epsilon must be > 0"):
        _plan(ledger, epsilon=1.0, budget=-1.0)


def test_corrupt_ledger_is_refused_with_its_line(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="hr")
    _train_rounds(ledger, _plan(ledger), 2)
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"privacy-ledger.jsonl:2: corrupt"):
        PrivacyLedger(tmp_path, department="hr")
    entry = json.loads(lines[1])
    entry["epsilon"] = 0.0
    ledger.path.write_text(lines[0] + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(DataError, match="epsilon goes down"):
        PrivacyLedger(tmp_path, department="hr")


def test_a_missing_or_edited_ledger_line_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="hr")
    _train_rounds(ledger, _plan(ledger), 3)
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text(lines[0] + "\n" + lines[2] + "\n")
    with pytest.raises(DataError, match=r"privacy-ledger.jsonl:2: entry 2 is missing \(this line is entry 3\)"):
        PrivacyLedger(tmp_path, department="hr")
    cheaper = json.loads(lines[1]) | {"noise_multiplier": 50.0}  # "it was a much noisier round"
    ledger.path.write_text("\n".join([lines[0], json.dumps(cheaper), lines[2]]) + "\n")
    with pytest.raises(DataError, match="does not follow from the recorded rounds"):
        PrivacyLedger(tmp_path, department="hr")


def test_a_department_with_a_small_budget_trains_every_round_with_more_noise(tmp_path):
    ledger = PrivacyLedger(tmp_path / "legal", department="legal")
    plan = _plan(ledger, rounds=10, epsilon=8.0, budget=3.0)
    at_run_epsilon = _plan(PrivacyLedger(tmp_path / "other", department="other"), rounds=10, epsilon=8.0)
    assert plan.noise_multiplier > at_run_epsilon.noise_multiplier
    _train_rounds(ledger, plan, 10)
    assert 3.0 - 0.01 <= ledger.entries[-1].epsilon <= 3.0  # its own budget, met and never crossed


def test_a_budget_lowered_mid_run_stops_the_department_after_the_last_round_that_fits(tmp_path):
    ledger = PrivacyLedger(tmp_path, department="legal")
    plan = _plan(ledger, rounds=10, epsilon=8.0)
    _train_rounds(ledger, plan, 2)
    lowered = _plan(ledger, rounds=10, epsilon=8.0, budget=6.0)  # the run's noise stays; the limit is new
    assert lowered.noise_multiplier == plan.noise_multiplier
    # Independently: the number of rounds of this mechanism whose composition stays within 6.0.
    expected = max(k for k in range(1, 11) if epsilon_of([plan.round_mechanism] * k, delta=1e-5, accountant="rdp") <= 6.0)
    assert 2 < expected < 10
    trained = 2
    for r in range(3, 11):
        try:
            ledger.check_round(lowered)
        except BudgetExhausted as exhausted:
            assert "department legal" in str(exhausted) and "its budget 6.0" in str(exhausted)
            break
        ledger.record_round(run="7", server_round=r, plan=lowered, steps=lowered.steps_per_round)
        trained += 1
    assert trained == expected and ledger.entries[-1].epsilon <= 6.0


@settings(max_examples=12, deadline=None)
@given(
    epsilon=st.floats(min_value=0.5, max_value=10.0),
    budget_share=st.floats(min_value=0.05, max_value=1.5),
    records=st.integers(min_value=200, max_value=5000),
    batch=st.integers(min_value=8, max_value=256),
    rounds=st.integers(min_value=1, max_value=20),
    epochs=st.integers(min_value=1, max_value=3),
    accountant=st.sampled_from(["rdp", "prv"]),
)
def test_no_department_ever_ends_above_its_budget(
    tmp_path_factory, epsilon, budget_share, records, batch, rounds, epochs, accountant
):
    state = tmp_path_factory.mktemp("ledger")
    ledger = PrivacyLedger(state, department="d")
    budget = min(epsilon * budget_share, epsilon)  # the department's own budget, at most the run's
    plan = ledger.plan(run="1", num_records=records, batch_size=min(batch, records), local_epochs=epochs,
                       planned_rounds=rounds, run_epsilon=epsilon, budget=budget, delta=1e-5, accountant=accountant)
    trained = 0
    for r in range(1, rounds + 3):
        try:
            ledger.check_round(plan)
        except BudgetExhausted:
            break
        ledger.record_round(run="1", server_round=r, plan=plan, steps=plan.steps_per_round)
        trained += 1
    final = ledger.entries[-1].epsilon if ledger.entries else 0.0
    assert final <= budget  # however many rounds a server asks for
    assert trained >= rounds  # every planned round runs ...
    assert ledger.entries[rounds - 1].epsilon >= budget - 0.02  # ... and spends the budget, not wasted
    # (the calibration lands within 0.01 below the budget, so a tiny extra round may still fit; the check stops the next)
    reread = PrivacyLedger(state, department="d")  # what a restarted department finds on disk costs the same
    assert len(reread.entries) == trained and reread.spent(delta=1e-5, accountant=accountant) == pytest.approx(final)
