"""``fedpriv simulate``: check everything, partition the data, run the federation, report.

All user mistakes are found here before Flower starts (data files, labels, department sizes,
budgets, settings, the model path), so a run never dies halfway for a reason known up front.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from client.site_policy import SitePolicy
from server.run_folder import METRICS_FILE, PLOT_FILE, REPORT_FILE
from shared.config import DEFAULTS, RunConfig, secagg_neighbourhood
from shared.data import Columns
from shared.errors import ConfigError
from simulation.cli.options import NO_DP_WARNING, run_dir_path
from simulation.deploy.launcher import run_simulation
from simulation.local.embedding import embed_federation
from simulation.local.prepare import DataPlan, Federation, partition_data, plan_federation, write_federation
from simulation.local.resume import resume_config


@dataclass(frozen=True, kw_only=True)
class SimulationRequest:
    """What `fedpriv simulate` was asked: the data and how to split it, and the run's settings."""

    data: Path | None
    test_data: Path | None
    columns: Columns
    partition: str | None
    departments: int | None
    alpha: float
    batch_size: int | None  # None: at most a quarter of the largest department
    seed: int
    training: dict[str, Any]  # RunConfig settings from the shared training options (simulation.cli.options)
    feature_cache: Path | None
    out: Path | None
    policies: dict[str, dict[str, Any]]  # department -> its own budget and site policy (client.site_policy)
    declared_scopes: bool = True


def consenting_policies(
    policies: dict[str, dict[str, Any]], *, departments: list[str], reconstruction_threshold: float,
) -> dict[str, dict[str, Any]]:
    """The simulated departments are the user's to speak for: each consents to distributed noise, and
    trusts the smallest aggregate SecAgg+ can unmask (its reconstruction threshold) to add the other
    shares; a policy the user gave a department wins."""
    smallest = max(2, math.ceil(reconstruction_threshold * len(departments)))
    return policies | {name: {"distributed-noise": True, "min-departments": smallest, **policies.get(name, {})}
                       for name in departments}


