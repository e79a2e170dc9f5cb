"""The padding ladder: the few shapes every per-step device input is padded up to.

Host-only module: plain Python, never imports ``jax``. The same ladder shape serves the token
count T, the sequence count S and the number of logits rows R; the runner compiles one
program per bucket at warm-up, so a value outside the ladder is an error, not a compile.

Invariants: a ladder is strictly increasing, its entries are powers of two except possibly
the last, which is ``max_value`` itself; ``bucket_for(n)`` is the smallest entry ``>= n``.
"""

import bisect

# Slot id of a padded token: the KV-cache write skips it (same value as jaxpaged.metadata).
PAD_SLOT_ID = -1


def make_buckets(max_value: int, min_value: int = 1) -> list[int]:
    """Powers of two from the first one ``>= min_value`` up to ``max_value``, which is
    always the last entry even when it is not a power of two.

    >>> make_buckets(100, min_value=8)
    [8, 16, 32, 64, 100]
    """
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    if min_value < 1:
        raise ValueError(f"min_value must be >= 1, got {min_value}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    bucket = 1 << (min_value - 1).bit_length()  # smallest power of two >= min_value
    buckets = []
    while bucket < max_value:
        buckets.append(bucket)
        bucket *= 2
    buckets.append(max_value)
    return buckets


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket ``>= n``. ``buckets`` is a ladder from ``make_buckets``."""
    if not buckets:
        raise ValueError("buckets must be non-empty")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"n={n} exceeds the largest bucket {buckets[-1]} (buckets={buckets})")
    return buckets[i]
