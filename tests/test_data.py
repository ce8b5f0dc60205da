"""Reading department files: every format error names the file, the line and the column."""

from __future__ import annotations

import json

import pytest

from shared.data import Columns, Record, check_labels, derive_labels, load_records, write_jsonl
from shared.errors import DataError


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_department_column(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label,department\n"reset my password, please",pw,it\nbook a room,room,facilities\n')
    records = load_records(path)
    assert [(r.text, r.label, r.department) for r in records] == [
        ("reset my password, please", "pw", "it"),
        ("book a room", "room", "facilities"),
    ]
    assert records[1].source == f"{path}:3"


def test_jsonl_and_numeric_labels(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps({"text": "a", "label": 1}) + "\n\n" + json.dumps({"text": "b", "label": "x"}) + "\n")
    assert [(r.text, r.label, r.department) for r in load_records(path)] == [("a", "1", None), ("b", "x", None)]


def test_roundtrip_through_write_jsonl(tmp_path):
    records = [Record("hello", "greet", "hr"), Record("bye", "leave", None)]
    write_jsonl(records, tmp_path / "out.jsonl")
    back = load_records(tmp_path / "out.jsonl")
    assert [(r.text, r.label, r.department) for r in back] == [("hello", "greet", "hr"), ("bye", "leave", None)]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("e.csv", "", "file is empty"),
        ("h.csv", "text,label\n", "no records"),
        ("m.csv", "text,category\nhello,x\n", "missing column(s) label"),
        ("f.csv", "text,label\nhello,x,extra\n", ":2: expected 2 fields"),
        ("b.csv", "text,label\n,x\n", ":2: column 'text' is missing or empty"),
        ("j.jsonl", '{"text": "a", "label": "x"}\n{broken\n', ":2: not valid JSON"),
        ("a.jsonl", '["a", "x"]\n', ":1: expected a JSON object"),
        ("n.jsonl", '{"text": "a"}\n', ":1: column 'label' is missing or empty"),
        ("x.txt", "text,label\n", "unsupported file type"),
    ],
)
def test_bad_files_are_named_with_line(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_not_utf8_and_missing_file(tmp_path):
    path = write(tmp_path, "latin.csv", "text,label\ncaf\u00e9,x\n", encoding="latin-1")
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(path)
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "absent.csv")


def test_many_problems_are_reported_together(tmp_path):
    lines = "text,label\n" + "".join(",x\n" for _ in range(15))
    with pytest.raises(DataError) as info:
        load_records(write(tmp_path, "many.csv", lines))
    message = str(info.value)
    assert "15 bad record(s)" in message and ":2:" in message and "and 5 more" in message


def test_unknown_label_names_file_line_and_label(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nhello,greet\nwhat,mystery\n")
    with pytest.raises(DataError) as info:
        check_labels(load_records(path), ["greet", "leave"])
    assert f"{path}:3: unknown label 'mystery'" in str(info.value)


def test_derive_labels_is_sorted_and_unique():
    assert derive_labels([Record("a", "z"), Record("b", "a"), Record("c", "z")]) == ("a", "z")


def test_a_file_is_read_with_the_users_own_column_names(tmp_path):
    path = write(tmp_path, "u.csv", "utterance,intent,unit\nreset my password,pw,it\n")
    records = load_records(path, columns=Columns("utterance", "intent", "unit"))
    assert [(r.text, r.label, r.department) for r in records] == [("reset my password", "pw", "it")]
    with pytest.raises(DataError, match="missing column\\(s\\) text, label; the header has utterance, intent, unit"):
        load_records(path)
    jsonl = write(tmp_path, "u.jsonl", json.dumps({"body": "x", "tag": "y"}) + "\n")
    assert load_records(jsonl, columns=Columns("body", "tag"))[0].label == "y"


def test_a_test_sets_department_column_is_ignored_even_when_empty(tmp_path):
    path = write(tmp_path, "t.csv", "text,label,department\nhello,greet,\nbye,leave,hr\n")
    with pytest.raises(DataError, match=":2: column 'department' is missing or empty"):
        load_records(path)  # a training file needs its departments
    records = load_records(path, columns=Columns().without_department())
    assert [(r.label, r.department) for r in records] == [("greet", None), ("leave", None)]


def test_column_names_must_be_distinct_and_non_empty():
    with pytest.raises(DataError, match="must differ"):
        Columns("text", "text")
    with pytest.raises(DataError, match="must not be empty"):
        Columns(" ", "label")
