"""state_dtype: gates and buffers keep their state in a smaller dtype; the model still computes in its own."""
import pytest
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip
from helpers import assert_matches_dense
from models import TinyViT


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    clip = builtin_clip(size=224, max_frames=8)
    with torch.no_grad():
        dense = [model(f[None]) for f in clip]
    return model, clip, dense


@pytest.fixture(scope="module")
def float32_run(setup):
    """The float32-state model at budget 0.25 on the clip, and its mean error: what smaller states are held to."""
    model, clip, dense = setup
    return _run(model, clip, dense, budget=0.25)


def _run(model, clip, dense, **options):
    emodel = eventful_fx.compile(model, calibration=None, **options)  # the same uniform plan for every dtype
    errors = []
    for frame, reference in zip(clip, dense):
        out = emodel(frame[None])
        assert out.dtype == reference.dtype
        errors.append(((out - reference).norm() / reference.norm()).item())
    return emodel, sum(errors) / len(errors)


@pytest.mark.parametrize("state_dtype, share", [(torch.float16, 0.5), (torch.bfloat16, 0.5), (torch.int8, 0.25)])
def test_smaller_state_saves_memory_and_keeps_fidelity(setup, float32_run, state_dtype, share):
    model, clip, dense = setup
    full, full_error = float32_run
    half, half_error = _run(model, clip, dense, budget=0.25, state_dtype=state_dtype)
    print(f"mean rel. err at budget 0.25: float32 state {full_error:.4f}, {state_dtype} state {half_error:.4f}")
    # the gates' per-token distances stay float32; int8 adds a float32 scale per token (1/384 of ViT-S's)
    assert share < half.state_bytes() / full.state_bytes() < share * 1.04
    assert half.decision.state_bytes == half.state_bytes()  # the cost model predicts the smaller state
    assert half_error <= 1.1 * full_error
    # buffers return a converted copy each frame: counted, and predicted by the cost model
    assert abs(half.decision.predicted_macs - half.stats.macs) <= 1e-6 * half.stats.macs


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.int8])
def test_smaller_state_at_full_budget_is_exact(setup, state_dtype):
    """Buffers return the frame's fresh tokens unrounded: at budget 1 (every token fresh) nothing is rounded."""
    model, clip, dense = setup
    _, error = _run(model, clip, dense, budget=1.0, state_dtype=state_dtype)
    assert error <= 1e-5  # was 1e-2: every buffer rounded its output to float16


def test_incremental_attention_keeps_its_caches_in_the_model_dtype(setup):
    model, clip, dense = setup
    emodel, error = _run(model, clip, dense, budget=1.0, attention="incremental", state_dtype=torch.float16)
    assert error <= 1e-5
    assert emodel.decision.state_bytes == emodel.state_bytes()


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_repeated_frame_updates_nothing_with_a_rounded_state(setup, state_dtype):
    """The threshold policy compares x rounded to the state dtype: rounding alone is no change."""
    model, clip, _ = setup
    emodel = eventful_fx.compile(model, policy="threshold", threshold=0.05, state_dtype=state_dtype)
    emodel(clip[0][None])
    first = emodel(clip[1][None])
    again = emodel(clip[1][None])
    # a gate that took every token on the last frame returned them unrounded; a repeat returns what the
    # state kept, and downstream gates may take the rounding once. From then on nothing moves:
    assert float((again - first).norm() / first.norm()) < 2 * torch.finfo(state_dtype).eps
    third = emodel(clip[1][None])
    assert torch.equal(third, again)
    assert all(k <= 1 for k in emodel.stats.tokens.values())  # class tokens are always refreshed


@pytest.mark.parametrize("bad", [torch.uint8, torch.float8_e4m3fn, "float16", 2])
def test_unsupported_state_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="state_dtype"):
        eventful_fx.compile(torch.nn.Linear(2, 2), state_dtype=bad)


def test_auto_state_dtype_halves_the_state_only_where_it_outweighs_the_weights(setup):
    model, clip, dense = setup
    small, _ = _run(model, clip[:2], dense[:2], budget=0.25)  # ViT-S at 224: state well below the weights
    assert small.state_dtype is None
    torch.manual_seed(0)
    wide = TinyViT(img_size=64, dim=64, depth=2).eval()  # 257 tokens: float32 state 1.65x the weights, float16 0.83x
    frames = torch.nn.functional.interpolate(clip[:3], size=64)
    weights = sum(p.numel() * p.element_size() for p in wide.parameters())
    auto = eventful_fx.compile(wide, budget=0.25, calibration=None)
    full = eventful_fx.compile(wide, budget=0.25, calibration=None, state_dtype=None)
    assert_matches_dense(auto, wide, frames[:1], tol=1e-5)  # the flush is exact
    full(frames[:1])
    assert auto.state_dtype == torch.float16 and full.state_bytes() > weights
    assert auto.state_bytes() < 0.51 * full.state_bytes() and auto.decision.state_bytes == auto.state_bytes()
    assert_matches_dense(eventful_fx.compile(wide, budget=1.0), wide, frames, tol=1e-5)  # budget 1 stays exact


def test_auto_state_dtype_takes_int8_where_float16_still_outweighs_the_weights(setup):
    _, clip, _ = setup
    torch.manual_seed(0)
    wide = TinyViT(img_size=96, dim=96, depth=2).eval()  # 577 tokens: float16 state 1.17x the weights, int8 0.64x
    frames = torch.nn.functional.interpolate(clip[:4], size=96)
    weights = sum(p.numel() * p.element_size() for p in wide.parameters())
    auto = eventful_fx.compile(wide, budget=0.25, calibration=None)
    assert_matches_dense(auto, wide, frames[:1], tol=1e-5)  # the flush is exact
    assert auto.state_dtype == torch.int8
    assert auto.state_bytes() <= weights and auto.decision.state_bytes == auto.state_bytes()
    half = eventful_fx.compile(wide, budget=0.25, calibration=None, state_dtype=torch.float16)
    with torch.no_grad():
        dense = [wide(f[None]) for f in frames]
        errors = {}
        for name, emodel in (("int8", auto), ("float16", half)):
            emodel.reset()
            outs = [emodel(f[None]) for f in frames]
            errors[name] = sum(float((o - d).norm() / d.norm()) for o, d in zip(outs[1:], dense[1:])) / 3
    assert half.state_bytes() > weights
    assert errors["int8"] <= 1.1 * errors["float16"] + 1e-3, errors
    assert_matches_dense(eventful_fx.compile(wide, budget=1.0), wide, frames, tol=1e-5)  # budget 1 stays exact
