"""Neighbour reuse (`neighbour_reuse=True`): a skipped token may take a grid neighbour's cached results.

Checked against the dense model: on a camera pan by whole patches the error must fall well
below plain gating's; exact on flushes; streams stay isolated; the cost model still predicts
the MACs the runtime counts; regions whose results depend on a token's position get no table.
"""
from __future__ import annotations

import timm
import torch

import eventful_fx
from eventful_fx.passes.capture import capture
from eventful_fx.passes.neighbours import attach_neighbours, neighbour_table
from eventful_fx.passes.regions import find_regions
from eventful_fx.passes.tokens import TokenAnalysis
from helpers import rel_err


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def _pan(frame: torch.Tensor, steps: int, patch: int = 16) -> torch.Tensor:
    """Frames of a camera moving right by one patch per frame, cut from a frame twice as wide."""
    wide = torch.cat([frame, frame.flip(-1)], dim=-1)
    return torch.stack([wide[..., t * patch: t * patch + frame.shape[-1]] for t in range(steps)])


def _errors(model, frames, **options) -> list[float]:
    emodel = eventful_fx.compile(model, calibration=None, **options)
    errors = []
    with torch.no_grad():
        for frame in frames:
            errors.append(rel_err(emodel(frame[None]), model(frame[None])))
    return errors


def test_table_lists_grid_neighbours_and_skips_class_tokens():
    order = torch.tensor([1e9, 1, 2, 3, 4, 5, 6], dtype=torch.float64)  # class token, then a 2x3 grid
    table = neighbour_table(order, (2, 3), radius=1)
    assert table.shape == (7, 9)
    assert table[0].tolist() == [0] * 9  # the class token has no neighbours
    assert table[:, 0].tolist() == list(range(7))
    assert sorted(set(table[1].tolist())) == [1, 2, 4, 5]  # grid (0, 0): right, below, diagonal
    assert sorted(set(table[5].tolist())) == [1, 2, 3, 4, 5, 6]  # grid (1, 1)
    assert neighbour_table(order, (3, 3)) is None  # 6 patch tokens are not a 3x3 grid


def test_pan_by_whole_patches_costs_far_less_error(frames_of):
    model = _vit()
    frames = _pan(frames_of(224, 1)[0], steps=6)
    plain = _errors(model, frames, budget=0.25)
    reused = _errors(model, frames, budget=0.25, neighbour_reuse=True)
    assert plain[0] <= 1e-5 and reused[0] <= 1e-5  # the flush is exact either way
    # measured: 0.29 of plain gating's mean error on this pan
    assert sum(reused[1:]) <= 0.5 * sum(plain[1:]), (reused, plain)


def test_streams_stay_isolated_and_macs_are_as_predicted(frames_of):
    model = _vit()
    clip = frames_of(224, 5)
    other = _pan(clip[0], steps=5)
    batched = eventful_fx.compile(model, budget=0.25, calibration=None, neighbour_reuse=True)
    alone = eventful_fx.compile(model, budget=0.25, calibration=None, neighbour_reuse=True)
    for t in range(5):
        out = batched(torch.stack([clip[t], other[t]]))
        assert rel_err(out[0], alone(clip[t][None])[0]) <= 1e-4
        if t:
            assert abs(batched.decision.predicted_macs - batched.stats.macs) <= 1e-6 * batched.stats.macs
    assert any(getattr(m, "neighbours", None) is not None for m in batched.graph_module.modules())


def test_state_dict_continues_a_stream_that_moved_rows(frames_of):
    model = _vit()
    frames = _pan(frames_of(224, 1)[0], steps=5)
    first = eventful_fx.compile(model, budget=0.25, calibration=None, neighbour_reuse=True)
    for frame in frames[:3]:
        first(frame[None])
    state = first.state_dict()
    second = eventful_fx.compile(_vit(), budget=0.25, calibration=None, neighbour_reuse=True)
    second.load_state_dict(state)
    for frame in frames[3:]:
        assert torch.equal(second(frame[None]), first(frame[None]))


def test_positional_regions_get_no_table():
    """A region that reads per-token tables (here the position-embedding add, inside the first region when the
    residual stream is gated) or feeds incremental attention (per-query sums) must not move rows."""
    model = _vit()
    gm = capture(model, (torch.randn(1, 3, 224, 224),), {})
    infos = TokenAnalysis(gm).run()
    regions, sites = find_regions(gm, infos, dense_residual=False)
    attach_neighbours(gm, infos, regions, sites, "query")
    positional = [r for r in regions if any(infos[n].per_token_args for n in r.nodes)]
    assert positional and all(r.neighbours is None for r in positional)
    assert sum(r.neighbours is not None for r in regions) >= len(model.blocks)

    regions, sites = find_regions(gm, infos)
    feeds_queries = lambda r: any(s.q in r.nodes for s in sites)  # noqa: E731
    attach_neighbours(gm, infos, regions, sites, "query")
    assert all(r.neighbours is not None for r in regions if feeds_queries(r))
    attach_neighbours(gm, infos, regions, sites, "incremental")
    assert all(r.neighbours is None for r in regions if feeds_queries(r))
    assert any(r.neighbours is not None for r in regions)  # the MLPs keep theirs
