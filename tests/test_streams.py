"""StreamPool (issue 15's core, no Ray): streams arriving in changing groups keep their own
state; each stream's outputs equal a batch-1 EventfulModule fed that stream alone."""
from __future__ import annotations

import random

import pytest
import timm
import torch

import eventful_fx
from eventful_fx.streams import StreamPool
from eventful_fx.video import builtin_clip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96).eval()


@pytest.fixture(scope="module")
def clips():
    clip = builtin_clip(96)
    return {f"cam{i}": torch.roll(clip, 3 * i, 0) for i in range(5)}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_streams_in_changing_groups_equal_one_module_per_stream(model, clips):
    pool = StreamPool(model, budget=0.25, max_batch=4, calibration=None)  # no calibration per module: faster
    alone = {name: eventful_fx.compile(model, budget=0.25, calibration=None) for name in clips}
    position = dict.fromkeys(clips, 0)
    rng, worst, sizes = random.Random(0), 0.0, set()
    for _ in range(24):
        ids = [s for s in rng.sample(sorted(clips), rng.randint(1, 4)) if position[s] < 12]
        if not ids:
            continue
        sizes.add(len(ids))
        out = pool.run(torch.stack([clips[s][position[s]] for s in ids]), ids)
        for row, s in enumerate(ids):
            expected = alone[s](clips[s][position[s]][None])[0]
            worst = max(worst, rel(out[row], expected))
            position[s] += 1
    assert sizes >= {1, 2, 3} and worst <= 1e-5
    assert sorted(pool.streams) == sorted(s for s in clips if position[s])


@torch.no_grad()
def test_a_closed_stream_starts_again_with_a_dense_frame(model, clips):
    pool = StreamPool(model, budget=0.25, max_batch=2, calibration=None)
    a, b = clips["cam0"], clips["cam1"]
    for t in range(3):
        pool.run(torch.stack([a[t], b[t]]), ["a", "b"])
    pool.close("a")
    out = pool.run(torch.stack([a[3], b[3]]), ["a", "b"])
    assert rel(out[0], model(a[3][None])[0]) <= 1e-5  # flushed: the dense output
    assert rel(out[1], model(b[3][None])[0]) > 1e-3   # b went on eventfully


def test_bad_calls_name_what_was_wrong(model, clips):
    pool = StreamPool(model, budget=0.25, max_batch=2)
    frames = clips["cam0"][:2]
    with pytest.raises(ValueError, match="distinct"):
        pool.run(frames, ["a", "a"])
    with pytest.raises(ValueError, match="one frame per stream id"):
        pool.run(frames, ["a"])
    with pytest.raises(ValueError, match="max_batch is 2"):
        pool.run(clips["cam0"][:3], ["a", "b", "c"])
    with pytest.raises(ValueError, match="max_batch"):
        StreamPool(model, max_batch=0)
    assert pool.streams == []
