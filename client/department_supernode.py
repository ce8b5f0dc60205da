"""The department's SuperNode process as fedpriv starts it: Flower's SuperNode, with two of its calls wrapped.

``fedpriv department start`` runs

    python -m client.department_supernode --approved-fab-sha256 H [--approved-fab-sha256 H2] FLOWER_SUPERNODE_ARGS...

which, before Flower's ``flower-supernode`` starts, wraps

- fetching a run's app code: only an approved FAB runs (``client.approved_code``);
- pulling the server's messages: Flower's loop (flwr 1.42, ``flwr/supernode/start_client_internal.py``)
  sleeps a hard-coded 3 s whenever a pull finds nothing, so each of a deployed SecAgg+ round's four
  messages waited up to 3 s (1.5 s on average) before the department saw it. Here a pull that finds
  nothing is repeated until a message arrives: every ``ACTIVE_PULL_INTERVAL_S`` while a run is
  active (a message came within ``ACTIVE_WINDOW_S``: the next SecAgg+ stage is due within seconds),
  every ``IDLE_PULL_INTERVAL_S`` otherwise, so an idle department asks the SuperLink less often than
  Flower's own 3 s would and an active one five times a second.

Like ``client.approved_code`` this runs from the department's own installation and is not shipped
in the FAB (``fab-exclude`` in pyproject.toml): the server cannot replace it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from client.approved_code import UnapprovedCode, install_approval

ACTIVE_PULL_INTERVAL_S = 0.2
IDLE_PULL_INTERVAL_S = 2.0
ACTIVE_WINDOW_S = 60.0


def prompt_pulls(
    pull: Callable[..., int | None], *, active_s: float = ACTIVE_PULL_INTERVAL_S, idle_s: float = IDLE_PULL_INTERVAL_S,
    window_s: float = ACTIVE_WINDOW_S,
) -> Callable[..., int | None]:
    """``pull`` repeated until it returns a message's run id (Flower's ``None``: nothing yet), every
    ``active_s`` within ``window_s`` of the last message and every ``idle_s`` after."""
    last_message = -math.inf

    def pull_until_a_message(*args: Any, **kwargs: Any) -> int | None:
        nonlocal last_message
        while (run_id := pull(*args, **kwargs)) is None:
            time.sleep(active_s if time.monotonic() - last_message < window_s else idle_s)
        last_message = time.monotonic()
        return run_id

    return pull_until_a_message


def install_prompt_pulls() -> None:
    from flwr.supernode import start_client_internal as supernode

    setattr(supernode, "_pull_and_store_message", prompt_pulls(supernode._pull_and_store_message))


def main(argv: list[str]) -> None:
    approved, rest = [], []
    index = 0
    while index < len(argv):
        if argv[index] == "--approved-fab-sha256" and index + 1 < len(argv):
            approved.append(argv[index + 1])
            index += 2
        else:
            rest.append(argv[index])
            index += 1
    install_approval(approved)
    install_prompt_pulls()
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # its output is the department's log file

    sys.argv = ["flower-supernode", *rest]
    try:
        flower_supernode()
    except UnapprovedCode as refused:
        print(f"fedpriv: {refused}", file=sys.stderr)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main(sys.argv[1:])
