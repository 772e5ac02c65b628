"""Calibration: the planner's error model fitted to a model and a few frames (eventful_fx/calibration.py)."""
from __future__ import annotations

import pytest
import timm
import torch

import eventful_fx
from eventful_fx.api import BUILTIN_CALIBRATION_CLIPS
from eventful_fx.calibration import CALIBRATION_FRAMES
from eventful_fx.video import builtin_clip, camera_clip
from eventful_fx.zoo import Tokens
from helpers import rel_err


@pytest.fixture(scope="module")
def clip(frames_of):
    return frames_of(224, 12)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Tokens(timm.create_model("vit_small_patch16_224").eval()).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tokens(timm.create_model("vit_tiny_patch16_224").eval()).eval()


def clip_error(emodel, model, frames) -> float:
    emodel.reset()
    errs = []
    for t, frame in enumerate(frames):
        with torch.no_grad():
            dense = model(frame[None])
        out = emodel(frame[None])
        if t:
            errs.append(rel_err(out, dense))
    return sum(errs) / len(errs)


def test_calibrated_plan_beats_the_uniform_plan_at_equal_macs(backbone, clip):
    uniform = eventful_fx.compile(backbone, budget=0.25, calibration=None)
    calibrated = eventful_fx.compile(backbone, budget=0.25, calibration=clip[:CALIBRATION_FRAMES])
    cal = calibrated.calibration
    assert len(cal.errors) == len(cal.groups) + 1 and cal.seconds > 0
    # MLP gates (more MACs per token) were measured to matter more than the attention gates
    mlp = max(range(len(cal.groups)), key=lambda i: calibrated.decision.model.gates[cal.groups[i][0]].per_k)
    assert cal.group_weights[mlp] > max(w for i, w in enumerate(cal.group_weights) if i != mlp)
    u, c = clip_error(uniform, backbone, clip), clip_error(calibrated, backbone, clip)
    print(f"vit_small @0.25: uniform {u:.4f}, calibrated {c:.4f}")
    assert calibrated.stats.macs <= 0.25 * calibrated.stats.dense_macs
    assert c < 0.97 * u


def test_plan_stays_a_function_of_the_budget(tiny, clip):
    emodel = eventful_fx.compile(tiny, budget=0.25, calibration=clip[:CALIBRATION_FRAMES])
    ks = dict(emodel.decision.ks)
    emodel.budget = 0.5
    emodel.budget = 0.25
    assert emodel.decision.ks == ks
    emodel.budget = 1.0  # calibrated weights never cost exactness
    for frame in clip[:3]:
        with torch.no_grad():
            dense = tiny(frame[None])
        assert rel_err(emodel(frame[None]), dense) <= 1e-4


def test_default_calibrates_on_the_builtin_clip_once_per_point(tiny, clip):
    """No options: a plan below budget 1 is calibrated on the built-in clips, whatever the stream shows (so a
    stream's plan never depends on the other streams of its batch), once per calibration point."""
    emodel = eventful_fx.compile(tiny, budget=1.0)
    emodel(clip[0][None])
    assert emodel.calibration is None  # budget 1.0: nothing to plan
    emodel.budget = 0.25
    first = emodel.calibration
    assert first is not None and first.fraction == 0.25
    assert first.clips == len(BUILTIN_CALIBRATION_CLIPS) and first.frames == first.clips * CALIBRATION_FRAMES
    emodel.budget = 0.22  # nearest point is still 1/4: no new measurement
    for frame in clip[1:4]:
        emodel(frame[None])
    assert emodel.calibration is first
    emodel.budget = 0.5
    assert emodel.calibration.fraction == 0.5
    emodel(clip[4][None])
    assert not emodel.stats.flush  # calibration runs on a graph of its own: the stream's state is untouched
    emodel.budget = 0.25
    assert emodel.calibration is first
    explicit = eventful_fx.compile(tiny, budget=0.25, calibration=None)
    explicit(clip[0][None])
    explicit._calibrate([builtin_clip(224, CALIBRATION_FRAMES, name) for name in BUILTIN_CALIBRATION_CLIPS], 0.25)
    assert explicit.decision.ks == emodel.decision.ks


def test_default_plan_holds_on_a_real_clip_it_was_not_calibrated_on(backbone):
    """A fit to one clip's motion can starve gates another video needs: calibrated on the synthetic clip
    alone, ViT-S's plan at 0.5 gave the query-gated attention gates a third of their tokens and lost 1.6x
    to the uniform plan on a real panning camera. The default fit must hold on every built-in clip."""
    frames = camera_clip("bikes", 224, 8)
    uniform = eventful_fx.compile(backbone, budget=0.5, calibration=None)
    default = eventful_fx.compile(backbone, budget=0.5)
    u, d = clip_error(uniform, backbone, frames), clip_error(default, backbone, frames)
    print(f"vit_small bikes @0.5: uniform {u:.4f}, default {d:.4f}")
    assert d <= 1.05 * u


def test_no_calibration_under_threshold_or_without_image_input(tiny, clip):
    emodel = eventful_fx.compile(tiny, budget=0.25, policy="threshold")
    emodel(clip[0][None])
    assert emodel.calibration is None
    emodel = eventful_fx.compile(tiny, budget=0.25, calibration=None)
    emodel(clip[0][None])
    assert emodel.calibration is None and not emodel.planner.fits


def test_bad_calibration_arguments(tiny, clip):
    with pytest.raises(ValueError, match="calibration must be"):
        eventful_fx.compile(tiny, calibration="always")
    with pytest.raises(ValueError, match="at least 3 consecutive frames"):
        eventful_fx.compile(tiny, calibration=clip[:2])


def test_a_second_module_of_the_same_model_reuses_its_calibration(clip):
    """The built-in calibration depends on the weights, the graph, the input, the options and the plan's
    structure: a second module of the same model plans at once, and a weight changed in place measures again."""
    torch.manual_seed(3)
    model = Tokens(timm.create_model("vit_tiny_patch16_224", depth=3).eval()).eval()
    first = eventful_fx.compile(model, budget=0.25)
    first(clip[0][None])
    second = eventful_fx.compile(model, budget=0.25)
    second(clip[0][None])
    assert second.calibration is first.calibration and second.decision.ks == first.decision.ks
    other = eventful_fx.compile(model, budget=0.25, attention="incremental")
    other(clip[0][None])
    assert other.calibration is not first.calibration
    with torch.no_grad():
        model.vit.blocks[0].mlp.fc1.weight.mul_(2.0)
    changed = eventful_fx.compile(model, budget=0.25)
    changed(clip[0][None])
    assert changed.calibration is not first.calibration
