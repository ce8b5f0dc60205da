"""CLINC150 (Larson et al., 2019) read in place from a folder holding data_full.json and domains.json.

The data set is never copied into the project: benchmarks and integration tests read it from
``../shared/data/clinc150`` beside the checkout (or ``$FEDPRIV_CLINC150``) and skip when it is absent.
Only the 150 in-scope intents are used; out-of-scope queries are dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shared.data import Record
from shared.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LOCATION = PROJECT_ROOT.parent / "shared" / "data" / "clinc150"


@dataclass(frozen=True)
class Clinc150:
    pool: list[Record]  # train + val: what departments hold
    test: list[Record]  # the official in-scope test split, for server-side evaluation
    domains: dict[str, list[str]]


def default_location() -> Path:
    return Path(os.environ.get("FEDPRIV_CLINC150", DEFAULT_LOCATION))


def is_clinc150_dir(path: Path) -> bool:
    return path.is_dir() and (path / "data_full.json").is_file() and (path / "domains.json").is_file()


def load_clinc150(folder: Path) -> Clinc150:
    if not is_clinc150_dir(folder):
        raise DataError(f"{folder}: not a CLINC150 folder (needs data_full.json and domains.json)")
    try:
        full = json.loads((folder / "data_full.json").read_text())
        domains = json.loads((folder / "domains.json").read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{folder}: corrupt CLINC150 file ({exc})") from None

    def records(split: str) -> list[Record]:
        source = folder / "data_full.json"
        return [Record(text, intent, None, f"{source}:{split}[{i}]") for i, (text, intent) in enumerate(full[split])]

    return Clinc150(pool=records("train") + records("val"), test=records("test"), domains=domains)
