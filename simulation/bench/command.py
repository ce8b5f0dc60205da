"""`fedpriv bench`: every performance number of fedpriv, measured side by side in one invocation.

    fedpriv bench [--quick] [--out DIR] [--only accuracy|overhead|secagg|scale|audit|out-of-scope|stage-one-weights]

Writes DIR/BENCHMARKS.md (the machine, the exact command, one table per piece) and
DIR/bench-results/<piece>.json; the runs, logs and caches go to DIR/bench-results/work/.
Every number comes from this invocation's own runs. Pieces that need CLINC150 (all but the DP
overhead, which falls back to the synthetic demo corpus) are skipped, and say so, without it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer

from simulation.cli.console import console
from simulation.local.clinc150 import default_location, is_clinc150_dir

PIECES = ("accuracy", "overhead", "secagg", "scale", "audit", "out-of-scope", "stage-one-weights")


@dataclass(frozen=True)
class BenchPlan:
    accuracy: tuple[tuple[str, str, float | None], ...]  # (design, partition, epsilon) runs
    overhead_repeats: int
    overhead_lora_records: int
    secagg_sizes: tuple[int, ...]
    secagg_rounds: int
    secagg_repeats: int
    scale_sizes: tuple[int, ...]
    scale_records: int
    scale_neighbourhoods: tuple[int, ...]  # SecAgg+ num-shares: 0 = full mesh
    deployment: bool
    audit_canaries: int  # per audited stage


EPSILONS = (1.0, 3.0, 8.0, None)
FULL = BenchPlan(
    tuple(("default", partition, epsilon) for partition in ("domain", "domain-no-scopes", "dirichlet-0.5")
          for epsilon in EPSILONS)
    + tuple((design, "domains-as-labels", epsilon) for design in ("default", "stage 1") for epsilon in (8.0, None))
    + tuple(("stage 1", partition, 8.0) for partition in ("domain", "domain-no-scopes", "dirichlet-0.5"))
    + tuple(("stage 1, distributed noise", "dirichlet-0.5", epsilon) for epsilon in (1.0, 3.0, 8.0))
    + (("default, distributed noise", "dirichlet-0.5", 8.0),)  # below 8 the default is stage 1 alone
    + tuple(("default, distributed noise, threshold 0.9", "dirichlet-0.5", epsilon) for epsilon in (1.0, 3.0, 8.0))
    + tuple(("stage 1, no centring", partition, epsilon) for partition in ("domain-no-scopes", "dirichlet-0.5")
            for epsilon in (1.0, 3.0))
    + (("stage 1 + 2", "domain", 8.0), ("stage 1 + 2", "domain-no-scopes", 8.0), ("stage 1 + 2", "domain", None),
       ("head DP-SGD (old)", "domain", 8.0), ("head DP-SGD (old)", "dirichlet-0.5", 8.0)),
    7, 256, (5, 10), 5, 2, (10, 50, 100), 100, (0, 21), True, 5000)
QUICK = BenchPlan((("default", "domain", 8.0), ("default", "domain", None), ("stage 1 + 2", "domain", 8.0)),
                  3, 64, (5,), 3, 1, (10, 20), 60, (0, 11), False, 1000)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {name: version(name) for name in ("torch", "flwr", "opacus", "transformers", "peft", "ray")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A few-minute version: fewer settings, rounds and repeats.")] = False,
    out: Annotated[Path, typer.Option(help="Where BENCHMARKS.md and bench-results/ are written.")] = Path("."),
    data: Annotated[Path | None, typer.Option(help="CLINC150 folder (default: ../shared/data/clinc150 or $FEDPRIV_CLINC150).")] = None,
    only: Annotated[list[str] | None, typer.Option(help=f"Run only these pieces (repeatable): {', '.join(PIECES)}.")] = None,
    model: Annotated[str, typer.Option(help="minilm, tiny (tests) or a local model folder.")] = "minilm",
) -> None:
    """Measure accuracy vs privacy, DP and SecAgg+ overhead, scale and the audit; write BENCHMARKS.md."""
    from shared.errors import ConfigError
    from shared.logs import quiet_libraries

    quiet_libraries()
    pieces = tuple(only or PIECES)
    unknown = sorted(set(pieces) - set(PIECES))
    if unknown:
        raise ConfigError(f"--only {unknown}: unknown; the pieces are {', '.join(PIECES)}")
    plan = QUICK if quick else FULL
    clinc = (data or default_location()).resolve()
    has_clinc = is_clinc150_dir(clinc)
    results_dir = out / "bench-results"
    work = results_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    command = "fedpriv " + " ".join(sys.argv[1:])
    sections: list[str] = []
    results: dict[str, Any] = {"machine": machine(), "command": command, "quick": quick}

    def save(name: str, payload: Any) -> None:
        results[name] = payload
        (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))

    def skipped(title: str) -> None:
        sections.extend([f"## {title}", "", f"Skipped: CLINC150 not found at {clinc}.", ""])

    accuracy_runs: list[dict[str, Any]] = []
    if "accuracy" in pieces or "audit" in pieces or "out-of-scope" in pieces:
        if has_clinc:
            from simulation.bench.accuracy import accuracy_markdown, centralized_ceiling
            from simulation.bench.accuracy import accuracy_runs as run_accuracy

            console.print("[bold]accuracy vs privacy[/] (CLINC150)")
            runs = plan.accuracy if "accuracy" in pieces else [("default", "domain", 8.0), ("default", "domain", None)]
            accuracy_runs = run_accuracy(data=clinc, out=work, plan=list(runs), model=model,
                                         rounds=3 if quick else None)
            central = {"150 intents": centralized_ceiling(data=clinc, out=work, model=model),
                       "domains as labels": centralized_ceiling(data=clinc, out=work, model=model, broad_labels=True)}
            save("accuracy", {"runs": accuracy_runs, "centralized": central})
            sections += ["## 1. Accuracy vs privacy (CLINC150 in-scope test split)", "",
                         "Defaults otherwise; delta 1e-5 per department. `domain`: each department declares its "
                         "domain's intents as its label scope; `domain-no-scopes`: none declared, as a user's own "
                         "departments (stage 1 finds them from noisy counts). Wall time: the first run embeds the "
                         "records, later runs reuse its cache (`--feature-cache`).", "",
                         *accuracy_markdown(accuracy_runs, central), ""]
        else:
            skipped("1. Accuracy vs privacy")
    if "overhead" in pieces:
        from simulation.bench.overhead import department_peak_memory, overhead_markdown, throughput

        console.print("[bold]DP overhead[/]")
        records, labels, source = _one_department(clinc if has_clinc else None)
        lora = records[: plan.overhead_lora_records]
        overhead = {"source": source,
                    "throughput": [
                        throughput(records=records, labels=labels, model=model, repeats=plan.overhead_repeats,
                                   cache_dir=work / "overhead-feature-cache"),
                        throughput(records=lora, labels=labels, model=model, repeats=plan.overhead_repeats,
                                   cache_dir=None, lora_r=8, batch_size=32),
                    ],
                    "peak_memory_mb": department_peak_memory(records=records, labels=labels, model=model)}
        save("overhead", overhead)
        sections += ["## 2. DP overhead (one department, local training)", "", f"Data: {source}.", "",
                     *overhead_markdown(overhead), ""]
    if "secagg" in pieces:
        if has_clinc:
            from simulation.bench.secagg import deployment_round_times, secagg_markdown, secagg_runs

            console.print("[bold]SecAgg+ overhead[/]")
            rows = secagg_runs(data=clinc, out=work, sizes=list(plan.secagg_sizes), rounds=plan.secagg_rounds,
                               repeats=plan.secagg_repeats, model=model)
            deployed = deployment_round_times(work, rounds=3) if plan.deployment else None
            save("secagg", {"runs": rows, "deployment": deployed})
            sections += ["## 3. Secure aggregation overhead (simulation, CLINC150 IID)", "",
                         *secagg_markdown(rows, deployed), ""]
        else:
            skipped("3. Secure aggregation overhead")
    if "scale" in pieces:
        if has_clinc:
            from simulation.bench.scale import scale_markdown, scale_runs
            from simulation.local.clinc150 import load_clinc150

            console.print("[bold]scale[/]")
            corpus = load_clinc150(clinc)
            scale = scale_runs(pool=corpus.pool, test=corpus.test, out=work, sizes=list(plan.scale_sizes),
                               per_department=plan.scale_records, rounds=3, model=model,
                               neighbourhoods=list(plan.scale_neighbourhoods))
            save("scale", scale)
            sections += ["## 4. Scale (simulation, CLINC150 subsets, SecAgg+ on)", "", *scale_markdown(scale), ""]
        else:
            skipped("4. Scale")
    if "audit" in pieces:
        audited = [r for r in accuracy_runs if r["partition"] == "domain" and r["epsilon"] in (8.0, None)]
        if audited:
            from simulation.bench.accuracy import audit_markdown, audits

            console.print("[bold]audit[/]")
            audit = audits(audited, canaries=plan.audit_canaries)
            save("audit", audit)
            sections += ["## 5. Audit of the by-domain runs (canaries, then the loss attack)", "",
                         *audit_markdown(audit), ""]
        else:
            skipped("5. Audit of the by-domain runs")

    if "out-of-scope" in pieces:
        routed = [r for r in accuracy_runs if (r["design"], r["partition"], r["epsilon"]) == ("default", "domain", 8.0)]
        if routed:
            from simulation.bench.out_of_scope import out_of_scope_markdown, out_of_scope_rows
            from simulation.cli.predict import DEFAULT_THRESHOLD

            console.print("[bold]out-of-scope requests[/]")
            rows = out_of_scope_rows(Path(routed[0]["run_dir"]) / "model", clinc)
            save("out_of_scope", rows)
            sections += ["## 9. `fedpriv predict --threshold` on CLINC150's out-of-scope queries", "",
                         f"Model: the `{routed[0]['name']}` run; in-scope test split and `oos_test`.", "",
                         *out_of_scope_markdown(rows, default=DEFAULT_THRESHOLD), ""]
        else:
            skipped("9. Out-of-scope requests")

    if "stage-one-weights" in pieces:
        if has_clinc:
            from simulation.bench.stage_one_weights import weight_sweep, weight_sweep_markdown

            console.print("[bold]stage-1 row weights[/] (CLINC150 validation split)")
            sweep = weight_sweep(data=clinc, out=work, model=model, draws=1 if quick else 3)
            save("stage_one_weights", sweep)
            sections += ["## 10. Stage 1's row weights (CLINC150 validation split: train -> val)", "",
                         *weight_sweep_markdown(sweep), ""]
        else:
            skipped("10. Stage 1's row weights")

    header = _header(results["machine"], command)
    (out / "BENCHMARKS.md").write_text("\n".join([*header, *sections]))
    (results_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    console.print((out / "BENCHMARKS.md").read_text(), highlight=False, markup=False)


def _one_department(clinc: Path | None) -> tuple[list, tuple[str, ...], str]:
    """One department's records and the federation's labels: CLINC150's first domain, else the demo corpus's first department."""
    from shared.data import derive_labels

    if clinc is not None:
        from simulation.local.clinc150 import load_clinc150

        corpus = load_clinc150(clinc)
        domain = sorted(corpus.domains)[0]
        intents = set(corpus.domains[domain])
        records = [r for r in corpus.pool if r.label in intents]
        return records, derive_labels(corpus.pool), f"CLINC150 domain '{domain}' (its train+val records)"
    from simulation.local.demo_corpus import demo_records

    pool = demo_records()
    first = sorted({r.department for r in pool})[0]
    return [r for r in pool if r.department == first], derive_labels(pool), f"synthetic demo corpus, department '{first}'"


def _header(info: dict[str, Any], command: str) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return ["# fedpriv benchmarks", "",
            f"Measured {info['date']} by `{command}` on {info['cpus']} CPU cores, {info['memory_gb']} GB memory, "
            f"{info['platform']}, Python {info['python']}; {versions}. Every number below comes from that one "
            "invocation; ratios compare runs interleaved in it. JSON: `bench-results/`.", ""]
