"""The static cost model and the budget solver, checked against what the runtime counts on real models.

Calibration only moves each gate's k, never what a k costs, so these tests skip it
(`calibration=None`). Predictions are compared with `emodel.stats` (the MACs the runtime ops count on a frame) and
`emodel.state_bytes()` (the tensors they hold), never with numbers of the cost model itself.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import sympy
import timm
import torch
import torchvision

import eventful_fx
from eventful_fx.analysis import analyze_graph
from eventful_fx.video import builtin_clip
from helpers import rel_err


def _tv_vit():
    model = torchvision.models.vit_b_16(weights=None)
    model.heads = torch.nn.Identity()  # its zero-initialised head would make every output 0
    return model


MODELS = {
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224"), 224),
    # 20x20 tokens: windows on a padded grid; two windowed and two global blocks
    "samvit_base_patch16@320": (lambda: timm.create_model("samvit_base_patch16", img_size=320, depth=4,
                                                          global_attn_indexes=(1, 3)), 320),
    "torchvision_vit_b_16": (_tv_vit, 224),
}


@pytest.fixture(scope="module")
def compiled():
    """One capture per model, shared by the tests below (capture is the slow part)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            make, size = MODELS[name]
            frames = builtin_clip(size=size, max_frames=2)
            model = make().eval()
            cache[name] = (model, eventful_fx.compile(model, budget=0.25, example_input=frames[:1], calibration=None), frames)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_expression_and_runtime_counts(name, compiled):
    model, emodel, frames = compiled(name)
    gm, infos, regions, sites, batch = emodel._captured
    report = analyze_graph(gm)
    cm = emodel.decision.model
    assert cm.dense_expr().free_symbols, "the dense MACs should be an expression of the token count"
    assert cm.dense_expr().subs(cm.values) == report.dense_macs  # exact: integers, no rounding
    emodel.reset()
    emodel(frames[0][None])
    emodel(frames[1][None])
    stats = emodel.stats
    assert not stats.flush and stats.dense_macs == report.dense_macs
    predicted = emodel.decision.predicted_macs
    print(f"{name}: predicted {predicted:.0f} MACs, runtime counted {stats.macs} "
          f"({100 * (predicted / stats.macs - 1):+.4f}%), state {emodel.decision.state_bytes} B")
    assert abs(predicted - stats.macs) <= 0.01 * stats.macs
    assert emodel.decision.state_bytes == emodel.state_bytes()
    # the symbolic total with one k for every gate, evaluated, is the same prediction
    k = sympy.Symbol("k", nonnegative=True)
    if len(set(emodel.decision.ks.values())) == 1:
        value = cm.uniform_expr().subs(cm.values).subs(k, next(iter(emodel.decision.ks.values())))
        assert abs(float(value) - predicted) <= 1e-6 * predicted


@pytest.mark.parametrize("attention", ["incremental", "dense"])
def test_attention_modes_predicted(attention):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224").eval()
    frames = builtin_clip(size=224, max_frames=2)
    emodel = eventful_fx.compile(model, budget=0.3, attention=attention, calibration=None)
    emodel(frames[0][None])
    emodel(frames[1][None])
    modes = set(emodel.plan.attention.values())
    assert modes == {attention}
    assert abs(emodel.decision.predicted_macs - emodel.stats.macs) <= 0.01 * emodel.stats.macs
    assert emodel.decision.state_bytes == emodel.state_bytes()


def test_budget_sweep_stays_in_band(compiled):
    model, emodel, frames = compiled("vit_base_patch16_224")
    dense = emodel.stats.dense_macs or emodel._dense_macs
    for budget in [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]:
        emodel.budget = budget
        predicted = emodel.decision.predicted_macs
        assert 0.9 * budget * dense <= predicted <= budget * dense, (budget, predicted / dense)
    emodel.budget = 1.0
    cm = emodel.decision.model
    assert emodel.decision.ks == {g: cm.gates[g].num_tokens for g in cm.gates}
    emodel.budget = 0.25


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_uncalibrated_plan_is_uniform(budget, compiled):
    """Without calibration every gate updates the same share of its tokens (the stand-in for the original):
    the time budget, met by the uniform plan itself, must not move it."""
    model, emodel, frames = compiled("vit_base_patch16_224")
    emodel.budget = budget
    cm = emodel.decision.model
    shares = [k / cm.gates[g].num_tokens for g, k in emodel.decision.ks.items()]
    emodel.budget = 0.25
    assert max(shares) - min(shares) <= 1.01 / 197, (budget, min(shares), max(shares))


