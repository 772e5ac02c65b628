"""Residual adds of values gated on the same tokens run on those tokens: one buffer, same values."""
import pytest
import timm
import torch

import eventful_fx
from eventful_fx.cost_model import expressions
from eventful_fx.passes import rewrite
from eventful_fx.passes.rewrite import RegionBuffer
from eventful_fx.runtime import TopK
from eventful_fx.video import builtin_clip


def _run(model, frames, ks=None):
    # joins happen where gates sit on the residual stream
    emodel = eventful_fx.compile(model, budget=0.5, linear_kernel="torch", dense_residual=False, calibration=None)
    with torch.no_grad():
        emodel(frames[0])
        if ks is not None:  # the plan of the other graph: only the join may differ
            for name, gate in emodel._gates().items():
                gate.policy = TopK(ks[name])
            emodel.reset()
        outputs = [emodel(x) for x in frames]
    return emodel, outputs


@pytest.mark.parametrize("streams", [1, 2])
def test_joined_residual_adds_give_the_same_outputs(monkeypatch, streams):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4).eval()
    clip = builtin_clip(size=224, max_frames=6)
    videos = [clip, clip.flip(-1)][:streams]
    frames = [torch.stack([video[t] for video in videos]) for t in range(len(clip))]

    joined, joined_out = _run(model, frames)
    ks = {name: gate.policy.k for name, gate in joined._gates().items()}
    monkeypatch.setattr(rewrite, "joinable", lambda *args: None)
    monkeypatch.setattr(expressions, "joinable", lambda *args: None)
    apart, apart_out = _run(model, frames, ks)

    def buffers(emodel):
        return sum(isinstance(m, RegionBuffer) for m in emodel.graph_module.modules())

    assert buffers(joined) < buffers(apart)
    for a, b in zip(joined_out, apart_out):
        assert (a - b).norm() <= 1e-6 * b.norm()
