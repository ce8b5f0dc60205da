"""Stage 2 in the canary audit: the department's DP-SGD rounds, in the audit's own copy, with canaries.

A canary here is a training record with a label of its own (one extra head row each, which no
real record uses): on the head over cached features its input is a unit feature vector in a random
direction; with LoRA it is a copy of one of the department's own inputs (cached states or tokens).
Each is included with probability 1/2; the department's DP-SGD (``train_private``: Opacus, Poisson
sampling, per-sample clipping, the noise its ledger calibrates for the run's planned rounds after
stage 1) trains a fresh model for those rounds. A canary's score is how much training raised its
own label's logit on its own input; the guesses split at the scores' median (a function of the
output alone, never of which canaries were included). The claim is the epsilon of the DP-SGD
rounds alone, as its ledger computes it.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.class_statistics import plan_stage_one
from client.department_data import DepartmentData, DepartmentSettings
from client.dp_training import train_plain, train_private
from client.label_scope import scoped_head
from client.privacy import MECHANISM_CLASS_COUNTS, MECHANISM_CLASS_SUMS, PrivacyLedger, department_batch
from shared.accounting import epsilon_of
from shared.config import RunConfig
from shared.errors import BudgetExhausted
from shared.features import labelled_dataset
from shared.model import Backbone, build_classifier
from shared.top_layers import CachedTopLayers, top_layer_dataset

AUDIT_RUN = "canary-audit"


def _inputs(backbone: Backbone, data: DepartmentData, config: RunConfig, cache: Path) -> list[torch.Tensor]:
    """The department's training inputs as its DP-SGD sees them, and their label indices last."""
    if config.lora_layers:
        dataset = top_layer_dataset(backbone, data.train, labels=config.labels, max_length=config.max_length,
                                    count=config.lora_layers)
    else:
        dataset = labelled_dataset(backbone, data.train, labels=config.labels, max_length=config.max_length,
                                   head_only=config.head_only, cache_dir=cache)
    return list(dataset.tensors)


@torch.no_grad()
def _canary_logits(module: torch.nn.Module, inputs: list[torch.Tensor], rows: torch.Tensor) -> np.ndarray:
    module.eval()
    logits = module(*inputs)
    return logits[torch.arange(len(rows)), rows].to(torch.float64).numpy()


def audit_department_training(
    *, backbone: Backbone, settings: DepartmentSettings, data: DepartmentData, config: RunConfig, canaries: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float, float | None]:
    """Scores, inclusions, the median threshold, and the claimed epsilon of the DP-SGD rounds (None: no DP)."""
    num_labels = len(config.labels)
    *inputs, targets = _inputs(backbone, data, config, settings.feature_cache)
    if config.head_only:
        directions = rng.normal(size=(canaries, inputs[0].shape[1]))
        canary_inputs = [torch.tensor(directions / np.linalg.norm(directions, axis=1, keepdims=True), dtype=inputs[0].dtype)]
    else:
        picked = torch.as_tensor(rng.integers(0, len(targets), canaries))
        canary_inputs = [t[picked] for t in inputs]
    rows = torch.arange(num_labels, num_labels + canaries)
    included = rng.random(canaries) < 0.5
    chosen = torch.as_tensor(included)
    train = TensorDataset(*[torch.cat([t, c[chosen]]) for t, c in zip(inputs, canary_inputs, strict=True)],
                          torch.cat([targets, rows[chosen]]))
    classifier = build_classifier(backbone, num_labels=num_labels + canaries, lora_r=config.lora_r,
                                  lora_alpha=config.lora_alpha, lora_targets=config.lora_targets,
                                  lora_layers=config.lora_layers)
    policy = settings.policy
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="fedpriv-canary-ledger-") as state:
        module = (CachedTopLayers(classifier, count=config.lora_layers) if config.lora_layers
                  else classifier.head if config.head_only else classifier)
        if settings.label_scope:  # it trains its scope's rows only, and here the canaries' rows too
            scope = [config.labels.index(label) for label in settings.label_scope] + rows.tolist()
            head = stack.enter_context(scoped_head(classifier, scope))
            module = head if config.head_only else module
        before = _canary_logits(module, canary_inputs, rows)
        claimed = None
        batch = department_batch(num_records=len(train.tensors[0]), batch_size=config.batch_size)  # as the department samples
        if not config.dp:
            for server_round in range(config.dp_sgd_rounds):
                train_plain(module=module, dataset=train, batch_size=batch.expected, local_epochs=config.local_epochs,
                            learning_rate=config.learning_rate, momentum=config.momentum, seed=config.seed + server_round)
        else:
            ledger = PrivacyLedger(Path(state), department=settings.name)
            budget = policy.effective_budget(config)
            if config.statistics_round:  # stage 1 came first: DP-SGD is calibrated to the rest of the run
                plan = plan_stage_one(config, budget=budget, delta=policy.delta, prior=[], before_stage=[],
                                      release_counts=not settings.label_scope)
                names = ([MECHANISM_CLASS_COUNTS] if plan.counts_sigma else []) + [MECHANISM_CLASS_SUMS]
                ledger.record(run=AUDIT_RUN, server_round=1, mechanisms=list(zip(names, plan.mechanisms, strict=True)),
                              accountant=config.accountant, delta=policy.delta, budget=budget)
            stage_one = len(ledger.history)
            for server_round in range(2, 2 + config.dp_sgd_rounds):
                plan = ledger.plan(run=AUDIT_RUN, num_records=len(train.tensors[0]), batch_size=batch.expected,
                                   local_epochs=config.local_epochs, planned_rounds=config.dp_sgd_rounds,
                                   run_epsilon=config.target_epsilon, budget=budget, delta=policy.delta,
                                   accountant=config.accountant)
                try:
                    ledger.check_round(plan)
                except BudgetExhausted:
                    break
                result = train_private(module=module, dataset=train, plan=plan, prior=ledger.history,
                                       batch_size=batch.expected, public_batch=batch.divisor, local_epochs=config.local_epochs,
                                       learning_rate=config.learning_rate, momentum=config.momentum,
                                       max_grad_norm=config.max_grad_norm)
                ledger.record_round(run=AUDIT_RUN, server_round=server_round, plan=plan, steps=result.steps)
            claimed = epsilon_of(ledger.history[stage_one:], delta=policy.delta, accountant=config.accountant)
        scores = _canary_logits(module, canary_inputs, rows) - before
    return scores, included, float(np.median(scores)), claimed
