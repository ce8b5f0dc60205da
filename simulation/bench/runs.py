"""Running `fedpriv simulate` for a benchmark: wall time, peak memory of the whole process tree, results.

Peak memory is the largest sum, over the run's process tree (fedpriv, the SuperLink, Flower's
SuperExec and simulation process, the Ray workers that host the departments), of each process's
proportional set size (PSS: shared pages split among the processes that share them, so the sum
is the memory the run really holds), sampled twice a second.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from shared.errors import FedprivError

FEDPRIV = str(Path(sys.executable).parent / "fedpriv")


def tree_pss(root: psutil.Process) -> int:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def sample_peak(process: subprocess.Popen, *, interval_s: float = 0.5) -> tuple[threading.Thread, list[int]]:
    peak = [0]
    root = psutil.Process(process.pid)

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_pss(root))
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread, peak


def measured_run(name: str, args: list[str], out: Path) -> dict[str, Any]:
    """`fedpriv simulate ARGS --out OUT/runs/NAME`, with its wall time, peak memory and metrics.

    Every run shares OUT/feature-cache: the first run on a data set embeds it, later ones reuse it.
    """
    run_dir = out / "runs" / name
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        process = subprocess.Popen([FEDPRIV, "simulate", *args, "--out", str(run_dir), "--feature-cache",
                                    str(out / "feature-cache")], stdout=stream,
                                   stderr=subprocess.STDOUT)
        sampler, peak = sample_peak(process)
        process.wait()
        sampler.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise FedprivError(f"benchmark run {name} failed; see {log}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "name": name, "run_dir": str(run_dir), "command": " ".join(["fedpriv", "simulate", *args]),
        "accuracy": metrics["final_accuracy"], "accuracy_source": metrics["final_accuracy_source"],
        "wall_time_s": round(wall, 1), "peak_memory_mb": round(peak[0] / 2**20),
        "rounds": len(metrics["rounds"]), "dp": metrics["dp"],
        "round_times_s": round_times(run_dir),
        "department_epsilon": {d: p.get("epsilon") for d, p in sorted(metrics["privacy"].items())},
    }


def round_times(run_dir: Path) -> list[float]:
    """Gaps between consecutive rounds' finish times: round 1 (start-up, embedding) is left out."""
    elapsed = [json.loads(line)["elapsed_s"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return [round(b - a, 3) for a, b in zip(elapsed, elapsed[1:], strict=False)]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
