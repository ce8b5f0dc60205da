"""One department's side of a round: check the request, train with DP-SGD, account, report.

``DepartmentClient`` is a Flower ``NumPyClient``: it receives only the global trainable
parameters (LoRA adapters + head) and returns only those, with ``num-examples`` and metrics.
Per-process caches keep the backbone, the department's records and their features between
rounds; everything that matters for privacy is on disk (``client.privacy.PrivacyLedger``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.client import NumPyClient
from torch.utils.data import TensorDataset

from client.department_data import DepartmentData, DepartmentSettings, load_department
from client.dp_training import train_plain, train_private
from client.privacy import PrivacyLedger
from client.secure_aggregation import check_weight, out_of_range, update_delta
from shared import protocol
from shared.config import RunConfig
from shared.errors import BudgetExhausted, ConfigError
from shared.evaluation import evaluate_module
from shared.features import labelled_dataset
from shared.model import TextClassifier, build_classifier, load_backbone
from shared.params import get_trainable, set_trainable


@functools.lru_cache(maxsize=2)
def shared_classifier(
    model: str, num_labels: int, lora_r: int, lora_alpha: int, lora_targets: tuple[str, ...]
) -> TextClassifier:
    """One classifier per process: all departments served by a process share its frozen backbone."""
    backbone = load_backbone(model)
    return build_classifier(
        backbone, num_labels=num_labels, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets
    )


@dataclass(frozen=True)
class PreparedData:
    department: DepartmentData
    train: TensorDataset  # (*inputs, labels): (features,) head-only, (input_ids, attention_mask) with LoRA
    val: TensorDataset
    test: TensorDataset | None


@functools.lru_cache(maxsize=16)
def prepare(settings: DepartmentSettings, config: RunConfig) -> PreparedData:
    department = load_department(settings, config)
    backbone = load_backbone(config.model)

    def tensors(records) -> TensorDataset:
        return labelled_dataset(
            backbone, records, labels=config.labels, max_length=config.max_length,
            head_only=config.head_only, cache_dir=settings.state_dir / "feature-cache",
        )

    test = tensors(department.test) if department.test else None
    return PreparedData(department, tensors(department.train), tensors(department.val), test)


class DepartmentClient(NumPyClient):
    def __init__(self, *, config: RunConfig, settings: DepartmentSettings, run_id: int) -> None:
        self.config = config
        self.settings = settings
        self.run_id = run_id
        self.classifier = shared_classifier(
            config.model, len(config.labels), config.lora_r, config.lora_alpha, config.lora_targets
        )

    def _check_request(self, request: dict) -> None:
        problems = []
        if request.get(protocol.LABEL_FINGERPRINT, self.config.label_fingerprint) != self.config.label_fingerprint:
            problems.append("the server's label set differs from this department's")
        backbone = load_backbone(self.config.model).fingerprint
        if request.get(protocol.BACKBONE_FINGERPRINT, backbone) != backbone:
            problems.append(f"the server's backbone differs from this department's ({self.config.model})")
        if problems:
            raise ConfigError(problems, source=f"request to department {self.settings.name}")

    def _trained_module(self) -> torch.nn.Module:
        return self.classifier.head if self.config.head_only else self.classifier

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """Train one round; return the update as a delta from the received parameters."""
        self._check_request(config)
        set_trainable(self.classifier, parameters)
        data = prepare(self.settings, self.config)
        if config.get(protocol.SECAGG, False):
            check_weight(department=self.settings.name, num_examples=len(data.train),
                         max_weight=int(config[protocol.SECAGG_MAX_WEIGHT]))
        delta, num_examples, metrics = self._train(parameters, data, config)
        if config.get(protocol.SECAGG, False):
            metrics[protocol.OUT_OF_RANGE] = out_of_range(
                delta, num_examples=num_examples, max_weight=int(config[protocol.SECAGG_MAX_WEIGHT]),
                clipping_range=float(config[protocol.SECAGG_CLIPPING_RANGE]),
            )
        if self.config.audit_updates:
            audit = self.settings.state_dir / "audit" / f"round-{int(config.get(protocol.SERVER_ROUND, 0)):03d}.npz"
            audit.parent.mkdir(parents=True, exist_ok=True)
            np.savez(audit, *delta, num_examples=num_examples)
        return delta, num_examples, metrics

    def _train(self, parameters: list[np.ndarray], data: PreparedData, config: dict) -> tuple[list[np.ndarray], int, dict]:
        server_round = int(config.get(protocol.SERVER_ROUND, 0))
        metrics: dict = {protocol.DEPARTMENT: self.settings.name, protocol.DP_ENABLED: self.config.dp}
        cfg = self.config
        if not cfg.dp:
            result = train_plain(
                module=self._trained_module(), dataset=data.train, batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs, learning_rate=cfg.learning_rate, momentum=cfg.momentum,
                seed=cfg.seed + server_round,
            )
            metrics.update({protocol.STATUS: protocol.STATUS_TRAINED, protocol.TRAIN_LOSS: result.mean_loss})
            return update_delta(get_trainable(self.classifier), parameters), len(data.train), metrics

        ledger = PrivacyLedger(self.settings.state_dir, department=self.settings.name)
        try:
            plan = ledger.plan(
                run_id=self.run_id, num_records=len(data.train), batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs, planned_rounds=int(config.get(protocol.NUM_ROUNDS, cfg.num_server_rounds)),
                target_epsilon=self.settings.target_epsilon, delta=self.settings.delta, accountant=cfg.accountant,
            )
            ledger.check_round(plan)
        except BudgetExhausted as exhausted:
            metrics.update({
                protocol.STATUS: protocol.STATUS_BUDGET_EXHAUSTED, protocol.REASON: str(exhausted),
                protocol.EPSILON: ledger.spent(delta=self.settings.delta, accountant=cfg.accountant),
                protocol.DELTA: self.settings.delta, protocol.TARGET_EPSILON: self.settings.target_epsilon,
            })
            # A zero delta with weight 0 adds nothing to the (possibly masked) average.
            return [np.zeros_like(p, dtype=np.float32) for p in parameters], 0, metrics
        result = train_private(
            module=self._trained_module(), dataset=data.train, plan=plan, prior=ledger.history,
            batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, learning_rate=cfg.learning_rate,
            momentum=cfg.momentum, max_grad_norm=cfg.max_grad_norm,
        )
        entry = ledger.record_round(run_id=self.run_id, server_round=server_round, plan=plan, steps=result.steps)
        metrics.update({
            protocol.STATUS: protocol.STATUS_TRAINED, protocol.TRAIN_LOSS: result.mean_loss,
            protocol.EPSILON: entry.epsilon, protocol.DELTA: entry.delta,
            protocol.TARGET_EPSILON: self.settings.target_epsilon,
            protocol.NOISE_MULTIPLIER: plan.noise_multiplier, protocol.STEPS: result.steps,
        })
        return update_delta(get_trainable(self.classifier), parameters), len(data.train), metrics

    @torch.no_grad()
    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self._check_request(config)
        set_trainable(self.classifier, parameters)
        data = prepare(self.settings, self.config)
        split = config.get(protocol.EVALUATION_SPLIT, protocol.SPLIT_VAL)
        dataset = data.test if split == protocol.SPLIT_TEST and data.test is not None else data.val
        loss, accuracy = evaluate_module(self._trained_module(), dataset)
        return loss, len(dataset), {
            protocol.DEPARTMENT: self.settings.name, protocol.ACCURACY: accuracy,
            protocol.EVALUATION_SPLIT: protocol.SPLIT_TEST if dataset is data.test else protocol.SPLIT_VAL,
        }

