"""One federated run from the server's side: build the model, run Flower's workflow, export.

The workflow is Flower's legacy ``DefaultWorkflow`` over a ``LegacyContext`` because, in flwr
1.42, that is the only path on which Flower's ``SecAggPlusWorkflow`` runs; with ``secagg`` on
(the default) it is the fit stage, and ``FedprivStrategy`` works unchanged on either path.

A resumed run starts from the newest checkpoint at or before ``resume-after-round`` and runs the
remaining rounds; departments keep their ledgers and their noise plan (same ``run-uid``). A run
whose departments run out of budget ends cleanly (``FederationEnded``) and still exports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from server.evaluation import make_server_evaluator
from server.run_folder import CHECKPOINTS_DIR, MOMENTUM_PREFIX
from server.run_record import RunRecorder
from server.secure_aggregation import AuditedSecAggPlusWorkflow
from server.strategy import FederationEnded, FedprivStrategy
from shared.checkpoint import load_checkpoint
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.export import export_model
from shared.model import build_classifier, load_backbone, trainable_names
from shared.params import get_trainable, set_trainable


def run_federation(grid: Grid, context: Context, config: RunConfig, recorder: RunRecorder) -> dict:
    if len(config.labels) < 2:
        raise ConfigError("labels must list the federation's label set (at least 2 labels)")
    backbone = load_backbone(config.model)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        classifier = build_classifier(
            backbone, num_labels=len(config.labels), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
            lora_targets=config.lora_targets, lora_layers=config.lora_layers,
        )
        torch.nn.init.zeros_(classifier.head.weight)
        torch.nn.init.zeros_(classifier.head.bias)
    velocity = None
    if resumes_a_trained_model(config, recorder):
        parameters, velocity = resume_parameters(config, backbone_fingerprint=backbone.fingerprint,
                                                 names=trainable_names(classifier))
        set_trainable(classifier, parameters)
    strategy = FedprivStrategy(
        config=config,
        recorder=recorder,
        parameter_names=trainable_names(classifier),
        backbone_fingerprint=backbone.fingerprint,
        initial_parameters=ndarrays_to_parameters(get_trainable(classifier)),
        velocity=velocity,
        evaluate_fn=make_server_evaluator(
            config=config, classifier=classifier, backbone=backbone, cache_dir=Path(config.feature_cache or Path(config.out_dir) / "feature-cache")
        ),
    )
    remaining = config.num_server_rounds - config.resume_after_round
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
    fit_workflow = AuditedSecAggPlusWorkflow(config=config, audit_dir=recorder.audit_dir) if config.secagg else None
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    except FederationEnded as ended:
        recorder.ended_early = str(ended)

    set_trainable(classifier, parameters_to_ndarrays(strategy.latest_parameters))
    trained_rounds = [r for r in recorder.rounds.values() if r["round"] > 0 and r.get("aggregate_check") == "passed"]
    if not trained_rounds:
        causes = list(dict.fromkeys(f for r in recorder.rounds.values() for f in r.get("failures", [])))
        shown = "; ".join(causes[:5]) + (f"; and {len(causes) - 5} more in metrics.json" if len(causes) > 5 else "")
        return recorder.finish(state="failed", message=f"no round produced an update: {shown or recorder.ended_early or 'no department answered'}")
    metrics = recorder.finish(state="completed", message=recorder.ended_early)
    export_model(
        Path(config.out_dir) / "model", classifier=classifier, backbone=backbone, labels=config.labels,
        max_length=config.max_length,
        summary={"final_accuracy": metrics["final_accuracy"], "dp": config.dp,
                 "secure_aggregation": config.secagg, "privacy": metrics["privacy"]},
    )
    return metrics


def resumes_a_trained_model(config: RunConfig, recorder: RunRecorder) -> bool:
    """Whether a round before the resume point changed the model; if none did (each failed, e.g. a
    first round that SecAgg+ had to halt), the resumed run starts from the initial model, as the
    stopped run itself went on."""
    return any(0 < r["round"] <= config.resume_after_round and r.get("aggregate_check") == "passed"
               for r in recorder.rounds.values())


def resume_parameters(
    config: RunConfig, *, backbone_fingerprint: str, names: list[str]
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The global parameters after the newest checkpointed round <= ``resume-after-round``, and the
    server's momentum then (None after the statistics round, which starts it afresh)."""
    folder = Path(config.out_dir) / CHECKPOINTS_DIR
    candidates = sorted(folder.glob("round-*.safetensors")) if folder.is_dir() else []
    usable = [c for c in candidates if int(c.stem.split("-")[1]) <= config.resume_after_round]
    if not usable:
        raise ConfigError(f"{folder}: no checkpoint at or before round {config.resume_after_round} to resume from")
    arrays, metadata = load_checkpoint(usable[-1])
    problems = []
    if metadata.get("label_fingerprint") != config.label_fingerprint:
        problems.append(f"{usable[-1]}: saved for another label set")
    if metadata.get("backbone_fingerprint") != backbone_fingerprint:
        problems.append(f"{usable[-1]}: saved for another backbone")
    momentum = sorted(name for name in arrays if name.startswith(MOMENTUM_PREFIX))
    if sorted(set(arrays) - set(momentum)) != sorted(names):
        problems.append(f"{usable[-1]}: its parameters do not match this model (LoRA settings changed?)")
    elif momentum and momentum != sorted(MOMENTUM_PREFIX + name for name in names):
        problems.append(f"{usable[-1]}: its server momentum does not match its parameters")
    if problems:
        raise ConfigError(problems, source="checkpoint to resume from")
    velocity = [arrays[MOMENTUM_PREFIX + name] for name in names] if momentum else None
    return [arrays[name] for name in names], velocity
