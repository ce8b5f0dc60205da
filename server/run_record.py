"""What the central admin reads after (and during) a run: the run folder.

    <out-dir>/
      status.json          running | completed | failed, with the reason
      rounds.jsonl         one line per finished round (the live progress feed)
      metrics.json         final_accuracy, rounds, privacy: department -> {epsilon, delta, ...}
      checkpoints/         round-NNN.safetensors: global trainable parameters after each round
      model/               the exported model (shared.export)
      accuracy_epsilon.png accuracy and each department's epsilon per round
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from shared.config import RunConfig

STATUS_FILE = "status.json"
ROUNDS_FILE = "rounds.jsonl"
METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy_epsilon.png"


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
        self.privacy: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ROUNDS_FILE).write_text("")
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
        out_of_range = [v.get("secagg_out_of_range") for v in departments.values()]
        entry["secagg_out_of_range"] = sum(v for v in out_of_range if v) if self.config.secagg else None
        for name, values in departments.items():
            entry["departments"].setdefault(name, {}).update(values)
            if values.get("epsilon") is not None or not values.get("dp", True):
                ledger = self.privacy.setdefault(name, {"rounds_trained": 0})
                ledger.update({k: values.get(k) for k in ("epsilon", "delta", "target_epsilon", "dp", "status")})
                if values.get("status") == "trained":
                    ledger["rounds_trained"] += 1

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
            "final_accuracy": last.get("accuracy"),
            "final_accuracy_source": last.get("accuracy_source"),
            "dp": self.config.dp,
            "secure_aggregation": self.config.secagg,
            "initial": self.rounds.get(0),
            "rounds": finished,
            "privacy": self.privacy,
            "wall_time_s": round(time.time() - self.started, 2),
            "config": self.config.to_run_config(),
        }
        write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def finish(self, *, state: str, message: str = "") -> dict[str, Any]:
        metrics = self._write_metrics(state=state)
        self.set_status(state, message)
        if metrics["rounds"]:
            from server.plots import plot_run

            plot_run(metrics, self.out_dir / PLOT_FILE)
        return metrics
