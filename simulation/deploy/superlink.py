"""Starting the central SuperLink from a provisioned kit: TLS, SuperNode authentication, offline.

`fedpriv server start --kit OUT/server` runs ``flower-superlink`` with the kit's certificates,
``--enable-supernode-auth`` and no runtime dependency installation, waits until it answers, then
registers every provisioned department's public key with ``flwr supernode register``. Only those
keys can join. ``fedpriv run`` later submits runs through the connection written here.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from simulation.deploy.processes import (
    CONNECTION,
    FlowerProcessError,
    check_kit,
    environment,
    executable,
    flwr_home,
    stop,
)

SERVER_KIT_FILES = ("ca.crt", "server.pem", "server.key", "departments.json")
STARTUP_TIMEOUT_S = 60


def wait_until_up(process: subprocess.Popen, address: str, *, ca: Path | None, log: Path) -> None:
    """Wait for the health endpoint; with a CA, a certificate that does not verify fails at once."""
    context = None
    if ca:
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False  # names are checked against the departments' address below
    url = f"{'https' if ca else 'http'}://{address}/health"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise FlowerProcessError(f"flower-superlink exited with code {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise FlowerProcessError(
                    f"the SuperLink's certificate does not verify against {ca}: {exc.reason.verify_message}; "
                    "departments would refuse it too (re-provision the server certificate)"
                ) from None
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FlowerProcessError(f"the SuperLink did not answer at {url} within {STARTUP_TIMEOUT_S}s; see {log}")
        time.sleep(0.5)


def verify_served_name(address: str, *, ca: Path, expected_host: str) -> None:
    """TLS handshake as a department would make it: the served certificate must name ``expected_host``."""
    host, port = address.rsplit(":", 1)
    connect_to = "127.0.0.1" if host in ("0.0.0.0", "") else host
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((connect_to, int(port)), timeout=5) as sock:
            with context.wrap_socket(sock, server_hostname=expected_host):
                return
    except ssl.SSLCertVerificationError as exc:
        raise FlowerProcessError(
            f"departments connect to '{expected_host}', but the SuperLink's certificate is refused for it: "
            f"{exc.verify_message} (provision with --hosts including {expected_host})"
        ) from None


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
            expected = json.loads((kit / "departments.json").read_text())["superlink"].rsplit(":", 1)[0]
            verify_served_name(address, ca=kit / "ca.crt", expected_host=expected)
            register_departments(kit, env)
    except BaseException:
        stop(process)
        raise
    return process


NODES_FILE = "nodes.json"  # department -> the SuperLink's node id for its key (Flower lists nodes by id only)


def register_departments(kit: Path, env: dict[str, str]) -> list[str]:
    departments = json.loads((kit / "departments.json").read_text())["departments"]
    nodes_path = kit / NODES_FILE
    nodes = json.loads(nodes_path.read_text()) if nodes_path.is_file() else {}
    for name in departments:
        key = kit / "keys" / f"{name}.pub"
        result = subprocess.run([executable("flwr"), "supernode", "register", str(key), CONNECTION, "--name", name,
                                 "--format", "json"], env=env, capture_output=True, text=True)
        already = "already" in (result.stdout + result.stderr).lower()
        if result.returncode != 0 and not already:
            raise FlowerProcessError(f"registering department {name} failed: {(result.stdout + result.stderr).strip()[-400:]}")
        try:
            nodes[name] = str(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # registered before (a restarted SuperLink keeps its database): the earlier id stands
    nodes_path.write_text(json.dumps(nodes, indent=2))
    return list(departments)
