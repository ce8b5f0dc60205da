"""Terminal output for the `fedpriv` commands, and the rule that a user's mistake prints one
clear message and exits with status 1, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from shared.errors import FedprivError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def user_errors():
    try:
        yield
    except FedprivError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Typer command so that every FedprivError ends it cleanly."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return command(*args, **kwargs)

    return wrapper
