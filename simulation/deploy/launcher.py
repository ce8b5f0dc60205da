"""Running the fedpriv Flower app through ``flwr run``: on a SuperLink of its own (simulation) or a deployed one.

``flwr run`` with the default ``:local:`` connection starts a SuperLink that outlives it, with
runtime dependency installation on. fedpriv instead starts its own simulation SuperLink for the
run (offline switches set, dependency installation off, a free port), points a run-private
``FLWR_HOME`` at it, runs ``flwr run <app> fedpriv``, follows the ServerApp's round feed,
and stops the SuperLink by PID when the run ends, however it ends.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from server import run_folder
from server.run_folder import REPORT_FILE, ROUNDS_FILE, RUN_CONFIG_FILE, STATUS_FILE
from simulation.deploy.processes import CONNECTION, FlowerProcessError, environment, executable, flwr_home, free_port, stop
from simulation.deploy.superlink import wait_until_up

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A run that finished without a report (no round completed) is followed this much longer, for `flwr run`
# to exit with its last log lines, before fedpriv stops waiting for it.
FINISH_GRACE_S = 15.0


def app_dir() -> Path:
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise FlowerProcessError(
            f"cannot find the fedpriv Flower app at {PROJECT_ROOT}: install fedpriv from its source folder "
            "with `pip install -e .`"
        )
    return PROJECT_ROOT


def write_run_config(run_config: dict[str, Any], path: Path) -> Path:
    path.write_text(tomli_w.dumps(run_config))
    return path


@contextmanager
def simulation_superlink(run_dir: Path) -> Iterator[dict[str, str]]:
    """A SuperLink in simulation mode for this run only; yields the environment that reaches it."""
    port = free_port()
    env = environment(flwr_home(run_dir, f"127.0.0.1:{port}", ca=None))
    log_path = run_dir / "logs" / "superlink.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
    ]
    with log_path.open("a") as log:  # a resumed run keeps the log of the attempt before it
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(process, f"127.0.0.1:{port}", ca=None, log=log_path)
        yield env
    finally:
        stop(process)


def submit_run(
    *, env: dict[str, str], run_config: dict[str, Any], run_dir: Path,
    on_round: Callable[[dict[str, Any]], None], federation_config: str | None = None, superlink_outlives_us: bool = True,
) -> dict[str, Any]:
    """``flwr run`` the app through the ``fedpriv`` connection of ``env``; follow the round feed.

    On an interrupt, a SuperLink that outlives this command (deployment) is asked to stop the run.
    """
    config_path = write_run_config(run_config, run_dir / RUN_CONFIG_FILE)
    log_path = run_dir / "logs" / "flwr-run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [executable("flwr"), "run", str(app_dir()), CONNECTION, "--run-config", str(config_path), "--stream"]
    if federation_config:
        command += ["--federation-config", federation_config]
    with log_path.open("a") as log:  # a resumed run keeps the log of the attempt before it
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _follow(run_dir, process, on_round)
        except KeyboardInterrupt:
            if superlink_outlives_us:
                _stop_flower_run(env, run_dir)
            run_folder.write_status(run_dir, state=run_folder.STOPPED, message=(
                f"interrupted; continue with `fedpriv simulate --resume {run_dir}` (simulation) or "
                f"`fedpriv run --resume {run_dir}` (deployment)"))
            raise
        finally:
            stop(process)
    status = run_folder.read_status(run_dir)
    if not status or status.get("state") == run_folder.RUNNING:
        raise FlowerProcessError(
            f"the Flower run ended without a result (exit code {process.returncode}); see {log_path}"
        )
    return status


def _stop_flower_run(env: dict[str, str], run_dir: Path) -> None:
    """Ask the SuperLink to stop the run: a deployed SuperLink keeps running a run whose `flwr run` has gone."""
    run_id = run_folder.read_status(run_dir).get("run_id")
    if run_id:
        try:
            subprocess.run([executable("flwr"), "stop", str(run_id), CONNECTION], env=env, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pass  # the SuperLink did not answer; the run ends with it, or with its own timeout


def run_simulation(
    *, run_config: dict[str, Any], num_departments: int, run_dir: Path,
    on_round: Callable[[dict[str, Any]], None], cpus_per_department: int = 1,
) -> dict[str, Any]:
    """Run the federation on Flower's simulation engine; returns the final status."""
    with simulation_superlink(run_dir) as env:
        return submit_run(
            env=env, run_config=run_config, run_dir=run_dir, on_round=on_round,
            federation_config=f"num-supernodes={num_departments} client-resources-num-cpus={cpus_per_department}",
            superlink_outlives_us=False,  # the simulation SuperLink is ours: it is stopped, run and all
        )


def _follow(run_dir: Path, process: subprocess.Popen, on_round: Callable[[dict[str, Any]], None]) -> None:
    feed = run_dir / ROUNDS_FILE
    seen, finished_at = 0, 0.0
    while True:
        finished = process.poll() is not None
        if feed.exists():
            text = feed.read_text()
            lines = text[: text.rfind("\n") + 1].splitlines()  # complete lines only
            for line in lines[seen:]:
                on_round(json.loads(line))
            seen = len(lines)
        if finished or _run_folder_complete(run_dir):
            return
        if run_folder.read_status(run_dir).get("state") in run_folder.FINISHED_STATES:
            finished_at = finished_at or time.monotonic()
            if time.monotonic() - finished_at > FINISH_GRACE_S:
                return
        time.sleep(0.2)


def _run_folder_complete(run_dir: Path) -> bool:
    """The ServerApp's last act is the report, written after the final status: once a report newer than
    the status is there, the run folder is complete (``flwr run --stream`` takes several more seconds to
    notice that the run ended). A run that finished no round writes no report: see ``FINISH_GRACE_S``."""
    status, report = run_dir / STATUS_FILE, run_dir / REPORT_FILE
    if not (status.is_file() and report.is_file()):
        return False
    if run_folder.read_status(run_dir).get("state") not in run_folder.FINISHED_STATES:
        return False
    return report.stat().st_mtime_ns >= status.stat().st_mtime_ns
