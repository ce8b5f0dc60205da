"""The exported model folder: plain transformers + peft + safetensors pieces, usable without fedpriv.

    model/
      backbone/             AutoModel.from_pretrained / AutoTokenizer.from_pretrained
      adapter/              PeftModel.from_pretrained(backbone, "adapter")   (only when LoRA was trained)
      head.safetensors      weight (L, H), bias (L,) of the linear head; centre (H,): the federation's DP mean
                            feature, which features are moved away from before the head (``shared.centering``)
      fedpriv_model.json    labels in head order, pooling, max length, privacy summary
      README.md             the ten lines that load it without fedpriv
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.centering import centred
from shared.errors import ModelError
from shared.model import Backbone, TextClassifier, encode

MANIFEST = "fedpriv_model.json"
POOLING = "mean over attention mask of each of the last two layers, averaged, then L2 normalisation"

_LOADING_README = """# Exported fedpriv model

Trained with fedpriv (federated, differentially private). Load it without fedpriv:

```python
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

meta = json.load(open("fedpriv_model.json"))
tokenizer = AutoTokenizer.from_pretrained("backbone")
encoder = AutoModel.from_pretrained("backbone")
if meta["lora"]:
    from peft import PeftModel
    encoder = PeftModel.from_pretrained(encoder, "adapter")
head = load_file("head.safetensors")
batch = tokenizer(["reset my password"], padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
states = encoder(**batch, output_hidden_states=True).hidden_states
mask = batch["attention_mask"].unsqueeze(-1).float()
pooled = sum((h * mask).sum(1) / mask.sum(1) for h in states[-2:]) / 2  # last two layers, averaged
features = torch.nn.functional.normalize(pooled, dim=-1)
if head["centre"].any():  # the federation's mean feature (a DP release)
    features = torch.nn.functional.normalize(features - head["centre"], dim=-1)
probabilities = (features @ head["weight"].T + head["bias"]).softmax(-1)
print(meta["labels"][int(probabilities.argmax())])
```
"""


def export_model(
    folder: Path, *, classifier: TextClassifier, backbone: Backbone, labels: Sequence[str], max_length: int,
    summary: Mapping[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not _link_backbone(Path(backbone.source), folder / "backbone"):
        backbone.model.save_pretrained(folder / "backbone")
        backbone.tokenizer.save_pretrained(folder / "backbone")
    lora = classifier.adapted
    if lora:
        classifier.encoder.save_pretrained(folder / "adapter")
    save_file(
        {"weight": classifier.head.weight.detach().contiguous(), "bias": classifier.head.bias.detach().contiguous(),
         "centre": classifier.centering.centre.detach().contiguous()},
        str(folder / "head.safetensors"),
    )
    manifest = {
        "labels": list(labels), "max_length": max_length, "pooling": POOLING, "lora": lora,
        "backbone_fingerprint": backbone.fingerprint, **summary,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (folder / "README.md").write_text(_LOADING_README)


def _link_backbone(source: Path, target: Path) -> bool:
    """Hard-link a frozen backbone loaded from a folder (the packaged MiniLM, or the user's model
    folder) instead of writing another 88 MB copy per run; False where that is not possible (the
    tiny test model, a folder on another file system), and the caller saves a copy instead. The
    exported weights are the source's, byte for byte (the backbone is frozen)."""
    if not (source / "config.json").is_file():
        return False
    files = [p for p in source.rglob("*") if p.is_file()]
    try:
        for path in files:
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        return False
    return True


@dataclass
class ExportedModel:
    encoder: torch.nn.Module
    tokenizer: Any
    head: torch.nn.Linear
    centre: torch.Tensor  # (H,); zeros: features are not centred
    labels: list[str]
    max_length: int
    manifest: dict[str, Any]  # fedpriv_model.json: labels, pooling, the run's privacy summary

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities, (N, L) in ``labels`` order."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        features = centred(encode(self.encoder, batch["input_ids"], batch["attention_mask"]), self.centre)
        return self.head(features).softmax(dim=-1)


def load_exported(folder: Path) -> ExportedModel:
    from transformers import AutoModel, AutoTokenizer

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{folder}: not an exported fedpriv model (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        labels, max_length, lora = list(manifest["labels"]), int(manifest["max_length"]), bool(manifest["lora"])
        tokenizer = AutoTokenizer.from_pretrained(folder / "backbone")
        encoder = AutoModel.from_pretrained(folder / "backbone")
        if lora:
            from peft import PeftModel

            encoder = PeftModel.from_pretrained(encoder, folder / "adapter")
        weights = load_file(str(folder / "head.safetensors"))
        head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        centre = weights.pop("centre", torch.zeros(head.in_features))  # models exported before centring have none
        head.load_state_dict(weights)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{folder}: cannot load the exported model ({type(exc).__name__}: {exc})") from None
    if head.out_features != len(labels):
        raise ModelError(f"{folder}: head has {head.out_features} outputs but {MANIFEST} lists {len(labels)} labels")
    encoder.eval()
    if centre.shape != (head.in_features,):
        raise ModelError(f"{folder}: head.safetensors' centre has shape {tuple(centre.shape)}, expected ({head.in_features},)")
    return ExportedModel(encoder, tokenizer, head, centre, labels, max_length, manifest)
