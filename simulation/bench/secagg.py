"""Benchmark table 3: what SecAgg+ costs a round, and what a department sends.

CLINC150 split IID over 5 and 10 departments, the real model (head of 150 x 384 + 150 values),
`fedpriv simulate --audit-updates` with and without `--no-secagg`, interleaved (plain, SecAgg+,
plain, SecAgg+, ...) and repeated. Round time is the median gap between consecutive rounds'
finish times (round 1, with start-up and embedding, is left out); bytes are the sizes of what one
department sent in a round as saved by the audit (the masked vector under SecAgg+, the float32
delta without). The SecAgg+ aggregate is replayed against plain FedAvg of the same updates.
With ``deployment``, one TLS + node-authentication federation on loopback is timed as well.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import FedprivError
from simulation.bench.runs import measured_run, round_times


def bytes_per_department(run_dir: Path, *, secagg: bool) -> int:
    if secagg:
        files = sorted((run_dir / "audit").glob("masked-round-002-*.npz"))
    else:
        files = sorted((run_dir / "departments").glob("*/audit/round-002.npz"))
    return int(statistics.median(f.stat().st_size for f in files))


def _arrays(path: Path) -> tuple[list[np.ndarray], int | None]:
    with np.load(path) as saved:
        names = sorted((n for n in saved.files if n.startswith("arr_")), key=lambda n: int(n[4:]))
        return [saved[n].astype(np.float64) for n in names], (int(saved["num_examples"]) if "num_examples" in saved.files else None)


def secagg_vs_plain(run_dir: Path) -> dict[str, float]:
    """Replay the run's audited updates through plain FedAvg and compare with what SecAgg+ gave."""
    from shared.checkpoint import load_checkpoint
    from shared.data import load_records
    from shared.features import cached_features
    from shared.model import load_backbone
    from simulation.local.resume import read_run_config

    aggregates = sorted((run_dir / "audit").glob("aggregate-round-*.npz"))
    secagg_sum: list[np.ndarray] | None = None
    plain_sum: list[np.ndarray] | None = None
    max_error = 0.0
    for path in aggregates:
        server_round = path.stem.rsplit("-", 1)[1]
        secure, _ = _arrays(path)
        updates = [_arrays(p) for p in sorted((run_dir / "departments").glob(f"*/audit/round-{server_round}.npz"))]
        total = sum(n for _, n in updates)
        plain = [sum(arrays[i] * n for arrays, n in updates) / total for i in range(len(secure))]
        max_error = max(max_error, *(float(np.abs(s - p).max()) for s, p in zip(secure, plain, strict=True)))
        secagg_sum = secure if secagg_sum is None else [a + b for a, b in zip(secagg_sum, secure, strict=True)]
        plain_sum = plain if plain_sum is None else [a + b for a, b in zip(plain_sum, plain, strict=True)]
    final, _ = load_checkpoint(run_dir / "checkpoints" / f"round-{len(aggregates):03d}.safetensors")
    secure_model = [final["head.weight"].astype(np.float64), final["head.bias"].astype(np.float64)]
    initial = [s - d for s, d in zip(secure_model, secagg_sum, strict=True)]
    plain_model = [i + d for i, d in zip(initial, plain_sum, strict=True)]
    manifest = json.loads((run_dir / "federation" / "manifest.json").read_text())
    label_index = {label: i for i, label in enumerate(manifest["labels"])}
    test = load_records(run_dir / "federation" / "test.jsonl")
    config = read_run_config(run_dir)
    features = cached_features(load_backbone(config.model), [r.text for r in test], max_length=config.max_length,
                               cache_dir=Path(config.feature_cache or run_dir / "feature-cache")).numpy().astype(np.float64)
    truth = np.array([label_index[r.label] for r in test])

    def accuracy(model: list[np.ndarray]) -> float:
        return float(((features @ model[0].T + model[1]).argmax(1) == truth).mean())

    return {"max_abs_error_per_round": max_error, "accuracy_secagg": accuracy(secure_model),
            "accuracy_plain_fedavg_same_updates": accuracy(plain_model)}


