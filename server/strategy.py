"""FedAvg over the trainable parameters, plus what a privacy-aware admin needs from each round.

``FedprivStrategy`` is Flower's own ``FedAvg`` (weighted by ``num-examples``) with hooks that
- send each round's config (round, planned rounds, aggregate size, label and backbone fingerprints,
  SecAgg+ ranges),
- stop asking a department that answered "budget exhausted", and end the run (``FederationEnded``)
  when fewer than ``min-departments`` departments with budget left remain,
- average the departments' deltas (directly, or as SecAgg+'s unmasked weighted sum) and add the
  average to the global parameters,
- record every department's reported epsilon, loss and status, and every failure,
- leave out of the average any department that answered "budget exhausted" (it sent weight 0),
- checkpoint the global trainable parameters after every round,
- number rounds from the checkpoint a resumed run starts from (Flower counts from 1 again).
It stays a plain legacy ``Strategy`` so that Flower's SecAgg+ workflow can drive it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

from server.class_statistics import federation_sums, nearest_class_mean_head
from server.run_folder import ledger_indexes
from server.run_record import RunRecorder
from shared import protocol, secagg_masks
from shared.checkpoint import save_checkpoint
from shared.config import RunConfig
from shared.reply_signature import reply_message, verify

EvaluateFn = Callable[[int, list, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


class FederationEnded(Exception):
    """Not enough departments can still train: the run ends cleanly with what it has."""


class _NotIn(Criterion):
    def __init__(self, excluded: set[str]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


class FedprivStrategy(FedAvg):
    def __init__(
        self, *, config: RunConfig, recorder: RunRecorder, parameter_names: list[str], backbone_fingerprint: str,
        initial_parameters: Parameters, evaluate_fn: EvaluateFn | None, audit_dir: Path | None = None,
    ) -> None:
        self.run_config = config
        self.audit_dir = audit_dir
        self.pending_round: int | None = None
        self.recorder = recorder
        self.parameter_names = parameter_names
        self.backbone_fingerprint = backbone_fingerprint
        self.latest_parameters = initial_parameters
        self.exhausted: dict[str, str] = {}  # node id -> department, for departments out of budget
        self.round_offset = config.resume_after_round
        super().__init__(
            fraction_fit=config.fraction_train,
            fraction_evaluate=1.0,
            min_fit_clients=config.min_departments,
            min_evaluate_clients=config.min_departments,
            min_available_clients=config.min_departments,
            initial_parameters=initial_parameters,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=self._round_config,
            on_evaluate_config_fn=self._evaluate_config,
            accept_failures=True,
        )

    def _stage(self, server_round: int) -> str:
        statistics = server_round == self.run_config.statistics_round
        return protocol.STAGE_STATISTICS if statistics else protocol.STAGE_DP_SGD

    def _round_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            protocol.SERVER_ROUND: server_round,
            protocol.STAGE: self._stage(server_round),
            protocol.NUM_ROUNDS: self.run_config.num_server_rounds,
            protocol.LABEL_FINGERPRINT: self.run_config.label_fingerprint,
            protocol.BACKBONE_FINGERPRINT: self.backbone_fingerprint,
            protocol.SECAGG: self.run_config.secagg,
            protocol.SECAGG_CLIPPING_RANGE: self.run_config.secagg_clipping_range,
            protocol.SECAGG_MAX_WEIGHT: self.run_config.secagg_max_weight,
            protocol.SECAGG_MASKS: secagg_masks.NAME,
            protocol.LEDGER_INDEXES: json.dumps(ledger_indexes(self.recorder.out_dir)),
        }

    def planned_sample_size(self, client_manager: Any) -> int:
        """How many departments the next round asks: those with budget left, times fraction-train."""
        eligible = [cid for cid in client_manager.all() if cid not in self.exhausted]
        return max(int(len(eligible) * self.fraction_fit), self.run_config.min_departments)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        server_round += self.round_offset
        self.pending_round = server_round
        needed = self.run_config.min_departments
        eligible = [cid for cid in client_manager.all() if cid not in self.exhausted]
        if self.exhausted and len(eligible) < needed:
            raise FederationEnded(
                f"ended before round {server_round}: {len(eligible)} department(s) have budget left, "
                f"min-departments is {needed} (budget exhausted: {', '.join(sorted(self.exhausted.values()))})"
            )
        sample_size = self.planned_sample_size(client_manager)
        clients = client_manager.sample(
            num_clients=sample_size, min_num_clients=needed, criterion=_NotIn(set(self.exhausted))
        )
        config = self._round_config(server_round) | {protocol.AGGREGATE_SIZE: len(clients)}
        return [(client, FitIns(parameters, config)) for client in clients]

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        server_round += self.round_offset
        if self.pending_round == server_round:  # the fit workflow ended without calling aggregate_fit
            self.recorder.record_failures(server_round, [
                "no aggregate this round: secure aggregation halted (fewer departments than its threshold "
                "answered) or every department failed; the global model is unchanged"
            ])
        return super().configure_evaluate(server_round - self.round_offset, parameters, client_manager)

    def _evaluate_config(self, server_round: int) -> dict[str, Scalar]:
        server_round += self.round_offset
        last = server_round == self.run_config.num_server_rounds
        split = protocol.SPLIT_TEST if last else protocol.SPLIT_VAL
        return self._round_config(server_round) | {protocol.EVALUATION_SPLIT: split}

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        departments: dict[str, dict[str, Any]] = {}
        trained: list[tuple[ClientProxy, FitRes]] = []
        for proxy, res in results:
            m = res.metrics
            name = str(m.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))
            departments[name] = {
                "status": m.get(protocol.STATUS),
                "epsilon": m.get(protocol.EPSILON),
                "delta": m.get(protocol.DELTA),
                "budget": m.get(protocol.BUDGET),
                "noise_multiplier": m.get(protocol.NOISE_MULTIPLIER),
                "train_loss": m.get(protocol.TRAIN_LOSS),
                "num_examples": res.num_examples,
                "dp": bool(m.get(protocol.DP_ENABLED, True)),
                "reason": m.get(protocol.REASON),
                "secagg_out_of_range": m.get(protocol.OUT_OF_RANGE),
                "ledger_entry": m.get(protocol.LEDGER_ENTRY),
            }
            if m.get(protocol.STATUS) == protocol.STATUS_BUDGET_EXHAUSTED:
                self.exhausted[proxy.cid] = name
            if m.get(protocol.STATUS) == protocol.STATUS_TRAINED and res.num_examples > 0:
                trained.append((proxy, res))
        failure_notes = [_describe_failure(f) for f in failures] + [
            f"department {name} declined ({d['status']}): {d['reason'] or 'no reason given'}"
            for name, d in departments.items()
            if d["status"] in (protocol.STATUS_BUDGET_EXHAUSTED, protocol.STATUS_POLICY_REFUSED)]
        impostors = self._impostors(results, server_round)
        if impostors and self.run_config.secagg:  # their releases are inside the masked sum: none of it is used
            self.pending_round = None
            self.recorder.record_fit(server_round, departments=departments, train_loss=None)
            self.recorder.record_failures(server_round, failure_notes + impostors + [
                "rejected aggregate: it holds replies not signed by their department's key; the global model is unchanged"])
            self.recorder.record_aggregate_check(server_round, passed=False)
            return None, {}
        if impostors:
            failure_notes += impostors
            trained = [(p, r) for p, r in trained if self._signed(r, server_round)]
        if not self.run_config.secagg:  # each update is visible: leave out the ones no honest department sends
            trained, refused = check_updates(trained, departments=departments, config=self.run_config)
            failure_notes += refused
        losses = [(float(res.metrics[protocol.TRAIN_LOSS]), res.num_examples) for _, res in trained
                  if protocol.TRAIN_LOSS in res.metrics]  # under DP departments send none
        total = sum(weight for _, weight in losses)
        train_loss = sum(loss * weight for loss, weight in losses) / total if total else None
        self.pending_round = None
        self.recorder.record_fit(server_round, departments=departments, train_loss=train_loss)
        self.recorder.record_failures(server_round, failure_notes)
        if not trained:
            return None, {}
        # Plain: FedAvg of the deltas. SecAgg+: every result carries the same unmasked weighted
        # average, and FedAvg of identical vectors is that vector.
        average_delta, metrics = super().aggregate_fit(server_round, trained, [])
        if average_delta is not None:
            average = parameters_to_ndarrays(average_delta)
            problem = aggregate_problem(average, bound=self._aggregate_bound(trained))
            if problem:
                self.recorder.record_failures(server_round, [
                    f"rejected aggregate: {problem}; the global model is unchanged (a department sent "
                    "values no honest department sends)"
                ])
                self.recorder.record_aggregate_check(server_round, passed=False)
                return None, {}
            self.recorder.record_aggregate_check(server_round, passed=True)
            current = parameters_to_ndarrays(self.latest_parameters)
            if self._stage(server_round) == protocol.STAGE_STATISTICS:
                arrays = self._statistics_head(current, average, departments=len(trained))
            else:
                arrays = [(g + d).astype(np.float32) for g, d in zip(current, average, strict=True)]
            if self.audit_dir is not None:
                np.savez(self.audit_dir / f"aggregate-round-{server_round:03d}.npz", *parameters_to_ndarrays(average_delta))
            parameters = ndarrays_to_parameters(arrays)
            self.latest_parameters = parameters
            save_checkpoint(
                self.recorder.out_dir / "checkpoints" / f"round-{server_round:03d}.safetensors",
                dict(zip(self.parameter_names, arrays, strict=True)),
                {"round": server_round, "run_id": self.recorder.run_id,
                 "label_fingerprint": self.run_config.label_fingerprint,
                 "backbone_fingerprint": self.backbone_fingerprint},
            )
            return parameters, metrics
        return None, metrics

    def _signed(self, res: FitRes, server_round: int) -> bool:
        keys = json.loads(self.run_config.department_keys)
        name = str(res.metrics.get(protocol.DEPARTMENT, ""))
        message = reply_message(
            run=self.run_config.run_uid or str(self.recorder.run_id), server_round=server_round, department=name,
            status=str(res.metrics.get(protocol.STATUS)), ledger=str(res.metrics.get(protocol.LEDGER_ENTRY, "")),
        )
        signature = res.metrics.get(protocol.SIGNATURE)
        return name in keys and isinstance(signature, str) and verify(message, signature, public_key=keys[name])

    def _impostors(self, results: list[tuple[ClientProxy, FitRes]], server_round: int) -> list[str]:
        """Deployment: a note for every reply whose name is not its signer's (refused, and logged)."""
        if not self.run_config.department_keys:
            return []
        return [f"node {proxy.cid}: reply as department {res.metrics.get(protocol.DEPARTMENT)!r} is not signed by that "
                "department's provisioned key: refused" for proxy, res in results if not self._signed(res, server_round)]

    def _aggregate_bound(self, trained: list[tuple[ClientProxy, FitRes]]) -> float:
        """The largest magnitude an average of honest updates can reach.

        Without SecAgg+ every update is within +-clipping range (checked one by one), so is their
        average. SecAgg+ clips each department's update after scaling it by its weight / max-weight,
        then divides the sum by the total scale: up to clipping range * departments * max-weight /
        total weight, which is the clipping range itself when every department weighs max-weight
        (always under DP, and in the statistics round).
        """
        clipping = self.run_config.secagg_clipping_range
        if not self.run_config.secagg:
            return clipping
        total = sum(res.num_examples for _, res in trained)
        return clipping * len(trained) * self.run_config.secagg_max_weight / total

    def _statistics_head(self, current: list[np.ndarray], average: list[np.ndarray], *, departments: int) -> list[np.ndarray]:
        """Stage 1: the nearest-class-mean head from the federation's class sums; LoRA stays as it is."""
        names = self.parameter_names
        sums = federation_sums([average[names.index("head.weight")]], departments=departments,
                               scale=self.run_config.statistics_scale)[0]
        weight, bias = nearest_class_mean_head(sums, logit_scale=self.run_config.ncm_logit_scale)
        head = {"head.weight": weight, "head.bias": bias}
        return [head.get(name, array).astype(np.float32) for name, array in zip(names, current, strict=True)]

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0 and self.round_offset:  # a resumed run's starting model was evaluated before
            return None
        result = super().evaluate(server_round, parameters)
        server_round += self.round_offset
        if result is not None:
            loss, metrics = result
            self.recorder.record_evaluation(
                server_round, loss=loss, accuracy=float(metrics[protocol.ACCURACY]), source="server test split"
            )
        return result

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.round_offset
        departments = {}
        for proxy, res in results:
            split = res.metrics.get(protocol.EVALUATION_SPLIT, protocol.SPLIT_VAL)
            departments[str(res.metrics.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))] = {
                f"{split}_accuracy": res.metrics.get(protocol.ACCURACY), f"{split}_loss": res.loss,
                f"{split}_examples": res.num_examples,
            }
        total = sum(res.num_examples for _, res in results)
        if total:
            loss = sum(res.loss * res.num_examples for _, res in results) / total
            accuracy = sum(float(res.metrics[protocol.ACCURACY]) * res.num_examples for _, res in results) / total
            splits = {res.metrics.get(protocol.EVALUATION_SPLIT, protocol.SPLIT_VAL) for _, res in results}
            source = "federated test" if splits == {protocol.SPLIT_TEST} else "federated validation"
            self.recorder.record_evaluation(
                server_round, loss=loss, accuracy=accuracy, source=source, departments=departments
            )
        self.recorder.record_failures(server_round, [f"evaluate: {_describe_failure(f)}" for f in failures])
        self.recorder.flush_round(server_round)
        if not total:
            return None, {}
        return loss, {protocol.ACCURACY: accuracy}


