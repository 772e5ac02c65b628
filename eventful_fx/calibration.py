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
each gate of group c gets w_c / |c|. A group whose fit is below a twentieth of its MACs'
share is floored there, so noise never starves it. With several clips (the default: both
built-in clips) each counts alone, its errors divided by the base plan's on it.

A fit describes the clips it was made on: on the synthetic clip alone, ViT-S/224's fit at
1/2 gave the query-gated attention gates a third of their tokens, and on a real panning
camera that plan lost 1.6x to the uniform one. So the plan the fit gives at the base plan's
MACs is checked on the same frames, as measured and half-way to the uniform plan (weights
blended in log): the better of the two is taken if it beats the base plan (uniform) in sum
and loses at most CLIP_TOLERANCE to it on every clip; else the weights stay uniform. The
plan for any budget is then a pure function of the budget again: only the weights changed.
Costs groups + 3 runs over the frames per point (ViT-B/224, 2 clips of 5 frames, 6 groups:
about twelve seconds on two cores).
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
BLEND_STRENGTHS = (1.0, 0.5)  # the fit as measured, and half-way to the uniform plan (see `calibrate`)
CLIP_TOLERANCE = 1.05  # a fitted plan may lose this much to the uniform plan on one calibration clip, no more


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
    #                                          (several clips: the sum over clips of it over the base run's)
    group_weights: list[float]               # w_c
    weights: dict[str, float]                # per gate: w_c / |c|
    intercept: float                         # e0
    kept: bool                               # the fitted plan beat the uniform one on the frames (else uniform)
    checked_error: float                     # the fitted plan's error on the frames
    frames: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    clips: int = 1


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


def calibrate(emodel, inputs: list, fraction: float = 0.25, depth_groups: int = 3) -> Calibration:
    """Fit the planner's per-gate weights for `emodel`'s plan structure on consecutive inputs.

    `emodel`: an eventful graph to run (`graph_module`, `reset()`, `set_policies(policies)`),
    with the dense `model` and the `decision` whose structure it was built for.

    `inputs`: one tuple of model inputs per frame (all streams of a batch at once), or a list
    of such clips. With several clips each counts alone: a run's error is the sum over clips
    of its error relative to the base plan's on that clip, and the fit is kept only if its plan
    loses at most CLIP_TOLERANCE to the uniform one on each of them. One clip's motion says little of another's: on
    the built-in synthetic clip alone ViT-S/224's fit starves the query-gated attention, which
    on a real panning camera (bikes) gave 1.5x the uniform plan's error at budget 0.5.
    `fraction`: f0, the fraction of its tokens every gate updates in the base plan.
    """
    clips = [inputs] if inputs and isinstance(inputs[0], tuple) else list(inputs)
    if not clips or min(len(c) for c in clips) < 3:
        raise ValueError(f"calibration needs at least 3 consecutive frames (a flush and two incremental), "
                         f"got {[len(c) for c in clips]}")
    start = time.perf_counter()
    cost_model = emodel.decision.model
    gates = cost_model.gates
    groups = gate_groups(cost_model, depth_groups)
    with torch.no_grad():
        references = [[emodel.model(*x) for x in clip] for clip in clips]
    runs = [[fraction] * len(groups)]
    for c in range(len(groups)):
        runs.append([fraction / 2 if i == c else fraction for i in range(len(groups))])
    rows, per_clip = [], []
    try:
        for fractions in runs:
            ks = {g: max(gates[g].min_k, min(gates[g].selectable, round(f * gates[g].selectable)))
                  for group, f in zip(groups, fractions) for g in group}
            rows.append([float(staleness(np.mean([ks[g] / gates[g].selectable for g in group]))) for group in groups])
            per_clip.append([_clip_error(emodel, ks, clip, refs) for clip, refs in zip(clips, references)])
    finally:
        emodel.reset()
    base = [max(e, 1e-30) for e in per_clip[0]] if len(clips) > 1 else [1.0]  # one clip: its own error
    errors = [sum(e / b for e, b in zip(run, base)) for run in per_clip]
    design = np.hstack([np.array(rows), np.ones((len(rows), 1))])
    fit, *_ = np.linalg.lstsq(design, np.array(errors), rcond=None)
    group_macs = np.array([sum(gates[g].macs(gates[g].num_tokens) / gates[g].num_tokens for g in group)
                           for group in groups])
    # the least weight a group keeps: a twentieth of what its MACs would give it at the fitted mean rate
    rate = max(float(np.sum(np.maximum(fit[:-1], 0))) / float(group_macs.sum()), 1e-12)
    floor = 0.05 * rate * group_macs
    group_weights = np.maximum(fit[:-1], floor)
    notes = [f"group {i} floored ({fit[i]:.3g} -> {floor[i]:.3g})" for i in range(len(groups)) if fit[i] < floor[i]]
    fitted = {g: float(group_weights[i]) / len(group) for i, group in enumerate(groups) for g in group}
    uniform_weights = {g: float(gate.per_k) * gate.num_tokens for g, gate in gates.items()}  # the uniform plan's
    # keep the fit only if its plan beats the base plan (uniform, same MACs) on the calibration frames and
    # loses little on any one clip; the fit as measured or half-way to uniform (weights blended in log),
    # whichever does better; else the uniform plan
    budget = cost_model.predict_macs({g: max(gates[g].min_k, round(fraction * gates[g].selectable))
                                      for g in gates}) / cost_model.dense_macs
    uniform = [e / b for e, b in zip(per_clip[0], base)]
    weights, kept, checked, taken = uniform_weights, False, errors[0], None
    for strength in BLEND_STRENGTHS:
        candidate = {g: fitted[g] ** strength * uniform_weights[g] ** (1 - strength) for g in gates}
        solution = BudgetSolver(cost_model, candidate).solve(budget)
        ks = {g: solution.ks.get(g, gates[g].num_tokens) for g in gates}
        try:
            per = [_clip_error(emodel, ks, clip, refs) / b for clip, refs, b in zip(clips, references, base)]
        finally:
            emodel.reset()
        notes.append(f"the fit at strength {strength}: error relative to the uniform plan's, per clip: "
                     + ", ".join(f"{c / u:.3g}" for c, u in zip(per, uniform)))
        if sum(per) < checked and all(c <= CLIP_TOLERANCE * u for c, u in zip(per, uniform)):
            weights, kept, checked, taken = candidate, True, sum(per), strength
    notes.append(f"the fit at strength {taken} taken" if kept else "uniform weights kept")
    mode = "/".join(sorted(set(cost_model.converted_sites.values()))) or "dense"
    return Calibration(mode, fraction, groups, runs, errors, [float(w) for w in group_weights], weights,
                       float(fit[-1]) if kept else 0.0, kept, checked, sum(len(c) for c in clips),
                       time.perf_counter() - start, notes, len(clips))


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
