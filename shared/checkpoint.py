"""Checkpoints of the global trainable parameters (safetensors + JSON metadata, written atomically)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from shared.errors import ModelError

METADATA_KEY = "fedpriv"


def save_checkpoint(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()},
        str(tmp),
        metadata={METADATA_KEY: json.dumps(dict(metadata))},
    )
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata; a missing, truncated or foreign file raises ``ModelError`` naming it."""
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            metadata = json.loads((f.metadata() or {})[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt or foreign checkpoint ({type(exc).__name__}: {exc})") from None
    return arrays, metadata
