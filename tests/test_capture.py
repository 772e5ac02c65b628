"""Capture that does not give up (issue 11): a defensive data_ptr assert no longer stops it, and when
every tracer fails the error names the model's own line and what to change."""
from __future__ import annotations

import pytest
import torch

import eventful_fx
from eventful_fx.passes.capture import CaptureError
from eventful_fx.video import builtin_clip
from helpers import assert_matches_dense
from models import TinyViT


class CheckedViT(TinyViT):
    def forward(self, x):
        y = self.stem(x)
        for block in self.blocks:
            z = block(y)
            assert z.data_ptr() != y.data_ptr(), "a block must not work in place"
            y = z
        return self.head(self.norm(y)[:, 0])


class ItemAssertViT(TinyViT):
    def forward(self, x):
        y = self.stem(x)
        assert y.abs().max().item() < 1e6, "exploded"  # the line the error must name
        for block in self.blocks:
            y = block(y)
        return self.head(self.norm(y)[:, 0])


def test_data_ptr_assert_does_not_block_capture():
    torch.manual_seed(0)
    model = CheckedViT().eval()
    clip = torch.nn.functional.interpolate(builtin_clip(size=224, max_frames=3), size=64)
    report = eventful_fx.analyze(model, clip[:1])
    assert report.convertible_fraction > 0.9  # was: capture failed outright
    assert_matches_dense(eventful_fx.compile(model, budget=1.0), model, clip, tol=1e-4)


def test_failed_capture_names_the_line_and_what_to_change():
    with pytest.raises(CaptureError) as error:
        eventful_fx.analyze(ItemAssertViT().eval(), torch.randn(1, 3, 64, 64))
    message = str(error.value)
    assert "test_capture.py:28" in message and "assert y.abs().max().item()" in message
    assert "torch._check" in message and len(message) < 1000
