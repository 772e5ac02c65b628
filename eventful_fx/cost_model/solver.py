"""Budget solver: picks each gate's k so that an incremental frame meets a MAC budget.

The cost of an incremental frame is `static + sum(a + b * k[gate])` over the cost terms
the rewrite recorded (gates, buffers, gated regions, attention modes). The uniform plan
gives every gate the same fraction of its tokens, the largest that meets the budget.
"""
from __future__ import annotations

import math


def predicted_macs(static: float, cost_terms, ks: dict[str, int]) -> float:
    return static + sum(a + b * ks[name] for name, a, b in cost_terms)


def solve_uniform(budget: float, dense_macs: int, static: float, cost_terms, num_tokens: dict[str, int]) -> dict[str, int]:
    """The largest common fraction f of tokens with predicted MACs <= budget * dense.

    Budget 1.0 means "exact": every gate keeps all its tokens, even though gates and
    buffers then cost a little more than the dense model.
    """
    def ks(f: float) -> dict[str, int]:
        return {name: max(1, min(n, math.floor(f * n + 1e-9))) for name, n in num_tokens.items()}

    if budget >= 1.0:
        return ks(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if predicted_macs(static, cost_terms, ks(mid)) <= budget * dense_macs:
            lo = mid
        else:
            hi = mid
    return ks(lo)