def deployment_round_times(out: Path, *, rounds: int) -> dict[str, Any]:
    """Provision, start a TLS SuperLink and 3 department SuperNodes on loopback (demo data, MiniLM),
    once all 3 are online run `fedpriv run` (its wall time is ``run_wall_s``), and stop every process by PID."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from shared.data import write_jsonl
    from simulation.deploy.processes import free_port
    from simulation.local.demo_corpus import demo_records

    fedpriv = str(Path(sys.executable).parent / "fedpriv")
    bench = out / "deployment"
    port = free_port()
    departments = ("finance", "hr", "it")
    records = demo_records()
    for name in departments:
        write_jsonl([r for r in records if r.department == name], bench / f"{name}.jsonl")
    (bench / "labels.txt").write_text("\n".join(sorted({r.label for r in records if r.department in departments})))
    subprocess.run([fedpriv, "provision", "--out", str(bench / "kits"), "--departments", ",".join(departments),
                    "--superlink", f"127.0.0.1:{port}"], check=True, capture_output=True)
    started = [subprocess.Popen([fedpriv, "server", "start", "--kit", str(bench / "kits" / "server"), "--port", str(port)],
                                stdout=(bench / "server.out").open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))]
    try:
        while "SuperLink up" not in (bench / "server.out").read_text():
            if started[0].poll() is not None:
                raise FedprivError(f"SuperLink did not start; see {bench / 'server.out'}")
            time.sleep(1)
        for name in departments:
            started.append(subprocess.Popen(
                [fedpriv, "department", "start", "--kit", str(bench / "kits" / name), "--data", str(bench / f"{name}.jsonl")],
                stdout=(bench / f"{name}.out").open("w"), stderr=subprocess.STDOUT))
        while (bench / "server.out").read_text().count(": online") < len(departments):  # deployed, then run
            if any(process.poll() is not None for process in started):
                raise FedprivError(f"a SuperNode or the SuperLink stopped; see {bench}/*.out")
            time.sleep(0.5)
        command = [fedpriv, "run", "--kit", str(bench / "kits" / "server"), "--labels-file", str(bench / "labels.txt"),
                   "--min-departments", "3", "--rounds", str(rounds), "--batch-size", "32", "--out", str(bench / "run")]
        started_run = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        run_wall_s = round(time.perf_counter() - started_run, 1)
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            process.wait(timeout=60)
    times = round_times(bench / "run")
    return {"command": " ".join(["fedpriv", *command[1:]]), "round_times_s": times,
            "round_time_median_s": statistics.median(times), "run_wall_s": run_wall_s}


def secagg_runs(*, data: Path, out: Path, sizes: list[int], rounds: int, repeats: int, model: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for departments in sizes:
        for repeat in range(repeats):
            for secagg in (False, True):
                name = f"secagg-{departments}-{'on' if secagg else 'off'}-{repeat}"
                # the head: the sum of the aggregates, on the uncentred features it is scored on
                args = ["--data", str(data), "--partition", "iid", "--departments", str(departments),
                        "--rounds", str(rounds), "--model", model, "--audit-updates",
                        "--server-momentum", "0", "--centering-share", "0"] + ([] if secagg else ["--no-secagg"])
                run = measured_run(name, args, out)
                run_dir = Path(run["run_dir"])
                rows.append({
                    **(secagg_vs_plain(run_dir) if secagg and repeat == 0 else {}),
                    "departments": departments, "secagg": secagg, "repeat": repeat, "command": run["command"],
                    "round_time_median_s": statistics.median(run["round_times_s"]), "round_times_s": run["round_times_s"],
                    "bytes_per_department": bytes_per_department(run_dir, secagg=secagg), "accuracy": run["accuracy"],
                })
    return rows


def secagg_markdown(rows: list[dict[str, Any]], deployed: dict[str, Any] | None) -> list[str]:
    lines = ["| departments | median round time, plain | with SecAgg+ | ratio (median over repeats, min..max) | "
             "bytes per department per round, plain / SecAgg+ |", "|---|---|---|---|---|"]
    for departments in sorted({r["departments"] for r in rows}):
        plain = [r for r in rows if r["departments"] == departments and not r["secagg"]]
        secure = [r for r in rows if r["departments"] == departments and r["secagg"]]
        ratios = [s["round_time_median_s"] / p["round_time_median_s"] for p, s in zip(plain, secure, strict=True)]
        target = "met" if statistics.median(ratios) <= 1.1 else "MISSED"
        lines.append(
            f"| {departments} | {statistics.median(r['round_time_median_s'] for r in plain):.2f} s | "
            f"{statistics.median(r['round_time_median_s'] for r in secure):.2f} s | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}..{max(ratios):.2f}; target <= 1.1x {target}) | "
            f"{plain[0]['bytes_per_department']:,} / {secure[0]['bytes_per_department']:,} |")
    lines += ["", "SecAgg+ aggregate vs plain FedAvg of the same audited updates (first repeat, all rounds):", "",
              "| departments | max abs error per round | test accuracy SecAgg+ | plain FedAvg of the same updates |",
              "|---|---|---|---|"]
    lines += [f"| {r['departments']} | {r['max_abs_error_per_round']:.2e} | {r['accuracy_secagg']:.4f} | "
              f"{r['accuracy_plain_fedavg_same_updates']:.4f} |" for r in rows if "max_abs_error_per_round" in r]
    if deployed:
        lines += ["", f"Deployment on loopback (TLS, node authentication, SecAgg+, 3 departments, MiniLM, demo data): "
                  f"median round time {deployed['round_time_median_s']:.1f} s, `fedpriv run` {deployed['run_wall_s']:.0f} s "
                  f"end to end (`{deployed['command']}`)."]
    return lines
