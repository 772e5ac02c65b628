"""Planner: the structure (which regions get a gate, each attention site's mode) and each gate's k for a budget.

Works on one analysed graph (no re-capture): for each structure it tries, it builds the cost
model once (sympy, lambdified) and the solver's token order once, and caches both, so a new
budget on a known structure costs well under a millisecond. The structure itself is chosen:

1. regions: every region with MACs (or feeding an attention site) starts gated; the solver
   drops a gate whose region would cost at least as much gated as dense at its k;
2. attention modes: the caller's mode where a site converts (its queries come from a gated
   region and nothing blocks it); a site whose queries' region is not gated runs densely.
   Query-gated attention measured best at every budget (vit_small on the built-in clip, 0.1
   to 0.75); the error model ranks plans of one structure, not structures against each
   other, so the planner does not pick modes on its own;
3. a memory cap: while the state (gates' references, buffers, incremental attention caches)
   exceeds it, incremental sites fall back to query-gated, then the gate that saves the
   fewest MACs per byte is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ..passes.regions import AttentionSite, Region
from ..passes.tokens import NodeInfo
from .expressions import CostModel, build_cost_model
from .solver import BudgetSolver, Solution, uniform_ks


@dataclass
class Decision:
    gated: frozenset[str]          # regions the rewrite gates
    attention: dict[str, str]      # mode per site (as asked; the cost model says which convert)
    ks: dict[str, int]             # per gate the rewrite creates
    model: CostModel
    predicted_macs: float
    state_bytes: int
    objective: float
    feasible: bool                 # the budget can be met at all (else: every gate at its least k)
    predicted_error: float | None = None  # squared relative output error, from a calibration's fit (with
    #                                       several calibration clips: summed over them, each over the base plan's)

    @property
    def key(self):
        return self.gated, tuple(sorted(self.attention.items()))


class Planner:
    def __init__(self, gm: fx.GraphModule, infos: dict[fx.Node, NodeInfo], regions: list[Region],
                 sites: list[AttentionSite], batch: int, attention: str = "query",
                 memory_cap_bytes: int | None = None, weights: str = "cascade", state_dtype: torch.dtype | None = None):
        self.gm, self.infos, self.regions, self.sites, self.batch = gm, infos, regions, sites, batch
        self.state_dtype = state_dtype
        self.attention = attention
        self.memory_cap_bytes = memory_cap_bytes
        self.weights = weights
        self.objective = "error"  # or "uniform": one k/N for every gate (the baseline the solver is measured against)
        self.candidates = frozenset(r.name for r in regions if any(infos[n].macs for n in r.nodes)
                                    or _feeds_attention(r, sites))
        self.fits: dict[str, ErrorFit] = {}  # per attention mode: a calibration's weights and intercept
        self._models: dict = {}
        self._solvers: dict = {}

    # -- caches -----------------------------------------------------------------------------
    def model(self, gated: frozenset[str], attention: dict[str, str]) -> CostModel:
        key = (gated, tuple(sorted(attention.items())))
        if key not in self._models:
            self._models[key] = build_cost_model(self.gm, self.infos, self.regions, self.sites, self.batch,
                                                 gated, attention, self.state_dtype)
        return self._models[key]

    def solver(self, cm: CostModel, mode: str) -> BudgetSolver:
        key = (id(cm), mode)
        if key not in self._solvers:
            self._solvers[key] = BudgetSolver(cm, self.fits[mode].weights if mode in self.fits else self.weights)
        return self._solvers[key]

    def set_fit(self, mode: str, fit: ErrorFit) -> None:
        """A calibration's error model for plans whose attention runs in `mode`."""
        self.fits[mode] = fit
        self._solvers.clear()

    def modes(self, mode: str) -> dict[str, str]:
        return {s.name: mode for s in self.sites}

    # -- planning ---------------------------------------------------------------------------
    def plan(self, budget: float, *, uniform: bool | None = None) -> Decision:
        uniform = self.objective == "uniform" if uniform is None else uniform
        return self._plan(budget, self.attention, uniform)

    def _plan(self, budget: float, mode: str, uniform: bool) -> Decision:
        attention = self.modes(mode)
        gated = self.candidates
        cap = self.memory_cap_bytes
        for _ in range(4 * len(self.regions) + 4):
            cm = self.model(gated, attention)
            if uniform:
                ks = uniform_ks(cm, budget)
                sol = Solution(ks, set(), cm.predict_macs(ks), self.solver(cm, mode).objective(
                    np.array([ks[g] for g in cm.gates]), np.ones(len(cm.gates), bool)), True)
            else:
                sol = self.solver(cm, mode).solve(budget)
            if sol.ungated:  # gates not worth their overhead at this budget: the regions run densely
                gated = gated - _regions_of(cm, sol.ungated)
                continue
            if cap is not None and cm.state_bytes() > cap:
                incremental = [s for s, m in cm.converted_sites.items() if m == "incremental"]
                if incremental:
                    attention = {**attention, **{s: "query" for s in incremental}}
                    continue
                gated = gated - _regions_of(cm, {_least_saving_per_byte(cm, sol)})
                continue
            fit = self.fits.get(mode)
            return Decision(gated, attention, sol.ks, cm, sol.predicted_macs, cm.state_bytes(), sol.objective,
                            sol.feasible, None if fit is None else fit.intercept + sol.objective)
        raise RuntimeError("eventful_fx planner: no structure met the constraints")  # pragma: no cover


@dataclass
class ErrorFit:
    """A calibrated error model: squared output error = intercept + sum_g weights[g] · psi(k_g / N_g)."""

    weights: dict[str, float]
    intercept: float


def _regions_of(cm: CostModel, gates: set[str]) -> set[str]:
    return {r for g in gates for r in cm.gates[g].regions}


def _least_saving_per_byte(cm: CostModel, sol: Solution) -> str:
    def score(name):
        g = cm.gates[name]
        saving = g.dense_macs - g.macs(sol.ks[name])
        return saving / max(g.state_bytes, 1)
    return min(cm.gates, key=score)


def _feeds_attention(region: Region, sites: list[AttentionSite]) -> bool:
    members = set(region.nodes)
    return any(s.q in members for s in sites)
