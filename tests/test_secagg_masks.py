"""SecAgg+ masks: Flower 1.42's generator folds a 32-byte secret to 32 bits; fedpriv's uses all of it."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from shared import secagg_masks

SHAPES = [(3, 4), (5,), ()]


def colliding_secrets() -> tuple[bytes, bytes]:
    """Two different 32-byte secrets whose XOR-fold to 32 bits (what Flower seeds MT19937 with) is equal."""
    first = bytearray(os.urandom(32))
    second = bytearray(first)
    for position in (0, 4):  # flipping the same bits in two 4-byte words leaves their XOR unchanged
        second[position] ^= 0x5A
    return bytes(first), bytes(second)


def flower_original():
    utils = importlib.import_module("flwr.common.secure_aggregation.secaggplus_utils")
    source = importlib.util.find_spec(utils.__name__).origin
    namespace: dict = {}
    exec(compile(open(source).read(), source, "exec"), namespace)  # a fresh copy, unpatched
    return namespace["pseudo_rand_gen"]


def test_flower_masks_collide_for_secrets_that_share_a_32_bit_fold_and_ours_do_not():
    first, second = colliding_secrets()
    original = flower_original()
    for a, b in zip(original(first, 2**32, SHAPES), original(second, 2**32, SHAPES), strict=True):
        np.testing.assert_array_equal(a, b)  # the attack: a 2^32 search finds every mask
    ours = [secagg_masks.cryptographic_masks(s, 2**32, SHAPES) for s in (first, second)]
    assert not np.array_equal(ours[0][0], ours[1][0])


def test_masks_are_deterministic_in_range_and_shaped_like_flowers():
    seed = os.urandom(32)
    masks = secagg_masks.cryptographic_masks(seed, 2**32, SHAPES)
    again = secagg_masks.cryptographic_masks(seed, 2**32, SHAPES)
    assert [m.shape for m in masks] == [(3, 4), (5,), ()] and all(m.dtype == np.int64 for m in masks)
    for a, b in zip(masks, again, strict=True):
        np.testing.assert_array_equal(a, b)
    values = np.concatenate([m.ravel() for m in secagg_masks.cryptographic_masks(seed, 2**32, [(20000,)])])
    assert values.min() >= 0 and values.max() < 2**32 and values.max() > 2**31  # the whole range is used
    with pytest.raises(ValueError, match="power of two"):
        secagg_masks.cryptographic_masks(seed, 1000, SHAPES)


def test_both_sides_use_the_replacement_and_refuse_to_run_without_it(monkeypatch):
    import client.secure_aggregation  # noqa: F401  (installs it, as every ClientApp does)

    secaggplus_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    secaggplus_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

    assert secaggplus_mod.pseudo_rand_gen is secagg_masks.cryptographic_masks
    assert secaggplus_workflow.pseudo_rand_gen is secagg_masks.cryptographic_masks
    secagg_masks.check()
    monkeypatch.setattr(secaggplus_workflow, "pseudo_rand_gen", flower_original())
    with pytest.raises(RuntimeError, match="32-bit"):
        secagg_masks.check()
