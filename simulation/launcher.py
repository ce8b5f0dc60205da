"""Running the fedpriv Flower app on Flower's simulation engine through ``flwr run``.

``flwr run`` with the default ``:local:`` connection starts a SuperLink that outlives it, with
runtime dependency installation on. fedpriv instead starts its own simulation SuperLink for the
run (offline switches set, dependency installation off, a free port), points a run-private
``FLWR_HOME`` at it, runs ``flwr run <app> fedpriv-local``, follows the ServerApp's round feed,
and stops the SuperLink by PID when the run ends, however it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.run_record import ROUNDS_FILE, STATUS_FILE
from shared.errors import FedprivError
from shared.flower_env import apply_offline_defaults

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedpriv-local"
STARTUP_TIMEOUT_S = 60


class LaunchError(FedprivError):
    """Flower could not be started or the run did not finish."""


def app_dir() -> Path:
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise LaunchError(
            f"cannot find the fedpriv Flower app at {PROJECT_ROOT}: install fedpriv from its source folder "
            "with `pip install -e .`"
        )
    return PROJECT_ROOT


def _executable(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        raise LaunchError(f"`{name}` not found: is flwr installed in this environment?")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_run_config(run_config: dict[str, Any], path: Path) -> Path:
    path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in run_config.items()))
    return path


@contextmanager
def simulation_superlink(run_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """A SuperLink in simulation mode for this run only; yields its address, stops it on exit."""
    port = _free_port()
    log_path = run_dir / "logs" / "superlink.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        _executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            if process.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise LaunchError(f"flower-superlink did not start within {STARTUP_TIMEOUT_S}s; see {log_path}")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and everything it started (Ray, SuperExec), by its process group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    except ProcessLookupError:
        pass


def run_simulation(
    *, run_config: dict[str, Any], num_departments: int, run_dir: Path,
    on_round: Callable[[dict[str, Any]], None], cpus_per_department: int = 1,
) -> dict[str, Any]:
    """Run the federation; calls ``on_round`` for each finished round; returns the final status."""
    app = app_dir()
    env = apply_offline_defaults(dict(os.environ))
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env["FLWR_HOME"] = str(flwr_home)
    config_path = write_run_config(run_config, run_dir / "run_config.toml")
    log_path = run_dir / "logs" / "flwr-run.log"
    with simulation_superlink(run_dir, env) as address:
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
        )
        command = [
            _executable("flwr"), "run", str(app), CONNECTION, "--run-config", str(config_path),
            "--federation-config",
            f"num-supernodes={num_departments} client-resources-num-cpus={cpus_per_department}",
            "--stream",
        ]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                _follow(run_dir, process, on_round)
            finally:
                _stop(process)
    status_path = run_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    if not status or status.get("state") == "running":
        raise LaunchError(f"the Flower run ended without a result (exit code {process.returncode}); see {log_path}")
    return status


def _follow(run_dir: Path, process: subprocess.Popen, on_round: Callable[[dict[str, Any]], None]) -> None:
    feed = run_dir / ROUNDS_FILE
    seen = 0
    while True:
        finished = process.poll() is not None
        if feed.exists():
            text = feed.read_text()
            lines = text[: text.rfind("\n") + 1].splitlines()  # complete lines only
            for line in lines[seen:]:
                on_round(json.loads(line))
            seen = len(lines)
        if finished:
            return
        status_path = run_dir / STATUS_FILE
        if status_path.exists() and json.loads(status_path.read_text() or "{}").get("state") in ("completed", "failed"):
            # The ServerApp is done; give the stream a moment to drain, then stop waiting.
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            continue
        time.sleep(0.5)
