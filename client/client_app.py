"""fedpriv ClientApp: wiring only. Training lives in client.department and client.dp_training."""

from __future__ import annotations

from flwr.client import Client, ClientApp
from flwr.common import Context

from client.department import DepartmentClient
from client.department_data import resolve_department
from client.secure_aggregation import secaggplus_when_requested
from shared.config import RunConfig
from shared.flower_env import apply_offline_defaults
from shared.logs import quiet_libraries

apply_offline_defaults()
quiet_libraries()


def client_fn(context: Context) -> Client:
    config = RunConfig.from_run_config(context.run_config)
    settings = resolve_department(config, context.node_config)
    return DepartmentClient(config=config, settings=settings, run_id=context.run_id).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_when_requested])
