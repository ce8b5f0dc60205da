"""Errors that fedpriv reports to a user without a traceback.

    FedprivError                  a user's mistake or a refused request, printed as one message
    ├── ConfigError (ValueError)  bad settings; lists every problem at once
    ├── DataError (ValueError)    a data file that cannot be used; names file, line, column
    ├── ModelError (ValueError)   a backbone, checkpoint or exported model that cannot be loaded
    ├── BudgetExhausted           a department refuses a round that would exceed its budget
    └── TrainingError             a department's training produced values it will not send (NaN, inf)
"""

from __future__ import annotations


class FedprivError(Exception):
    """Base of every error that is the user's to fix, not the program's."""


class ConfigError(FedprivError, ValueError):
    """One or more invalid settings, all reported together."""

    def __init__(self, problems: list[str] | str, *, source: str = "configuration") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"Invalid {source}:\n{lines}")


class DataError(FedprivError, ValueError):
    """A data file or department that cannot be used for training."""


class LedgerError(DataError):
    """A department's privacy ledger that cannot be trusted (corrupt, edited, shorter than the server's copy).

    Unlike other data errors it never quotes a record, so the department tells the server why it stops.
    """


class ModelError(FedprivError, ValueError):
    """A backbone, checkpoint or exported model that cannot be loaded."""


class BudgetExhausted(FedprivError):
    """Training one more round would push a department past its privacy budget."""


class TrainingError(FedprivError):
    """A department's training produced an update it will not send (NaN or infinite values)."""
