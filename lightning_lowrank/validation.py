"""Argument checks shared by both methods: a clear error naming the parameter and the accepted values."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` if it is an int in [low, high] (no upper bound without ``high``), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepted = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be an int {accepted}, got {value!r}")
    return value
