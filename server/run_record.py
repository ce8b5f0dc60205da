"""What the central admin reads after (and during) a run: the run folder.

    <out-dir>/
      status.json          running | completed | failed, with the reason
      rounds.jsonl         one line per finished round (the live progress feed)
      metrics.json         final_accuracy, rounds, privacy: department -> {epsilon, budget, delta, ...}
      ledgers/NAME.jsonl   the server's copy of each department's privacy ledger lines, as reported
      checkpoints/         round-NNN.safetensors: global trainable parameters after each round
      model/               the exported model (shared.export)
      accuracy_epsilon.png accuracy and each department's epsilon per round
      report.html          the admin report (server.report), self-contained

A resumed run (``resume-after-round`` > 0) reads the rounds it continues from back from
rounds.jsonl and appends to it; the ledgers folder is only ever appended to.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.data import safe_name
from shared.errors import DataError

STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.jsonl"
METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy_epsilon.png"
LEDGERS_DIR = "ledgers"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2))
    tmp.replace(path)


class RunRecorder:
    def __init__(self, out_dir: Path, *, config: RunConfig, run_id: int) -> None:
        self.out_dir = out_dir
        self.config = config
        self.run_id = run_id
        self.rounds: dict[int, dict[str, Any]] = {}
        self.started = time.time()
        self.ended_early = ""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LEDGERS_DIR).mkdir(exist_ok=True)
        feed = out_dir / ROUNDS_FILE
        if config.resume_after_round:
            self.rounds = {r["round"]: r for r in read_rounds(feed) if r["round"] <= config.resume_after_round}
            missing = set(range(1, config.resume_after_round + 1)) - set(self.rounds)
            if missing:
                raise DataError(f"{feed}: cannot resume after round {config.resume_after_round}: rounds "
                                f"{sorted(missing)} are not in the round feed")
        feed.write_text("".join(json.dumps(_clean(r)) + "\n" for _, r in sorted(self.rounds.items()) if r["round"] > 0))
        self.set_status("running")

    def set_status(self, state: str, message: str = "") -> None:
        write_json(self.out_dir / STATUS_FILE, {"state": state, "message": message, "run_id": self.run_id})

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round, "departments": {}, "failures": []})

    def record_failures(self, server_round: int, notes: list[str]) -> None:
        self._round(server_round)["failures"].extend(notes)

    def record_fit(
        self, server_round: int, *, departments: dict[str, dict[str, Any]], train_loss: float | None
    ) -> None:
        entry = self._round(server_round)
        entry["train_loss"] = train_loss
        entry["secure_aggregation"] = self.config.secagg
        entry["transport"] = self.config.transport
        out_of_range = [v.get("secagg_out_of_range") for v in departments.values()]
        entry["secagg_out_of_range"] = sum(v for v in out_of_range if v) if self.config.secagg else None
        for name, values in departments.items():
            lines = values.pop("ledger_entry", None)
            for line in str(lines or "").splitlines():
                self._copy_ledger_line(name, line)
            entry["departments"].setdefault(name, {}).update(values)

    def _copy_ledger_line(self, department: str, line: str) -> None:
        """Append a department's reported ledger line to the server's copy, once per ledger index."""
        path = ledger_copy_path(self.out_dir, department)
        try:
            index = int(json.loads(line)["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            self.record_failures(max(self.rounds), [f"department {department} reported an unreadable ledger line"])
            return
        known = read_ledger_copy(path)
        if known and index <= known[-1]["index"]:
            return  # a replayed round: the department re-sent a line the server already holds
        with path.open("a") as copy:
            copy.write(line.strip() + "\n")

    def record_aggregate_check(self, server_round: int, *, passed: bool) -> None:
        """Whether the round's aggregate passed the server's checks (finite, within range)."""
        self._round(server_round)["aggregate_check"] = "passed" if passed else "rejected"

    def record_evaluation(
        self, server_round: int, *, loss: float, accuracy: float, source: str,
        departments: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        entry = self._round(server_round)
        entry.setdefault("evaluation", {})[source] = {"loss": loss, "accuracy": accuracy}
        # The headline number of a round: the server's test split when there is one.
        if source == "server test split" or "server test split" not in entry["evaluation"]:
            entry["accuracy"], entry["loss"], entry["accuracy_source"] = accuracy, loss, source
        for name, values in (departments or {}).items():
            entry["departments"].setdefault(name, {}).update(values)

    def flush_round(self, server_round: int) -> None:
        entry = self._round(server_round)
        entry["elapsed_s"] = round(time.time() - self.started, 2)
        with (self.out_dir / ROUNDS_FILE).open("a") as feed:
            feed.write(json.dumps(_clean(entry)) + "\n")
        self._write_metrics(state="running")

    def _write_metrics(self, *, state: str) -> dict[str, Any]:
        finished = [self.rounds[r] for r in sorted(self.rounds) if r > 0]
        evaluated = [r for r in finished if r.get("accuracy") is not None]
        last = evaluated[-1] if evaluated else {}
        metrics = {
            "run_id": self.run_id,
            "status": state,
            "ended_early": self.ended_early or None,
            "final_accuracy": last.get("accuracy"),
            "final_accuracy_source": last.get("accuracy_source"),
            "dp": self.config.dp,
            "secure_aggregation": self.config.secagg,
            "transport": self.config.transport,
            "statistics_round": self.config.statistics_round or None,
            "initial": self.rounds.get(0),
            "rounds": finished,
            "privacy": privacy_summary(finished),
            "wall_time_s": round(time.time() - self.started, 2),
            "config": self.config.to_run_config(),
        }
        write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def finish(self, *, state: str, message: str = "") -> dict[str, Any]:
        metrics = self._write_metrics(state=state)
        self.set_status(state, message)
        if metrics["rounds"]:
            from server.ledger_view import ledger_rows
            from server.plots import plot_run
            from server.report import write_report

            plot_run(metrics, self.out_dir / PLOT_FILE, ledger=ledger_rows(self.out_dir))
            write_report(self.out_dir)
        return metrics


def privacy_summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per department, from the rounds in order: latest epsilon, budget, delta, status, rounds trained."""
    summary: dict[str, dict[str, Any]] = {}
    for entry in rounds:
        for name, values in entry.get("departments", {}).items():
            if "status" not in values:
                continue  # evaluated but never asked to train
            ledger = summary.setdefault(name, {"rounds_trained": 0, "last_trained_round": None})
            for key in ("epsilon", "delta", "budget", "dp", "status", "reason"):
                if values.get(key) is not None or key == "reason":
                    ledger[key] = values.get(key)
            if values.get("status") == "trained":
                ledger["rounds_trained"] += 1
                ledger["last_trained_round"] = entry["round"]
    return summary


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


LEDGER_LINE_KEYS = ("index", "noise_multiplier", "sample_rate", "steps", "accountant", "delta", "epsilon")


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
