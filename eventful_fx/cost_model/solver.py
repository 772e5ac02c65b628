"""Budget solver: each gate's k for a MAC budget, on one structure's cost model.

Objective. A gate that updates k of its N tokens per frame leaves the others stale; tokens
that drift steadily and are picked by largest accumulated change are updated round robin,
every P = N/k frames, so a token's error is its age (0 .. P-1 frames) times its per-frame
change, and the mean squared error is phi(k/N) = (P - 1)(2P - 1)/6 frames² of change
(`staleness`; 0 at k = N, growing like 1/f² as f = k/N falls). The solver minimises

    E(k) = sum_g w_g · phi(k_g / N_g)    subject to    MACs(k) <= budget · dense MACs,

where MACs(k) is the cost model's lambdified total (linear in each k, overhead included)
and w_g weighs what a token gate g skips costs at the output: w_g = c_g², with c_g the
summed error amplitude of the regions that stay stale at that token (`CostModel.cascade`:
each region's error energy in proportion to its MACs per token, the regions being g's own
and those of every gate whose input changes only through g — behind query-gated attention
a skipped token has no new value for any later gate to pick, so one early skip leaves a
whole chain of blocks stale, and those errors, all from one missed change, add up
coherently). A gate nothing is behind gets w_g = its MACs per token: on its own, every gate
gets the same k/N.
phi is convex, so adding tokens in order of decreasing w_g·(phi(k/N) - phi((k+1)/N)) / (MACs
per token of g) is optimal for this separable knapsack up to the last token; that order
depends on the structure alone, so a new budget only cuts a precomputed cumulative cost
(well under a millisecond); the lambdified gradient gives each gate's MACs per token. With
`weights="macs"` (w_g = g's MACs per token, no cascades) the optimum is one k/N for every
gate: the uniform plan.

A gate whose allotted k makes its region cost at least as much as running it densely is
dropped (`ungated`): a dense region is exact and cheaper. Gates that feed a converted
attention site stay: their sites need sparse queries. Budget 1.0 is exact: every gate keeps
all its tokens (gates and buffers then cost a little more than the dense model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .expressions import CostModel


def staleness(f):
    """phi(f): mean squared staleness of a token, in frames of change, when a gate updates a fraction f per frame.

    Tokens that drift steadily (a pan) and are picked by largest accumulated change are
    updated round robin, every P = 1/f frames; at a frame their ages are 0 .. P-1 and the
    error of age a is a times the per-frame change: mean a² = (P - 1)(2P - 1) / 6.
    """
    p = 1.0 / np.asarray(f, dtype=np.float64)
    return (p - 1) * (2 * p - 1) / 6


def default_gains(num_tokens: int, start: int = 1) -> np.ndarray:
    """phi(i/N) - phi((i+1)/N) for tokens i = start..N-1: what the (i+1)-th token saves (start >= 1)."""
    i = np.arange(max(start, 1), num_tokens, dtype=np.float64)
    return staleness(i / num_tokens) - staleness((i + 1) / num_tokens)


@dataclass
class Solution:
    ks: dict[str, int]
    ungated: set[str] = field(default_factory=set)
    predicted_macs: float = 0.0
    objective: float = 0.0
    feasible: bool = True


class BudgetSolver:
    """Precomputes the order in which tokens are worth adding; `solve(budget)` cuts it."""

    def __init__(self, cm: CostModel, weights: str | dict[str, float] = "cascade"):
        """`weights`: "cascade" (the squared count of regions a skipped token leaves stale), "macs" (each
        gate's MACs per token: the uniform plan) or a number per gate."""
        self.cm = cm
        self.names = list(cm.gates)
        const, per_k, dense, n, kmin = cm.gate_arrays()
        self.const, self.per_k, self.dense, self.n, self.kmin = const, per_k, dense, n, kmin
        self.static = float(cm.static)
        self.dense_macs = cm.dense_macs
        self.removable = np.array([not cm.gates[g].sites for g in self.names], dtype=bool)
        if weights == "macs":
            w = per_k * n
        elif weights == "cascade":
            cascade = cm.cascade()
            w = np.array([cascade[g] ** 2 for g in self.names], dtype=np.float64)
        elif isinstance(weights, dict):
            w = np.array([weights[g] for g in self.names], dtype=np.float64)
        else:
            raise ValueError(f"weights must be 'cascade', 'macs' or a dict per gate, got {weights!r}")
        self.weights = w
        self.gains = [w[i] * default_gains(int(n[i]), int(kmin[i])) for i in range(len(self.names))]
        ratio = np.concatenate([self.gains[i] / max(per_k[i], 1e-12) for i in range(len(self.names))]) \
            if self.names else np.zeros(0)
        self.item_gate = np.concatenate([np.full(len(self.gains[i]), i) for i in range(len(self.names))]) \
            if self.names else np.zeros(0, dtype=np.int64)
        self.order = np.argsort(-ratio, kind="stable")
        self.sorted_gate = self.item_gate[self.order]
        self.sorted_cost = per_k[self.sorted_gate]
        self.cum_cost = np.cumsum(self.sorted_cost)

    def objective(self, k: np.ndarray, active: np.ndarray) -> float:
        return float(sum(self.weights[i] * staleness(k[i] / self.n[i]) for i in np.flatnonzero(active)))

    def solve(self, budget: float) -> Solution:
        g = len(self.names)
        if budget >= 1.0:
            ks = {name: int(self.n[i]) for i, name in enumerate(self.names)}
            return Solution(ks, set(), self.predict(ks), 0.0, True)
        limit = budget * self.dense_macs
        active = np.ones(g, dtype=bool)
        while True:
            k = self._allot(limit, active)
            gated_cost = self.const + self.per_k * k
            drop = active & self.removable & (gated_cost >= self.dense)
            if not drop.any():
                break
            active &= ~drop
        ks = {name: int(k[i]) for i, name in enumerate(self.names) if active[i]}
        ungated = {name for i, name in enumerate(self.names) if not active[i]}
        base = self._base(active)
        return Solution(ks, ungated, self._cost(k, active), self.objective(k, active), base <= limit)

    def _base(self, active: np.ndarray) -> float:
        return self.static + float(np.sum(np.where(active, self.const + self.per_k * self.kmin, self.dense)))

    def _cost(self, k: np.ndarray, active: np.ndarray) -> float:
        return self.static + float(np.sum(np.where(active, self.const + self.per_k * k, self.dense)))

    def _allot(self, limit: float, active: np.ndarray) -> np.ndarray:
        k = self.kmin.astype(np.int64).copy()
        room = limit - self._base(active)
        if room <= 0:
            return k
        if active.all():
            cum = self.cum_cost
            take = active
        else:
            take = active[self.sorted_gate]
            cum = np.cumsum(np.where(take, self.sorted_cost, 0.0))
        count = int(np.searchsorted(cum, room * (1 - 1e-12), side="right"))
        chosen = self.sorted_gate[:count]
        if not active.all():
            chosen = chosen[take[:count]]
        k += np.bincount(chosen, minlength=len(self.names))
        # crumbs: the next token in the order did not fit; cheaper gates may still take some
        left = room * (1 - 1e-12) - (cum[count - 1] if count else 0.0)
        for i in np.argsort(self.per_k):
            if active[i] and k[i] < self.n[i] and self.per_k[i] <= left:
                extra = min(int(self.n[i] - k[i]), int(left // self.per_k[i]))
                k[i] += extra
                left -= extra * self.per_k[i]
        return k

    def predict(self, ks: dict[str, int]) -> float:
        return self.cm.predict_macs(ks)


def uniform_ks(cm: CostModel, budget: float) -> dict[str, int]:
    """The largest common fraction f of every gate's tokens whose predicted MACs fit the budget."""
    gates = cm.gates

    def ks(f: float) -> dict[str, int]:
        return {name: max(g.min_k, min(g.num_tokens, math.floor(f * g.num_tokens + 1e-9))) for name, g in gates.items()}

    if budget >= 1.0:
        return ks(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if cm.predict_macs(ks(mid)) <= budget * cm.dense_macs:
            lo = mid
        else:
            hi = mid
    return ks(lo)
