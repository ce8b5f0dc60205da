"""`fedpriv status --kit KIT`: which departments are connected to the SuperLink, and its runs.

Flower lists SuperNodes by node id and runs by run id; `fedpriv server start` keeps which id is
which department (``KIT/nodes.json``, from registering their keys), so the admin reads names.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server import run_folder
from shared.errors import DataError
from simulation.cli.console import console


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


RUNS_FILE = "runs.txt"  # the run folders `fedpriv run` started from this kit, one per line


def department_presence(kit: Path) -> dict[str, str]:
    """department (or node id) -> its SuperNode's status at the SuperLink of ``kit``."""
    from simulation.deploy.superlink import NODES_FILE

    names = json.loads((kit / NODES_FILE).read_text()) if (kit / NODES_FILE).is_file() else {}
    return {department: state for department, _, state, _ in node_rows(_flwr_json(kit, "supernode", "list"), names=names)}


def run_folder_rows(kit: Path) -> list[tuple[str, str, str, str]]:
    """(run folder, run id, state, round reached of planned) for every run started from ``kit``."""
    listed = (kit / RUNS_FILE).read_text().splitlines() if (kit / RUNS_FILE).is_file() else []
    rows = []
    for folder in dict.fromkeys(line.strip() for line in listed if line.strip()):
        run_dir = Path(folder)
        try:
            status = run_folder.read_status(run_dir)
            rounds = [entry["round"] for entry in run_folder.read_rounds(run_dir / run_folder.ROUNDS_FILE)]
            planned = tomllib.loads((run_dir / run_folder.RUN_CONFIG_FILE).read_text()).get("num-server-rounds", "?")
        except (OSError, ValueError, KeyError, DataError, tomllib.TOMLDecodeError):
            rows.append((folder, "-", "unreadable", "-"))
            continue
        rows.append((folder, str(status.get("run_id") or "-"), str(status.get("state")), f"{max(rounds, default=0)} of {planned}"))
    return rows


def _flwr_json(kit: Path, *args: str) -> dict[str, Any]:
    from shared.errors import ConfigError
    from simulation.deploy.processes import CONNECTION, environment, executable

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
    from shared.errors import ConfigError
    from simulation.deploy.superlink import NODES_FILE

    kit = kit.resolve()
    if not (kit / ".flwr" / "config.toml").is_file():
        raise ConfigError(f"{kit}: no SuperLink connection yet; run `fedpriv server start --kit {kit}` first")
    names = json.loads((kit / NODES_FILE).read_text()) if (kit / NODES_FILE).is_file() else {}
    departments = Table(title=f"Departments at the SuperLink of {kit}")
    for column in ("department", "node id", "status", "online since"):
        departments.add_column(column)
    for row in node_rows(_flwr_json(kit, "supernode", "list"), names=names):
        departments.add_row(*row)
    runs = Table(title="Runs at the SuperLink")
    for column in ("run id", "status", "submitted", "elapsed"):
        runs.add_column(column)
    for row in run_rows(_flwr_json(kit, "ls")):
        runs.add_row(*row)
    folders = Table(title=f"Runs started with `fedpriv run --kit {kit}`")
    for column in ("run folder", "run id", "state", "round"):
        folders.add_column(column)
    for row in run_folder_rows(kit):
        folders.add_row(*row)
    console.print(departments)
    console.print(runs)
    console.print(folders)
