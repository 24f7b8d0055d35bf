"""Order-independent digests of sets of input keys, for the per-partition exactly-once check."""

from __future__ import annotations

import hashlib

_MASK = 2**64 - 1


def key_digest(keys: list[str]) -> int:
    """The sum of each key's 64-bit BLAKE2b, modulo 2^64.

    Sums of disjoint sets add up, so a partition's digest can be checked against the digests of the shards that
    hold its rows without gathering the keys anywhere. A missing key and a repeated one would have to cancel
    exactly to go unnoticed.
    """
    total = 0
    for key in keys:
        total += int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return total & _MASK


def add_digests(*digests: int) -> int:
    return sum(digests) & _MASK
