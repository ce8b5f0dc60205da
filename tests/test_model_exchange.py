"""Only LoRA adapters and the head are trained, and they and the centring's statistics are all that is
transmitted; the frozen backbone never travels."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ModelError
from shared.model import build_classifier, load_backbone, trainable_names
from shared.params import get_trainable, set_trainable


def test_head_only_exchanges_just_the_head(tiny_backbone):
    model = build_classifier(tiny_backbone, num_labels=5, lora_r=0, lora_alpha=8, lora_targets=("query",))
    assert trainable_names(model) == ["head.weight", "head.bias", "centering.statistics"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_lora_exchanges_adapters_and_head_not_the_backbone(tiny_backbone):
    model = build_classifier(tiny_backbone, num_labels=5, lora_r=4, lora_alpha=8, lora_targets=("query", "value"))
    names = trainable_names(model)
    assert names[-3:] == ["head.weight", "head.bias", "centering.statistics"]
    assert names[:-3] and all("lora_" in n for n in names[:-3])
    sent = sum(a.size for a in get_trainable(model))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sent < frozen / 10
    # PEFT works on a copy: the shared cached backbone stays free of adapters.
    assert not any("lora_" in n for n, _ in tiny_backbone.model.named_parameters())


def test_set_trainable_roundtrip_and_rejections(tiny_backbone):
    model = build_classifier(tiny_backbone, num_labels=3, lora_r=2, lora_alpha=4, lora_targets=("query",))
    arrays = [np.random.default_rng(0).normal(size=a.shape).astype(np.float32) for a in get_trainable(model)]
    set_trainable(model, arrays)
    for sent, got in zip(arrays, get_trainable(model), strict=True):
        np.testing.assert_array_equal(sent, got)
    with pytest.raises(ModelError, match="sent 1 arrays"):
        set_trainable(model, arrays[:1])
    bias = trainable_names(model).index("head.bias")
    bad_shape = arrays[:bias] + [np.zeros(7, dtype=np.float32)] + arrays[bias + 1:]
    with pytest.raises(ModelError, match=r"head.bias: shape \(7,\), expected \(3,\)"):
        set_trainable(model, bad_shape, sender="department hr")
    not_finite = arrays[:bias] + [np.array([0.0, np.nan, 1.0], dtype=np.float32)] + arrays[bias + 1:]
    with pytest.raises(ModelError, match="NaN"):
        set_trainable(model, not_finite)


def test_tiny_backbone_is_identical_in_every_process(tiny_backbone):
    load_backbone.cache_clear()
    again = load_backbone("tiny")
    assert again.fingerprint == tiny_backbone.fingerprint


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_backbone(str(tmp_path / "nowhere"))


def test_a_model_folder_is_identified_by_every_file_before_anything_loads(tmp_path, tiny_backbone):
    folder = tmp_path / "model"
    tiny_backbone.model.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    load_backbone.cache_clear()
    backbone = load_backbone(str(folder))
    assert backbone.hidden_size == 32 and "_loaded" not in backbone.__dict__
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + " ")  # any file counts
    load_backbone.cache_clear()
    assert load_backbone(str(folder)).fingerprint != backbone.fingerprint
    assert backbone.model.config.hidden_size == 32  # loads on first use
    (folder / "config.json").write_text("{not json")
    load_backbone.cache_clear()
    with pytest.raises(ModelError, match="config.json is not readable JSON"):
        load_backbone(str(folder))
    load_backbone.cache_clear()
