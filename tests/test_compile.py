"""eventful_fx.compile end to end on real models and the built-in video clip (camera pan + moving object)."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import eventful_fx

from models import TinyViT, TransformerEncoderViT
from helpers import assert_matches_dense, rel_err


@pytest.fixture(scope="module")
def clip(frames_of):
    return frames_of(224, 8)  # [8, 3, 224, 224]


def _tv_vit():
    model = torchvision.models.vit_b_16(weights=None)
    model.heads = torch.nn.Identity()  # its zero-initialised head would make every output 0
    return model


MODELS = {
    "vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224"),
    "vit_small_patch16_224": lambda: timm.create_model("vit_small_patch16_224"),
    "vit_base_patch16_224": lambda: timm.create_model("vit_base_patch16_224"),
    "deit_small_patch16_224": lambda: timm.create_model("deit_small_patch16_224"),
    "deit3_small_patch16_224": lambda: timm.create_model("deit3_small_patch16_224"),
    "samvit_base_patch16@224": lambda: timm.create_model("samvit_base_patch16", img_size=224),
    "vit_small_reg4": lambda: timm.create_model("vit_small_patch16_224", reg_tokens=4),
    "torchvision_vit_b_16": _tv_vit,
}


SLOW = {"vit_base_patch16_224", "samvit_base_patch16@224", "torchvision_vit_b_16"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_budget_one_equals_dense(name, clip):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    emodel = eventful_fx.compile(model, budget=1.0)
    assert_matches_dense(emodel, model, clip, tol=1e-4)
    assert not emodel.stats.flush and emodel.plan.gates, "the frames after the first must run through the gates"


@pytest.mark.parametrize("model_cls", [TinyViT, TransformerEncoderViT])
@pytest.mark.parametrize("attention", ["query", "incremental", "dense"])
def test_hand_written_budget_one_equals_dense(model_cls, attention, clip):
    torch.manual_seed(0)
    model = model_cls().eval()
    frames = torch.nn.functional.interpolate(clip, size=model.img_size if hasattr(model, "img_size") else 64)
    emodel = eventful_fx.compile(model, budget=1.0, attention=attention)
    assert_matches_dense(emodel, model, frames, tol=1e-4)


@pytest.mark.slow
def test_savings_on_vit_base_and_flop_counter_agrees(clip):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224").eval()
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None)  # the counts, not the plan, are the subject
    emodel(clip[0][None])
    assert emodel.stats.flush
    for frame in clip[1:4]:
        counter = FlopCounterMode(display=False)
        with counter:
            emodel(frame[None])
        stats = emodel.stats
        assert not stats.flush
        assert stats.macs <= 0.27 * stats.dense_macs
        counted = counter.get_total_flops() // 2
        by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        if not any("scaled_dot_product" in op for op in by_op):  # FlopCounterMode skips fused SDPA on CPU
            counted += sum(m.matmul_macs for n, m in emodel.graph_module.named_children() if n.startswith("attn_"))
        matrix_macs = stats.macs - stats.overhead_macs
        assert abs(counted - matrix_macs) <= 0.02 * matrix_macs, (counted, matrix_macs)


def test_fidelity_improves_with_budget(clip):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    with torch.no_grad():
        dense = [model(f[None]) for f in clip]
    errors = {}
    for budget in (0.1, 0.25, 0.5, 1.0):  # the calibrated default's error is test_fidelity.py's subject
        emodel = eventful_fx.compile(model, budget=budget, calibration=None)
        errors[budget] = sum(rel_err(emodel(f[None]), d) for f, d in zip(clip, dense)) / len(clip)
    print("mean relative error over the clip by budget:", errors)
    assert errors[0.1] > errors[0.25] > errors[0.5] > errors[1.0]
    assert errors[1.0] <= 1e-5


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_batch_of_streams_equals_single_runs(policy, clip):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    streams = [clip, clip.flip(-1), clip.roll(3, dims=0)]  # three different videos
    options = dict(budget=0.5, policy=policy, threshold=2.0, calibration=None)  # the plan is not the subject
    batched = eventful_fx.compile(model, **options)
    batch_out = [batched(torch.stack([s[t] for s in streams])) for t in range(len(clip))]
    counts = []
    for i, stream in enumerate(streams):
        single = eventful_fx.compile(model, **options)
        for t in range(len(clip)):
            assert rel_err(batch_out[t][i], single(stream[t][None])[0]) <= 1e-4
        counts.append(list(single.stats.tokens.values()))
    if policy == "threshold":
        assert len({tuple(c) for c in counts}) > 1, "streams should select different numbers of tokens"


def test_budget_change_takes_effect_without_recapture(clip):
    model = timm.create_model("vit_tiny_patch16_224").eval()
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None)
    emodel(clip[0][None])
    emodel(clip[1][None])
    graph, low = emodel.graph_module, emodel.stats.fraction
    emodel.budget = 0.75
    emodel(clip[2][None])
    assert emodel.graph_module is graph
    assert not emodel.stats.flush
    assert 0.7 <= emodel.stats.fraction <= 0.75 and low <= 0.25


def test_repeated_frame_updates_nothing_under_threshold(clip):
    model = timm.create_model("vit_tiny_patch16_224").eval()
    emodel = eventful_fx.compile(model, policy="threshold", threshold=0.5)
    emodel(clip[0][None])
    first = emodel(clip[1][None])
    again = emodel(clip[1][None])
    assert torch.equal(first, again)
    assert all(k <= 1 for k in emodel.stats.tokens.values())  # class tokens are always refreshed


def test_reset_and_refresh_flush_to_dense(clip):
    model = timm.create_model("vit_tiny_patch16_224").eval()
    with torch.no_grad():
        dense = [model(f[None]) for f in clip]
    emodel = eventful_fx.compile(model, budget=0.1, refresh=3, calibration=None)
    errors = [rel_err(emodel(f[None]), d) for f, d in zip(clip, dense)]
    assert all(errors[t] <= 1e-5 for t in (0, 3, 6)) and errors[2] > 1e-3
    emodel.reset()
    assert rel_err(emodel(clip[4][None]), dense[4]) <= 1e-5


def test_bad_budget_raises():
    model = TinyViT()
    for budget in (0, -0.5, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="budget"):
            eventful_fx.compile(model, budget=budget)
    emodel = eventful_fx.compile(model, budget=0.5)
    with pytest.raises(ValueError, match="budget"):
        emodel.budget = 2.0
    assert emodel.budget == 0.5


def test_nan_frame_raises_and_leaves_state_untouched(clip):
    torch.manual_seed(0)
    model = TinyViT().eval()
    frames = torch.nn.functional.interpolate(clip, size=64)
    clean, poisoned = eventful_fx.compile(model, budget=0.3), eventful_fx.compile(model, budget=0.3)
    bad = frames[2].clone()
    bad[0, 5, 5] = float("nan")
    for t, frame in enumerate(frames[:5]):
        expected = clean(frame[None])
        if t == 2:
            with pytest.raises(ValueError, match="NaN"):
                poisoned(bad[None])
        assert torch.equal(poisoned(frame[None]), expected)


def test_new_shape_or_batch_recaptures_with_warning(clip):
    torch.manual_seed(0)
    model = TinyViT().eval()
    emodel = eventful_fx.compile(model, budget=0.3)
    x = torch.nn.functional.interpolate(clip[:2], size=64)
    emodel(x[:1])
    emodel(x[1:])
    for changed in (x, x[:1].double()):  # two streams instead of one; float64 instead of float32
        model.to(changed.dtype)
        with pytest.warns(UserWarning, match="re-capturing"):
            out = emodel(changed)
        assert emodel.stats.flush
        with torch.no_grad():
            assert rel_err(out, model(changed)) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emodel(x[1:].double())  # same signature as the last call: no new capture


def test_dense_residual_is_exact_at_budget_one(clip):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    stream, branch = (eventful_fx.compile(model, budget=1.0, dense_residual=d) for d in (False, True))
    for frame in clip[:4]:
        with torch.no_grad():
            dense = model(frame[None])
        assert rel_err(branch(frame[None]), dense) <= 1e-4
        assert rel_err(stream(frame[None]), dense) <= 1e-4
    # gates sit after the norms, never on the embedding or the residual stream
    assert all("layer_norm" in n for n in branch.plan.gates)
    assert not all("layer_norm" in n for n in stream.plan.gates)


def test_reset_of_one_stream_flushes_only_that_stream(clip):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    other = clip.flip(-1)
    batched, alone = (eventful_fx.compile(model, budget=0.3, calibration=None) for _ in range(2))
    for t in range(5):
        if t == 3:
            batched.reset(streams=[1])
        out = batched(torch.stack([clip[t], other[t]]))
        assert rel_err(out[0], alone(clip[t][None])[0]) <= 1e-4  # stream 0 never notices
        if t == 3:
            with torch.no_grad():
                assert rel_err(out[1], model(other[t][None])[0]) <= 1e-5  # stream 1 was flushed
        elif t > 0:
            with torch.no_grad():
                assert rel_err(out[1], model(other[t][None])[0]) > 1e-4
