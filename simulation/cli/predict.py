"""`fedpriv predict`: classify texts (arguments or a CSV/JSONL file) with an exported model.

A text whose top probability falls below ``--threshold`` is answered ``unknown`` (out of scope)
instead of its nearest label: a router should hand such requests to a person, not guess.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer

from simulation.cli.console import console

UNKNOWN = "unknown"
# Chosen on CLINC150's validation split (in-scope val + out-of-scope val, models trained on train
# alone): the largest threshold that costs every default model at most 1 point of in-scope accuracy
# (0.25: -0.6 / -0.8 at epsilon 8 with out-of-scope recall 0.66 / 0.61, -0.4 / -0.03 for stage 1 alone at
# epsilon 1 / 3; 0.3: -1.4 at epsilon 8). BENCHMARKS.md section 9 shows the test split at this and other thresholds.
DEFAULT_THRESHOLD = 0.25
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def predict(
    model: Annotated[Path, typer.Option("--model", help="Exported model folder (RUN/model).")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify (or --input FILE).")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="A CSV/JSONL file of texts to classify.")] = None,  # noqa: A002
    output: Annotated[Path | None, typer.Option("--output", help="Write text, label, score per text to this .csv or .jsonl file.")] = None,
    text_column: Annotated[str, typer.Option(help="The column of --input that holds the texts.")] = "text",
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Answer 'unknown' when the top label's probability is below this.")] = DEFAULT_THRESHOLD,
    top: Annotated[int, typer.Option(min=1, help="How many labels to show per text on the terminal.")] = 1,
) -> None:
    """Classify texts with an exported fedpriv model."""
    from shared.data import load_texts
    from shared.errors import ConfigError
    from shared.export import load_exported
    from shared.logs import quiet_libraries

    if bool(texts) == (input is not None):
        raise ConfigError("give texts as arguments or --input FILE, not both and not neither")
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {output}: must end in {' or '.join(OUTPUT_SUFFIXES)}")
    quiet_libraries()
    texts = load_texts(input, column=text_column) if input is not None else list(texts or [])
    exported = load_exported(model)
    probabilities = exported.predict(texts)
    labels, scores = routed(probabilities, labels=exported.labels, threshold=threshold)
    if output is not None:
        write_predictions(output, texts=texts, labels=labels, scores=scores)
        unknown = labels.count(UNKNOWN)
        console.print(f"{len(texts)} texts -> {output} ({unknown} unknown below threshold {threshold:g})", highlight=False)
        return
    for text, label, row in zip(texts, labels, probabilities, strict=True):
        best, best_index = row.topk(min(top, len(exported.labels)))
        shown = ", ".join(f"{exported.labels[i]} ({s:.3f})" for s, i in zip(best.tolist(), best_index.tolist(), strict=True))
        console.print(f"{label}\t{shown}\t{text}" if label == UNKNOWN else f"{shown}\t{text}", highlight=False)


def routed(probabilities, *, labels: list[str], threshold: float) -> tuple[list[str], list[float]]:
    """Each text's top label and its probability; ``UNKNOWN`` where that probability is below ``threshold``."""
    scores, indices = probabilities.max(dim=1)
    top = [(labels[i] if score >= threshold else UNKNOWN, score) for score, i in zip(scores.tolist(), indices.tolist(), strict=True)]
    return [label for label, _ in top], [score for _, score in top]


def write_predictions(path: Path, *, texts: list[str], labels: list[str], scores: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": t, "label": label, "score": round(s, 6)} for t, label, s in zip(texts, labels, scores, strict=True)]
    with path.open("w", encoding="utf-8", newline="") as out:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(out, fieldnames=["text", "label", "score"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
