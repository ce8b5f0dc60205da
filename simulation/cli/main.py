"""The ``fedpriv`` command line. ``flwr run`` is the launcher underneath every federation."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from shared.config import DEFAULTS
from shared.data import Columns
from shared.errors import ConfigError
from simulation.bench.command import bench
from simulation.cli import options as opt
from simulation.cli.admin import audit, labels, ledger, report
from simulation.cli.console import console, friendly, user_errors
from simulation.cli.predict import predict
from simulation.cli.serve import serve
from simulation.deploy.commands import department_app, provision, run, server_app
from simulation.deploy.status import status

app = typer.Typer(
    help="fedpriv: federated fine-tuning of a text classifier across departments, with differential privacy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(friendly(provision))
app.command()(friendly(run))
app.command()(friendly(ledger))
app.command()(friendly(audit))
app.command()(friendly(report))
app.command()(friendly(labels))
app.command()(friendly(predict))
app.command()(friendly(serve))
app.command()(friendly(status))
app.command()(friendly(bench))
app.add_typer(server_app, name="server")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        console.print(f"fedpriv {version('fedpriv')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print fedpriv's version and exit.")] = False,
) -> None:
    """fedpriv: federated fine-tuning of a text classifier across departments, with differential privacy."""
app.add_typer(department_app, name="department")


@app.command()
@opt.with_training_options
def simulate(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="CSV/JSONL file (text,label[,department]) or the CLINC150 folder. Default: the built-in synthetic demo corpus.")] = None,
    test_data: opt.TestData = None,
    text_column: opt.TextColumn = "text",
    label_column: opt.LabelColumn = "label",
    department_column: opt.DepartmentColumn = "department",
    partition: Annotated[str | None, typer.Option(help="column | domain | dirichlet | iid. Default: domain for CLINC150, else column.")] = None,
    departments: Annotated[int | None, typer.Option(help="Number of departments for dirichlet / iid (default 4).")] = None,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration for --partition dirichlet.")] = 0.5,
    batch_size: Annotated[int | None, typer.Option(help=f"Expected batch size (Poisson sampling); a department with fewer than 4 batches of records samples a quarter of them. Default: {DEFAULTS.batch_size}, at most a quarter of the largest department.")] = None,
    audit_updates: Annotated[bool, typer.Option("--audit-updates", help="Save each department's raw delta (its own folder) and what the server received (masked under SecAgg+), for audits.")] = False,
    out: opt.Out = None,
    feature_cache: Annotated[Path | None, typer.Option(help="One folder where departments and server cache their embeddings of the frozen backbone, reused by later runs on the same data (default: inside the run folder).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for partitioning, splits and initialisation (never for DP noise).")] = DEFAULTS.seed,
    budget: Annotated[list[str] | None, typer.Option(help="NAME=EPSILON: that department's own budget, as its local configuration would set it (repeatable). It trains until one more round would cross it.")] = None,
    policy: Annotated[list[str] | None, typer.Option(help="NAME:KEY=VALUE: a department's site policy (repeatable); keys: max-epsilon-per-round, min-noise-multiplier, require-secagg, min-departments, delta.")] = None,
    no_declared_scopes: Annotated[bool, typer.Option("--no-declared-scopes", help="Ignore the label scopes CLINC150's domains and the demo corpus declare, as a user's own departments would have none: stage 1 finds each department's labels from noisy counts.")] = False,
    label_scope: Annotated[list[str] | None, typer.Option(help="NAME=LABEL[,LABEL...]: the labels that department declares it holds (repeatable); it trains only their rows of the head, so its noise lands only there. CLINC150 by domain and the demo corpus declare theirs.")] = None,
    min_departments: Annotated[int, typer.Option(help="The run ends when fewer departments than this can still train (budgets spent).")] = DEFAULTS.min_departments,
    resume: Annotated[Path | None, typer.Option(help="Continue this stopped run folder from its last completed round, with its own settings.")] = None,
    *,
    training: dict[str, Any],  # the shared training options (simulation.cli.options.TRAINING)
) -> None:
    """Run a federation of departments on this machine with Flower's simulation engine."""
    from simulation.local.simulate import SimulationRequest, resume_federation, simulate_federation

    with user_errors():
        if resume is not None:
            given = [f"--{name.replace('_', '-')}" for name in ctx.params if name != "resume"
                     and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
            if given:
                raise ConfigError(f"--resume: a resumed run keeps its own settings; drop {', '.join(given)}")
            status = resume_federation(resume, console=console)
            if status["state"] != "completed":
                raise typer.Exit(code=1)
            return
        if batch_size is not None and batch_size < 1:
            raise typer.BadParameter(f"must be >= 1 (got {batch_size})", param_hint="--batch-size")
        request = SimulationRequest(
            data=data, test_data=test_data, columns=Columns(text_column, label_column, department_column),
            partition=partition, departments=departments, alpha=alpha, batch_size=batch_size, seed=seed,
            training=training | {"audit_updates": audit_updates, "min_departments": min_departments},
            feature_cache=feature_cache, out=out, policies=opt.department_policies(budget or [], policy or [], label_scope or []),
            declared_scopes=not no_declared_scopes,
        )
        status = simulate_federation(request, console=console)
    if status["state"] != "completed":
        raise typer.Exit(code=1)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so every SuperLink, SuperNode and
    # `flwr run` that a command started is stopped by its `finally`.
    signal.signal(signal.SIGTERM, _interrupt)
    app()


if __name__ == "__main__":
    main()
