"""fedpriv ClientApp: wiring only. Training lives in client.department and client.dp_training."""

from __future__ import annotations

import os

from flwr.client import Client, ClientApp
from flwr.common import Context

from client.secure_aggregation import secaggplus_when_requested
from shared.flower_env import apply_offline_defaults

apply_offline_defaults()


def client_fn(context: Context) -> Client:
    # Imported here, not at module level: in deployment every message starts a fresh ClientApp
    # process, and three of SecAgg+'s four stages never reach the model, so they skip loading
    # torch, transformers and opacus.
    from client.department import DepartmentClient
    from client.department_data import resolve_department
    from shared.config import RunConfig
    from shared.logs import quiet_libraries

    quiet_libraries()
    # Everything a department writes (ledger, cached embeddings of its records, stored updates) is
    # its own: readable by its user only, like its keys.
    os.umask(0o077)
    config = RunConfig.from_run_config(context.run_config)
    settings = resolve_department(config, context.node_config)
    return DepartmentClient(config=config, settings=settings, run_id=context.run_id).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_when_requested])
