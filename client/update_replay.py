"""A department's last DP update, kept so that a repeated request is answered without retraining.

When a server is stopped mid-round and resumed from its last checkpoint, it asks again for a round
that some departments already trained and paid for in their ledgers. Training again would spend
the budget twice. Re-sending the same noisy update is post-processing of an already-released
output and costs nothing, so the department keeps its last update keyed by (run, round, the
parameters it was trained from) and answers a matching request with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPLAY_FILE = "last-update.npz"


def request_key(*, run: str, server_round: int, parameters: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256(f"{run}|{server_round}".encode())
    for array in parameters:
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_update(
    state_dir: Path, *, key: str, delta: Sequence[np.ndarray], num_examples: int, metrics: dict[str, Any]
) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (REPLAY_FILE + ".tmp.npz")
    np.savez(tmp, *delta, key=np.array(key), num_examples=np.array(num_examples), metrics=np.array(json.dumps(metrics)))
    tmp.replace(state_dir / REPLAY_FILE)


def load_update(state_dir: Path, *, key: str) -> tuple[list[np.ndarray], int, dict[str, Any]] | None:
    """The stored update if it answers exactly this request; None otherwise (or if unreadable)."""
    path = state_dir / REPLAY_FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) != key:
                return None
            arrays = [stored[f"arr_{i}"] for i in range(len(stored.files) - 3)]
            return arrays, int(stored["num_examples"]), json.loads(str(stored["metrics"]))
    except (OSError, ValueError, KeyError):
        return None  # an unreadable copy only means the round is trained (and paid for) again
