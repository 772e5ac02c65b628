"""Calibration: the planner's error model fitted to one model and a few frames of its video.

The budget solver weighs the stale tokens of each gate g by w_g (`cost_model/solver.py`):
it minimises sum_g w_g · psi(k_g/N_g) for the MAC budget. Without calibration w_g is the
gate's MACs per token, and every gate updates the same fraction of its tokens. What a
stale token really costs at the output depends on the model and on the video: on an
untrained ViT-B/224, a stale MLP output costs about ten times what a stale query-gated
attention output does, per MAC; on a classifier's logits early blocks matter more than
late ones. Calibration measures this instead of assuming it.

Gates are grouped by what they compute (token count, channels, MACs per token, attention
sites fed: qkv gates, MLP gates, ...) and, within a kind, by depth (`depth_groups`
contiguous groups in graph order). On the calibration frames the eventful graph runs a base
plan, every gate at one fraction f0 of its tokens, and for each group a plan that halves
only that group's fraction. The fit describes plans near f0 (extrapolated from 1/4 to 1/2,
a fit moved ViT-B/224's error at budget 0.5 from 0.100 to 0.119), so it is made at three
points, f0 = 1/8, 1/4 and 1/2, each the first time a budget nearest to it is planned. The
squared relative error against the dense model over the incremental frames, summed over the
model's outputs (each relative to its own size, so tokens do not drown logits), is fitted
by least squares to

    E = e0 + sum_c w_c · psi(f_c),

(e0 absorbs what no fraction explains, e.g. the first frames' smaller staleness), and
each gate of group c gets w_c / |c|. The fit is kept only if the plan it gives at the base
plan's MACs beats the base plan (uniform) on the same frames; else the weights stay uniform. A group whose fit is below a twentieth of its MACs'
share is floored there, so noise never starves it. The plan for any budget is then a pure
function of the budget again: only the weights changed. Costs groups + 2 runs over the
frames per point (ViT-B/224, 5 frames, 6 groups: about five seconds on two cores).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from .cost_model.solver import BudgetSolver, staleness
from .runtime import TopK

CALIBRATION_FRAMES = 5
BASE_FRACTIONS = (0.125, 0.25, 0.5)  # calibration points: a budget uses the fit made at the nearest one


def base_fraction(budget: float) -> float:
    """The calibration point a budget plans with: the nearest of BASE_FRACTIONS in log scale."""
    return min(BASE_FRACTIONS, key=lambda f: abs(np.log(f) - np.log(min(max(budget, 1e-3), 1.0))))


@dataclass
class Calibration:
    """What a calibration measured and the weights it gave the planner."""

    mode: str                                # the attention mode of the structure calibrated
    fraction: float                          # f0 of the base plan
    groups: list[list[str]]                  # gate names per group
    fractions: list[list[float]]             # per run: the fraction of each group
    errors: list[float]                      # per run: squared relative error, summed over incremental frames
    group_weights: list[float]               # w_c
    weights: dict[str, float]                # per gate: w_c / |c|
    intercept: float                         # e0
    kept: bool                               # the fitted plan beat the uniform one on the frames (else uniform)
    checked_error: float                     # the fitted plan's error on the frames
    frames: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def gate_groups(cost_model, depth_groups: int = 3) -> list[list[str]]:
    """Gates of a cost model grouped by kind (what they compute), then by depth within each kind."""
    kinds: dict[tuple, list[str]] = {}
    for name, gate in cost_model.gates.items():
        kind = (gate.num_tokens, gate.channels, round(float(gate.per_k)),
                tuple(sorted(cost_model.converted_sites.get(s, "dense") for s in gate.sites)))
        kinds.setdefault(kind, []).append(name)
    groups = []
    for names in kinds.values():
        parts = max(1, min(depth_groups, len(names)))
        groups += [names[i * len(names) // parts:(i + 1) * len(names) // parts] for i in range(parts)]
    return groups


def output_error(outputs, references) -> tuple[float, float]:
    """(squared error, squared norm) of every tensor of a model's output, against the dense output."""
    err = norm = 0.0
    for out, ref in zip(tree_leaves(outputs), tree_leaves(references)):
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            err += float((out.float() - ref.float()).pow(2).sum())
            norm += float(ref.float().pow(2).sum())
    return err, norm


