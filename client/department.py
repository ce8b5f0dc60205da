"""One department's side of a round: check the request, train with DP-SGD, account, report.

``DepartmentClient`` is a Flower ``NumPyClient``: it receives only the global trainable
parameters (LoRA adapters + head) and returns only those, with ``num-examples`` and metrics.
Per-process caches keep the backbone, the department's records and their features between
rounds; everything that matters for privacy is on disk (``client.privacy.PrivacyLedger``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch
from flwr.client import NumPyClient

from client.activity import activity_line, record_activity
from client.class_statistics import StatisticsPlan, plan_stage_one, release_statistics
from client.department_data import DepartmentSettings
from client.dp_training import train_plain, train_private
from client.feature_mean import FeatureMeanPlan, plan_feature_mean, release_feature_mean
from client.label_scope import scoped_head
from client.prepared_data import PreparedData, prepare, shared_classifier, train_features
from client.privacy import (
    MECHANISM_CLASS_COUNTS,
    MECHANISM_CLASS_SUMS,
    MECHANISM_FEATURE_MEAN,
    PrivacyLedger,
    department_batch,
)
from client.secure_aggregation import MASKED_BY_SECAGG, check_weight, out_of_range, update_delta
from client.update_replay import load_update, request_key, save_update
from shared import protocol, secagg_masks
from shared.accounting import epsilon_of
from shared.centering import CENTERING_PARAMETER
from shared.config import RunConfig
from shared.data import safe_name
from shared.errors import BudgetExhausted, ConfigError, DataError, FedprivError, LedgerError, TrainingError
from shared.evaluation import evaluate_module
from shared.model import load_backbone, trainable_names
from shared.params import get_trainable, set_trainable
from shared.reply_signature import reply_message, sign
from shared.top_layers import CachedTopLayers


def shareable_reason(error: FedprivError) -> str:
    """What the server may read of a department's error: never record content.

    A data error can quote a record (an unknown label, a malformed line), so only its kind leaves;
    the department's own activity log keeps the whole message. Every other error (a ledger that
    cannot be trusted, settings, the request, the model, the budget) is sent as it is.
    """
    if isinstance(error, DataError) and not isinstance(error, LedgerError):
        return ("its records or its ledger cannot be used (DataError); the department's activity log names the file, "
                "line and problem")
    return str(error)


class DepartmentClient(NumPyClient):
    def __init__(self, *, config: RunConfig, settings: DepartmentSettings, run_id: int) -> None:
        self.config = config
        self.settings = settings
        self.run_id = run_id
        self.classifier = shared_classifier(
            config.model, len(config.labels), config.lora_r, config.lora_alpha, config.lora_targets, config.lora_layers
        )

    def _check_backbone(self, fingerprint: str) -> None:
        if fingerprint != load_backbone(self.config.model).fingerprint:
            raise ConfigError(f"the server's backbone differs from this department's ({self.config.model})",
                              source=f"request to department {self.settings.name}")

    def _trained_module(self) -> torch.nn.Module:
        if self.config.lora_layers:
            return CachedTopLayers(self.classifier, count=self.config.lora_layers)
        return self.classifier.feature_head() if self.config.head_only else self.classifier

    @contextmanager
    def _module_to_train(self, *, scoped: bool = True) -> Iterator[torch.nn.Module]:
        """The trained module; with a label scope (and ``scoped``), only its own rows of the head are trainable."""
        scope = self.settings.label_scope
        if not (scope and scoped):
            yield self._trained_module()
            return
        rows = [self.config.labels.index(label) for label in scope]
        with scoped_head(self.classifier, rows):
            yield self._trained_module()

    @property
    def run(self) -> str:
        return self.config.run_uid or str(self.run_id)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """One round's release (class statistics or a DP-SGD delta), signed in deployment.

        A request the department cannot serve is answered as a named failure (weight 0, nothing
        trained or released) whose reason holds no record content (``shareable_reason``).
        """
        server_round, stage, records = int(config.get(protocol.SERVER_ROUND, 0)), str(config.get(protocol.STAGE, "?")), None
        try:
            request = protocol.FitRequest.from_config(config, department=self.settings.name)
            arrays, weight, metrics = self._fit(parameters, request)
            records = len(prepare(self.settings, self.config).department.train)
        except FedprivError as error:
            record_activity(self.settings.state_dir, f"{self.settings.name}: round {server_round} failed: {error}")
            arrays, weight = [np.zeros_like(p, dtype=np.float32) for p in parameters], 0
            metrics = {protocol.DEPARTMENT: self.settings.name, protocol.DP_ENABLED: self.config.dp,
                       protocol.STATUS: protocol.STATUS_FAILED, protocol.REASON: shareable_reason(error)}
        record_activity(self.settings.state_dir, activity_line(
            department=self.settings.name, run=self.run, server_round=server_round, stage=stage, metrics=metrics,
            records=records))
        if self.settings.signing_key is not None:
            message = reply_message(
                run=self.run, server_round=server_round, department=self.settings.name,
                status=str(metrics.get(protocol.STATUS)), ledger=str(metrics.get(protocol.LEDGER_ENTRY, "")),
            )
            metrics = metrics | {protocol.SIGNATURE: sign(message, private_key=self.settings.signing_key)}
        return arrays, weight, metrics

    def _secure_aggregation(self, request: protocol.FitRequest) -> bool:
        """Whether this reply will be masked by SecAgg+: known from how the request arrived, checked
        against the run's settings and the server's mask generator."""
        masked = MASKED_BY_SECAGG.get()
        source = f"request to department {self.settings.name}"
        if self.config.secagg and not masked:
            raise ConfigError("the run uses SecAgg+, but this request did not arrive through it: department "
                              f"{self.settings.name} sends nothing unmasked", source=source)
        if masked and request.secagg_masks != secagg_masks.NAME:
            raise ConfigError(f"the server does not say it unmasks with {secagg_masks.NAME} masks; department "
                              f"{self.settings.name} sends nothing under Flower's 32-bit-seeded masks", source=source)
        return masked

    def _fit(self, parameters: list[np.ndarray], request: protocol.FitRequest) -> tuple[list[np.ndarray], int, dict]:
        self._check_backbone(request.backbone_fingerprint)
        secagg = self._secure_aggregation(request)
        server_round = request.server_round
        key = request_key(run=self.run, server_round=server_round, parameters=parameters)
        replayed = load_update(self.settings.state_dir, key=key)
        if replayed is not None:
            return replayed
        set_trainable(self.classifier, parameters)
        data = prepare(self.settings, self.config)
        if secagg:
            check_weight(department=self.settings.name, num_examples=len(data.train),
                         max_weight=self.config.secagg_max_weight)
        if request.stage in (protocol.STAGE_FEATURE_MEAN, protocol.STAGE_STATISTICS):
            delta, num_examples, metrics = self._release(parameters, data, request, secagg=secagg)
        else:
            delta, num_examples, metrics = self._train(parameters, data, request, secagg=secagg)
        if not all(np.all(np.isfinite(d)) for d in delta):
            raise TrainingError(f"department {self.settings.name}: training produced NaN or infinite values; "
                                "nothing was sent")
        if secagg:
            metrics[protocol.OUT_OF_RANGE] = out_of_range(
                delta, num_examples=num_examples, max_weight=self.config.secagg_max_weight,
                clipping_range=self.config.secagg_clipping_range,
            )
        else:  # the bound SecAgg+ applies, so the server can refuse what no honest department sends
            bound = self.config.secagg_clipping_range
            delta = [np.clip(d, -bound, bound) for d in delta]
        if self.config.audit_updates:
            audit = self.settings.state_dir / "audit" / f"round-{server_round:03d}.npz"
            audit.parent.mkdir(parents=True, exist_ok=True)
            np.savez(audit, *delta, num_examples=num_examples)
        if metrics[protocol.STATUS] == protocol.STATUS_TRAINED and self.config.dp:
            save_update(self.settings.state_dir, key=key, delta=delta, num_examples=num_examples, metrics=metrics)
        return delta, num_examples, metrics

    def _declined(self, parameters: list[np.ndarray], metrics: dict, *, status: str, reason: str) -> tuple[list[np.ndarray], int, dict]:
        """No training: a zero delta with weight 0 adds nothing to the (possibly masked) average."""
        metrics.update({protocol.STATUS: status, protocol.REASON: reason})
        return [np.zeros_like(p, dtype=np.float32) for p in parameters], 0, metrics

    def _release(
        self, parameters: list[np.ndarray], data: PreparedData, request: protocol.FitRequest, *, secagg: bool
    ) -> tuple[list[np.ndarray], int, dict]:
        """Stage 1: the DP feature-mean release (in the centring's slot) or the DP class-statistics
        release on centred features (in the head's), scaled into SecAgg+'s range.

        Sent with weight secagg-max-weight (every department the same), so SecAgg+'s weighted
        average times the number of departments is the plain sum (``server.class_statistics``).
        """
        server_round, mean_round = request.server_round, request.stage == protocol.STAGE_FEATURE_MEAN
        metrics: dict = {protocol.DEPARTMENT: self.settings.name, protocol.DP_ENABLED: self.config.dp}
        cfg, policy = self.config, self.settings.policy
        refusals = policy.refusals_of_request(secagg=secagg, aggregate_size=request.aggregate_size)
        scope = self.settings.label_scope
        scope_rows = [cfg.labels.index(label) for label in scope] if scope else None
        shares, refused = policy.noise_shares(requested=cfg.distributed_noise and cfg.dp, secagg=secagg)
        refusals += refused
        if shares > 1:  # a noise share on every row, in or out of a scope, so that every row of the sum has the
            # whole release's noise (a label one department alone holds would otherwise carry one share); no counts
            scope_rows = list(range(len(cfg.labels)))
        features, targets = train_features(self.settings, cfg, data)
        plan: FeatureMeanPlan | StatisticsPlan | None = None
        ledger = None
        if cfg.dp:
            ledger = PrivacyLedger(self.settings.state_dir, department=self.settings.name)
            ledger.check_anchor(request.ledger_indexes.get(safe_name(self.settings.name), 0))
            budget = policy.effective_budget(cfg)
            before = ledger.spent(delta=policy.delta, accountant=cfg.accountant)
            metrics.update({protocol.DELTA: policy.delta, protocol.BUDGET: budget, protocol.EPSILON: before})
            try:
                if mean_round:
                    plan = plan_feature_mean(cfg, budget=budget, delta=policy.delta, prior=ledger.history)
                else:  # stage 1 began before this run's feature mean
                    before_stage = ledger.history_without(run=self.run, mechanism=MECHANISM_FEATURE_MEAN)
                    plan = plan_stage_one(cfg, budget=budget, delta=policy.delta, prior=ledger.history,
                                          before_stage=before_stage, release_counts=scope_rows is None)
            except BudgetExhausted as exhausted:
                return self._declined(parameters, metrics, status=protocol.STATUS_BUDGET_EXHAUSTED, reason=str(exhausted))
            after = epsilon_of(ledger.history + plan.mechanisms, delta=policy.delta, accountant=cfg.accountant)
            refusals += policy.refusals_of_round(plan, before=before, after=after)
        elif policy.min_noise_multiplier is not None or policy.max_epsilon_per_round is not None:
            refusals.append("this department's site policy limits the privacy cost of a round; a --no-dp run has none")
        if refusals:
            return self._declined(parameters, metrics, status=protocol.STATUS_POLICY_REFUSED, reason="; ".join(refusals))
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        by_name: dict[str, torch.Tensor]
        if mean_round:
            mean_plan = plan if isinstance(plan, FeatureMeanPlan) else None
            by_name = {CENTERING_PARAMETER: release_feature_mean(
                features, plan=mean_plan.shared_by(shares) if mean_plan else None, generator=generator)}
            names = [MECHANISM_FEATURE_MEAN]
        else:
            statistics_plan = plan if isinstance(plan, StatisticsPlan) else None
            release = release_statistics(
                self.classifier.centering(features), targets, num_labels=len(cfg.labels),
                plan=statistics_plan.shared_by(shares) if statistics_plan else None, scope_rows=scope_rows,
                generator=generator,
            )
            metrics[protocol.RELEASED_LABELS] = release.released_labels
            by_name = {"head.weight": release.sums, "head.bias": release.counts}
            names = ([MECHANISM_CLASS_COUNTS] if statistics_plan and statistics_plan.counts_sigma else []) + [MECHANISM_CLASS_SUMS]
        metrics[protocol.STATUS] = protocol.STATUS_TRAINED
        if ledger is not None and plan is not None:
            entries = ledger.record(
                run=self.run, server_round=server_round, mechanisms=list(zip(names, plan.mechanisms, strict=True)),
                accountant=cfg.accountant, delta=policy.delta, budget=policy.effective_budget(cfg), noise_shares=shares,
            )
            metrics.update({
                protocol.EPSILON: entries[-1].epsilon,
                protocol.NOISE_MULTIPLIER: plan.sums_sigma if isinstance(plan, StatisticsPlan) else plan.noise_multiplier,
                protocol.LEDGER_ENTRY: "\n".join(json.dumps(asdict(e)) for e in entries),
            })
        scale = cfg.feature_mean_scale if mean_round else cfg.statistics_scale
        arrays = [np.asarray(by_name[n] / scale, dtype=np.float32) if n in by_name else np.zeros_like(p, dtype=np.float32)
                  for n, p in zip(trainable_names(self.classifier), parameters, strict=True)]
        return arrays, cfg.secagg_max_weight, metrics

    def _train(
        self, parameters: list[np.ndarray], data: PreparedData, request: protocol.FitRequest, *, secagg: bool
    ) -> tuple[list[np.ndarray], int, dict]:
        server_round = request.server_round
        metrics: dict = {protocol.DEPARTMENT: self.settings.name, protocol.DP_ENABLED: self.config.dp}
        cfg, policy = self.config, self.settings.policy
        refusals = policy.refusals_of_request(secagg=secagg, aggregate_size=request.aggregate_size)
        if not cfg.dp:
            if policy.min_noise_multiplier is not None or policy.max_epsilon_per_round is not None:
                refusals.append("this department's site policy limits the privacy cost of a round; a --no-dp run has none")
            if refusals:
                return self._declined(parameters, metrics, status=protocol.STATUS_POLICY_REFUSED, reason="; ".join(refusals))
            with self._module_to_train() as module:
                result = train_plain(
                    module=module, dataset=data.train, local_epochs=cfg.local_epochs,
                    batch_size=department_batch(num_records=len(data.train), batch_size=cfg.batch_size).expected,
                    learning_rate=cfg.learning_rate, momentum=cfg.momentum, seed=cfg.seed + server_round,
                )
            metrics.update({protocol.STATUS: protocol.STATUS_TRAINED, protocol.TRAIN_LOSS: result.mean_loss})
            return update_delta(get_trainable(self.classifier), parameters), len(data.train), metrics

        planned_rounds = cfg.dp_sgd_rounds
        if planned_rounds < 1:
            raise ConfigError(f"round {server_round} asks for DP-SGD, but the run plans none "
                              f"({cfg.num_server_rounds} round(s), all of them stage 1)",
                              source=f"request to department {self.settings.name}")
        # Distributed noise: one step a round with a 1/sqrt(shares) share of the noise, every trained
        # parameter (a declared scope too) getting its share, so that every coordinate of the SecAgg+ sum
        # carries the whole noise (client.dp_training.train_private)
        shares, refused = policy.noise_shares(requested=cfg.distributed_noise, secagg=secagg)
        refusals += refused
        batch = department_batch(num_records=len(data.train), batch_size=cfg.batch_size, distributed=shares > 1)
        ledger = PrivacyLedger(self.settings.state_dir, department=self.settings.name)
        ledger.check_anchor(request.ledger_indexes.get(safe_name(self.settings.name), 0))
        budget = policy.effective_budget(cfg)
        metrics.update({protocol.DELTA: policy.delta, protocol.BUDGET: budget,
                        protocol.EPSILON: ledger.spent(delta=policy.delta, accountant=cfg.accountant)})
        try:
            plan = ledger.plan(
                run=self.run, num_records=len(data.train), batch_size=batch.expected, local_epochs=cfg.local_epochs,
                planned_rounds=planned_rounds, run_epsilon=cfg.target_epsilon, budget=budget, delta=policy.delta,
                accountant=cfg.accountant, one_step_rounds=cfg.distributed_noise,
            )
            before, after = ledger.check_round(plan)
        except BudgetExhausted as exhausted:
            return self._declined(parameters, metrics, status=protocol.STATUS_BUDGET_EXHAUSTED, reason=str(exhausted))
        refusals += policy.refusals_of_round(plan, before=before, after=after)
        if refusals:
            return self._declined(parameters, metrics, status=protocol.STATUS_POLICY_REFUSED, reason="; ".join(refusals))
        with self._module_to_train(scoped=shares == 1) as module:
            result = train_private(
                module=module, dataset=data.train, plan=plan, prior=ledger.history,
                batch_size=batch.expected, public_batch=batch.divisor, local_epochs=cfg.local_epochs, learning_rate=cfg.learning_rate,
                momentum=cfg.momentum, max_grad_norm=cfg.max_grad_norm, noise_shares=shares,
            )
        entry = ledger.record_round(run=self.run, server_round=server_round, plan=plan, steps=result.steps,
                                    noise_shares=shares)
        # Under DP nothing data-dependent leaves but the DP update: no training loss, and every
        # department weighs the same (its record count would be a clear-text statistic of its data).
        metrics.update({
            protocol.STATUS: protocol.STATUS_TRAINED, protocol.EPSILON: entry.epsilon,
            protocol.NOISE_MULTIPLIER: plan.noise_multiplier, protocol.STEPS: result.steps,
            protocol.LEDGER_ENTRY: json.dumps(asdict(entry)),
        })
        return update_delta(get_trainable(self.classifier), parameters), cfg.secagg_max_weight, metrics

    @torch.no_grad()
    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        request = protocol.EvaluateRequest.from_config(config, department=self.settings.name)
        self._check_backbone(request.backbone_fingerprint)
        if self.config.dp:
            # The server picks the model evaluated here, so a crafted model could read label counts
            # back from clear-text accuracy: under DP a department keeps its evaluation to itself.
            return 0.0, 0, {protocol.DEPARTMENT: self.settings.name, protocol.EVALUATION_WITHHELD: True}
        set_trainable(self.classifier, parameters)
        data = prepare(self.settings, self.config)
        dataset = data.test if request.split == protocol.SPLIT_TEST and data.test is not None else data.val
        loss, accuracy = evaluate_module(self._trained_module(), dataset)
        return loss, len(dataset), {
            protocol.DEPARTMENT: self.settings.name, protocol.ACCURACY: accuracy,
            protocol.EVALUATION_SPLIT: protocol.SPLIT_TEST if dataset is data.test else protocol.SPLIT_VAL,
        }

