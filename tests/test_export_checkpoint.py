"""Checkpoints and the exported model: loadable by fedpriv, by plain transformers/peft, and corruption is caught."""

from __future__ import annotations

import json
import runpy

import numpy as np
import pytest
import torch

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import ModelError
from shared.export import export_model, load_exported
from shared.model import build_classifier

LABELS = ["greet", "leave", "pay"]


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    path = tmp_path / "round-001.safetensors"
    arrays = {"head.weight": np.ones((3, 4), np.float32), "head.bias": np.zeros(3, np.float32)}
    save_checkpoint(path, arrays, {"round": 1})
    loaded, metadata = load_checkpoint(path)
    assert metadata == {"round": 1}
    np.testing.assert_array_equal(loaded["head.weight"], arrays["head.weight"])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelError, match="corrupt or foreign checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("lora_r", [0, 2])
def test_export_loads_with_fedpriv_and_with_plain_transformers(tmp_path, tiny_backbone, lora_r, monkeypatch):
    torch.manual_seed(0)
    model = build_classifier(tiny_backbone, num_labels=3, lora_r=lora_r, lora_alpha=4, lora_targets=("query",))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        # a centre from round 1's feature mean: the export and its README snippet must apply it
        model.centering.statistics.copy_(torch.cat([torch.randn(tiny_backbone.hidden_size), torch.tensor([12.0])]))
    export_model(tmp_path, classifier=model, backbone=tiny_backbone, labels=LABELS, max_length=32,
                 summary={"final_accuracy": 0.5})
    exported = load_exported(tmp_path)
    texts = ["reset my password", "book a room"]
    probabilities = exported.predict(texts)
    with torch.no_grad():
        batch = tiny_backbone.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        expected = model(batch["input_ids"], batch["attention_mask"]).softmax(-1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)

    # The README snippet shipped in the folder runs with transformers + peft alone.
    readme = (tmp_path / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "snippet.py").write_text(snippet)
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(tmp_path / "snippet.py"))
    torch.testing.assert_close(namespace["probabilities"], expected[:1], rtol=1e-4, atol=1e-5)
    # ... and in a fresh Python process that has never imported fedpriv
    import subprocess
    import sys

    fresh = subprocess.run([sys.executable, "-I", "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip().splitlines()[-1] == LABELS[int(expected[0].argmax())]


def test_broken_export_is_named(tmp_path, tiny_backbone):
    model = build_classifier(tiny_backbone, num_labels=3, lora_r=0, lora_alpha=4, lora_targets=("query",))
    export_model(tmp_path, classifier=model, backbone=tiny_backbone, labels=LABELS, max_length=32, summary={})
    manifest = json.loads((tmp_path / "fedpriv_model.json").read_text())
    manifest["labels"] = LABELS[:2]
    (tmp_path / "fedpriv_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="3 outputs but fedpriv_model.json lists 2 labels"):
        load_exported(tmp_path)
    (tmp_path / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load the exported model"):
        load_exported(tmp_path)


def test_predict_reads_a_file_writes_labels_and_scores_and_answers_unknown_below_the_threshold(tmp_path, tiny_backbone):
    from typer.testing import CliRunner

    from simulation.cli.main import app

    torch.manual_seed(0)
    model = build_classifier(tiny_backbone, num_labels=3, lora_r=0, lora_alpha=4, lora_targets=("query",))
    with torch.no_grad():
        model.head.weight.normal_(0, 5.0)
    export_model(tmp_path / "model", classifier=model, backbone=tiny_backbone, labels=LABELS, max_length=32,
                 summary={})
    texts = tmp_path / "requests.csv"
    texts.write_text('id,body\n1,"reset my password, please"\n2,book a room\n3,what is the weather\n')
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "model"), "--input", str(texts), "--text-column",
                                 "body", "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["reset my password, please", "book a room", "what is the weather"]
    assert all(r["label"] in LABELS and 1 / 3 <= r["score"] <= 1 for r in rows)
    lowest, second = sorted(r["score"] for r in rows)[:2]
    assert lowest < second
    cutoff = (lowest + second) / 2  # only the least confident answer falls below it
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "model"), "--input", str(texts), "--text-column",
                                 "body", "--output", str(tmp_path / "out.csv"), "--threshold", str(cutoff)])
    assert result.exit_code == 0, result.output
    labelled = (tmp_path / "out.csv").read_text().splitlines()
    assert labelled[0] == "text,label,score" and sum(",unknown," in line for line in labelled) == 1
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "model"), "--input", str(texts)])
    assert result.exit_code == 1 and "missing column(s) text" in result.output
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "model"), "hello", "--input", str(texts)])
    assert result.exit_code == 1 and "not both" in result.output


