"""Budget solver: each gate's k for a MAC budget, on one structure's cost model.

Objective. A gate that updates k of its N tokens per frame leaves the others stale, and
tokens picked by largest accumulated change are refreshed about every P = N/k frames, so
their ages run 0 .. P-1. Frame-to-frame changes of real video are partly noise (camera
shake, sensor noise, compression): a stale token's error grows like a random walk, its
squared size in proportion to its age, so the mean squared error of a gate's tokens is
psi(f) = (1 - f)/f in units of one frame's squared change (`staleness`; 0 at k = N). On
ViT-B/224 the all-token error of uniform plans follows psi within 1.5x from f = 0.5 to
0.125, where the steady-drift model (age², growing like 1/f²) is off by 3.3x. The solver
minimises

    E(k) = sum_g w_g · psi(k_g / N_g)    subject to    MACs(k) <= budget · dense MACs,

where MACs(k) is the cost model's lambdified total (linear in each k, overhead included)
and w_g weighs what gate g's stale tokens cost at the output. Without calibration w_g is
g's MACs per token (`weights="macs"`), for which the optimum gives every gate the same
k/N: the uniform plan. `calibration.py` measures w_g on a clip instead (an error model
fitted to the model and the video). "cascade" weights (`CostModel.cascade`) count the
chains of gates that query-gated attention forms when gates sit on the residual stream.
psi is convex, so adding tokens in order of decreasing w_g·(psi(k/N) - psi((k+1)/N)) / (MACs
per token of g) is optimal for this separable knapsack up to the last token; that order
depends on the structure alone, so a new budget only cuts a precomputed cumulative cost
(well under a millisecond); the lambdified gradient gives each gate's MACs per token.

Time. MACs are not all equally fast: attention's (a softmax between two small products)
take about ATTENTION_TIME times a GEMM's per MAC, so a plan that buys accuracy with queries
can meet the MAC budget and still run slower than the uniform plan (ViT-B/384 at 0.25: the
calibrated plan gave qkv gates 2568 query rows to the uniform plan's 1692 and ran 7% slower).
With calibrated or cascade weights the solver therefore meets two budgets: the MACs, and a
time no longer than the uniform plan's at the same budget (`time_per_k`: each gate's MACs per
token with attention's counted ATTENTION_TIME times). The order is priced by
gain / (MACs + (p - 1) · attention MACs), with the price p in [1, ATTENTION_TIME] bisected
until the cut that meets both budgets leaves neither with room (a Lagrange multiplier): the
most accurate plan the model knows that is no slower than the uniform one. Re-planning then
takes about a millisecond (1.2 ms on ViT-B/224): a dozen sorts of every gate's tokens.

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

# Time per MAC of gated attention (SDPA on the selected queries against all N keys) over that of
# the gated linears' GEMMs, inside an incremental frame of ViT-B/384 at budget 0.25: 17.8 us per
# query row of 0.886 M MACs (20 us per M) against 5.9 us per M MACs for the linears (2-core AMD
# EPYC, AVX-512, float32, `benchmarks/profile_frame.py`). With 1.7 the plan ran no faster than
# with no time budget at all.
ATTENTION_TIME = 3.0
PRICE_STEPS = 12  # bisection steps for the attention price (a 1/4000 of the range)


def staleness(f):
    """psi(f) = (1 - f)/f: mean squared error of a gate's tokens, in frames of squared change, at a fraction f per frame.

    Tokens are refreshed about every P = 1/f frames, so their ages run 0 .. P-1; a change
    that accumulates like a random walk has a squared size in proportion to its age, so
    the mean is in proportion to the mean age (P - 1)/2 (the constant is the weights').
    """
    f = np.asarray(f, dtype=np.float64)
    return (1 - f) / f


def default_gains(num_tokens: int, start: int = 1) -> np.ndarray:
    """psi(i/N) - psi((i+1)/N) for tokens i = start..N-1: what the (i+1)-th token saves (start >= 1)."""
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
        gate's MACs per token: the uniform plan) or a number per gate. Any but "macs" also keeps to the
        uniform plan's time (module docstring)."""
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
        elif isinstance(weights, dict):  # calibrated: a gate the calibration did not see weighs by its MACs
            known = [i for i, g in enumerate(self.names) if g in weights]
            rate = float(np.median([weights[self.names[i]] / max(per_k[i] * n[i], 1e-12) for i in known])) \
                if known else 1.0
            w = np.array([weights.get(g, rate * per_k[i] * n[i]) for i, g in enumerate(self.names)], dtype=np.float64)
        else:
            raise ValueError(f"weights must be 'cascade', 'macs' or a dict per gate, got {weights!r}")
        self.weights = w
        self.gains = [w[i] * default_gains(int(n[i]), int(kmin[i])) for i in range(len(self.names))]
        self.item_gain = np.concatenate(self.gains) if self.names else np.zeros(0)
        self.item_gate = np.concatenate([np.full(len(self.gains[i]), i) for i in range(len(self.names))]) \
            if self.names else np.zeros(0, dtype=np.int64)
        self.order = self._order(per_k)
        self.sorted_gate = self.item_gate[self.order]
        self.sorted_cost = per_k[self.sorted_gate]
        self.cum_cost = np.cumsum(self.sorted_cost)
        attention = np.zeros(len(self.names))
        position = {name: i for i, name in enumerate(self.names)}
        for term in cm.terms:
            if term.what == "attention" and term.gate is not None:
                attention[position[term.gate]] += float(term.per_k)
        self.attention_per_k = attention
        self.time_per_k = per_k + (ATTENTION_TIME - 1) * attention
        self.keeps_time = weights != "macs" and bool(attention.any())

    def _order(self, cost_per_k: np.ndarray) -> np.ndarray:
        """Every gate's tokens by decreasing gain per unit of `cost_per_k` (per gate)."""
        return np.argsort(-(self.item_gain / np.maximum(cost_per_k, 1e-12)[self.item_gate]), kind="stable")

    def objective(self, k: np.ndarray, active: np.ndarray) -> float:
        return float(sum(self.weights[i] * staleness(k[i] / self.n[i]) for i in np.flatnonzero(active)))

    def solve(self, budget: float) -> Solution:
        g = len(self.names)
        if budget >= 1.0:  # every position, padding included: buffers then return every token unrounded
            ks = {name: self.cm.gates[name].num_tokens for name in self.names}
            return Solution(ks, set(), self.predict(ks), 0.0, True)
        limit = budget * self.dense_macs
        active = np.ones(g, dtype=bool)
        uniform = uniform_ks(self.cm, budget) if self.keeps_time else None
        uniform_k = None if uniform is None else np.array([uniform[name] for name in self.names])
        while True:
            k = self._allot(limit, active)
            if uniform_k is not None:
                k = self._keep_time(k, limit, uniform_k, active)
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

    def _time(self, k: np.ndarray, active: np.ndarray) -> float:
        """Time of the per-token work above each active gate's least k, in GEMM MACs."""
        return float(np.sum(np.where(active, self.time_per_k * (k - self.kmin), 0.0)))

    def _keep_time(self, k: np.ndarray, limit: float, uniform_k: np.ndarray, active: np.ndarray) -> np.ndarray:
        """k, or if slower than the uniform plan `uniform_k`, the plan priced to meet both budgets."""
        # the uniform plan rounds every gate's k down: one token more per gate is still its time
        # (and a plan whose weights are the MACs, tied everywhere, is not pushed off uniform by a hair)
        time_room = self._time(uniform_k, active) + float(np.sum(np.where(active, self.time_per_k, 0.0)))
        if self._time(k, active) <= time_room:
            return k
        low, high = 1.0, ATTENTION_TIME
        best = self._allot_priced(limit, active, high, time_room)[0]
        for _ in range(PRICE_STEPS):
            price = (low + high) / 2
            k, time_bound = self._allot_priced(limit, active, price, time_room)
            if time_bound:  # the time ran out first: queries are still too cheap
                low = price
            else:
                high, best = price, k
        return best

    def _allot(self, limit: float, active: np.ndarray) -> np.ndarray:
        """Each gate's k: the order's tokens while the MACs fit, then crumbs for cheaper gates."""
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

    def _allot_priced(self, limit: float, active: np.ndarray, price: float, time_room: float):
        """Each gate's k in the order with attention's MACs counted `price` times, cut where the MACs or the
        time run out; and whether the time ran out first."""
        k = self.kmin.astype(np.int64).copy()
        room = limit - self._base(active)
        if room <= 0:
            return k, False
        gate = self.item_gate[self._order(self.per_k + (price - 1) * self.attention_per_k)]
        take = active[gate]
        cum_macs = np.cumsum(np.where(take, self.per_k[gate], 0.0))
        cum_time = np.cumsum(np.where(take, self.time_per_k[gate], 0.0))
        by_macs = int(np.searchsorted(cum_macs, room * (1 - 1e-12), side="right"))
        by_time = int(np.searchsorted(cum_time, time_room, side="right"))
        count = min(by_macs, by_time)
        chosen = gate[:count][take[:count]]
        k += np.bincount(chosen, minlength=len(self.names))
        return k, by_time < by_macs

    def predict(self, ks: dict[str, int]) -> float:
        return self.cm.predict_macs(ks)


def uniform_ks(cm: CostModel, budget: float) -> dict[str, int]:
    """The largest common fraction f of every gate's tokens whose predicted MACs fit the budget."""
    gates = cm.gates

    def ks(f: float) -> dict[str, int]:
        return {name: max(g.min_k, min(g.selectable, math.floor(f * g.selectable + 1e-9))) for name, g in gates.items()}

    if budget >= 1.0:
        return {name: g.num_tokens for name, g in gates.items()}
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if cm.predict_macs(ks(mid)) <= budget * cm.dense_macs:
            lo = mid
        else:
            hi = mid
    return ks(lo)
