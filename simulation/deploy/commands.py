"""`fedpriv provision`, `fedpriv server start`, `fedpriv department start`, `fedpriv run`: deployment."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.config import DEFAULTS, RunConfig
from shared.data import Columns
from shared.errors import ConfigError, FedprivError
from simulation.cli import options as opt
from simulation.cli.console import console, err_console, friendly
from simulation.cli.options import NO_DP_WARNING, new_run_dir
from simulation.deploy.status import RUNS_FILE

server_app = typer.Typer(help="The central admin's SuperLink.", no_args_is_help=True)
department_app = typer.Typer(help="A department's SuperNode.", no_args_is_help=True)

INSECURE_WARNING = "[bold red]--insecure: no TLS and no node authentication. Never outside a test bench.[/]"


LOG_TAIL_LINES = 15


def _serve_until_interrupted(process, what: str, *, follow: Path | None = None, log: Path | None = None,
                             every: tuple[float, Callable[[], None]] | None = None) -> None:
    """Wait for ``process`` (Ctrl-C stops it); print each new line of ``follow`` as it is written, call
    ``every``'s function at its interval, and print the end of ``log`` (the process's raw output) should it fail."""
    from simulation.deploy.processes import stop

    shown = follow.stat().st_size if follow is not None and follow.exists() else 0
    next_tick = time.monotonic()
    try:
        while process.poll() is None:
            time.sleep(1)
            if every is not None and time.monotonic() >= next_tick:
                every[1]()
                next_tick = time.monotonic() + every[0]
            if follow is not None and follow.exists() and follow.stat().st_size > shown:
                with follow.open("rb") as feed:
                    feed.seek(shown)
                    fresh = feed.read()
                shown += len(fresh)
                for line in fresh.decode("utf-8", errors="replace").splitlines():
                    console.print(line, highlight=False, markup=False)
    except KeyboardInterrupt:
        console.print(f"stopping {what}")
    finally:
        stop(process)
    if process.returncode not in (0, -signal.SIGTERM, None):
        if log is not None and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            err_console.print(f"last lines of {log}:\n" + "\n".join(tail), highlight=False, markup=False)
        err_console.print(
            f"[bold red]error:[/] {what} stopped with exit code {process.returncode}. If the log above shows "
            "CERTIFICATE_VERIFY_FAILED, this kit's ca.crt is not the SuperLink's CA; \\[code: 2004] means this node's "
            "key is not registered at the SuperLink (the server log names the key); 'Failed to initialize the "
            "connection' means nothing answered at the kit's address, or the SuperLink runs with --insecure."
        )
        raise typer.Exit(code=1)


def provision(
    out: Annotated[Path, typer.Option(help="New folder for the CA, the server kit and one kit per department.")],
    departments: Annotated[str, typer.Option(help="Comma-separated department names, e.g. finance,hr,it.")],
    hosts: Annotated[str, typer.Option(help="Comma-separated host names / IPs of the SuperLink (certificate SANs).")] = "localhost,127.0.0.1",
    superlink: Annotated[str, typer.Option(help="Address departments connect to (host:port).")] = "127.0.0.1:9093",
) -> None:
    """Create a CA, the server certificate and per-department key pairs and kits (pinning this checkout's app code)."""
    from client.approved_code import fab_sha256
    from simulation.deploy.launcher import app_dir
    from simulation.deploy.provisioning import provision as run_provision

    names = [d.strip() for d in departments.split(",") if d.strip()]
    result = run_provision(out.resolve(), departments=names, hosts=[h.strip() for h in hosts.split(",") if h.strip()],
                           superlink=superlink, approved_fab_sha256=fab_sha256(app_dir()))
    console.print(f"server kit: {result.server_kit}")
    for name, kit in result.department_kits.items():
        console.print(f"department kit {name}: {kit}  (give to {name} only; its node.key never leaves it)")
    console.print(f"CA private key: {result.root / 'ca' / 'ca.key'} (keep offline)")


@server_app.command("start")
@friendly
def server_start(
    kit: Annotated[Path, typer.Option(help="The server kit from `fedpriv provision` (OUT/server).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9093,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (test benches only).")] = False,
) -> None:
    """Start the SuperLink with TLS and SuperNode authentication; register the provisioned departments."""
    from simulation.deploy.superlink import start_superlink

    if insecure:
        console.print(INSECURE_WARNING)
    log = kit / "logs" / "superlink.log"
    process = start_superlink(kit.resolve(), host=host, port=port, insecure=insecure, log=log)
    console.print(f"SuperLink up on {host}:{port} ({'INSECURE' if insecure else 'TLS, node authentication'}); log: {log}")
    _serve_until_interrupted(process, "the SuperLink", every=(PRESENCE_INTERVAL_S, _presence_reporter(kit.resolve())))


PRESENCE_INTERVAL_S = 10


def _presence_reporter(kit: Path) -> Callable[[], None]:
    """A function that prints each department whose SuperNode came online or went away since its last call."""
    from simulation.deploy.status import department_presence

    seen: dict[str, str] = {}

    def report() -> None:
        try:
            now = department_presence(kit)
        except FedprivError:
            return  # the SuperLink is busy or restarting: ask again at the next tick
        for department, state in sorted(now.items()):
            if seen.get(department) != state and (department in seen or state == "online"):
                console.print(f"{time.strftime('%H:%M:%S')} department {department}: {state}", highlight=False)
        seen.clear()
        seen.update(now)

    return report


@department_app.command("approve")
@friendly
def department_approve(
    kit: Annotated[Path, typer.Option(help="This department's kit.")],
    app: Annotated[Path | None, typer.Option(help="The app folder (reviewed code) whose FAB to approve.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Or the FAB's SHA-256, as `flwr build` prints it.")] = None,
) -> None:
    """Approve a version of the app code: this department's SuperNode runs only approved FABs."""
    from simulation.deploy.supernode import approve

    digest = approve(kit.resolve(), app=app, sha256=sha256)
    console.print(f"approved app code {digest} in {kit / 'department.toml'}; restart the department's SuperNode")


@department_app.command("audit")
@friendly
def department_audit(
    kit: Annotated[Path, typer.Option(help="This department's kit.")],
    data: Annotated[Path, typer.Option(help="This department's CSV/JSONL, as it trains on it.")],
    run_config: Annotated[Path, typer.Option(help="The run's settings: run_config.toml from its run folder (no data in it).")],
    text_column: opt.TextColumn = "text",
    label_column: opt.LabelColumn = "label",
    canaries: Annotated[int, typer.Option(min=10, help="Canaries per audited stage, each included with probability 1/2.")] = 1000,
    out: Annotated[Path | None, typer.Option(help="Where to write the audit's JSON (default: KIT/state/canary-audit.json).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the canaries.")] = 0,
) -> None:
    """Canary-audit this department's releases on its own host, with the run's settings and its own
    budget and policy: its records never leave it, its ledger is not touched. Exits 2 on a privacy bug."""
    from simulation.audit.canary import department_canary_audit
    from simulation.cli.admin import print_canary_audit

    result = department_canary_audit(kit.resolve(), data=data, run_config=run_config, canaries=canaries, seed=seed,
                                     columns=Columns(text_column, label_column, None))
    path = out or kit / "state" / "canary-audit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print_canary_audit(result)
    console.print(f"written: {path}")
    if result["violation"]:
        console.print("[bold red]An audit bound exceeds the claimed epsilon: this is a privacy bug.[/]")
        raise typer.Exit(code=2)


@department_app.command("start")
@friendly
def department_start(
    kit: Annotated[Path, typer.Option(help="This department's kit from `fedpriv provision`.")],
    data: Annotated[Path, typer.Option(help="This department's CSV/JSONL (text,label).")],
    superlink: Annotated[str | None, typer.Option(help="SuperLink address (default: from the kit).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Where the privacy ledger and caches live (default: KIT/state).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="This department's own budget; may only lower the run's.")] = None,
    text_column: opt.TextColumn = "text",
    label_column: opt.LabelColumn = "label",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (test benches only).")] = False,
) -> None:
    """Start this department's SuperNode (it stays in the foreground; Ctrl-C stops it). It trains only
    when the server runs a federation, and prints one line per round it serves; Flower's own log
    goes to KIT/logs/supernode.log."""
    from client.activity import ACTIVITY_FILE
    from simulation.deploy.supernode import distributed_noise_statement, start_department

    if insecure:
        console.print(INSECURE_WARNING)
    consent = distributed_noise_statement(kit, epsilon=epsilon)
    if consent:
        console.print(f"[yellow]{consent}[/]")
    log = kit / "logs" / "supernode.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = start_department(kit.resolve(), data=data, superlink=superlink, state_dir=state_dir,
                               insecure=insecure, epsilon=epsilon, log=log, columns=Columns(text_column, label_column, None))
    console.print(f"department SuperNode started from {kit}; waiting for the server's rounds (Flower's log: {log})")
    _serve_until_interrupted(process, "the SuperNode", follow=(state_dir or kit / "state") / ACTIVITY_FILE, log=log)


@opt.with_training_options
def run(
    kit: Annotated[Path, typer.Option(help="The server kit (its .flwr connection is written by `server start`).")],
    labels_file: Annotated[Path | None, typer.Option(help="The federation's labels, one per line (`fedpriv labels DATA...` writes it).")] = None,
    min_departments: Annotated[int | None, typer.Option(help="Departments a round needs: the run waits until that many are connected, and ends when fewer can still train.")] = None,
    batch_size: Annotated[int, typer.Option(help="Expected batch size (Poisson sampling); a department with fewer than 4 batches of records samples a quarter of them.")] = DEFAULTS.batch_size,
    test_data: opt.TestData = None,
    secagg_max_weight: Annotated[int, typer.Option(help="SecAgg+ bound on a department's training records.")] = DEFAULTS.secagg_max_weight,
    secagg_timeout: Annotated[float, typer.Option(help="Seconds a SecAgg+ stage waits for a department before dropping it (the round goes on while the reconstruction threshold holds).")] = DEFAULTS.secagg_timeout_s,
    out: opt.Out = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this stopped run folder from its last completed round (its own settings; only --kit is used).")] = None,
    budget: opt.DepartmentOwned = None,
    policy: opt.DepartmentOwned = None,
    label_scope: opt.DepartmentOwned = None,
    *,
    training: dict[str, Any],  # the shared training options (simulation.cli.options.TRAINING)
) -> None:
    """Run a federation on the deployed SuperLink (`flwr run` underneath), with the training options of `simulate`."""
    from simulation.deploy.launcher import submit_run
    from simulation.deploy.processes import check_kit, environment
    from simulation.local.resume import resume_config
    from simulation.local.simulate import print_round, print_summary

    if budget or policy or label_scope:
        raise ConfigError(opt.DEPARTMENT_OWNED)
    check_kit(kit, ("departments.json",))
    connection = kit / ".flwr" / "config.toml"
    if not connection.is_file():
        raise ConfigError(f"{kit}: no SuperLink connection yet; run `fedpriv server start --kit {kit}` first")
    transport = "tls+node-auth" if "root-certificates" in connection.read_text() else "insecure"
    if resume is not None:
        config = dataclasses.replace(resume_config(resume), transport=transport)
        run_dir = Path(config.out_dir)
        console.print(f"resuming {run_dir} after round {config.resume_after_round} of {config.num_server_rounds}")
    else:
        missing = [name for name, value in (("--labels-file", labels_file), ("--min-departments", min_departments)) if value is None]
        if missing:
            raise ConfigError([f"{name} is required for a new run" for name in missing], source="fedpriv run options")
        labels = tuple(line.strip() for line in labels_file.read_text().splitlines() if line.strip())
        config = RunConfig(
            **training, min_departments=min_departments, batch_size=batch_size, labels=labels, secagg_timeout_s=secagg_timeout,
            secagg_max_weight=secagg_max_weight, transport=transport, run_uid=uuid.uuid4().hex[:12],
            # the provisioned key of every department: each reply must be signed by its department's
            department_keys=json.dumps(json.loads((kit / "departments.json").read_text())["departments"])
            if transport == "tls+node-auth" else "",
            test_data=str(test_data.resolve()) if test_data else "", out_dir="pending",
        )
        run_dir = new_run_dir(out)  # only once every setting has been validated above
        config = dataclasses.replace(config, out_dir=str(run_dir))
        with (kit / RUNS_FILE).open("a") as runs:  # `fedpriv status --kit` follows the runs started here
            runs.write(f"{run_dir}\n")
        console.print(f"submitting to the SuperLink of {kit}; waiting for {min_departments} departments; run folder {run_dir}")
    if not config.dp:
        console.print(NO_DP_WARNING)
    status = submit_run(env=environment(kit.resolve() / ".flwr"), run_config=config.to_run_config(), run_dir=run_dir,
                        on_round=lambda entry: print_round(console, entry, config))
    print_summary(console, run_dir, status)
    if status["state"] != "completed":
        raise typer.Exit(code=1)