def simulate_federation(request: SimulationRequest, *, console: Console) -> dict[str, Any]:
    from shared.model import MINILM, TINY, load_backbone

    training = dict(request.training)
    model = training.pop("model")
    if model not in (MINILM, TINY) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"--model {model}: not 'minilm', 'tiny' or an existing model folder")
    RunConfig(**training)  # every training setting refused by name before the data is read
    if request.policies:  # refused here, before any file is written, not on the department's first round
        promised = RunConfig(target_epsilon=training["target_epsilon"], target_delta=training["target_delta"])
        for name, policy in request.policies.items():
            SitePolicy.from_mapping(policy, department=name, run=promised)
    data_plan = DataPlan(
        data=request.data, test_data=request.test_data, columns=request.columns, partition=request.partition,
        departments=request.departments, alpha=request.alpha, seed=request.seed,
        declared_scopes=request.declared_scopes,
    )
    partitioned = partition_data(data_plan)
    policies = (consenting_policies(request.policies, departments=list(partitioned.shares),
                                          reconstruction_threshold=training["secagg_reconstruction_threshold"])
                if training["distributed_noise"] else dict(request.policies))
    # Departments keep a test split of their own only when the server has no test set.
    test_fraction = 0.0 if partitioned.test is not None else DEFAULTS.test_fraction
    fractions = {"val_fraction": training.pop("val_fraction"), "test_fraction": test_fraction, "seed": request.seed}
    # the default batch fits the largest department; smaller ones sample a quarter of their records
    batch_size = request.batch_size or max(1, min(DEFAULTS.batch_size, partitioned.largest_train_split(**fractions) // 4))
    out = run_dir_path(request.out)
    federation = plan_federation(
        partitioned, out_dir=out, delta=training["target_delta"], dp=training["dp"],
        policies=policies, **fractions
    )
    config = RunConfig(
        **training | {"min_departments": min(training["min_departments"], len(federation.departments))}, **fractions,
        model=str(Path(model).expanduser().resolve()) if model not in (MINILM, TINY) else model,
        batch_size=batch_size, labels=federation.labels, out_dir=str(out), partition_dir=str(federation.partition_dir),
        test_data=str(federation.test_file) if federation.test_file else "",
        feature_cache=str(request.feature_cache.expanduser().resolve()) if request.feature_cache else "", run_uid=uuid.uuid4().hex[:12],
        # The tightest SecAgg+ weight bound that fits every department: the finest quantization.
        secagg_max_weight=max(d.train_records for d in federation.departments),
    )
    load_backbone(config.model)  # a bad model folder fails here, with its reason
    out.mkdir(parents=True, exist_ok=True)  # nothing is written before every setting and file has been validated
    write_federation(partitioned, federation)

    _print_header(console, federation, config)
    embed_federation(config, console=console)
    console.print("starting Flower's simulation engine...")
    return _run(console, config, num_departments=len(federation.departments))


def resume_federation(run_dir: Path, *, console: Console) -> dict[str, Any]:
    """Continue a stopped simulation from its last completed round, with its own settings and ledgers."""
    config = resume_config(run_dir)
    manifest = json.loads((Path(config.partition_dir) / "manifest.json").read_text())
    console.print(f"[bold]fedpriv simulate --resume[/]: {run_dir}, continuing after round {config.resume_after_round} "
                  f"of {config.num_server_rounds}")
    return _run(console, config, num_departments=len(manifest["departments"]))


def _run(console: Console, config: RunConfig, *, num_departments: int) -> dict[str, Any]:
    out = Path(config.out_dir)
    status = run_simulation(
        run_config=config.to_run_config(), num_departments=num_departments, run_dir=out,
        on_round=lambda entry: print_round(console, entry, config),
    )
    print_summary(console, out, status)
    return status


def privacy_mechanisms(config: RunConfig) -> str:
    """The DP mechanisms of a run, in the order its rounds use them."""
    stages = []
    noise = "distributed noise" if config.distributed_noise else "local noise"
    if config.centering_round:
        stages.append(f"round {config.centering_round} Gaussian feature mean ({noise})")
    if config.statistics_round:
        stages.append(f"round {config.statistics_round} Gaussian class statistics ({noise})")
    if config.dp_sgd_rounds:
        stages.append(f"{config.dp_sgd_rounds} round(s) of DP-SGD")
    return ", then ".join(stages)


def _print_header(console: Console, federation: Federation, config: RunConfig) -> None:
    console.print(f"[bold]fedpriv simulate[/]: {federation.description}")
    console.print(
        f"{len(federation.departments)} departments, {len(federation.labels)} labels, {config.num_server_rounds} rounds, "
        f"model {config.model} ({'head only' if config.head_only else f'LoRA r={config.lora_r} + head'}), "
        f"batch {config.batch_size}"
    )
    if config.dp:
        console.print(
            f"Differential privacy: {privacy_mechanisms(config)}, each department's budget epsilon={config.target_epsilon}, "
            f"delta={config.target_delta} over the whole run ({config.accountant} accountant)"
        )
    else:
        console.print(NO_DP_WARNING)
    scoped = sum(d.scoped for d in federation.departments)
    if scoped:
        console.print(f"Label scopes: {scoped} of {len(federation.departments)} departments declare theirs and train "
                      "only those labels' rows of the head")
    if config.secagg:
        console.print("Secure aggregation: Flower SecAgg+ (the server learns only the weighted sum of updates; "
                      f"{secagg_neighbourhood(config.secagg_num_shares)})")
    else:
        console.print("[bold yellow]--no-secagg: the server sees every department's individual update.[/]")
    console.print(f"Run folder: {config.out_dir}")


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_round(console: Console, entry: dict[str, Any], config: RunConfig) -> None:
    departments = entry.get("departments", {})
    epsilons = {n: d.get("epsilon") for n, d in departments.items() if d.get("epsilon") is not None}
    if not config.dp:
        eps_text = "no DP"
    elif len(epsilons) <= 5:
        eps_text = " ".join(f"{n}={e:.2f}" for n, e in sorted(epsilons.items()))
    elif epsilons:
        eps_text = f"{min(epsilons.values()):.2f}..{max(epsilons.values()):.2f} over {len(epsilons)} depts"
    else:
        eps_text = "-"
    failures = f"  [red]{len(entry['failures'])} failure(s)[/]" if entry.get("failures") else ""
    console.print(
        f"round {entry['round']:>3}/{config.num_server_rounds}  acc {_fmt(entry.get('accuracy'), '.4f')}  "
        f"loss {_fmt(entry.get('loss'), '.4f')}  train-loss {_fmt(entry.get('train_loss'), '.4f')}  "
        f"epsilon {eps_text}  [{_fmt(entry.get('elapsed_s'), '.0f')} s]{failures}",
        highlight=False,
    )


def print_summary(console: Console, out: Path, status: dict[str, Any]) -> None:
    """The end of a run in brief: the ledger, accuracy, what went wrong, where the files are."""
    from simulation.cli.admin import ledger_table

    metrics_path = out / METRICS_FILE
    if status.get("state") != "completed":
        console.print(f"[bold red]run failed:[/] {status.get('message')}")
    if not metrics_path.exists():
        return
    metrics = json.loads(metrics_path.read_text())
    console.print(ledger_table(out))
    if metrics.get("ended_early"):
        console.print(f"[yellow]the run ended early:[/] {metrics['ended_early']}")
    if metrics.get("final_accuracy") is not None:
        console.print(f"final accuracy {metrics['final_accuracy']:.4f} ({metrics['final_accuracy_source']})")
    protections = [
        "DP" if metrics.get("dp") else "NO DP",
        "SecAgg+" if metrics.get("secure_aggregation") else "no SecAgg+",
        {"simulation": "in-process simulation", "tls+node-auth": "TLS + node authentication"}.get(
            metrics.get("transport"), "NO TLS, no node authentication"),
    ]
    console.print("protections: " + ", ".join(protections))
    failures = [f"round {r['round']}: {f}" for r in metrics["rounds"] for f in r.get("failures", [])]
    if failures:
        console.print(f"[yellow]{len(failures)} failure(s)[/], first: {failures[0]}")
    clipped = sum(r.get("secagg_out_of_range") or 0 for r in metrics["rounds"])
    if clipped:
        console.print(f"[yellow]SecAgg+ clipped {clipped} update values to its range[/] (per round in metrics.json)")
    console.print(f"report: {out / REPORT_FILE}\nmetrics: {metrics_path}\nplot: {out / PLOT_FILE}\nmodel: {out / 'model'}")
