"""CLINC150 benchmark: 10 label-disjoint departments (one per domain), with DP and without.

    python -m simulation.benchmark [--out bench-results] [--rounds N] [--epsilon 8]

Runs `fedpriv simulate` end to end (Flower simulation engine, Opacus DP-SGD, server-side test on
CLINC150's in-scope test split), one run after the other on this machine, and writes
``clinc150.json`` and ``clinc150.md`` with in-scope test accuracy, wall time and each
department's epsilon. Every number comes from the runs; nothing is typed in.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.clinc150 import default_location, is_clinc150_dir

FEDPRIV = str(Path(sys.executable).parent / "fedpriv")


def run_variant(name: str, args: list[str], out: Path) -> dict[str, Any]:
    run_dir = out / "runs" / name
    command = [FEDPRIV, "simulate", *args, "--out", str(run_dir)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise typer.Exit(f"benchmark run {name} failed; see {out / 'logs' / (name + '.log')}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "name": name,
        "run_dir": str(run_dir),
        "command": " ".join(["fedpriv", "simulate", *args]),
        "accuracy": metrics["final_accuracy"],
        "accuracy_source": metrics["final_accuracy_source"],
        "wall_time_s": round(wall, 1),
        "rounds": len(metrics["rounds"]),
        "dp": metrics["dp"],
        "privacy": {
            d: {"epsilon": p.get("epsilon"), "delta": p.get("delta"), "budget": p.get("target_epsilon")}
            for d, p in sorted(metrics["privacy"].items())
        },
        "accuracy_per_round": [r.get("accuracy") for r in metrics["rounds"]],
    }


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# CLINC150, 10 departments by domain (label-disjoint)",
        "",
        f"Machine: {machine['cpus']} CPUs, Python {machine['python']}, {machine['platform']}. "
        f"Measured {machine['date']}.",
        "",
        "| run | in-scope test accuracy | wall time | epsilon per department (delta) |",
        "|---|---|---|---|",
    ]
    for r in results:
        if r["dp"]:
            eps = [p["epsilon"] for p in r["privacy"].values()]
            delta = next(iter(r["privacy"].values()))["delta"]
            privacy = f"{min(eps):.3f}..{max(eps):.3f} (delta {delta:g}), budget {next(iter(r['privacy'].values()))['budget']}"
        else:
            privacy = "none: --no-dp, no guarantee"
        lines.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['wall_time_s']:.0f} s | {privacy} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results]
    lines += ["", "Per department (DP run):", "", "| department | epsilon | delta |", "|---|---|---|"]
    for r in results:
        if r["dp"]:
            lines += [f"| {d} | {p['epsilon']:.4f} | {p['delta']:g} |" for d, p in r["privacy"].items()]
    return "\n".join(lines) + "\n"


def main(
    out: Annotated[Path, typer.Option(help="Folder for JSON, markdown, logs and runs.")] = Path("bench-results"),
    data: Annotated[Path, typer.Option(help="CLINC150 folder.")] = default_location(),
    rounds: Annotated[int | None, typer.Option(help="Rounds (default: fedpriv's default).")] = None,
    epsilon: Annotated[float, typer.Option(help="Per-department epsilon.")] = 8.0,
    skip_no_dp: Annotated[bool, typer.Option(help="Only the DP run.")] = False,
) -> None:
    if not is_clinc150_dir(data):
        typer.echo(f"CLINC150 not found at {data}; nothing to benchmark.")
        raise typer.Exit(0)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(data)] + (["--rounds", str(rounds)] if rounds else [])
    results = [run_variant(f"dp-eps{epsilon:g}", [*common, "--epsilon", str(epsilon), "--delta", "1e-5"], out)]
    if not skip_no_dp:
        results.append(run_variant("no-dp", [*common, "--no-dp"], out))
    machine = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (out / "clinc150.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    (out / "clinc150.md").write_text(markdown(results, machine))
    typer.echo((out / "clinc150.md").read_text())


if __name__ == "__main__":
    typer.run(main)
