"""FedAvg over the trainable parameters, one round at a time (``server.round_state``).

``FedprivStrategy`` is Flower's own ``FedAvg`` (weighted by ``num-examples``) with hooks that
- begin each round once (``begin_round``): its run number, its stage, the departments it asks (only
  those with budget left), or ``FederationEnded`` when fewer than ``min-departments`` remain;
- send each department a ``protocol.FitRequest`` / ``EvaluateRequest``;
- refuse what no honest department sends (``server.update_checks``), then, by the round's stage:
  in the feature-mean round, set the centring's statistics to the federation's summed release
  (``shared.centering``); in the statistics round, build the nearest-class-mean head from the
  summed class statistics; in a DP-SGD round, move the trained parameters by the average delta
  (directly, or SecAgg+'s unmasked weighted average) with the server's momentum (FedAvgM:
  v = server-momentum x v + average delta). Each stage changes only its own parameters: what a
  department sends in any other slot is ignored;
- hand everything to the run record (``server.run_record``), which persists it.
It stays a plain legacy ``Strategy`` so that Flower's SecAgg+ workflow can drive it unchanged.
Flower's own ``FedAvgM`` is not used for the momentum: it averages full weights (departments send
deltas, and stage 1 sends class statistics), starts its momentum at Flower's round 1 (which a
resumed run restarts at) and keeps it where no checkpoint can save it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
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

from server import update_checks
from server.class_statistics import federation_sums, nearest_class_mean_head
from server.round_state import RoundState, decline_notes, department_replies
from server.run_folder import ledger_indexes
from server.run_record import RunRecorder
from shared import protocol, secagg_masks
from shared.centering import CENTERING_PARAMETER
from shared.config import RunConfig

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
        initial_parameters: Parameters, evaluate_fn: EvaluateFn | None, velocity: list[np.ndarray] | None = None,
    ) -> None:
        self.run_config = config
        self.recorder = recorder
        self.parameter_names = parameter_names
        self.backbone_fingerprint = backbone_fingerprint
        self.latest_parameters = initial_parameters
        self.velocity = velocity  # the server's momentum; None: no DP-SGD round since the start or stage 1
        self.exhausted: dict[str, str] = {}  # node id -> department, for departments out of budget
        self.round: RoundState | None = None
        super().__init__(
            fraction_fit=config.fraction_train,
            fraction_evaluate=1.0,
            min_fit_clients=config.min_departments,
            min_evaluate_clients=config.min_departments,
            min_available_clients=config.min_departments,
            initial_parameters=initial_parameters,
            evaluate_fn=evaluate_fn,
            accept_failures=True,
        )

    def begin_round(self, flower_round: int, client_manager: Any) -> RoundState:
        """The round Flower numbers ``flower_round``: begun (departments sampled) once, then reused."""
        if self.round is not None and self.round.flower_round == flower_round:
            return self.round
        number = self.run_config.resume_after_round + flower_round
        needed = self.run_config.min_departments
        eligible = [cid for cid in client_manager.all() if cid not in self.exhausted]
        if self.exhausted and len(eligible) < needed:
            raise FederationEnded(
                f"ended before round {number}: {len(eligible)} department(s) have budget left, "
                f"min-departments is {needed} (budget exhausted: {', '.join(sorted(self.exhausted.values()))})"
            )
        asked = client_manager.sample(num_clients=max(int(len(eligible) * self.fraction_fit), needed),
                                      min_num_clients=needed, criterion=_NotIn(set(self.exhausted)))
        stage = {self.run_config.centering_round: protocol.STAGE_FEATURE_MEAN,
                 self.run_config.statistics_round: protocol.STAGE_STATISTICS}.get(number, protocol.STAGE_DP_SGD)
        self.round = RoundState(flower_round=flower_round, number=number, stage=stage, asked=list(asked))
        return self.round

    def _current(self, flower_round: int) -> RoundState:
        if self.round is None or self.round.flower_round != flower_round:
            raise RuntimeError(f"Flower round {flower_round} was never begun (configure_fit runs first)")
        return self.round

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        current = self.begin_round(server_round, client_manager)
        request = protocol.FitRequest(
            server_round=current.number, stage=current.stage, aggregate_size=len(current.asked),
            backbone_fingerprint=self.backbone_fingerprint, secagg_masks=secagg_masks.NAME,
            ledger_indexes=ledger_indexes(self.recorder.out_dir),
        )
        return [(client, FitIns(parameters, request.to_config())) for client in current.asked]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        current = self._current(server_round)
        current.aggregated = True
        number, config = current.number, self.run_config
        departments = department_replies(results)
        for proxy, res in results:
            if res.metrics.get(protocol.STATUS) == protocol.STATUS_BUDGET_EXHAUSTED:
                self.exhausted[proxy.cid] = str(res.metrics.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))
        trained = [(p, r) for p, r in results
                   if r.metrics.get(protocol.STATUS) == protocol.STATUS_TRAINED and r.num_examples > 0]
        notes = [update_checks.describe_failure(f) for f in failures] + decline_notes(departments)
        unsigned = update_checks.unsigned(results, run=config.run_uid or str(self.recorder.run_id), server_round=number,
                                          config=config)
        notes += [update_checks.impostor_note(reply) for reply in unsigned]
        if unsigned and config.secagg:  # their releases are inside the masked sum: none of it is used
            self.recorder.record_fit(number, departments=departments, train_loss=None)
            return self._reject(number, notes + [
                "rejected aggregate: it holds replies not signed by their department's key; the global model is unchanged"])
        impostors = {proxy.cid for proxy, _ in unsigned}
        trained = [(p, r) for p, r in trained if p.cid not in impostors]
        if not config.secagg:  # each update is visible: leave out the ones no honest department sends
            trained, refused = update_checks.check_updates(trained, departments=departments, config=config)
            notes += refused
        self.recorder.record_fit(number, departments=departments, train_loss=_train_loss(trained))
        self.recorder.record_failures(number, notes)
        if not trained:
            return None, {}
        # Plain: FedAvg of the deltas. SecAgg+: every result carries the same unmasked weighted
        # average, and FedAvg of identical vectors is that vector.
        average_delta, metrics = super().aggregate_fit(server_round, trained, [])
        if average_delta is None:
            return None, metrics
        average = parameters_to_ndarrays(average_delta)
        problem = update_checks.aggregate_problem(average, bound=update_checks.aggregate_bound(trained, config=config))
        if problem:
            return self._reject(number, [f"rejected aggregate: {problem}; the global model is unchanged (a department "
                                         "sent values no honest department sends)"])
        self.recorder.record_aggregate_check(number, passed=True)
        current_arrays = parameters_to_ndarrays(self.latest_parameters)
        if current.stage == protocol.STAGE_FEATURE_MEAN:
            arrays = self._centering_statistics(current_arrays, average, departments=len(trained))
            self.velocity = None
        elif current.stage == protocol.STAGE_STATISTICS:
            arrays = self._statistics_head(current_arrays, average, departments=len(trained))
            self.velocity = None
        else:
            centering = self.parameter_names.index(CENTERING_PARAMETER)  # set in round 1, never trained
            moved = [np.zeros_like(a) if i == centering else a for i, a in enumerate(average)]
            self.velocity = moved if self.velocity is None else [
                config.server_momentum * v + d for v, d in zip(self.velocity, moved, strict=True)]
            arrays = [(g + v).astype(np.float32) for g, v in zip(current_arrays, self.velocity, strict=True)]
        self.recorder.record_aggregate(number, average)
        names = self.parameter_names
        self.recorder.record_model(number, dict(zip(names, arrays, strict=True)),
                                   velocity=None if self.velocity is None else dict(zip(names, self.velocity, strict=True)),
                                   backbone_fingerprint=self.backbone_fingerprint)
        self.latest_parameters = ndarrays_to_parameters(arrays)
        return self.latest_parameters, metrics

    def _reject(self, number: int, notes: list[str]) -> tuple[None, dict[str, Scalar]]:
        self.recorder.record_failures(number, notes)
        self.recorder.record_aggregate_check(number, passed=False)
        return None, {}

    def _centering_statistics(self, current: list[np.ndarray], average: list[np.ndarray], *, departments: int) -> list[np.ndarray]:
        """The feature-mean round: the federation's summed [feature sum, record count] becomes the
        centring's statistics; every other parameter stays as it is."""
        index = self.parameter_names.index(CENTERING_PARAMETER)
        summed = federation_sums([average[index]], departments=departments, scale=self.run_config.feature_mean_scale)[0]
        return [summed.astype(np.float32) if i == index else array for i, array in enumerate(current)]

    def _statistics_head(self, current: list[np.ndarray], average: list[np.ndarray], *, departments: int) -> list[np.ndarray]:
        """Stage 1: the nearest-class-mean head from the federation's class sums; LoRA stays as it is."""
        names = self.parameter_names
        sums = federation_sums([average[names.index("head.weight")]], departments=departments,
                               scale=self.run_config.statistics_scale)[0]
        weight, bias = nearest_class_mean_head(sums, logit_scale=self.run_config.statistics_logit_scale)
        head = {"head.weight": weight, "head.bias": bias}
        return [head.get(name, array).astype(np.float32) for name, array in zip(names, current, strict=True)]

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        current = self._current(server_round)
        if not current.aggregated:  # the fit stage ended without calling aggregate_fit
            self.recorder.record_failures(current.number, [
                "no aggregate this round: secure aggregation halted (fewer departments than its threshold "
                "answered) or every department failed; the global model is unchanged"
            ])
        if self.run_config.dp:
            # Under DP a department keeps its evaluation to itself (the server picks the model it would
            # evaluate): asking would cost every department a message and a model load per round for
            # nothing. The server's own test split is the evaluation; the round's record is complete.
            self.recorder.flush_round(current.number)
            return []
        last = current.number == self.run_config.num_server_rounds
        request = protocol.EvaluateRequest(server_round=current.number, backbone_fingerprint=self.backbone_fingerprint,
                                           split=protocol.SPLIT_TEST if last else protocol.SPLIT_VAL)
        return [(client, EvaluateIns(parameters, request.to_config()))
                for client, _ in super().configure_evaluate(server_round, parameters, client_manager)]

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0 and self.run_config.resume_after_round:  # a resumed run's start was evaluated before
            return None
        result = super().evaluate(server_round, parameters)
        if result is not None:
            loss, metrics = result
            number = self._current(server_round).number if server_round else 0
            self.recorder.record_evaluation(number, loss=loss, accuracy=float(metrics[protocol.ACCURACY]),
                                            source="server test split")
        return result

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        number = self._current(server_round).number
        departments = {}
        for proxy, res in results:
            split = str(res.metrics.get(protocol.EVALUATION_SPLIT, protocol.SPLIT_VAL))
            departments[str(res.metrics.get(protocol.DEPARTMENT, f"node-{proxy.cid}"))] = {
                f"{split}_accuracy": res.metrics.get(protocol.ACCURACY), f"{split}_loss": res.loss,
                f"{split}_examples": res.num_examples,
            }
        self.recorder.record_failures(number, [f"evaluate: {update_checks.describe_failure(f)}" for f in failures])
        total = sum(res.num_examples for _, res in results)
        if not total:  # under DP departments withhold their evaluation
            self.recorder.flush_round(number)
            return None, {}
        loss = sum(res.loss * res.num_examples for _, res in results) / total
        accuracy = sum(float(res.metrics[protocol.ACCURACY]) * res.num_examples for _, res in results) / total
        splits = {res.metrics.get(protocol.EVALUATION_SPLIT, protocol.SPLIT_VAL) for _, res in results}
        source = "federated test" if splits == {protocol.SPLIT_TEST} else "federated validation"
        self.recorder.record_evaluation(number, loss=loss, accuracy=accuracy, source=source, departments=departments)
        self.recorder.flush_round(number)
        return loss, {protocol.ACCURACY: accuracy}


def _train_loss(trained: list[tuple[ClientProxy, FitRes]]) -> float | None:
    """The weighted mean training loss, without DP only: under DP departments send none."""
    losses = [(float(res.metrics[protocol.TRAIN_LOSS]), res.num_examples) for _, res in trained
              if protocol.TRAIN_LOSS in res.metrics]
    total = sum(weight for _, weight in losses)
    return sum(loss * weight for loss, weight in losses) / total if total else None
