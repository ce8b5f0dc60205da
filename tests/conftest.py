"""Shared fixtures: everything tiny and built in-process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbone():
    from shared.model import TINY, load_backbone

    return load_backbone(TINY)


@pytest.fixture
def server_task(monkeypatch):
    """Flower messages take their run and sender from the process's task identity (the ServerApp's, here)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
