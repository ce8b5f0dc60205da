"""What the server refuses before it touches the global model, and how it names what failed.

A hostile department may send values no honest department sends (NaN, infinity, magnitudes past
SecAgg+'s clipping range, an inflated weight), or reply under another department's name. Without
SecAgg+ each update is visible and checked on its own; under SecAgg+ only the aggregate is, and a
reply not signed by its department's key poisons the whole masked sum.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.common import Error, FitRes, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.server.client_proxy import ClientProxy

from shared import protocol
from shared.config import RunConfig
from shared.reply_signature import reply_message, verify

Reply = tuple[ClientProxy, FitRes]
_ERROR_NAMES = {value: name.lower().replace("_", " ") for name, value in vars(ErrorCode).items() if name.isupper()}


def aggregate_problem(arrays: list[np.ndarray], *, bound: float) -> str:
    """Why an aggregate (or one update) cannot come from honest departments; "" when it can."""
    if not all(np.all(np.isfinite(a)) for a in arrays):
        return "it holds NaN or infinite values"
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if largest > bound * (1 + 1e-6):
        return f"a value of magnitude {largest:.4g} is outside +-{bound:.4g}, the most honest updates reach"
    return ""


def aggregate_bound(trained: list[Reply], *, config: RunConfig) -> float:
    """The largest magnitude an average of honest updates can reach.

    Without SecAgg+ every update is within +-clipping range (checked one by one), so is their
    average. SecAgg+ clips each department's update after scaling it by its weight / max-weight,
    then divides the sum by the total scale: up to clipping range * departments * max-weight /
    total weight, which is the clipping range itself when every department weighs max-weight
    (always under DP, and in the statistics round).
    """
    clipping = config.secagg_clipping_range
    if not config.secagg:
        return clipping
    total = sum(res.num_examples for _, res in trained)
    return clipping * len(trained) * config.secagg_max_weight / total


def check_updates(
    trained: list[Reply], *, departments: dict[str, dict[str, Any]], config: RunConfig,
) -> tuple[list[Reply], list[str]]:
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


def signed(res: FitRes, *, run: str, server_round: int, keys: dict[str, str]) -> bool:
    """Whether a reply is signed by the provisioned key of the department it names."""
    name = str(res.metrics.get(protocol.DEPARTMENT, ""))
    message = reply_message(
        run=run, server_round=server_round, department=name, status=str(res.metrics.get(protocol.STATUS)),
        ledger=str(res.metrics.get(protocol.LEDGER_ENTRY, "")),
    )
    signature = res.metrics.get(protocol.SIGNATURE)
    return name in keys and isinstance(signature, str) and verify(message, signature, public_key=keys[name])


def unsigned(results: list[Reply], *, run: str, server_round: int, config: RunConfig) -> list[Reply]:
    """Deployment: the replies whose name is not their signer's (none without provisioned keys)."""
    if not config.department_keys:
        return []
    keys = json.loads(config.department_keys)
    return [(proxy, res) for proxy, res in results if not signed(res, run=run, server_round=server_round, keys=keys)]


def impostor_note(reply: Reply) -> str:
    proxy, res = reply
    return (f"node {proxy.cid}: reply as department {res.metrics.get(protocol.DEPARTMENT)!r} is not signed by that "
            "department's provisioned key: refused")


def describe_failure(failure: BaseException | tuple[ClientProxy, Any]) -> str:
    """One line for a reply Flower counted as failed: its error code and reason as Flower gives them.

    A department's own refusals never get here: it answers them as a named status with a reason
    that holds no record content (``client.department``), so what is left is a process that
    crashed, timed out or could not be reached.
    """
    if isinstance(failure, tuple):
        proxy, res = failure
        status = getattr(res, "status", None)
        text = f"node {proxy.cid}: {getattr(status, 'message', '') or getattr(status, 'code', res)}"
    elif failure.args and isinstance(failure.args[0], Error):
        error = failure.args[0]
        text = f"{_ERROR_NAMES.get(error.code, f'error {error.code}')}: {error.reason or 'no reason given'}"
    else:
        text = f"{type(failure).__name__}: {failure}"
    return " ".join(text.split())[:400]
