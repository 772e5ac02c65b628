"""ViTDet/SAM-style backbones (issue 11): windowed blocks whose token grid is padded to a
multiple of the window, global blocks with decomposed relative-position bias.

Real timm `samvit_base_patch16`, made shallow (4 blocks, two of them global) and small
(320 px: a 20x20 token grid padded to 28x28 for 14x14 windows) so it runs in seconds.
"""
from __future__ import annotations

import pytest
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip
from helpers import assert_matches_dense

SIZE = 320


class SamBackbone(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.sam = timm.create_model("samvit_base_patch16", pretrained=False, img_size=SIZE, depth=4,
                                     global_attn_indexes=(1, 3), **kwargs).eval()

    def forward(self, x):
        return self.sam.forward_features(x)


@pytest.fixture(scope="module")
def sam_and_clip():
    return SamBackbone().eval(), builtin_clip(size=SIZE, max_frames=3)


def test_padded_windows_convert(sam_and_clip):
    model, clip = sam_and_clip
    report = eventful_fx.analyze(model, clip[:1], budget=0.25)
    # the padding of the token grid was read as tokens of no stream: every windowed qkv and proj
    # stayed dense (0.64 convertible, least plan 0.36 of dense)
    assert report.convertible_linear_count == report.linear_count == 16
    assert report.convertible_fraction > 0.85
    assert report.plan.fraction <= 0.26


def test_exact_at_one_and_counted_macs_at_quarter(sam_and_clip):
    model, clip = sam_and_clip
    assert_matches_dense(eventful_fx.compile(model, budget=1.0), model, clip, tol=1e-4)
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None)
    errors = assert_matches_dense(emodel, model, clip, tol=0.5)
    assert errors[0] < 1e-4 and emodel.stats.fraction <= 0.27
