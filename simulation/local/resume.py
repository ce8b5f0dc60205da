"""Which round a stopped run continues after, and with which settings: read from its run folder.

A run folder holds ``run_config.toml`` (every setting the run was started with, written before
Flower starts), ``rounds.jsonl`` (one line per completed round) and a checkpoint per aggregated
round. A resume keeps the settings and the ``run-uid`` (so every department keeps its noise plan
and its ledger) and sets ``resume-after-round`` to the last completed round.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from server import run_folder
from server.run_folder import ROUNDS_FILE, RUN_CONFIG_FILE, read_rounds
from shared.config import RunConfig
from shared.errors import ConfigError


def read_run_config(run_dir: Path) -> RunConfig:
    """The settings a run folder's run was started with."""
    run_dir = run_dir.expanduser().resolve()
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a fedpriv run folder (no {RUN_CONFIG_FILE})")
    try:
        config = RunConfig.from_run_config(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if Path(config.out_dir).resolve() != run_dir:
        raise ConfigError(f"{path}: written for run folder {config.out_dir}, not {run_dir}")
    return config


def resume_config(run_dir: Path) -> RunConfig:
    run_dir = run_dir.expanduser().resolve()
    config = read_run_config(run_dir)
    completed = [r["round"] for r in read_rounds(run_dir / ROUNDS_FILE)]
    last = max(completed, default=0)
    if last >= config.num_server_rounds:
        raise ConfigError(f"{run_dir}: all {config.num_server_rounds} rounds are complete; nothing to resume")
    if not config.run_uid:
        raise ConfigError(f"{run_dir / RUN_CONFIG_FILE}: the run has no run-uid, so departments could not continue its noise plan")
    run_folder.write_status(run_dir, state=run_folder.RESUMING, message=f"after round {last}")
    return dataclasses.replace(config, resume_after_round=last)
