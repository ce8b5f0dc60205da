"""Benchmark table 4: how a round's time and the simulation's memory grow with the number of departments.

Every department holds the same small number of CLINC150 records (drawn label-stratified, so
the work per department is constant and every label is present), the real model, SecAgg+ on.
The growth exponent b of time ~ a * departments^b is fitted by least squares on log-log values.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

from shared.data import Record, write_jsonl
from simulation.bench.runs import measured_run


def stratified(records: list[Record], count: int, *, seed: int) -> list[Record]:
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(record.label, []).append(record)
    rng = random.Random(seed)
    for group in by_label.values():
        rng.shuffle(group)
    picked: list[Record] = []
    while len(picked) < count:
        before = len(picked)
        for group in by_label.values():
            if group and len(picked) < count:
                picked.append(group.pop())
        if len(picked) == before:
            break  # fewer records than asked for
    return picked


def growth_exponent(sizes: list[int], values: list[float]) -> float | None:
    if len(sizes) < 2:
        return None
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def scale_runs(*, pool: list[Record], test: list[Record], out: Path, sizes: list[int], per_department: int,
               rounds: int, model: str, neighbourhoods: list[int]) -> dict[str, Any]:
    """One run per (size, SecAgg+ neighbourhood); neighbourhood 0 is the full mesh, k only where k < size."""
    test_file = out / "scale-data" / "test.jsonl"
    write_jsonl(stratified(test, 1000, seed=1), test_file)
    runs = []
    for departments in sizes:
        data = out / "scale-data" / f"{departments}.jsonl"
        write_jsonl(stratified(pool, departments * per_department, seed=0), data)
        for shares in neighbourhoods:
            if shares and shares >= departments:
                continue
            args = ["--data", str(data), "--test-data", str(test_file), "--partition", "iid", "--departments",
                    str(departments), "--rounds", str(rounds), "--model", model, "--secagg-num-shares", str(shares)]
            run = measured_run(f"scale-{departments}-shares-{shares or 'all'}", args, out)
            runs.append({"departments": departments, "secagg_num_shares": shares,
                         "round_time_median_s": statistics.median(run["round_times_s"]), **run})
    growth = {}
    for shares in neighbourhoods:
        series = [r for r in runs if r["secagg_num_shares"] == shares]
        sizes_run = [r["departments"] for r in series]
        growth[str(shares)] = {
            "sizes": sizes_run,
            "time_exponent": growth_exponent(sizes_run, [r["round_time_median_s"] for r in series]),
            "memory_exponent": growth_exponent(sizes_run, [r["peak_memory_mb"] for r in series]),
        }
    return {"per_department_records": per_department, "runs": runs, "growth": growth}


def _mesh(shares: int) -> str:
    return "every department" if not shares else f"{shares - 1} neighbours"


def scale_markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"Each department: {result['per_department_records']} records; SecAgg+ on; rounds after the first.", "",
             "| departments | SecAgg+ shares with | median round time | round times | "
             "peak memory (whole simulation, PSS) | wall time |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['departments']} | {_mesh(r['secagg_num_shares'])} | {r['round_time_median_s']:.1f} s | "
                     f"{', '.join(f'{t:.1f}' for t in r['round_times_s'])} | {r['peak_memory_mb']} MB | "
                     f"{r['wall_time_s']:.0f} s |")

    def exponent(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    lines.append("")
    for shares, fit in result["growth"].items():
        if len(fit["sizes"]) >= 2:
            lines.append(f"Fitted growth, SecAgg+ with {_mesh(int(shares))} ({', '.join(map(str, fit['sizes']))} "
                         f"departments): round time ~ departments^{exponent(fit['time_exponent'])}, "
                         f"peak memory ~ departments^{exponent(fit['memory_exponent'])}.")
    return lines