def test_plan_favouring_queries_is_no_slower_than_uniform(compiled):
    """Weights that prize the gates in front of attention would buy their queries (3x a GEMM's time per
    MAC): the plan must still fit the MACs, take no longer than the uniform plan, and beat its error model."""
    from eventful_fx.cost_model.solver import BudgetSolver, uniform_ks

    model, emodel, frames = compiled("vit_base_patch16_224")
    cm = emodel.decision.model
    probe = BudgetSolver(cm, "macs")
    weights = {name: (20.0 if probe.attention_per_k[i] > 0 else 1.0) for i, name in enumerate(probe.names)}
    solver = BudgetSolver(cm, weights)
    assert solver.keeps_time and not probe.keeps_time

    def time_of(ks):
        return sum(solver.time_per_k[i] * ks[name] for i, name in enumerate(solver.names) if name in ks)

    for budget in [0.125, 0.25, 0.5]:
        uniform = uniform_ks(cm, budget)
        plan = solver.solve(budget)
        assert not plan.ungated  # the times below compare the same gates
        assert plan.predicted_macs <= budget * cm.dense_macs * (1 + 1e-9)
        slack = float(np.sum(solver.time_per_k))  # the uniform plan rounds each gate's k down: one token each
        assert time_of(plan.ks) <= time_of(uniform) + slack * (1 + 1e-9), budget
        solver.keeps_time = False
        free = solver.solve(budget)
        solver.keeps_time = True
        assert time_of(free.ks) > time_of(uniform) + 2 * slack, budget  # without the time budget: slower
        active = np.array([name in plan.ks for name in solver.names])
        k_uniform = np.array([uniform[name] for name in solver.names])
        assert plan.objective < solver.objective(k_uniform, active), budget


def test_replan_is_fast_and_keeps_the_graph(compiled):
    model, emodel, frames = compiled("vit_base_patch16_224")
    emodel.budget = 0.3
    emodel.reset()
    emodel(frames[0][None])
    graph = emodel.graph_module
    times = []
    for budget in [0.2, 0.25, 0.3, 0.35, 0.4, 0.3, 0.2, 0.45, 0.25, 0.3]:
        start = time.perf_counter()
        emodel.budget = budget
        times.append(time.perf_counter() - start)
    print(f"re-plan: median {1e3 * statistics.median(times):.2f} ms, max {1e3 * max(times):.2f} ms")
    assert statistics.median(times) < 0.05
    assert emodel.graph_module is graph  # same structure: only the gates' k changed
    emodel(frames[1][None])
    assert not emodel.stats.flush and abs(emodel.stats.fraction - 0.3) <= 0.01


def test_structure_change_rewrites_and_flushes():
    """At 0.99 most gates would keep nearly all their tokens: their regions cost less run densely, so they go."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224").eval()
    frames = builtin_clip(size=224, max_frames=4)
    emodel = eventful_fx.compile(model, budget=0.5, attention="dense", calibration=None)
    emodel(frames[0][None])
    emodel(frames[1][None])
    graph, gates = emodel.graph_module, set(emodel.plan.gates)
    emodel.budget = 0.99
    assert emodel.graph_module is not graph and set(emodel.plan.gates) < gates
    with torch.no_grad():
        dense = model(frames[2][None])
    out = emodel(frames[2][None])
    assert emodel.stats.flush and rel_err(out, dense) <= 1e-5  # the new graph's first frame is a flush
    emodel(frames[3][None])
    assert abs(emodel.decision.predicted_macs - emodel.stats.macs) <= 0.01 * emodel.stats.macs
    assert emodel.stats.macs <= 0.99 * emodel.stats.dense_macs


def test_memory_cap():
    """Under the cap incremental attention falls back to query-gated, then the least useful gates go."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224").eval()
    frames = builtin_clip(size=224, max_frames=2)
    free = eventful_fx.compile(model, budget=0.5, attention="incremental", example_input=frames[:1], calibration=None)
    query = eventful_fx.compile(model, budget=0.5, attention="query", example_input=frames[:1], calibration=None)
    cap = int(0.8 * query.decision.state_bytes)
    capped = eventful_fx.compile(model, budget=0.5, attention="incremental", memory_cap_bytes=cap, calibration=None)
    for frame in frames:
        capped(frame[None])
    assert capped.state_bytes() <= cap < free.decision.state_bytes
    assert capped.decision.state_bytes == capped.state_bytes()
    assert set(capped.plan.attention.values()) <= {"query", "dense"}
    assert capped.decision.feasible and capped.stats.macs <= 0.5 * capped.stats.dense_macs


def test_analyze_shows_symbolic_total_and_plan():
    model = timm.create_model("vit_tiny_patch16_224").eval()
    report = eventful_fx.analyze(model, torch.randn(1, 3, 224, 224), budget=0.25)
    text = str(report)
    assert "MACs(k) =" in text and "N*k" in report.macs_expression
    assert report.plan is not None and 0.9 * 0.25 <= report.plan.fraction <= 0.25
    assert report.plan.state_bytes > 0 and "plan for budget 0.25" in text
    assert report.to_dict()["plan"]["gates"]
