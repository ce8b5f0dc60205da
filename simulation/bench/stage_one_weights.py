"""Benchmark table 10: how stage 1 weighs its rows, chosen on CLINC150's validation split.

Departments hold CLINC150's ``train`` split, 10 by domain (no declared scopes) or 10 by
Dirichlet(0.5); the head is scored on ``val``, never on ``test``. Each cell is every department's
real release (``client.class_statistics``: ``plan_statistics`` calibrated to the cell's epsilon with
the PRV accountant, then ``release_statistics`` with fresh noise), summed as SecAgg+ sums them, and
the server's nearest-class-mean head (``server.class_statistics``), averaged over ``draws`` noise
draws. No Flower and no DP-SGD: the mechanism and the head alone, on frozen features embedded once.

The designs: the yes/no threshold of 3 count-noise deviations (the earlier default, as weights that
jump from 0 to 1), every row with no counts, and row weights clip((noisy count - offset deviations)
/ full-weight count, 0, 1) for a few offsets and full-weight counts (the default among them).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

from shared.config import DEFAULTS

EPSILONS = (1.0, 3.0, 8.0)
# (name, count offset in deviations, full-weight count); None: every row, no counts
WEIGHTINGS: tuple[tuple[str, float, float] | tuple[str, None, None], ...] = (
    ("threshold 3 deviations (earlier default)", 3.0, 1e-9),
    ("every row, no counts", None, None),
    (f"weights, offset {DEFAULTS.statistics_count_offset:g}, full at {DEFAULTS.statistics_full_weight_count:g} (default)",
     DEFAULTS.statistics_count_offset, DEFAULTS.statistics_full_weight_count),
    ("weights, offset 0.5, full at 100", 0.5, 100.0),
    ("weights, offset 0, full at 25", 0.0, 25.0),
)


def weight_sweep(*, data: Path, out: Path, model: str, draws: int = 3, seed: int = 0) -> dict[str, Any]:
    import json

    import torch

    from client.class_statistics import plan_statistics, release_statistics
    from server.class_statistics import nearest_class_mean_head
    from shared.data import Record, derive_labels
    from shared.features import labelled_dataset
    from shared.model import load_backbone
    from shared.partition import by_domain, dirichlet
    from simulation.local.clinc150 import load_clinc150

    started = time.perf_counter()
    clinc = load_clinc150(data)
    full = json.loads((data / "data_full.json").read_text())
    train = [Record(text, intent, None, f"train[{i}]") for i, (text, intent) in enumerate(full["train"])]
    val = [Record(text, intent, None, f"val[{i}]") for i, (text, intent) in enumerate(full["val"])]
    labels = derive_labels(train)
    backbone = load_backbone(model)

    def embedded(records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        features, targets = labelled_dataset(backbone, records, labels=labels, max_length=DEFAULTS.max_length,
                                             head_only=True, cache_dir=out / "feature-cache").tensors
        return features, targets

    (train_x, train_y), (val_x, val_y) = embedded(train), embedded(val)
    index = {record.source: i for i, record in enumerate(train)}
    splits = {"by domain, no scopes": by_domain(train, clinc.domains),
              "Dirichlet(0.5)": dirichlet(train, num_departments=10, alpha=0.5, seed=seed)}
    calibrated = {(epsilon, counts): plan_statistics(
        target_epsilon=epsilon, delta=DEFAULTS.target_delta, prior=[], accountant="prv",
        count_share=DEFAULTS.statistics_count_share, count_offset=0.0, full_weight_count=1.0, release_counts=counts,
    ) for epsilon in EPSILONS for counts in (True, False)}
    generator = torch.Generator().manual_seed(seed)
    cells = []
    for split, departments in splits.items():
        parts = [torch.tensor([index[r.source] for r in records]) for records in departments.values()]
        for epsilon in EPSILONS:
            for name, offset, full_weight in WEIGHTINGS:
                plan = dataclasses.replace(calibrated[(epsilon, offset is not None)], count_offset=offset or 0.0,
                                           full_weight_count=full_weight or 1.0)
                every_row = None if offset is not None else list(range(len(labels)))
                accuracies = []
                for _ in range(draws):
                    total = sum(release_statistics(train_x[p], train_y[p], num_labels=len(labels), plan=plan,
                                                   scope_rows=every_row, generator=generator).sums for p in parts)
                    weight, _ = nearest_class_mean_head(total.numpy(), logit_scale=DEFAULTS.ncm_logit_scale)
                    accuracies.append(float(((val_x.numpy() @ weight.T).argmax(1) == val_y.numpy()).mean()))
                cells.append({"split": split, "epsilon": epsilon, "weighting": name,
                              "val_accuracy": statistics.mean(accuracies), "draws": accuracies})
    return {"cells": cells, "model": model, "draws": draws, "wall_time_s": round(time.perf_counter() - started, 1)}


def weight_sweep_markdown(sweep: dict[str, Any]) -> list[str]:
    splits = list(dict.fromkeys(c["split"] for c in sweep["cells"]))
    header = "| weighting | " + " | ".join(f"{s}, epsilon {e:g}" for s in splits for e in EPSILONS) + " |"
    lines = [header, "|---|" + "---|" * (len(splits) * len(EPSILONS))]
    for name, _, _ in WEIGHTINGS:
        row = {(c["split"], c["epsilon"]): c["val_accuracy"] for c in sweep["cells"] if c["weighting"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{row[(s, e)]:.4f}" for s in splits for e in EPSILONS) + " |")
    return lines + ["", f"Mean of {sweep['draws']} noise draws per cell; {sweep['model']}; "
                        f"{sweep['wall_time_s']} s with embedding."]
