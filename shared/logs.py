"""Silence library chatter (progress bars, advisory warnings) that would bury fedpriv's own output."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("opacus").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
