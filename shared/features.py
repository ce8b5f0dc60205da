"""Tokenising texts and embedding them with the frozen backbone, cached on disk.

In head-only mode (lora-r = 0) the backbone is a fixed public function, so a department embeds
its records once and every later round trains on the cached features: no privacy cost (the
features are a deterministic function of one record and public weights) and no repeated forward
passes. The cache key covers the backbone fingerprint, max length and every text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from shared.data import Record
from shared.model import POOLED_LAYERS, Backbone, encode

EMBED_BATCH = 128


def tokenize(backbone: Backbone, texts: Sequence[str], *, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids and attention mask, (N, T) each, T <= max_length."""
    batch = backbone.tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def embed_texts(
    backbone: Backbone, texts: Sequence[str], *, max_length: int, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Mean-pooled, unit-length embeddings (N, H); batches of similar length to keep padding small.
    ``progress`` is told how many texts each batch embedded."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), backbone.hidden_size)
    for start in range(0, len(order), EMBED_BATCH):
        index = order[start : start + EMBED_BATCH]
        input_ids, attention_mask = tokenize(backbone, [texts[i] for i in index], max_length=max_length)
        out[index] = encode(backbone.model, input_ids, attention_mask)
        if progress is not None:
            progress(len(index))
    return out


def cached_features(
    backbone: Backbone, texts: Sequence[str], *, max_length: int, cache_dir: Path | None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    if cache_dir is None:
        return embed_texts(backbone, texts, max_length=max_length, progress=progress)
    digest = hashlib.sha256(f"{backbone.fingerprint}|{max_length}|last-{POOLED_LAYERS}-layers".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = Path(cache_dir) / f"features-{digest.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            features = torch.load(path, weights_only=True)
            if features.shape == (len(texts), backbone.hidden_size):
                if progress is not None:
                    progress(len(texts))
                return features
        except (RuntimeError, OSError, EOFError):
            pass  # a damaged cache is rebuilt, never trusted
    features = embed_texts(backbone, texts, max_length=max_length, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # departments sharing a cache may write the same file at once
    torch.save(features, tmp)
    tmp.replace(path)
    return features


def labelled_dataset(
    backbone: Backbone, records: Sequence[Record], *, labels: Sequence[str], max_length: int,
    head_only: bool, cache_dir: Path | None,
) -> TensorDataset:
    """``(features, labels)`` in head-only mode, ``(input_ids, attention_mask, labels)`` with LoRA."""
    label_index = {label: i for i, label in enumerate(labels)}
    texts = [r.text for r in records]
    targets = torch.tensor([label_index[r.label] for r in records])
    if head_only:
        return TensorDataset(cached_features(backbone, texts, max_length=max_length, cache_dir=cache_dir), targets)
    input_ids, attention_mask = tokenize(backbone, texts, max_length=max_length)
    return TensorDataset(input_ids, attention_mask, targets)
