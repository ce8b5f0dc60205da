"""`fedpriv ledger`, `fedpriv audit`, `fedpriv report`: what the central admin reads from a run folder;
`fedpriv labels`: the label set a deployed run needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from simulation.cli import options as opt
from simulation.cli.console import console

RunDir = Annotated[Path, typer.Argument(help="A run folder (fedpriv-runs/...).", exists=True, file_okay=False)]


def ledger_table(run_dir: Path) -> Table:
    from server.ledger_view import ledger_rows

    rows = ledger_rows(run_dir)
    shared = any(row.own_epsilon is not None for row in rows)  # distributed noise: two guarantees
    table = Table(title=f"Privacy ledger (epsilon spent, rounds trained): {run_dir}",
                  caption="own epsilon: a department's guarantee should its noise share be unmasked alone "
                          "(distributed noise; epsilon is against the SecAgg+ aggregate)" if shared else None)
    columns = ("department", "epsilon", *(("own epsilon",) if shared else ()), "budget", "delta", "rounds", "status",
               "recomputed")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        own = (f"{row.own_epsilon:.4f}" if row.own_epsilon is not None else "-",) if shared else ()
        table.add_row(
            row.department, f"{row.epsilon:.4f}" if row.epsilon is not None else "no DP", *own,
            f"{row.budget:g}" if row.budget is not None else "-", f"{row.delta:g}" if row.delta is not None else "-",
            str(row.rounds_trained), row.status, row.check,
        )
    return table


def ledger(run_dir: RunDir) -> None:
    """Each department's privacy spending in a run: epsilon spent, budget, delta, rounds trained, status."""
    console.print(ledger_table(run_dir.resolve()))


def audit(
    run_dir: RunDir,
    canaries: Annotated[int, typer.Option(min=10, help="Canaries per audited stage (class statistics, DP-SGD), each included with probability 1/2.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed for the canaries and for splitting records into threshold-picking and testing halves.")] = 0,
) -> None:
    """Audit a run: a canary audit in one run (Steinke et al. 2023) of what the departments release and,
    in simulation, a membership-inference attack on the final model; a deployed run gathers the
    audits its departments ran on their own hosts (RUN/department-audits/). Exits 2 on a privacy bug."""
    import json

    from server.report import AUDIT_FILE, write_report
    from shared.logs import quiet_libraries
    from simulation.audit.canary import canary_audit
    from simulation.audit.membership import membership_audit
    from simulation.deploy.gathered_audit import gathered_canary_audit
    from simulation.local.resume import read_run_config

    quiet_libraries()
    run_dir = run_dir.resolve()
    if not read_run_config(run_dir).partition_dir:  # deployed: the records are on the departments' hosts
        canary = gathered_canary_audit(run_dir)
        result: dict = {"canary_audit": canary, "violation": canary["violation"]}
        print_canary_audit(canary)
    else:
        canary = canary_audit(run_dir, canaries=canaries, seed=seed)
        with console.status("membership-inference attack on the final model"):
            result = membership_audit(run_dir, seed=seed)
        result["canary_audit"] = canary
        result["violation"] = bool(result["violation"] or canary["violation"])

        def show(value: float | None) -> str:
            return f"{value:.4f}" if value is not None else "n/a (too few non-members)"

        print_canary_audit(canary)
        console.print(f"membership-inference attack ({result['members']} members, {result['non_members']} non-members; "
                      f"{result['attack']}): AUC {result['auc']:.4f}  TPR@1%FPR {show(result['tpr_at_1pct_fpr'])}  "
                      f"TPR@0.1%FPR {show(result['tpr_at_0_1pct_fpr'])}  empirical epsilon {result['empirical_epsilon']:.4f}")
    (run_dir / AUDIT_FILE).write_text(json.dumps(result, indent=2))
    report = write_report(run_dir)
    if result["violation"]:
        console.print("[bold red]An audit bound exceeds the claimed epsilon: this is a privacy bug.[/]")
        raise typer.Exit(code=2)
    console.print(f"report: {report}")


def print_canary_audit(canary: dict) -> None:
    for stage in canary["stages"]:
        claimed = stage["claimed_epsilon"]
        who = f"department {stage['department']}, " if "department" in stage else ""
        console.print(f"canary audit, {who}{stage['audited']}: {stage['canaries']} canaries, {stage['correct_guesses']} of "
                      f"{stage['guesses']} guesses right; epsilon lower bound {stage['epsilon_lower_bound']:.4f} "
                      f"({stage['confidence']:.1%} confidence), claimed "
                      f"{f'{claimed:.4f}' if claimed is not None else 'none (no DP)'}")


def report(run_dir: RunDir) -> None:
    """(Re)write the run's self-contained report.html."""
    from server.report import write_report

    console.print(f"report: {write_report(run_dir.resolve())}")


def labels(
    data: Annotated[list[Path], typer.Argument(help="CSV/JSONL files whose labels make the federation's label set (every department's, or one file of them all).")],
    out: Annotated[Path, typer.Option(help="The labels file to write, one label per line (what `fedpriv run --labels-file` reads).")] = Path("labels.txt"),
    text_column: opt.TextColumn = "text",
    label_column: opt.LabelColumn = "label",
) -> None:
    """Write the federation's label set: every label in the given files, sorted, one per line.

    The labels are the only thing the central admin needs to know of the departments' data before a
    deployed run; they are not protected by differential privacy, so list labels that are public
    (a product catalogue, an intent taxonomy), not ones that only some records reveal."""
    from shared.data import Columns, derive_labels, load_records
    from shared.errors import ConfigError

    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    columns = Columns(text_column, label_column, None)
    found = derive_labels(record for path in data for record in load_records(path, columns=columns))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{label}\n" for label in found))
    console.print(f"{len(found)} labels from {len(data)} file(s) -> {out}", highlight=False)
