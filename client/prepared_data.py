"""A department's model and records as tensors, built once per process and reused between rounds.

In simulation one process serves many departments (they share its frozen backbone); in deployment
every message starts a fresh ClientApp process and the caches on disk (embeddings of the frozen
backbone's features, in the department's state folder) carry the work between rounds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from client.department_data import DepartmentData, DepartmentSettings, load_department
from shared.config import RunConfig
from shared.features import cached_features, labelled_dataset
from shared.model import TextClassifier, build_classifier, load_backbone
from shared.top_layers import top_layer_dataset


@functools.lru_cache(maxsize=2)
def shared_classifier(
    model: str, num_labels: int, lora_r: int, lora_alpha: int, lora_targets: tuple[str, ...], lora_layers: int = 0,
) -> TextClassifier:
    """One classifier per process: all departments served by a process share its frozen backbone."""
    backbone = load_backbone(model)
    return build_classifier(
        backbone, num_labels=num_labels, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
        lora_layers=lora_layers,
    )


@dataclass(frozen=True)
class PreparedData:
    department: DepartmentData
    train: TensorDataset  # (*inputs, labels): (features,) head-only, (input_ids, attention_mask) with LoRA
    val: TensorDataset
    test: TensorDataset | None


@functools.lru_cache(maxsize=16)
def prepare(settings: DepartmentSettings, config: RunConfig) -> PreparedData:
    department = load_department(settings, config)
    backbone = load_backbone(config.model)

    def tensors(records) -> TensorDataset:
        if config.lora_layers:  # stage 2 on the top layers: cached states at their input
            return top_layer_dataset(backbone, records, labels=config.labels, max_length=config.max_length,
                                     count=config.lora_layers)
        return labelled_dataset(
            backbone, records, labels=config.labels, max_length=config.max_length,
            head_only=config.head_only, cache_dir=settings.feature_cache,
        )

    test = tensors(department.test) if department.test else None
    return PreparedData(department, tensors(department.train), tensors(department.val), test)


def train_features(settings: DepartmentSettings, config: RunConfig, data: PreparedData) -> tuple[torch.Tensor, torch.Tensor]:
    """The training records' frozen-backbone features (N, H) and label indices (N,), for stage 1."""
    if config.head_only:
        features, targets = data.train.tensors
        return features, targets
    texts = [r.text for r in data.department.train]
    features = cached_features(load_backbone(config.model), texts, max_length=config.max_length,
                               cache_dir=settings.feature_cache)
    return features, data.train.tensors[-1]
