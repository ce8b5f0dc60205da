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
from simulation.bench_runs import measured_run


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
               rounds: int, model: str) -> dict[str, Any]:
    test_file = out / "scale-data" / "test.jsonl"
    write_jsonl(stratified(test, 1000, seed=1), test_file)
    runs = []
    for departments in sizes:
        data = out / "scale-data" / f"{departments}.jsonl"
        write_jsonl(stratified(pool, departments * per_department, seed=0), data)
        args = ["--data", str(data), "--test-data", str(test_file), "--partition", "iid", "--departments",
                str(departments), "--rounds", str(rounds), "--model", model]
        run = measured_run(f"scale-{departments}", args, out)
        runs.append({"departments": departments, "round_time_median_s": statistics.median(run["round_times_s"]), **run})
    return {
        "per_department_records": per_department, "runs": runs,
        "time_exponent": growth_exponent(sizes, [r["round_time_median_s"] for r in runs]),
        "memory_exponent": growth_exponent(sizes, [r["peak_memory_mb"] for r in runs]),
    }


def scale_markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"Each department: {result['per_department_records']} records; SecAgg+ on; rounds after the first.", "",
             "| departments | median round time | round times | peak memory (whole simulation, PSS) | wall time |",
             "|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['departments']} | {r['round_time_median_s']:.1f} s | "
                     f"{', '.join(f'{t:.1f}' for t in r['round_times_s'])} | {r['peak_memory_mb']} MB | "
                     f"{r['wall_time_s']:.0f} s |")

    def exponent(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    lines += ["", f"Fitted growth: round time ~ departments^{exponent(result['time_exponent'])}, "
              f"peak memory ~ departments^{exponent(result['memory_exponent'])}."]
    return lines
