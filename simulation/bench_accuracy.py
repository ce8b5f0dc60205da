"""Benchmark tables 1 and 5: accuracy against privacy on CLINC150, the centralized ceiling, the audit.

Table 1 runs `fedpriv simulate` on CLINC150 for every epsilon and for no DP, with departments
split by domain (10, label-disjoint) and by Dirichlet(0.5) (10), and trains the same model
centrally (all records pooled, no DP, the same optimizer, batch and epochs as rounds) as the
ceiling. Table 5 runs `fedpriv audit` on the by-domain runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from shared.config import DEFAULTS
from simulation.bench_runs import measured_run

PARTITIONS = {"domain": ["--partition", "domain"],
              "dirichlet-0.5": ["--partition", "dirichlet", "--departments", "10", "--alpha", "0.5"]}
TARGETS = {8.0: 0.94, 3.0: 0.92, 1.0: 0.88}  # by domain


def accuracy_runs(*, data: Path, out: Path, epsilons: list[float | None], partitions: list[str],
                  rounds: int, model: str) -> list[dict[str, Any]]:
    """One run per (partition, epsilon); epsilon None is the non-private baseline."""
    results = []
    for partition in partitions:
        for epsilon in epsilons:
            privacy = ["--no-dp"] if epsilon is None else ["--epsilon", str(epsilon)]
            name = f"{partition}-{'no-dp' if epsilon is None else f'eps{epsilon:g}'}"
            args = ["--data", str(data), *PARTITIONS[partition], "--rounds", str(rounds), "--model", model, *privacy]
            results.append({"partition": partition, "epsilon": epsilon, **measured_run(name, args, out)})
    return results


def centralized_ceiling(*, data: Path, out: Path, rounds: int, model: str) -> dict[str, Any]:
    """The same model trained on every record pooled, without DP: what federation and privacy cost."""
    from client.dp_training import train_plain
    from shared.clinc150 import load_clinc150
    from shared.data import derive_labels
    from shared.evaluation import evaluate_module
    from shared.features import labelled_dataset
    from shared.model import build_classifier, load_backbone

    started = time.perf_counter()
    clinc = load_clinc150(data)
    labels = derive_labels(clinc.pool)
    backbone = load_backbone(model)
    classifier = build_classifier(backbone, num_labels=len(labels), lora_r=0, lora_alpha=DEFAULTS.lora_alpha,
                                  lora_targets=DEFAULTS.lora_targets)

    def dataset(records):
        return labelled_dataset(backbone, records, labels=labels, max_length=DEFAULTS.max_length, head_only=True,
                                cache_dir=out / "central-feature-cache")

    train, test = dataset(clinc.pool), dataset(clinc.test)
    train_plain(module=classifier.head, dataset=train, batch_size=DEFAULTS.batch_size, local_epochs=rounds,
                learning_rate=DEFAULTS.learning_rate, momentum=DEFAULTS.momentum, seed=0)
    _, accuracy = evaluate_module(classifier.head, test)
    return {"accuracy": accuracy, "wall_time_s": round(time.perf_counter() - started, 1), "epochs": rounds,
            "records": len(train), "model": model}


def audits(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from simulation.audit import membership_audit

    results = []
    for run in runs:
        audit = membership_audit(Path(run["run_dir"]))
        results.append({"run": run["name"], "epsilon": run["epsilon"], **audit})
    return results


def accuracy_markdown(runs: list[dict[str, Any]], central: dict[str, Any] | None) -> list[str]:
    lines = ["| departments | epsilon | in-scope test accuracy | target | wall time | peak memory |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        target = TARGETS.get(run["epsilon"]) if run["partition"] == "domain" else None
        verdict = "-" if target is None else f">= {target:.2f} {'met' if run['accuracy'] >= target else 'MISSED'}"
        epsilon = "non-private" if run["epsilon"] is None else f"{run['epsilon']:g}"
        lines.append(f"| {run['partition']} (10) | {epsilon} | {run['accuracy']:.4f} | {verdict} | "
                     f"{run['wall_time_s']:.0f} s | {run['peak_memory_mb']} MB |")
    if central:
        lines.append(f"| centralized (pooled, no DP) | non-private | {central['accuracy']:.4f} | ceiling | "
                     f"{central['wall_time_s']:.0f} s | - |")
    return lines


def audit_markdown(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical epsilon (95% lower bound) | claimed epsilon |",
             "|---|---|---|---|---|---|"]
    for r in results:
        def rate(value):
            return f"{value:.4f}" if value is not None else "n/a"
        claimed = f"{r['claimed_epsilon']:g}" if r["claimed_epsilon"] is not None else "none (no DP)"
        lines.append(f"| {r['run']} | {r['auc']:.4f} | {rate(r['tpr_at_1pct_fpr'])} | {rate(r['tpr_at_0_1pct_fpr'])} | "
                     f"{r['empirical_epsilon']:.3f} | {claimed} |")
    return lines
