"""The department's side of Flower's SecAgg+, and the update it hands to it.

Masks come from ``shared.secagg_masks`` (a cryptographic generator), installed on import and
checked before every SecAgg+ message. Updates leave a department as deltas (trained minus received parameters): they are small and
centred on zero, so SecAgg+'s clipping range can stay tight and its quantization fine.
``secaggplus_mod`` only understands SecAgg+ messages; the guard lets the same ClientApp serve
runs with secure aggregation switched off (``--no-secagg``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared import secagg_masks
from shared.errors import ConfigError

secagg_masks.install()  # Flower's own masks come from a 32-bit seed (shared.secagg_masks)

# Set while a request is served inside SecAgg+: the department learns that its reply will be masked
# from how the message reached it, not from anything the server says.
MASKED_BY_SECAGG: ContextVar[bool] = ContextVar("masked_by_secagg", default=False)


def secaggplus_when_requested(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    secagg_masks.check()  # fail closed: never mask with the 32-bit-seeded generator
    token = MASKED_BY_SECAGG.set(True)
    try:
        return secaggplus_mod(msg, ctxt, call_next)
    finally:
        MASKED_BY_SECAGG.reset(token)


def update_delta(trained: Sequence[np.ndarray], received: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(t, dtype=np.float32) - np.asarray(r, dtype=np.float32) for t, r in zip(trained, received, strict=True)]


def out_of_range(delta: Sequence[np.ndarray], *, num_examples: int, max_weight: int, clipping_range: float) -> int:
    """How many values SecAgg+ would clip: it scales by num_examples / max_weight, then clips."""
    scale = num_examples / max_weight
    return int(sum(np.count_nonzero(np.abs(d * scale) > clipping_range) for d in delta))


def check_weight(*, department: str, num_examples: int, max_weight: int) -> None:
    if num_examples > max_weight:
        raise ConfigError(
            f"department {department} has {num_examples} training records, more than secagg-max-weight="
            f"{max_weight}: its weighted update would overflow SecAgg+; raise secagg-max-weight"
        )
