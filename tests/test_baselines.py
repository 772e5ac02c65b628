"""Dense baselines (issue 13): the speedup is taken against the fastest dense model, not eager alone."""
from __future__ import annotations

import timm
import torch

from eventful_fx.baselines import packed_linears
from eventful_fx.measure import format_table, measure
from helpers import rel_err


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()  # Inductor time grows with depth


def test_packed_linears_compute_the_same_model_on_the_same_weights(frames_of):
    model = _vit()
    packed = packed_linears(model)
    x = frames_of(224, 1)
    with torch.no_grad():
        assert rel_err(packed(x), model(x)) <= 1e-5
    assert type(model.blocks[0].mlp.fc1) is torch.nn.Linear  # the user's model is left as it was
    assert packed.blocks[0].mlp.fc1.weight is model.blocks[0].mlp.fc1.weight  # shared, not copied
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(2)  # an in-place edit reaches the packed copy (re-packed)
        assert rel_err(packed(x), model(x)) <= 1e-5


def test_measure_takes_the_speedup_against_the_fastest_baseline(frames_of):
    model = _vit()
    row = measure(model, frames_of(224, 3), 0.5, name="vit_tiny", progress=False)
    timed = set(row.baseline_ms) | set(row.baselines_skipped)
    assert timed == {"eager", "packed", "inductor"}, (row.baseline_ms, row.baselines_skipped)
    assert row.dense_ms == min(row.baseline_ms.values()) and row.baseline_ms[row.baseline] == row.dense_ms
    assert abs(row.speedup - row.dense_ms / row.eventful_ms) <= 1e-12
    assert row.speedup_vs_eager >= row.speedup
    table = format_table([row])
    assert all(f"{b} ms" in table for b in row.baseline_ms) and f"({row.baseline})" in table
    assert row.rel_error < 0.2  # fidelity is still measured against the eager model
