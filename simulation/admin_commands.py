"""`fedpriv ledger`, `fedpriv audit`, `fedpriv report`: what the central admin reads from a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from simulation.console import console

RunDir = Annotated[Path, typer.Argument(help="A run folder (fedpriv-runs/...).", exists=True, file_okay=False)]


def ledger_table(run_dir: Path) -> Table:
    from server.ledger_view import ledger_rows

    table = Table(title=f"Privacy ledger (epsilon spent, rounds trained): {run_dir}")
    for column in ("department", "epsilon", "budget", "delta", "rounds", "status", "recomputed"):
        table.add_column(column, overflow="fold")
    for row in ledger_rows(run_dir):
        table.add_row(
            row.department, f"{row.epsilon:.4f}" if row.epsilon is not None else "no DP",
            f"{row.budget:g}" if row.budget is not None else "-", f"{row.delta:g}" if row.delta is not None else "-",
            str(row.rounds_trained), row.status, row.check,
        )
    return table


def ledger(run_dir: RunDir) -> None:
    """Each department's privacy spending in a run: epsilon spent, budget, delta, rounds trained, status."""
    console.print(ledger_table(run_dir.resolve()))


def audit(
    run_dir: RunDir,
    seed: Annotated[int, typer.Option(help="Seed for splitting the records into threshold-picking and testing halves.")] = 0,
) -> None:
    """Membership-inference audit of a simulation run's final model: AUC, TPR at low FPR, empirical epsilon."""
    from server.report import write_report
    from shared.logs import quiet_libraries
    from simulation.audit import membership_audit

    quiet_libraries()
    run_dir = run_dir.resolve()
    result = membership_audit(run_dir, seed=seed)

    def show(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "n/a (too few non-members)"

    console.print(f"membership-inference audit of {run_dir} ({result['members']} members, "
                  f"{result['non_members']} non-members; {result['attack']})")
    console.print(f"AUC {result['auc']:.4f}  TPR@1%FPR {show(result['tpr_at_1pct_fpr'])}  "
                  f"TPR@0.1%FPR {show(result['tpr_at_0_1pct_fpr'])}")
    claimed = result["claimed_epsilon"]
    console.print(f"empirical epsilon (95% lower bound) {result['empirical_epsilon']:.4f}; claimed "
                  f"{claimed if claimed is not None else 'none (no DP)'}")
    if result["violation"]:
        console.print("[bold red]The empirical epsilon exceeds the claimed epsilon: this is a privacy bug.[/]")
        raise typer.Exit(code=2)
    console.print(f"report: {write_report(run_dir)}")


def report(run_dir: RunDir) -> None:
    """(Re)write the run's self-contained report.html."""
    from server.report import write_report

    console.print(f"report: {write_report(run_dir.resolve())}")
