"""Option values and the warnings a plan gives (issue 12): bad values fail at compile() with the
option's name; infeasible budgets and memory caps say which one binds; state_bytes scales with
streams; a non-finite frame let through with check_finite=False is cured by reset()."""
from __future__ import annotations

import pytest
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip
from helpers import rel_err


@pytest.fixture(scope="module")
def model_and_clip():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval(), builtin_clip(size=224, max_frames=4)


@pytest.mark.parametrize("option, value", [
    ("policy", "top-k"), ("attention", "sparse"), ("attention", None), ("refresh", True), ("refresh", 1.5),
    ("refresh", 0), ("threshold", -1.0), ("memory_cap_bytes", -1), ("memory_cap_bytes", 1.5),
    ("linear_kernel", "mkl"), ("state_dtype", torch.uint8), ("calibration", "clip.mp4"),
])
def test_bad_option_values_name_the_option(model_and_clip, option, value):
    model, _ = model_and_clip
    with pytest.raises(ValueError, match=option):
        eventful_fx.compile(model, **{option: value})


def test_compile_refuses_what_is_no_module():
    with pytest.raises(TypeError, match="nn.Module"):
        eventful_fx.compile(lambda x: x)


def test_infeasible_budget_and_memory_cap_warn_with_the_binding_constraint(model_and_clip):
    model, clip = model_and_clip
    with pytest.warns(UserWarning, match="budget 0.01 is below what this model can reach"):
        emodel = eventful_fx.compile(model, budget=0.01, calibration=None)
        emodel(clip[:1])
    with pytest.warns(UserWarning, match="memory_cap_bytes=1 leaves state for 0 of") as record:
        emodel = eventful_fx.compile(model, budget=0.25, calibration=None, memory_cap_bytes=1)
        emodel(clip[:1])
    assert not any("below what this model can reach" in str(w.message) for w in record)  # was: blamed the budget
    assert emodel.state_bytes() == 0


def test_state_bytes_scale_with_streams_as_predicted(model_and_clip):
    model, clip = model_and_clip
    sizes = {}
    for batch in (1, 3):
        emodel = eventful_fx.compile(model, budget=0.25, calibration=None)
        with torch.no_grad():
            emodel(clip[:batch])
            emodel(clip[1:1 + batch])
        sizes[batch] = emodel.state_bytes()
        assert abs(emodel.state_bytes() - emodel.decision.state_bytes) <= 0.05 * emodel.decision.state_bytes
    assert sizes[3] == 3 * sizes[1]


def test_non_finite_frame_without_the_check_is_cured_by_reset(model_and_clip):
    model, clip = model_and_clip
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None, check_finite=False)
    bad = clip[1:2].clone()
    bad[0, 0, :32, :32] = float("inf")
    with torch.no_grad():
        emodel(clip[:1])
        assert not torch.isfinite(emodel(bad)).all()  # let through, as asked: the state holds it now
        emodel.reset()
        assert rel_err(emodel(clip[2:3]), model(clip[2:3])) < 1e-5
        assert torch.isfinite(emodel(clip[3:4])).all()