def test_serve_answers_a_real_http_client_and_refuses_bad_requests(tmp_path, tiny_backbone):
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from simulation.cli.serve import MAX_TEXTS, build_app

    model = build_classifier(tiny_backbone, num_labels=3, lora_r=0, lora_alpha=4, lora_targets=("query",))
    export_model(tmp_path / "model", classifier=model, backbone=tiny_backbone, labels=LABELS, max_length=32,
                 summary={"dp": True, "final_accuracy": 0.5})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(tmp_path / "model", threshold=0.99), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as client:
            health = client.get("/health").json()
            assert health == {"status": "ok", "labels": 3, "threshold": 0.99, "differential_privacy": True,
                              "final_accuracy": 0.5}
            texts = ["reset my password", "book a room"]
            answer = client.post("/predict", json={"texts": texts})
            assert answer.status_code == 200
            expected = load_exported(tmp_path / "model").predict(texts).max(dim=1).values.tolist()
            predictions = answer.json()["predictions"]
            assert [p["score"] for p in predictions] == pytest.approx(expected, abs=1e-5)
            assert all(p["label"] == "unknown" for p in predictions)  # a random head is never 99% sure
            for bad in ({"texts": []}, {"texts": [""]}, {"text": "x"}, {"texts": ["x"] * (MAX_TEXTS + 1)}, {"texts": "x"}):
                refused = client.post("/predict", json=bad)
                assert refused.status_code == 422 and "texts" in refused.text, bad
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path):
    from typer.testing import CliRunner

    from simulation.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--port", "1"])
    assert result.exit_code == 1 and "not an exported fedpriv model" in result.output


def test_a_backbone_loaded_from_a_folder_is_linked_not_copied_into_the_export(tmp_path, tiny_backbone):
    from shared.model import load_backbone

    tiny_backbone.model.save_pretrained(tmp_path / "hf")
    tiny_backbone.tokenizer.save_pretrained(tmp_path / "hf")
    backbone = load_backbone(str(tmp_path / "hf"))
    model = build_classifier(backbone, num_labels=3, lora_r=0, lora_alpha=4, lora_targets=("query",))
    export_model(tmp_path / "model", classifier=model, backbone=backbone, labels=LABELS, max_length=32, summary={})
    weights = tmp_path / "model" / "backbone" / "model.safetensors"
    assert weights.stat().st_ino == (tmp_path / "hf" / "model.safetensors").stat().st_ino  # one copy on disk
    texts = ["reset my password"]
    with torch.no_grad():
        batch = backbone.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        expected = model(batch["input_ids"], batch["attention_mask"]).softmax(-1)
    torch.testing.assert_close(load_exported(tmp_path / "model").predict(texts), expected, rtol=1e-4, atol=1e-5)


def test_the_out_of_scope_table_counts_turned_away_requests(tmp_path, tiny_backbone):
    from simulation.bench.out_of_scope import out_of_scope_rows

    model = build_classifier(tiny_backbone, num_labels=3, lora_r=0, lora_alpha=4, lora_targets=("query",))
    export_model(tmp_path / "model", classifier=model, backbone=tiny_backbone, labels=LABELS, max_length=32, summary={})
    texts = ["hello there", "pay my bill", "see you tomorrow", "what time is it", "book a flight"]
    (tmp_path / "data_full.json").write_text(json.dumps({"test": [[t, "greet"] for t in texts[:3]],
                                                         "oos_test": [[t, "oos"] for t in texts[3:]]}))
    scores = load_exported(tmp_path / "model").predict(texts).max(dim=1).values
    never, always = out_of_scope_rows(tmp_path / "model", tmp_path, thresholds=(0.0, 1.01))
    assert never["in_scope_turned_away"] == 0 and never["out_of_scope_recall"] == 0
    assert always["in_scope_turned_away"] == 1 and always["out_of_scope_recall"] == 1 and always["in_scope_accuracy"] == 0
    middle = float(scores[:3].median())
    (row,) = out_of_scope_rows(tmp_path / "model", tmp_path, thresholds=(middle,))
    assert row["in_scope_turned_away"] == pytest.approx(float((scores[:3] < middle).float().mean()))
    assert row["out_of_scope_recall"] == pytest.approx(float((scores[3:] < middle).float().mean()))
