"""How long to wait before trying again: exponential backoff with jitter."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before try number `attempt + 1` (attempt ≥ 1): doubling from `base_s`, capped at
    `max_s`, drawn from its upper half so retries of many events spread out."""
    ceiling = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    draw: float = (rng or random).random()
    return ceiling / 2 + draw * ceiling / 2
