"""A deployment across Linux network namespaces: one namespace per department host and one for the
server, joined by veth links to a bridge in the server's namespace, TLS with the certificate's
address. A department host that dies mid-run (SecAgg+ goes on while its threshold holds), a network
partition of one department (link down) and its return, and a server restart continued with
`--resume`. Every namespace and process the test creates is removed at the end; where namespaces
are not permitted (not root, no `ip`), the test is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.data import write_jsonl
from simulation.local.demo_corpus import demo_records

pytestmark = pytest.mark.slow
FEDPRIV = str(Path(sys.executable).parent / "fedpriv")
DEPARTMENTS = ("finance", "hr", "it")
SUBNET = "10.231.7"
SERVER_ADDRESS = f"{SUBNET}.1"
PORT = 9093


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Hosts:
    """The namespaces of one test: ``server`` and one per department, all removed by ``remove``."""

    def __init__(self, prefix: str) -> None:
        self.server = f"{prefix}-srv"
        self.departments = {name: f"{prefix}-{name}" for name in DEPARTMENTS}
        self.links = {name: f"{prefix[-4:]}{name[:3]}" for name in DEPARTMENTS}  # the server-side veth ends
        self.processes: list[subprocess.Popen] = []

    def create(self) -> None:
        ip("netns", "add", self.server)
        ip("-n", self.server, "link", "set", "lo", "up")
        ip("-n", self.server, "link", "add", "br0", "type", "bridge")
        ip("-n", self.server, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", "br0")
        ip("-n", self.server, "link", "set", "br0", "up")
        for i, (name, namespace) in enumerate(self.departments.items(), start=10):
            ip("netns", "add", namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", self.server, "link", "add", self.links[name], "type", "veth", "peer", "name", "eth0",
               "netns", namespace)
            ip("-n", self.server, "link", "set", self.links[name], "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")

    def start(self, namespace: str, *args: str, log: Path) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", namespace, FEDPRIV, *args], stdout=log.open("a"),
                                   stderr=subprocess.STDOUT, env=dict(os.environ))
        self.processes.append(process)
        return process

    def run(self, namespace: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", namespace, FEDPRIV, *args], capture_output=True, text=True,
                              env=dict(os.environ), timeout=timeout)

    def kill_host(self, namespace: str) -> None:
        """Every process in the namespace dies at once, as when a host loses power."""
        for pid in ip("netns", "pids", namespace, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def link(self, department: str, *, up: bool) -> None:
        ip("-n", self.server, "link", "set", self.links[department], "up" if up else "down")

    def remove(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for namespace in (*self.departments.values(), self.server):
            self.kill_host(namespace)
            ip("netns", "del", namespace, check=False)


@pytest.fixture
def hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    created = Hosts(f"fp{os.getpid() % 10000}")
    probe = ip("netns", "add", created.server, check=False)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here: {probe.stderr.strip()}")
    ip("netns", "del", created.server)
    try:
        created.create()
        yield created
    finally:
        created.remove()
    assert not any(ns in ip("netns", "list").stdout for ns in (*created.departments.values(), created.server))


def wait_for(condition, *, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"{what}: the process ended"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def completed_rounds(run_dir: Path) -> list[dict]:
    feed = run_dir / "rounds.jsonl"
    if not feed.exists():
        return []
    text = feed.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def trained_by(entry: dict) -> set[str]:
    return {name for name, p in entry.get("departments", {}).items() if p.get("status") == "trained"}


def test_hosts_that_die_partitions_and_a_server_restart(tmp_path, hosts):
    records = demo_records()
    for name in DEPARTMENTS:
        write_jsonl([r for r in records if r.department == name], tmp_path / f"{name}.jsonl")
    (tmp_path / "labels.txt").write_text("\n".join(sorted({r.label for r in records if r.department in DEPARTMENTS})))
    kits = tmp_path / "kits"
    provisioned = subprocess.run([FEDPRIV, "provision", "--out", str(kits), "--departments", ",".join(DEPARTMENTS),
                                  "--hosts", SERVER_ADDRESS, "--superlink", f"{SERVER_ADDRESS}:{PORT}"],
                                 capture_output=True, text=True)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    server_log = tmp_path / "server.out"

    def start_server() -> subprocess.Popen:
        process = hosts.start(hosts.server, "server", "start", "--kit", str(kits / "server"), "--host", SERVER_ADDRESS,
                              "--port", str(PORT), log=server_log)
        up = server_log.read_text().count("SuperLink up") + 1 if server_log.exists() else 1
        wait_for(lambda: server_log.read_text().count("SuperLink up") >= up, what="the SuperLink", timeout=120,
                 process=process)
        return process

    def start_department(name: str) -> subprocess.Popen:
        return hosts.start(hosts.departments[name], "department", "start", "--kit", str(kits / name),
                           "--data", str(tmp_path / f"{name}.jsonl"), log=tmp_path / f"{name}.out")

    def submit(run_dir: Path, *extra: str) -> subprocess.Popen:
        return hosts.start(hosts.server, "run", "--kit", str(kits / "server"), *extra, log=tmp_path / f"{run_dir.name}.out")

    def new_run(run_dir: Path, rounds: int, *, epsilon: float) -> subprocess.Popen:
        # a run's epsilon is the departments' lifetime cap on these records: the ledgers compose the runs
        return submit(run_dir, "--labels-file", str(tmp_path / "labels.txt"), "--min-departments", "2",
                      "--rounds", str(rounds), "--model", "tiny", "--batch-size", "32", "--secagg-timeout", "60",
                      "--epsilon", str(epsilon), "--out", str(run_dir))

    def finish(process: subprocess.Popen, run_dir: Path) -> dict:
        assert process.wait(timeout=600) == 0, (tmp_path / f"{run_dir.name}.out").read_text()[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())

    server = start_server()
    departments = {name: start_department(name) for name in DEPARTMENTS}

    # 1. The host of `it` dies during the run: SecAgg+ drops it, the rounds go on with finance and hr
    # (2 of 3 holds the reconstruction threshold), and every aggregate passes its checks.
    run_dir = tmp_path / "host-dies"
    process = new_run(run_dir, rounds=4, epsilon=8)
    wait_for(lambda: len(completed_rounds(run_dir)) >= 1, what="round 1", timeout=300, process=process)
    assert trained_by(completed_rounds(run_dir)[0]) == set(DEPARTMENTS)
    hosts.kill_host(hosts.departments["it"])
    metrics = finish(process, run_dir)
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    assert all(r["secure_aggregation"] and r["aggregate_check"] == "passed" for r in metrics["rounds"])
    assert trained_by(metrics["rounds"][-1]) == {"finance", "hr"}
    assert departments["it"].poll() is not None

    # 2. The host comes back; then hr's link goes down for a round and comes back up: hr misses
    # rounds while it is cut off and trains again once its link is back.
    departments["it"] = start_department("it")
    run_dir = tmp_path / "partition"
    process = new_run(run_dir, rounds=5, epsilon=16)
    wait_for(lambda: len(completed_rounds(run_dir)) >= 1, what="round 1", timeout=300, process=process)
    hosts.link("hr", up=False)
    wait_for(lambda: any("hr" not in trained_by(r) for r in completed_rounds(run_dir)), what="a round without hr",
             timeout=300, process=process)
    hosts.link("hr", up=True)
    cut_off = len(completed_rounds(run_dir))
    metrics = finish(process, run_dir)
    assert metrics["status"] == "completed"
    assert all(r["aggregate_check"] == "passed" for r in metrics["rounds"])
    assert "hr" in trained_by(metrics["rounds"][-1]), [trained_by(r) for r in metrics["rounds"]]
    assert cut_off < len(metrics["rounds"])
    assert departments["hr"].poll() is None  # its SuperNode rode out the partition

    # 3. The server host restarts mid-run: the SuperLink comes back from its database, the departments
    # reconnect, and `fedpriv run --resume` continues after the last completed round.
    run_dir = tmp_path / "server-restart"
    process = new_run(run_dir, rounds=4, epsilon=24)
    wait_for(lambda: len(completed_rounds(run_dir)) >= 1, what="round 1", timeout=300, process=process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    done = len(completed_rounds(run_dir))
    assert done < 4
    server = start_server()
    resumed = hosts.run(hosts.server, "run", "--kit", str(kits / "server"), "--resume", str(run_dir), timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after round {done}" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    for name in DEPARTMENTS:  # no mechanism paid twice across the three runs, and every ledger within its budget
        lines = [json.loads(line) for line in (kits / name / "state" / "privacy-ledger.jsonl").read_text().splitlines()]
        assert len({(e["run"], e["round"], e["mechanism"]) for e in lines}) == len(lines)
        assert lines[-1]["epsilon"] <= 24.0
