"""A run folder's layout, and the readers and writers every part of fedpriv shares for it.

    <out-dir>/
      run_config.toml      every setting of the run, as submitted (a resume reads it back)
      status.json          running | completed | failed | stopped | resuming, with the reason
      rounds.jsonl         one line per finished round (the live progress feed)
      metrics.json         final_accuracy, rounds, privacy: department -> {epsilon, budget, delta, ...}
      ledgers/NAME.jsonl   the server's copy of each department's privacy ledger lines, as reported
      checkpoints/         round-NNN.safetensors: global trainable parameters after each round
      audit/               with audit-updates: each masked reply and each aggregate as the server held them
      model/               the exported model (shared.export)
      accuracy_epsilon.png accuracy and each department's epsilon per round
      report.html          the admin report (server.report), self-contained

This module imports nothing from ``server``: the recorder (``server.run_record``) writes the
folder during a run; the ledger view, plots and report read it afterwards; the CLI reads and
(for status.json, through ``write_status`` only) writes it around a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shared.data import safe_name
from shared.errors import DataError

RUN_CONFIG_FILE = "run_config.toml"
STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.jsonl"
METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy_epsilon.png"
REPORT_FILE = "report.html"
LEDGERS_DIR = "ledgers"
CHECKPOINTS_DIR = "checkpoints"
MOMENTUM_PREFIX = "server-momentum/"  # a checkpoint's keys for the server's momentum, beside the parameters
AUDIT_DIR = "audit"
LEDGER_LINE_KEYS = ("index", "noise_multiplier", "sample_rate", "steps", "accountant", "delta", "epsilon")

# status.json's states: the ServerApp writes the first three, the CLI the last two
RUNNING, COMPLETED, FAILED, STOPPED, RESUMING = "running", "completed", "failed", "stopped", "resuming"
FINISHED_STATES = (COMPLETED, FAILED)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def json_line(payload: Any) -> str:
    return json.dumps(_clean(payload)) + "\n"


def write_json(path: Path, payload: Any) -> None:
    """Write atomically: a reader polling the file never sees half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2))
    tmp.replace(path)


def write_status(run_dir: Path, *, state: str, message: str = "", run_id: int | None = None) -> None:
    """The one writer of status.json."""
    write_json(run_dir / STATUS_FILE, {"state": state, "message": message, "run_id": run_id})


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json, or {} where there is none yet or it cannot be read (a run that never started)."""
    path = run_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: not a fedpriv run folder (no {METRICS_FILE})")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: not a metrics object")
    return metrics


def read_rounds(feed: Path) -> list[dict[str, Any]]:
    if not feed.exists():
        return []
    rounds = []
    for number, line in enumerate(feed.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{feed}:{number}: not a JSON round entry") from None
    return rounds


def ledger_copy_path(out_dir: Path, department: str) -> Path:
    return out_dir / LEDGERS_DIR / f"{safe_name(department)}.jsonl"


def read_ledger_copy(path: Path) -> list[dict[str, Any]]:
    """The server's copy of one department's ledger lines; a line that cannot be one is refused by number."""
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a ledger line ({exc.msg})") from None
        missing = [key for key in LEDGER_LINE_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise DataError(f"{path}:{number}: ledger line lacks {', '.join(missing)}")
        lines.append(entry)
    return lines


def ledger_indexes(out_dir: Path) -> dict[str, int]:
    """The last ledger index the server holds per department (by file name): the departments' anchor."""
    folder = out_dir / LEDGERS_DIR
    indexes = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        copy = read_ledger_copy(path)
        if copy:
            indexes[path.stem] = int(copy[-1]["index"])
    return indexes