def aggregate_problem(arrays: list[np.ndarray], *, bound: float) -> str:
    """Why an aggregate (or one update) cannot come from honest departments; "" when it can."""
    if not all(np.all(np.isfinite(a)) for a in arrays):
        return "it holds NaN or infinite values"
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if largest > bound * (1 + 1e-6):
        return f"a value of magnitude {largest:.4g} is outside +-{bound:.4g}, the most honest updates reach"
    return ""


def check_updates(
    trained: list[tuple[ClientProxy, FitRes]], *, departments: dict[str, dict[str, Any]], config: RunConfig,
) -> tuple[list[tuple[ClientProxy, FitRes]], list[str]]:
    """Without SecAgg+: keep the updates an honest department could have sent, name the others."""
    kept, refused = [], []
    for proxy, res in trained:
        name = str(res.metrics.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))
        problem = aggregate_problem(parameters_to_ndarrays(res.parameters), bound=config.secagg_clipping_range)
        if res.num_examples > config.secagg_max_weight:
            problem = f"it claims weight {res.num_examples}, above secagg-max-weight={config.secagg_max_weight}"
        if problem:
            refused.append(f"department {name}: update refused: {problem}")
            departments.get(name, {})["status"] = protocol.STATUS_REJECTED
        else:
            kept.append((proxy, res))
    return kept, refused


def _describe_failure(failure: Any) -> str:
    """One readable line: a department's own error message, not the Ray/Flower traceback around it."""
    if isinstance(failure, tuple) and len(failure) == 2:
        proxy, res = failure
        text = f"node {proxy.cid}: {getattr(res, 'status', res)}"
    else:
        text = str(failure)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.replace("\\n", " ").split())
    return text[:400]
