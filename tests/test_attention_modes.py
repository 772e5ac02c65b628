"""The three attention modes end to end (issue 12): MACs counted by FlopCounterMode, an
instrument independent of the cost model, agree with the module's own count in every mode
(SDPA included); incremental attention is an exact oracle for dense attention at equal k."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import eventful_fx
from eventful_fx.video import builtin_clip
from helpers import rel_err


@pytest.fixture(scope="module")
def model_and_clip():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval(), builtin_clip(size=224, max_frames=5)


@pytest.mark.parametrize("attention", ["dense", "query", "incremental"])
def test_flop_counter_agrees_with_counted_macs(model_and_clip, attention):
    model, clip = model_and_clip
    emodel = eventful_fx.compile(model, budget=0.25, attention=attention, calibration=None)
    with torch.no_grad():
        emodel(clip[:1])
        for frame in clip[1:3]:
            with FlopCounterMode(display=False) as counter:
                emodel(frame[None])
            stats = emodel.stats
            by_op = {str(op) for op in counter.get_flop_counts()["Global"]}
            if attention != "incremental":  # the other modes attend through SDPA, which must be counted too
                assert any("scaled_dot_product" in op for op in by_op), by_op
            matrix_macs = stats.macs - stats.overhead_macs
            counted = counter.get_total_flops() // 2
            assert abs(counted - matrix_macs) <= 0.02 * matrix_macs, (counted, matrix_macs)
            assert stats.macs <= 0.27 * stats.dense_macs


def test_incremental_equals_dense_attention_at_equal_k(model_and_clip):
    """Incremental attention computes exactly what dense attention does on the buffered q, k, v. The
    threshold policy picks the same tokens in both (their inputs agree), so the outputs must agree."""
    model, clip = model_and_clip
    dense_mode, incremental = (eventful_fx.compile(model, budget=0.25, policy="threshold", threshold=4.0,
                                                   attention=a) for a in ("dense", "incremental"))
    with torch.no_grad():
        for t, frame in enumerate(clip):
            a, b = dense_mode(frame[None]), incremental(frame[None])
            assert dense_mode.stats.tokens == incremental.stats.tokens
            assert rel_err(b, a) < 1e-5
            if t:
                assert rel_err(a, model(frame[None])) > 1e-4  # not trivially equal: both skip tokens
                assert incremental.stats.fraction < 0.9