def calibrate(emodel, inputs: list[tuple], fraction: float = 0.25, depth_groups: int = 3) -> Calibration:
    """Fit the planner's per-gate weights for `emodel`'s plan structure on consecutive inputs.

    `emodel`: an eventful graph to run (`graph_module`, `reset()`, `set_policies(policies)`),
    with the dense `model` and the `decision` whose structure it was built for.

    `inputs`: one tuple of model inputs per frame (all streams of a batch at once);
    `fraction`: f0, the fraction of its tokens every gate updates in the base plan.
    """
    if len(inputs) < 3:
        raise ValueError(f"calibration needs at least 3 consecutive frames (a flush and two incremental), "
                         f"got {len(inputs)}")
    start = time.perf_counter()
    cost_model = emodel.decision.model
    gates = cost_model.gates
    groups = gate_groups(cost_model, depth_groups)
    with torch.no_grad():
        references = [emodel.model(*x) for x in inputs]
    runs = [[fraction] * len(groups)]
    for c in range(len(groups)):
        runs.append([fraction / 2 if i == c else fraction for i in range(len(groups))])
    rows, errors = [], []
    try:
        for fractions in runs:
            ks = {g: max(gates[g].min_k, min(gates[g].selectable, round(f * gates[g].selectable)))
                  for group, f in zip(groups, fractions) for g in group}
            rows.append([float(staleness(np.mean([ks[g] / gates[g].selectable for g in group]))) for group in groups])
            errors.append(_clip_error(emodel, ks, inputs, references))
    finally:
        emodel.reset()
    design = np.hstack([np.array(rows), np.ones((len(rows), 1))])
    fit, *_ = np.linalg.lstsq(design, np.array(errors), rcond=None)
    group_macs = np.array([sum(gates[g].macs(gates[g].num_tokens) / gates[g].num_tokens for g in group)
                           for group in groups])
    # the least weight a group keeps: a twentieth of what its MACs would give it at the fitted mean rate
    rate = max(float(np.sum(np.maximum(fit[:-1], 0))) / float(group_macs.sum()), 1e-12)
    floor = 0.05 * rate * group_macs
    group_weights = np.maximum(fit[:-1], floor)
    notes = [f"group {i} floored ({fit[i]:.3g} -> {floor[i]:.3g})" for i in range(len(groups)) if fit[i] < floor[i]]
    weights = {g: float(group_weights[i]) / len(group) for i, group in enumerate(groups) for g in group}
    # keep the fit only if its plan beats the base plan (uniform, same MACs) on the calibration frames
    budget = cost_model.predict_macs({g: max(gates[g].min_k, round(fraction * gates[g].selectable))
                                      for g in gates}) / cost_model.dense_macs
    solution = BudgetSolver(cost_model, weights).solve(budget)
    ks = {g: solution.ks.get(g, gates[g].num_tokens) for g in gates}
    try:
        checked = _clip_error(emodel, ks, inputs, references)
    finally:
        emodel.reset()
    kept = checked < errors[0]
    if not kept:
        notes.append(f"the fitted plan lost to the uniform plan on these frames ({checked:.3g} against "
                     f"{errors[0]:.3g}): uniform weights kept")
        weights = {g: float(gate.per_k) * gate.num_tokens for g, gate in gates.items()}  # the uniform plan's
    mode = "/".join(sorted(set(cost_model.converted_sites.values()))) or "dense"
    return Calibration(mode, fraction, groups, runs, errors, [float(w) for w in group_weights], weights,
                       float(fit[-1]) if kept else 0.0, kept, checked, len(inputs), time.perf_counter() - start, notes)


def _clip_error(emodel, ks: dict[str, int], inputs: list[tuple], references: list) -> float:
    """Squared relative error of all outputs, summed over the incremental frames, with each gate at its k."""
    emodel.set_policies({name: TopK(ks[name]) for name in ks})
    emodel.reset()
    err: dict[int, float] = {}
    norm: dict[int, float] = {}
    with torch.no_grad():
        for t, x in enumerate(inputs):
            out = emodel.graph_module(*x)
            if t:  # each output counts alone: a model's tokens must not drown its logits
                for i, (o, r) in enumerate(zip(tree_leaves(out), tree_leaves(references[t]))):
                    e, n = output_error(o, r)
                    err[i], norm[i] = err.get(i, 0.0) + e, norm.get(i, 0.0) + n
    return sum(err[i] / max(norm[i], 1e-30) for i in err if norm[i] > 0)
