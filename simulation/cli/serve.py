"""`fedpriv serve`: a small HTTP endpoint that routes live requests with an exported model.

    POST /predict  {"texts": ["reset my password", ...]}
        -> {"predictions": [{"label": "password_reset", "score": 0.93}, ...], "threshold": 0.0}
    GET  /health   -> {"status": "ok", "labels": 16, "differential_privacy": true, ...}

FastAPI validates every request (a missing or empty text, too many texts, a text too long: 422,
naming the field) and uvicorn serves it. The model is loaded once, before the port opens; a
folder that is not an exported model is refused at start. A text whose top probability is below
``--threshold`` is answered ``unknown``, as `fedpriv predict` does.
"""

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, Field

from simulation.cli.console import console
from simulation.cli.predict import DEFAULT_THRESHOLD, routed

MAX_TEXTS = 256
MAX_TEXT_CHARS = 10_000


class PredictRequest(BaseModel):
    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(min_length=1, max_length=MAX_TEXTS)


def build_app(model: Path, *, threshold: float) -> Any:
    """The FastAPI application serving ``model`` (loaded here, once)."""
    from fastapi import FastAPI

    from shared.export import load_exported

    exported = load_exported(model)
    manifest = exported.manifest
    app = FastAPI(title="fedpriv", description=f"Text classification with the fedpriv model in {model}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "labels": len(exported.labels), "threshold": threshold,
                "differential_privacy": manifest.get("dp"), "final_accuracy": manifest.get("final_accuracy")}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        labels, scores = routed(exported.predict(request.texts), labels=exported.labels, threshold=threshold)
        predictions = [{"label": label, "score": round(score, 6)} for label, score in zip(labels, scores, strict=True)]
        return {"predictions": predictions, "threshold": threshold}

    return app


def serve(
    model: Annotated[Path, typer.Option("--model", help="Exported model folder (RUN/model).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Answer 'unknown' when the top label's probability is below this.")] = DEFAULT_THRESHOLD,
) -> None:
    """Serve an exported model over HTTP: POST /predict {"texts": [...]}, GET /health (stays in the foreground)."""
    import uvicorn

    from shared.logs import quiet_libraries

    quiet_libraries()
    app = build_app(model, threshold=threshold)
    console.print(f"serving {model} on http://{host}:{port} (POST /predict, GET /health); Ctrl-C stops it")
    uvicorn.run(app, host=host, port=port, log_level="warning")
