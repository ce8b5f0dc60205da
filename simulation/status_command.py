"""`fedpriv status --kit KIT`: which departments are connected to the SuperLink, and its runs.

Flower lists SuperNodes by node id and runs by run id; `fedpriv server start` keeps which id is
which department (``KIT/nodes.json``, from registering their keys), so the admin reads names.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from simulation.console import console


def node_rows(nodes: dict[str, Any], *, names: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(department, node id, status, online since) for every node `flwr supernode list --format json` lists."""
    by_id = {node_id: name for name, node_id in names.items()}
    rows = [(by_id.get(str(n.get("node-id")), "(unknown key)"), str(n.get("node-id")), str(n.get("status")),
             str(n.get("online-at"))) for n in nodes.get("nodes", [])]
    return sorted(rows)


def run_rows(runs: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(run id, status, pending since, elapsed) for every run `flwr ls --format json` lists."""
    return [(str(r.get("run-id")), str(r.get("status")), str(r.get("pending-at")), str(r.get("elapsed")))
            for r in runs.get("runs", [])]


def _flwr_json(kit: Path, *args: str) -> dict[str, Any]:
    from shared.errors import ConfigError
    from shared.flower_env import CONNECTION, environment, executable

    result = subprocess.run([executable("flwr"), *args, CONNECTION, "--format", "json"],
                            env=environment(kit / ".flwr"), capture_output=True, text=True, timeout=60)
    try:
        answer = json.loads(result.stdout)
    except json.JSONDecodeError:
        answer = {}
    if result.returncode != 0 or not answer.get("success", False):
        raise ConfigError(f"the SuperLink of {kit} did not answer `flwr {' '.join(args)}`: is `fedpriv server start "
                          f"--kit {kit}` running? ({(result.stdout + result.stderr).strip()[-300:]})")
    return answer


def status(
    kit: Annotated[Path, typer.Option(help="The server kit (its SuperLink started by `fedpriv server start`).")],
) -> None:
    """The departments the SuperLink knows (online or not) and its runs."""
    from server.deployment import NODES_FILE
    from shared.errors import ConfigError

    kit = kit.resolve()
    if not (kit / ".flwr" / "config.toml").is_file():
        raise ConfigError(f"{kit}: no SuperLink connection yet; run `fedpriv server start --kit {kit}` first")
    names = json.loads((kit / NODES_FILE).read_text()) if (kit / NODES_FILE).is_file() else {}
    departments = Table(title=f"Departments at the SuperLink of {kit}")
    for column in ("department", "node id", "status", "online since"):
        departments.add_column(column)
    for row in node_rows(_flwr_json(kit, "supernode", "list"), names=names):
        departments.add_row(*row)
    runs = Table(title="Runs")
    for column in ("run id", "status", "submitted", "elapsed"):
        runs.add_column(column)
    for row in run_rows(_flwr_json(kit, "ls")):
        runs.add_row(*row)
    console.print(departments)
    console.print(runs)
