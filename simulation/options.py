"""Training options shared by `fedpriv simulate` and `fedpriv run`, declared once; the run folder rule."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from shared.errors import ConfigError

Rounds = Annotated[int, typer.Option(help="Federated rounds.")]
LocalEpochs = Annotated[int, typer.Option(help="Local epochs per round.")]
LearningRate = Annotated[float, typer.Option(help="Local SGD learning rate.")]
MaxGradNorm = Annotated[float, typer.Option(help="Per-sample clipping bound.")]
Epsilon = Annotated[float, typer.Option(help="Each department's privacy budget epsilon over the whole run (a department may set a lower one).")]
Delta = Annotated[float, typer.Option(help="Each department's delta; must be below 1/records.")]
Accountant = Annotated[str, typer.Option(help="Privacy accountant: rdp or prv.")]
Model = Annotated[str, typer.Option(help="minilm (packaged all-MiniLM-L6-v2), tiny (tests), or a local Hugging Face model folder (on every host).")]
LoraR = Annotated[int, typer.Option(help="LoRA rank; 0 trains only the head on frozen features.")]
TestData = Annotated[Path | None, typer.Option(help="Held-out CSV/JSONL for server-side evaluation.")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="Baseline WITHOUT differential privacy: no guarantee holds.")]
NoSecagg = Annotated[bool, typer.Option("--no-secagg", help="Baseline without SecAgg+: the server sees each department's update.")]
Out = Annotated[Path | None, typer.Option(help="Run folder on this host (default: fedpriv-runs/<time>).")]

NO_DP_WARNING = "[bold red]WARNING: --no-dp: NO differential privacy. No privacy guarantee holds for this run.[/]"


def new_run_dir(out: Path | None) -> Path:
    """The run folder, created; an existing folder that already holds files is refused."""
    run_dir = (out or Path("fedpriv-runs") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} already holds files; choose a new run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
