"""Starting the central SuperLink from a provisioned kit: TLS, SuperNode authentication, offline.

`fedpriv server start --kit OUT/server` runs ``flower-superlink`` with the kit's certificates,
``--enable-supernode-auth`` and no runtime dependency installation, waits until it answers, then
registers every provisioned department's public key with ``flwr supernode register``. Only those
keys can join. ``fedpriv run`` later submits runs through the connection written here.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from shared.flower_env import (
    CONNECTION,
    FlowerProcessError,
    check_kit,
    environment,
    executable,
    flwr_home,
)

SERVER_KIT_FILES = ("ca.crt", "server.pem", "server.key", "departments.json")
STARTUP_TIMEOUT_S = 60


def wait_until_up(process: subprocess.Popen, address: str, *, ca: Path | None, log: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    url = f"{'https' if ca else 'http'}://{address}/health"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise FlowerProcessError(f"flower-superlink exited with code {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FlowerProcessError(f"the SuperLink did not answer at {url} within {STARTUP_TIMEOUT_S}s; see {log}")
        time.sleep(0.5)


def start_superlink(kit: Path, *, host: str, port: int, insecure: bool, log: Path) -> subprocess.Popen:
    """Start the SuperLink and register the provisioned departments; returns the running process."""
    check_kit(kit, ("departments.json",) if insecure else SERVER_KIT_FILES)
    address = f"{host}:{port}"
    home = flwr_home(kit, address, ca=None if insecure else kit / "ca.crt")
    env = environment(home)
    command = [executable("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation", "--database", str(kit / "superlink.db")]
    if insecure:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(kit / "ca.crt"), "--ssl-certfile", str(kit / "server.pem"),
                    "--ssl-keyfile", str(kit / "server.key"), "--enable-supernode-auth"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(process, address, ca=None if insecure else kit / "ca.crt", log=log)
        if not insecure:
            register_departments(kit, env)
    except BaseException:
        process.terminate()
        raise
    return process


def register_departments(kit: Path, env: dict[str, str]) -> list[str]:
    departments = json.loads((kit / "departments.json").read_text())["departments"]
    for name in departments:
        key = kit / "keys" / f"{name}.pub"
        result = subprocess.run([executable("flwr"), "supernode", "register", str(key), CONNECTION, "--name", name],
                                env=env, capture_output=True, text=True)
        already = "already" in (result.stdout + result.stderr).lower()
        if result.returncode != 0 and not already:
            raise FlowerProcessError(f"registering department {name} failed: {(result.stdout + result.stderr).strip()[-400:]}")
    return list(departments)
