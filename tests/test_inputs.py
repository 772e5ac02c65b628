"""What a call may change, and what happens when it does (issue 12): non-tensor and keyword
arguments, parameters and submodules replaced after the first frame, inputs the model rejects.

Every check compares the eventful model with the dense model it wraps, on real frames.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import eventful_fx
from eventful_fx.passes.capture import InputError
from helpers import rel_err


@pytest.fixture(scope="module")
def clip(frames_of):
    return frames_of(224, 4)


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


class Scaled(torch.nn.Module):
    """A model with a positional and a keyword-only non-tensor argument that change its output."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()

    def forward(self, x, scale=1.0, *, shift=0.0):
        return self.vit.forward_features(x) * scale + shift


def test_changed_non_tensor_argument_recaptures(clip):
    model = Scaled().eval()
    emodel = eventful_fx.compile(model, budget=1.0)
    with torch.no_grad():
        emodel(clip[:1], 1.0)
        with pytest.warns(UserWarning, match=r"input changed .*1\.0.*3\.0") as record:
            out = emodel(clip[1:2], 3.0)
        assert record[0].filename == __file__  # the warning names the caller's line, not torch's
        assert rel_err(out, model(clip[1:2], 3.0)) < 1e-5  # was 0.667: the scale=1.0 graph
        out = emodel(clip[2:3], 3.0)  # same value: no new capture
        assert rel_err(out, model(clip[2:3], 3.0)) < 1e-5


def test_keyword_arguments_are_accepted(clip):
    model = Scaled().eval()
    emodel = eventful_fx.compile(model, budget=1.0)
    with torch.no_grad():
        out = emodel(clip[:1], scale=2.0, shift=0.5)
        assert rel_err(out, model(clip[:1], scale=2.0, shift=0.5)) < 1e-5
        with pytest.warns(UserWarning, match="input changed"):
            out = emodel(clip[1:2], scale=2.0, shift=-1.0)
        assert rel_err(out, model(clip[1:2], scale=2.0, shift=-1.0)) < 1e-5


def test_replaced_submodule_and_parameter_recapture(clip):
    model = tiny_vit()
    emodel = eventful_fx.compile(model, budget=1.0)
    with torch.no_grad():
        emodel(clip[:1])
        model.head = torch.nn.Linear(192, 10)
        with pytest.warns(UserWarning, match="replaced"):
            out = emodel(clip[1:2])
        assert out.shape == (1, 10) and rel_err(out, model(clip[1:2])) < 1e-5  # was 1.11
        model.blocks[3].mlp.fc1.weight = torch.nn.Parameter(torch.randn_like(model.blocks[3].mlp.fc1.weight))
        with pytest.warns(UserWarning, match="replaced"):
            out = emodel(clip[2:3])
        assert rel_err(out, model(clip[2:3])) < 1e-5  # was 0.39
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # unrelated modules built elsewhere do not re-capture this one
            torch.nn.Linear(3, 3)
            emodel(clip[3:4])


@pytest.mark.parametrize("bad, cause", [
    (lambda c: c[:1, :2], "expected input.* to have 3 channels"),
    (lambda c: c[0], "not enough values to unpack"),
    (lambda c: (c[:1] * 255).to(torch.uint8), "Input type"),
    (lambda c: torch.nn.functional.interpolate(c[:1], size=192), r"Input height \(192\)"),
])
def test_input_the_model_rejects_gets_a_short_error_and_leaves_the_stream(clip, bad, cause, capfd):
    model = tiny_vit()
    emodel, twin = (eventful_fx.compile(model, budget=0.25, calibration=None) for _ in range(2))
    with torch.no_grad():
        for e in (emodel, twin):
            e(clip[:1])
            e(clip[1:2])
        capfd.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(InputError, match=cause) as error:
                emodel(bad(clip))
        assert len(str(error.value)) < 500 and "VisionTransformer" in str(error.value)
        printed = capfd.readouterr()
        assert len(printed.out.splitlines()) + len(printed.err.splitlines()) < 5  # was ~230 lines of traceback
        # the stream goes on as if the bad frame had never come
        assert torch.equal(emodel(clip[2:3]), twin(clip[2:3]))
