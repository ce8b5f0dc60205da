"""Keep Flower, Ray and Hugging Face offline: no update checks, no telemetry, no hub downloads,
no per-run dependency installs (which would re-install torch from the registry)."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_defaults(env: dict[str, str] | os._Environ = os.environ) -> dict[str, str] | os._Environ:
    """Set every offline switch that the user has not set explicitly; returns ``env``."""
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    return env
