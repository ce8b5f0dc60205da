"""Departments online for a strategy under test: Flower's own client manager holding stand-in proxies."""

from __future__ import annotations

from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class Department(ClientProxy):
    """A proxy the strategy can sample; nothing is ever sent through it in these tests."""

    def _unused(self, *args, **kwargs):
        raise AssertionError("unit tests hand the strategy its replies directly")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused


def online(*names: str) -> SimpleClientManager:
    manager = SimpleClientManager()
    for name in names:
        manager.register(Department(name))
    return manager


def begin(strategy, *names: str, flower_round: int = 1) -> list:
    """Start a round the way Flower does (configure_fit) with these departments online; its instructions."""
    return strategy.configure_fit(flower_round, strategy.latest_parameters, online(*names))
