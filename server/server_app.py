"""fedpriv ServerApp: wiring only. The round logic lives in server.federation and server.strategy."""

from __future__ import annotations

from pathlib import Path

from flwr.common import Context
from flwr.server import Grid, ServerApp

from server.federation import run_federation
from server.prompt_grid import PromptGrid
from server.report import write_report
from server.run_record import RunRecorder
from shared.config import RunConfig
from shared.errors import FedprivError
from shared.flower_env import apply_offline_defaults
from shared.logs import quiet_libraries

apply_offline_defaults()
quiet_libraries()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_run_config(context.run_config)
    recorder = RunRecorder(Path(config.out_dir), config=config, run_id=context.run_id)
    try:
        run_federation(PromptGrid(grid), context, config, recorder)
    except FedprivError as exc:
        recorder.finish(state="failed", message=str(exc))
        raise
    except Exception as exc:
        recorder.finish(state="failed", message=f"internal error: {type(exc).__name__}: {exc}")
        raise
    finally:
        if any(number > 0 for number in recorder.rounds):  # a run that finished no round has nothing to show
            write_report(Path(config.out_dir))
