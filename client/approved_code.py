"""A department runs only the app code it approved: the FAB's SHA-256 is pinned in its kit.

The ClientApp that enforces a department's budget and policy arrives from the server, inside
Flower's FAB, so it cannot guard itself: a server that ships a modified ``client/site_policy.py``
could spend any budget. The check therefore runs in the department's SuperNode process, which the
department installs and starts itself (``fedpriv department start``), before any ClientApp of a
run is started: the SuperNode fetches each new run's FAB from the SuperLink through ``get_fab``,
and fedpriv wraps that one call so that a FAB whose SHA-256 is not in the kit's
``approved-fab-sha256`` list stops the SuperNode with ``UnapprovedCode`` (fail closed: no record
is read, nothing is sent). Flower's own ``--trusted-entities`` verification needs signatures that
only Flower's hosted SuperLink supplies (``valid_license``), so a self-hosted federation cannot use it.

Approving a new version (README, "Approved code"): the department reviews the code, builds its
FAB with ``flwr build`` (deterministic: fixed timestamps) or ``fedpriv department approve --kit KIT
--app DIR``, and adds its hash to the kit; the old hash can stay or be removed.

``client.department_supernode`` is the SuperNode process that installs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from shared.errors import FedprivError

KIT_KEY = "approved-fab-sha256"


class UnapprovedCode(FedprivError):
    """The server asked this department to run app code (a FAB) it has not approved."""


def fab_sha256(app: Path) -> str:
    """The SHA-256 of the FAB that ``flwr build`` / ``flwr run`` make from the app folder ``app``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def approved_only(get_fab: Callable[[str, int], Any], approved: Collection[str]) -> Callable[[str, int], Any]:
    """``get_fab`` that refuses any FAB whose content does not hash to an approved SHA-256."""

    def checked(fab_hash: str, run_id: int) -> Any:
        fab = get_fab(fab_hash, run_id)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest not in approved:
            raise UnapprovedCode(
                f"run {run_id}: the server sent app code (FAB sha256 {digest}) this department has not approved "
                f"({KIT_KEY} in its department.toml lists {', '.join(sorted(approved)) or 'none'}); the SuperNode "
                "stops before any record is read. Review the new version and approve it with "
                "`fedpriv department approve`"
            )
        return fab

    return checked


def install_approval(approved: Collection[str]) -> None:
    """Make this process's SuperNode fetch FABs only through ``approved_only``."""
    if not approved:
        raise UnapprovedCode(f"no approved app code: the kit's department.toml has no {KIT_KEY}")
    from flwr.supernode import start_client_internal as supernode

    original: Callable[..., Any] = supernode._pull_and_store_message

    def pull_approved(*args: Any, get_fab: Callable[[str, int], Any], **kwargs: Any) -> Any:
        return original(*args, get_fab=approved_only(get_fab, approved), **kwargs)

    setattr(supernode, "_pull_and_store_message", pull_approved)  # Flower's function, replaced
