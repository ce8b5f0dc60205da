"""RunConfig: one place that reads Flower's run config, validates everything, names every bad value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import DEFAULTS, RunConfig
from shared.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_defaults_are_the_dataclass_defaults():
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(app_config) == RunConfig()
    assert set(app_config) == set(RunConfig().to_run_config())


def test_round_trip_with_labels():
    config = RunConfig(labels=("a", "b,c", 'd"e'), lora_targets=("query", "key"), dp=False, target_epsilon=3.0)
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        RunConfig(target_epsilon=0, target_delta=1.5, batch_size=0, accountant="moments", learning_rate=-1,
                  server_momentum=1.0)
    message = str(info.value)
    for fragment in ("target-epsilon must be > 0 (got 0)", "target-delta must be in (0, 1) (got 1.5)",
                     "batch-size must be >= 1 (got 0)", "accountant must be one of", "learning-rate must be > 0",
                     "server-momentum must be in [0, 1) (got 1.0)"):
        assert fragment in message
    assert len(info.value.problems) == 6


def test_types_and_unknown_keys_from_run_config():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({"num-server-rounds": "three", "dp": "maybe", "colour": "red", "labels": "[1, 2]"})
    message = str(info.value)
    assert "'num-server-rounds': expected an integer" in message
    assert "'dp': expected true or false" in message
    assert "unknown setting 'colour'" in message
    assert "'labels': expected a JSON list of label names" in message


def test_label_fingerprint_depends_on_order():
    assert RunConfig(labels=("a", "b")).label_fingerprint != RunConfig(labels=("b", "a")).label_fingerprint


def test_rounds_left_out_add_dp_sgd_only_where_epsilon_leaves_room_for_it():
    from shared.schedule import STAGE_TWO_MIN_EPSILON, STAGE_TWO_ROUNDS, default_schedule

    def rounds(*, dp=True, distributed_noise=False, epsilon, head_init="class-statistics", centering_share=0.05):
        return default_schedule(dp=dp, distributed_noise=distributed_noise, epsilon=epsilon, head_init=head_init,
                                centering_share=centering_share)["num_server_rounds"]

    assert rounds(epsilon=STAGE_TWO_MIN_EPSILON) == 2 + STAGE_TWO_ROUNDS  # feature mean, class statistics, DP-SGD
    assert rounds(epsilon=3.0) == 2  # stage 1 alone
    assert rounds(dp=False, epsilon=1.0) == 2 + STAGE_TWO_ROUNDS
    assert rounds(epsilon=3.0, centering_share=0.0) == 1
    assert rounds(epsilon=1.0, head_init="zeros") == STAGE_TWO_ROUNDS
    assert rounds(distributed_noise=True, epsilon=STAGE_TWO_MIN_EPSILON) == 2 + STAGE_TWO_ROUNDS
    assert rounds(distributed_noise=True, epsilon=3.0) == 2


def left_out_options() -> dict:
    import inspect

    from simulation.cli.options import with_training_options

    def command(*, training: dict) -> None: ...

    return {name: parameter.default for name, parameter in inspect.signature(with_training_options(command)).parameters.items()}


def test_local_epochs_left_out_are_one_under_dp_and_more_without():
    from shared.schedule import NO_DP_LOCAL_EPOCHS
    from simulation.cli.options import training_settings

    left_out = left_out_options()
    assert training_settings(left_out)["local_epochs"] == 1
    assert training_settings({**left_out, "no_dp": True})["local_epochs"] == NO_DP_LOCAL_EPOCHS > 1
    assert training_settings({**left_out, "no_dp": True, "local_epochs": 3})["local_epochs"] == 3


def test_distributed_noise_left_out_schedule_takes_bigger_steps_and_named_options_win():
    from shared.schedule import DISTRIBUTED_LEARNING_RATE, DISTRIBUTED_SERVER_MOMENTUM
    from simulation.cli.options import training_settings

    left_out = left_out_options()
    local = training_settings(left_out)
    assert (local["learning_rate"], local["server_momentum"]) == (DEFAULTS.learning_rate, DEFAULTS.server_momentum)
    distributed = training_settings({**left_out, "distributed_noise": True})
    assert distributed["distributed_noise"] is True
    assert (distributed["learning_rate"], distributed["server_momentum"]) == (DISTRIBUTED_LEARNING_RATE, DISTRIBUTED_SERVER_MOMENTUM)
    named = training_settings({**left_out, "distributed_noise": True, "learning_rate": 1.0, "server_momentum": 0.0})
    assert (named["learning_rate"], named["server_momentum"]) == (1.0, 0.0)


def test_stage_one_needs_its_rounds_and_a_centring_share_below_one():
    with pytest.raises(ConfigError) as raised:
        RunConfig(num_server_rounds=1, centering_share=1.0)
    message = str(raised.value)
    assert "num-server-rounds must be >= 2 (got 1)" in message and "centering-share must be in [0, 1)" in message
    assert RunConfig(num_server_rounds=1, centering_share=0.0).statistics_round == 1
    centred = RunConfig(num_server_rounds=4)
    assert (centred.centering_round, centred.statistics_round, centred.dp_sgd_rounds) == (1, 2, 2)
    assert RunConfig(head_init="zeros", num_server_rounds=1).centering_round == 0


def test_distributed_noise_in_simulation_is_calibrated_for_the_smallest_aggregate_secagg_unmasks():
    from simulation.local.simulate import consenting_policies

    names = [f"d{i}" for i in range(10)]
    default = consenting_policies({}, departments=names, reconstruction_threshold=DEFAULTS.secagg_reconstruction_threshold)
    assert {p["min-departments"] for p in default.values()} == {6} and all(p["distributed-noise"] for p in default.values())
    strict = consenting_policies({"d0": {"min-departments": 10}}, departments=names, reconstruction_threshold=0.9)
    assert strict["d0"]["min-departments"] == 10 and strict["d1"]["min-departments"] == 9
    assert consenting_policies({}, departments=names[:2], reconstruction_threshold=0.6)["d0"]["min-departments"] == 2
    for threshold in (0.5, float("nan"), 1.5):
        with pytest.raises(ConfigError, match="secagg-reconstruction-threshold must be in"):
            RunConfig(secagg_reconstruction_threshold=threshold)
