"""Starting, finding and stopping Flower's processes (SuperLink, SuperNode, `flwr run`) for the CLI.

Local federations and deployments both run Flower as separate processes with a private
``FLWR_HOME``; nothing here is part of the apps the FAB ships.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import tomli_w

from shared.errors import ConfigError, FedprivError
from shared.flower_env import apply_offline_defaults

CONNECTION = "fedpriv"


class FlowerProcessError(FedprivError):
    """A Flower process (SuperLink, SuperNode, flwr run) did not start, was refused or failed."""


def executable(name: str) -> str:
    """A Flower command from this environment (never another one on PATH)."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    raise FlowerProcessError(f"`{name}` not found beside {sys.executable}: is flwr installed in this environment?")


def check_kit(kit: Path, required: tuple[str, ...]) -> None:
    if not kit.is_dir():
        raise ConfigError(f"--kit {kit}: no such folder (create kits with `fedpriv provision`)")
    missing = [name for name in required if not (kit / name).is_file()]
    if missing:
        raise ConfigError([f"kit {kit} lacks {name}" for name in missing], source="kit")


def free_port() -> int:
    """A TCP port on loopback that is free now (each SuperLink and SuperNode needs its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_home(folder: Path, address: str, *, ca: Path | None) -> Path:
    """A private FLWR_HOME with one connection, ``fedpriv``, to the SuperLink at ``address``."""
    home = folder / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    security = {"root-certificates": str(ca.resolve())} if ca else {"insecure": True}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: {"address": address, **security}}}))
    return home


# The SuperExec polls for a run's tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower's
# default 1.0; 0.01-60 allowed): each deployed round passes through it several times (SecAgg+ has four
# message stages), so fedpriv's processes poll at 0.1 s unless the user set it.
SUPEREXEC_POLL_INTERVAL_S = "0.1"


def environment(home: Path) -> dict[str, str]:
    """This process's environment with the offline switches, a shorter SuperExec poll and the given FLWR_HOME.

    This environment's scripts come first on PATH: Flower's SuperLink and SuperNode start
    ``flower-superexec``, and it ``flwr-serverapp``/``flwr-clientapp``, by name, so a ``fedpriv``
    called by its full path from a virtual environment that is not activated still finds them.
    """
    env = dict(apply_offline_defaults(dict(os.environ)))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_INTERVAL_S)
    env["FLWR_HOME"] = str(home)
    return env


def stop(process: subprocess.Popen) -> None:
    """Stop a process and everything it started, by process group and by descendant.

    Flower's SuperLink starts its SuperExec in a session of its own, and the SuperExec starts the
    simulation (ServerApp, Ray): signalling the SuperLink's group alone leaves the run going.
    """
    import psutil

    if process.poll() is not None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    groups = {process.pid}
    for child in descendants:
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group

    def signal_all(sig: signal.Signals) -> None:
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM)
    _, alive = psutil.wait_procs(descendants, timeout=20)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        alive.append(process)
    if alive:
        signal_all(signal.SIGKILL)
        process.wait()
