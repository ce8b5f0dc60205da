"""The canary audit of a deployed run: what each department found on its own host, gathered.

In deployment the records never leave the departments, so nobody but a department can audit its
releases: each runs `fedpriv department audit --kit KIT --data DATA --run-config RUN/run_config.toml`
on its host (``simulation.audit.canary``), which writes ``KIT/state/canary-audit.json``: bounds,
counts and claims, no records. The central admin copies those files into
``RUN/department-audits/<department>.json``; `fedpriv audit RUN` then reads them all, checks each,
and reports every department's bound against its claim. A bound above its claim is a privacy bug
(each department's bound holds at its own stated confidence).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shared.errors import DataError

DEPARTMENT_AUDITS = "department-audits"
STAGE_KEYS = ("stage", "audited", "canaries", "guesses", "correct_guesses", "epsilon_lower_bound", "confidence",
              "claimed_epsilon", "violation")


def gathered_canary_audit(run_dir: Path) -> dict[str, Any]:
    """Every department's own canary audit of ``run_dir``'s run, checked; one problem list for all files."""
    folder = run_dir / DEPARTMENT_AUDITS
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(
            f"{run_dir}: a deployed run, and no department audits in {folder}. Its records never left the departments, "
            "so each audits itself on its own host: `fedpriv department audit --kit KIT --data DATA --run-config "
            f"{run_dir / 'run_config.toml'}`, then copy its KIT/state/canary-audit.json to {folder}/<department>.json")
    stages, problems = [], []
    for path in files:
        try:
            audit = json.loads(path.read_text())
            found = audit["stages"]
            if not isinstance(found, list) or not found:
                raise ValueError("no audited stage")
            for stage in found:
                missing = [k for k in STAGE_KEYS if k not in stage]
                if missing:
                    raise ValueError(f"a stage lacks {', '.join(missing)}")
                bound, claim = stage["epsilon_lower_bound"], stage["claimed_epsilon"]
                if not math.isfinite(float(bound)) or (claim is not None and not math.isfinite(float(claim))):
                    raise ValueError("a bound or claim that is not a finite number")
                stages.append({**stage, "department": path.stem,
                               "violation": bool(claim is not None and float(bound) > float(claim))})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}: not a department's canary audit ({exc})")
    if problems:
        raise DataError("; ".join(problems))
    return {"stages": stages, "departments": [p.stem for p in files], "confidence": min(s["confidence"] for s in stages),
            "violation": any(s["violation"] for s in stages), "source": "each department on its own host"}
