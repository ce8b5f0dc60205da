"""Embedding a simulated federation's records before Flower starts, with a progress bar.

Head-only runs (``lora-r`` 0) train on features of the frozen public backbone, which every
department computes once and caches (``shared.features``). Inside Flower that happens in the
simulation's workers, silently, before round 1: minutes for a large file. So `fedpriv simulate`
fills the very caches the departments and the server will read (same texts, same keys), here in
the CLI process where a person can watch it. Nothing is released: the departments still compute
everything they send from their own records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from shared.config import RunConfig


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} texts/s" if task.speed else "")


def embed_federation(config: RunConfig, *, console: Console) -> None:
    """Every department's train/validation/test features and the server's test features, cached."""
    from client.department_data import load_department, resolve_department
    from shared.data import DEFAULT_COLUMNS, load_records
    from shared.model import load_backbone

    if not config.head_only and not config.statistics_round:
        return  # LoRA from the first round: every forward pass goes through the adapters, nothing to cache
    manifest = json.loads((Path(config.partition_dir) / "manifest.json").read_text())
    jobs = []
    for index in range(len(manifest["departments"])):
        settings = resolve_department(config, {"partition-id": index})
        data = load_department(settings, config)
        # head-only: every split trains or evaluates on features; with LoRA only stage 1's training records do
        for part in (data.train, data.val, data.test) if config.head_only else (data.train,):
            if part:
                jobs.append((settings.name, [r.text for r in part], settings.feature_cache))
    if config.test_data and config.head_only:
        test = load_records(config.test_data, columns=DEFAULT_COLUMNS.without_department())
        jobs.append(("server test set", [r.text for r in test], Path(config.feature_cache or Path(config.out_dir) / "feature-cache")))
    previous = os.umask(0o077)  # the departments' own files are theirs alone, as their ClientApps write them
    try:
        _embed(jobs, backbone=load_backbone(config.model), max_length=config.max_length, console=console)
    finally:
        os.umask(previous)


def _embed(jobs: list, *, backbone, max_length: int, console: Console) -> None:
    from shared.features import cached_features

    total = sum(len(texts) for _, texts, _ in jobs)
    columns = (TextColumn("embedding {task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("with the frozen backbone", total=total)
        for name, texts, cache in jobs:
            progress.update(task, description=f"{name}")
            cached_features(backbone, texts, max_length=max_length, cache_dir=cache,
                            progress=lambda done: progress.advance(task, done))
        progress.update(task, description="done (cached)")
