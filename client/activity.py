"""One line per round a department serves, in its own state folder, for the person watching it.

`fedpriv department start` shows these lines instead of Flower's raw logs (which go to
``KIT/logs/supernode.log``): what the department did in each round, what it spent, of what budget.
The file is the department's own (0600, like everything in its state folder); it never leaves it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from shared import protocol

ACTIVITY_FILE = "activity.log"
STAGE_WORDS = {protocol.STAGE_FEATURE_MEAN: "feature mean", protocol.STAGE_STATISTICS: "class statistics"}


def activity_line(*, department: str, run: str, server_round: int, stage: str, metrics: dict[str, Any], records: int | None) -> str:
    status = str(metrics.get(protocol.STATUS, "?"))
    what = "released" if status == protocol.STATUS_TRAINED and stage in STAGE_WORDS else (
        "trained" if status == protocol.STATUS_TRAINED else status.replace("-", " "))
    parts = [f"{time.strftime('%H:%M:%S')} {department}: {what} round {server_round} ({STAGE_WORDS.get(stage, 'DP-SGD')}, run {run})"]
    if metrics.get(protocol.EPSILON) is not None:
        budget = metrics.get(protocol.BUDGET)
        parts.append(f"epsilon {float(metrics[protocol.EPSILON]):.2f}" + (f" of {float(budget):g}" if budget is not None else ""))
    elif metrics.get(protocol.DP_ENABLED) is False:
        parts.append("NO DP")
    if records is not None:
        parts.append(f"{records:,} records")
    if metrics.get(protocol.REASON):
        parts.append(str(metrics[protocol.REASON]))
    return ", ".join(parts)


def record_activity(state_dir: Path, line: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / ACTIVITY_FILE).open("a", encoding="utf-8") as out:
        out.write(line + "\n")
