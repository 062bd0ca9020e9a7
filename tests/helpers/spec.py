"""Plain-Python statements of the SLM spec that the implementation is compared with."""

from __future__ import annotations

import math


def plain_top_k(scores, valid, k):
    """Spec: round-half-up(k * n_valid) highest valid scores (>= 1), ties -> earlier position."""
    items = [(-s, i) for i, (s, v) in enumerate(zip(scores, valid)) if v]
    n = len(items)
    count = min(n, max(1 if n else 0, math.floor(n * k + 0.5)))
    chosen = {i for _, i in sorted(items)[:count]}
    return [i in chosen for i in range(len(scores))]
