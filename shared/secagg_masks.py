"""SecAgg+ masks from a cryptographic generator keyed by the whole shared secret.

Flower 1.42's ``pseudo_rand_gen`` XOR-folds a mask seed (a 32-byte shared key or self-mask seed)
into 32 bits and seeds numpy's MT19937 with it (flower issue 7522; a fix is proposed in flower
PR 7570, not released). An honest-but-curious server, which learns every surviving department's
self-mask seed in the unmasking stage, then needs only a 2^32 search per pairwise mask to strip a
department's masks and read its individual update.

``cryptographic_masks`` keeps Flower's signature and output (one int64 array per shape, values in
[0, num_range)) but draws them from ChaCha20's keystream under SHA-256(domain || seed): every bit
of the seed matters and the stream is a cryptographic PRG. Both the department's mod and the
server's workflow call the function by the name they imported, so ``install`` replaces it in the
three modules that hold it, in every fedpriv process (ClientApp and ServerApp), and ``check``
fails closed where the replacement is not in place. Masks are only ever compared between fedpriv
processes, which all install it: a department running Flower's generator against a fedpriv server
would unmask to garbage, which the server's aggregate check rejects.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

NAME = "chacha20-sha256"  # sent to departments in each round's config; they refuse any other
_DOMAIN = b"fedpriv secagg+ mask v1\0"
_FLOWER_MODULES = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


def cryptographic_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Flower's ``pseudo_rand_gen`` contract: one int64 array per shape, uniform in [0, num_range)."""
    if num_range < 2 or num_range & (num_range - 1) or num_range > 2**62:
        raise ValueError(f"SecAgg+ modulus range must be a power of two in [2, 2^62] (got {num_range})")
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    sizes = [int(np.prod(shape)) if shape else 1 for shape in dimensions_list]
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64(num_range - 1)
    output, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        values = words[start : start + size].astype(np.int64)
        output.append(values.reshape(shape) if shape else np.array(values[0], dtype=np.int64))
        start += size
    return output


def install() -> None:
    """Replace Flower's mask generator in every module that calls it."""
    for name in _FLOWER_MODULES:
        setattr(importlib.import_module(name), "pseudo_rand_gen", cryptographic_masks)  # a module attribute
    check()


def check() -> None:
    """Raise unless every Flower module that generates masks uses ``cryptographic_masks``."""
    stale = [name for name in _FLOWER_MODULES if importlib.import_module(name).pseudo_rand_gen is not cryptographic_masks]
    if stale:
        raise RuntimeError(
            "SecAgg+ masks would come from Flower's 32-bit-seeded generator in " + ", ".join(stale)
            + "; refusing to mask or unmask (shared.secagg_masks.install was not applied)"
        )
