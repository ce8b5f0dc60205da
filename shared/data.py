"""A department's labelled records: reading CSV/JSONL files and checking them against the label set.

Accepted formats (chosen by file suffix):
- CSV with a header row holding ``text`` and ``label`` and optionally ``department``;
- JSONL, one object per line with the same keys.
A file whose columns have other names is read as it is, with ``Columns`` naming them
(``--text-column``, ``--label-column``, ``--department-column``); a file that only evaluates
(a test set) is read with ``department=None``: its department column, empty or not, is ignored.
Every problem names the file, the line and the column, and up to ``MAX_REPORTED`` problems
are reported together so that a user can fix a file in one pass.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import DataError

SUFFIXES = (".csv", ".jsonl", ".json")
MAX_REPORTED = 10


@dataclass(frozen=True)
class Columns:
    """The names of a file's text, label and (optional) department columns; department None: ignore it."""

    text: str = "text"
    label: str = "label"
    department: str | None = "department"

    def __post_init__(self) -> None:
        names = [n for n in (self.text, self.label, self.department) if n is not None]
        problems = [f"a column name must not be empty (got {n!r})" for n in names if not n.strip()]
        if len(set(names)) != len(names):
            problems.append(f"text, label and department columns must differ (got {', '.join(names)})")
        if problems:
            raise DataError("; ".join(problems))

    @property
    def required(self) -> tuple[str, str]:
        return self.text, self.label

    def without_department(self) -> Columns:
        return Columns(self.text, self.label, None)


DEFAULT_COLUMNS = Columns()


@dataclass(frozen=True)
class Record:
    text: str
    label: str
    department: str | None = None
    source: str = ""  # "file:line", for error messages


def load_records(path: str | Path, *, columns: Columns = DEFAULT_COLUMNS) -> list[Record]:
    """Read every record of a CSV or JSONL file; raise ``DataError`` naming each bad line."""
    path, rows = _rows(path, required=columns.required)
    return _to_records(path, rows, columns)


def load_texts(path: str | Path, *, column: str = "text") -> list[str]:
    """The texts of a CSV or JSONL file to classify (no labels needed); every bad line named."""
    path, rows = _rows(path, required=(column,))
    texts, problems = [], []
    for line_number, row in rows:
        value = None if isinstance(row, str) else row.get(column)
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
        else:  # a malformed line says why; a well-formed one lacks the column
            problems.append(f"{path}:{line_number}: {row if isinstance(row, str) else f'column {column!r} is missing or empty'}")
    if problems:
        raise DataError(_summarise(path, problems))
    if not texts:
        raise DataError(f"{path}: no texts (the file has a header or blank lines only)")
    return texts


def _rows(path: str | Path, *, required: tuple[str, ...]) -> tuple[Path, Iterable[tuple[int, dict[str, object] | str]]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}', expected one of {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return path, (_csv_rows(path, text, required) if suffix == ".csv" else _jsonl_rows(path, text))


def _csv_rows(path: Path, text: str, required: tuple[str, ...]) -> Iterable[tuple[int, dict[str, object] | str]]:
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        raise DataError(f"{path}:1: malformed CSV header ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(missing)}; the header has {', '.join(header) or 'nothing'}"
        )
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"malformed CSV ({exc})"
            continue
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            yield reader.line_num, f"expected {len(header)} fields as in the header, found {len(fields)}"
            continue
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _jsonl_rows(path: Path, text: str) -> Iterable[tuple[int, dict[str, object] | str]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_number, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(row, dict):
            yield line_number, f"expected a JSON object, found {type(row).__name__}"
            continue
        yield line_number, row


def _to_records(path: Path, rows: Iterable[tuple[int, dict[str, object] | str]], columns: Columns) -> list[Record]:
    records: list[Record] = []
    problems: list[str] = []
    for line_number, row in rows:
        where = f"{path}:{line_number}"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        row_problems = []
        values: dict[str, str | None] = {"department": None}
        wanted = (("text", columns.text), ("label", columns.label), ("department", columns.department))
        for field, column in wanted:
            if column is None:
                continue
            value = row.get(column)
            if value is None and field == "department":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "label":
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                row_problems.append(f"column '{column}' is missing or empty")
                continue
            values[field] = value.strip()
        if row_problems:
            problems.append(f"{where}: {'; '.join(row_problems)}")
            continue
        records.append(Record(values["text"], values["label"], values["department"], where))  # type: ignore[arg-type]
    if problems:
        raise DataError(_summarise(path, problems))
    if not records:
        raise DataError(f"{path}: no records (the file has a header or blank lines only)")
    return records


def check_labels(records: Sequence[Record], labels: Sequence[str], *, described_as: str = "the federation's labels") -> None:
    """Raise ``DataError`` naming file, line and label for every record outside the label set."""
    known = set(labels)
    problems = [f"{r.source}: unknown label {r.label!r} (not in {described_as})" for r in records if r.label not in known]
    if problems:
        shown = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
        raise DataError(_summarise(None, problems) + f"\n{described_as[0].upper()}{described_as[1:]}: {shown}")


def derive_labels(records: Iterable[Record]) -> tuple[str, ...]:
    """The sorted label set of the given records (simulation derives the federation's labels so)."""
    return tuple(sorted({r.label for r in records}))


def write_jsonl(records: Iterable[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for r in records:
            row = {"text": r.text, "label": r.label}
            if r.department:
                row["department"] = r.department
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _summarise(path: Path | None, problems: list[str]) -> str:
    head = f"{path}: {len(problems)} bad record(s)" if path else f"{len(problems)} bad record(s)"
    shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{head}:\n{shown}{more}"


def safe_name(name: str) -> str:
    """A department name as a file name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


MAX_NAME_LENGTH = 64


def check_department_names(names: Sequence[str], *, source: str) -> None:
    """Every name usable as a folder of its own, and no two that share one after ``safe_name``.

    Two names that map to one file would merge two departments' records and ledgers (one trained
    twice, its epsilon doubled); a name like ``../x`` would put a ledger outside the run folder.
    """
    problems = []
    for name in names:
        if not name or len(name) > MAX_NAME_LENGTH:
            problems.append(f"department name {name!r}: must have 1 to {MAX_NAME_LENGTH} characters")
        elif name.startswith(".") or "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
            problems.append(f"department name {name!r}: may not start with '.' or hold '/', '\\' or control characters")
    folders: dict[str, list[str]] = {}
    for name in names:
        folders.setdefault(safe_name(name).lower(), []).append(name)
    for folder, same in folders.items():
        if len(same) > 1:
            problems.append(f"department names {', '.join(map(repr, same))} share one folder ({folder!r}): rename one")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))
