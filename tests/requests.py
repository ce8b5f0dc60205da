"""Requests as the server's strategy builds them, served to a department as Flower delivers them."""

from __future__ import annotations

from typing import Any

from client.secure_aggregation import MASKED_BY_SECAGG
from shared import protocol, secagg_masks
from shared.config import RunConfig
from shared.model import load_backbone


def fit_request(config: RunConfig, server_round: int = 1, *, stage: str = protocol.STAGE_DP_SGD,
                aggregate_size: int = 3, **extra: Any) -> dict[str, Any]:
    request = protocol.FitRequest(
        server_round=server_round, stage=stage, aggregate_size=aggregate_size,
        backbone_fingerprint=load_backbone(config.model).fingerprint, secagg_masks=secagg_masks.NAME, ledger_indexes={},
    )
    return request.to_config() | extra


def evaluate_request(config: RunConfig, server_round: int = 1, *, split: str = protocol.SPLIT_VAL) -> dict[str, Any]:
    return protocol.EvaluateRequest(server_round=server_round, backbone_fingerprint=load_backbone(config.model).fingerprint,
                                    split=split).to_config()


def fit(client: Any, parameters: list, request: dict[str, Any], *, masked: bool | None = None) -> tuple:
    """``client.fit`` inside SecAgg+ when the run uses it (or as ``masked`` says), as Flower's mod serves it."""
    token = MASKED_BY_SECAGG.set(client.config.secagg if masked is None else masked)
    try:
        return client.fit(parameters, request)
    finally:
        MASKED_BY_SECAGG.reset(token)


def failure(client: Any, reply: tuple) -> tuple[str, str]:
    """(what the server reads, what the department's own activity log says) of a reply that failed."""
    from client.activity import ACTIVITY_FILE

    arrays, weight, metrics = reply
    assert metrics[protocol.STATUS] == protocol.STATUS_FAILED and weight == 0 and all(not a.any() for a in arrays)
    return str(metrics[protocol.REASON]), (client.settings.state_dir / ACTIVITY_FILE).read_text()
