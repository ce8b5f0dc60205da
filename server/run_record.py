"""Writing a run folder while the ServerApp runs (``RunRecorder``); its layout is ``server.run_folder``.

A resumed run (``resume-after-round`` > 0) reads the rounds it continues from back from
rounds.jsonl and appends to it; the ledgers folder is only ever appended to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from server import run_folder
from server.run_folder import (
    AUDIT_DIR,
    CHECKPOINTS_DIR,
    LEDGERS_DIR,
    METRICS_FILE,
    MOMENTUM_PREFIX,
    ROUNDS_FILE,
    json_line,
    ledger_copy_path,
    read_ledger_copy,
    read_rounds,
)
from shared import protocol
from shared.checkpoint import save_checkpoint
from shared.config import RunConfig
from shared.errors import DataError


class RunRecorder:
    def __init__(self, out_dir: Path, *, config: RunConfig, run_id: int) -> None:
        self.out_dir = out_dir
        self.config = config
        self.run_id = run_id
        self.rounds: dict[int, dict[str, Any]] = {}
        self.started = time.time()
        self.ended_early = ""
        # with audit-updates: what the server held of each round (masked replies, unmasked aggregates)
        self.audit_dir = out_dir / AUDIT_DIR if config.audit_updates else None
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.audit_dir is not None:
            self.audit_dir.mkdir(exist_ok=True)
        (out_dir / LEDGERS_DIR).mkdir(exist_ok=True)
        feed = out_dir / ROUNDS_FILE
        if config.resume_after_round:
            self.rounds = {r["round"]: r for r in read_rounds(feed) if r["round"] <= config.resume_after_round}
            missing = set(range(1, config.resume_after_round + 1)) - set(self.rounds)
            if missing:
                raise DataError(f"{feed}: cannot resume after round {config.resume_after_round}: rounds "
                                f"{sorted(missing)} are not in the round feed")
        feed.write_text("".join(json_line(r) for _, r in sorted(self.rounds.items()) if r["round"] > 0))
        run_folder.write_status(out_dir, state=run_folder.RUNNING, run_id=run_id)

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

    def record_aggregate(self, server_round: int, average: list[np.ndarray]) -> None:
        """With ``audit-updates``: the aggregate the server unmasked, for the audit beside each department's reply."""
        if self.audit_dir is not None:
            np.savez(self.audit_dir / f"aggregate-round-{server_round:03d}.npz", *average)

    def record_model(
        self, server_round: int, arrays: dict[str, np.ndarray], *, velocity: dict[str, np.ndarray] | None,
        backbone_fingerprint: str,
    ) -> None:
        """The global trainable parameters after a round, and the server's momentum (keys under
        ``MOMENTUM_PREFIX``): the checkpoint a resumed run starts from."""
        momentum = {MOMENTUM_PREFIX + name: v for name, v in (velocity or {}).items()}
        save_checkpoint(
            self.out_dir / CHECKPOINTS_DIR / f"round-{server_round:03d}.safetensors", arrays | momentum,
            {"round": server_round, "run_id": self.run_id, "label_fingerprint": self.config.label_fingerprint,
             "backbone_fingerprint": backbone_fingerprint},
        )

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
            feed.write(json_line(entry))
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
            "centering_round": self.config.centering_round or None,
            "statistics_round": self.config.statistics_round or None,
            "initial": self.rounds.get(0),
            "rounds": finished,
            "privacy": privacy_summary(finished),
            "wall_time_s": round(time.time() - self.started, 2),
            "config": self.config.to_run_config(),
        }
        run_folder.write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def finish(self, *, state: str, message: str = "") -> dict[str, Any]:
        """The final metrics and status; the caller then writes the report (``server.report``)."""
        metrics = self._write_metrics(state=state)
        run_folder.write_status(self.out_dir, state=state, message=message, run_id=self.run_id)
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
            if values.get("status") == protocol.STATUS_TRAINED:
                ledger["rounds_trained"] += 1
                ledger["last_trained_round"] = entry["round"]
    return summary
