"""Token selection policies of a `TokenGate`: how many tokens a stream recomputes per frame.

Top-k policies fix the count from N alone, so shapes are static and nothing syncs the
host; `Threshold` selects a data-dependent count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TopK:
    """The k highest-scoring tokens of every stream (k is clamped to N)."""

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"TopK.k must be an int >= 0, got {self.k!r}")

    def count(self, num_tokens: int) -> int:
        return min(self.k, num_tokens)


@dataclass(frozen=True)
class TopFraction:
    """The ceil(fraction * N) highest-scoring tokens of every stream."""

    fraction: float

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"TopFraction.fraction must be a number in [0, 1], got {self.fraction!r}")

    def count(self, num_tokens: int) -> int:
        # round() first so that e.g. 0.1 * 30 = 3.0000000000000004 gives 3, not 4
        return min(num_tokens, math.ceil(round(self.fraction * num_tokens, 9)))


@dataclass(frozen=True)
class Threshold:
    """Every token whose score exceeds `threshold` (a variable count per stream and frame)."""

    threshold: float

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or math.isnan(self.threshold) or self.threshold < 0:
            raise ValueError(f"Threshold.threshold must be a number >= 0, got {self.threshold!r}")

    def count(self, num_tokens: int) -> None:
        return None


Policy = TopK | TopFraction | Threshold
