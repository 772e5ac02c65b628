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


def test_global_and_windowed_attention_with_query_bias_convert(sam_and_clip):
    model, clip = sam_and_clip
    report = eventful_fx.analyze(model, clip[:1], budget=0.25)
    converted = [a for a in report.attention_sites if a.convertible]
    assert len(converted) == 2 and all(a.tokens == (SIZE // 16) ** 2 for a in converted)  # the two global blocks
    assert report.convertible_fraction > 0.9
    # the windowed blocks' queries are rows of [windows * heads, 196, d]: row-gated on request
    report = eventful_fx.analyze(model, clip[:1], budget=0.25, attention="query_windows")
    assert all(a.convertible for a in report.attention_sites) and len(report.attention_sites) == 4
    assert sorted(a.tokens for a in report.attention_sites) == [400, 400, 4 * 12 * 196, 4 * 12 * 196]
    assert report.convertible_fraction > 0.95
    assert_matches_dense(eventful_fx.compile(model, budget=1.0, attention="query_windows"), model, clip, tol=1e-4)
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None, attention="query_windows")
    errors = assert_matches_dense(emodel, model, clip, tol=0.5)
    assert errors[0] < 1e-4 and emodel.stats.fraction <= 0.26


class QueryBias(torch.nn.Module):
    """SAM's decomposed relative-position bias of a projection of patch tokens, as the model's output."""

    def __init__(self, grid=6, dim=16, patch=4):
        super().__init__()
        torch.manual_seed(0)
        self.grid = grid
        self.embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.proj = torch.nn.Linear(dim, dim)
        self.rel_pos_h = torch.nn.Parameter(torch.randn(2 * grid - 1, dim))
        self.rel_pos_w = torch.nn.Parameter(torch.randn(2 * grid - 1, dim))

    def forward(self, image):
        from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

        x = self.embed(image).flatten(2).transpose(1, 2)  # [B, grid*grid, dim]
        size = (self.grid, self.grid)
        return get_decomposed_rel_pos_bias(self.proj(x), self.rel_pos_h, self.rel_pos_w, size, size)


@pytest.mark.parametrize("streams", [1, 3])
def test_bias_rows_of_selected_queries_equal_the_dense_rows(streams):
    """Only tokens 5 and 17 change: their rows come from the gathered tables, the others are kept."""
    model = QueryBias().eval()
    x0 = torch.randn(streams, 3, 24, 24)
    x1 = x0.clone()
    for token in (5, 17):
        row, col = divmod(token, 6)
        x1[:, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 1.0
    emodel = eventful_fx.compile(model, budget=0.7, policy="threshold", threshold=1e-4, dense_residual=False,
                                 state_dtype=None,  # rows compared exactly: no rounded state
                                 calibration=None)
    with torch.no_grad():
        emodel(x0)
        out = emodel(x1)
        assert list(emodel.stats.tokens.values()) == [2]  # two rows recomputed
        assert (out - model(x1)).abs().max() < 1e-5
        assert (model(x1) - model(x0))[:, [5, 17]].abs().amax() > 0.1  # those rows did change


@pytest.mark.parametrize("style", ["explicit", "sdpa"])
def test_hand_written_vitdets(style):
    """Two ViTDets of our own: explicit q·kᵀ/softmax/·v attention with an einsum bias from q and view/permute
    windows on a padded grid; SDPA with a precomputed bias and unfold windows."""
    from models import ViTDetExplicit, ViTDetSDPA

    torch.manual_seed(0)
    model = (ViTDetExplicit if style == "explicit" else ViTDetSDPA)().eval()
    clip = builtin_clip(size=model.img_size, max_frames=4)
    report = eventful_fx.analyze(model, clip[:1], budget=0.25)
    assert report.attention_count == 4 and report.convertible_attention_count == 2  # the global blocks
    assert report.convertible_linear_count == report.linear_count == 16
    assert report.convertible_fraction > 0.9
    assert_matches_dense(eventful_fx.compile(model, budget=1.0), model, clip, tol=1e-4)
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None)
    assert_matches_dense(emodel, model, clip, tol=0.5)
    assert emodel.stats.fraction <= 0.27


def test_explicit_attention_is_fused_into_sdpa(sam_and_clip):
    model, clip = sam_and_clip
    explicit = SamBackbone().eval()
    for block in explicit.sam.blocks:
        block.attn.fused_attn = False  # timm's q·kᵀ + bias, softmax, ·v path
    fused_report = eventful_fx.analyze(model, clip[:1], budget=0.25)
    report = eventful_fx.analyze(explicit, clip[:1], budget=0.25)
    assert report.convertible_attention_count == fused_report.convertible_attention_count == 2
    assert abs(report.convertible_fraction - fused_report.convertible_fraction) < 0.01
    assert_matches_dense(eventful_fx.compile(explicit, budget=1.0), explicit, clip, tol=1e-4)


def test_padding_of_the_window_grid_takes_no_tokens(sam_and_clip):
    """Padded positions hold the same value on every frame. Selected on every frame like class tokens,
    they took 384 of each windowed gate's k (all of it at 0.25) and the error was 2.6x this."""
    model, _ = sam_and_clip
    clip = builtin_clip(size=SIZE, max_frames=4, name="real")
    emodel = eventful_fx.compile(model, budget=0.25, calibration=None)
    errors = assert_matches_dense(emodel, model, clip, tol=0.5)
    print("all-token error per frame at 0.25:", errors)
    assert errors[0] < 1e-4
    assert sum(errors[1:]) / 3 <= 1.15 * 0.0087 and max(errors[1:]) <= 1.15 * 0.0106


def test_plans_count_the_tokens_that_can_change(sam_and_clip):
    """A windowed gate's fraction k/N counts the 400 tokens, not the 784 positions of the padded grid, where
    its padding still holds the pad's constant; after attention a padded position holds a padded query's
    output, which changes (cropped later, but it takes a token when selected)."""
    model, clip = sam_and_clip
    # (float32 state: test_exact_at_one...) a rounded state is exact only where every position is fresh
    emodel = eventful_fx.compile(model, budget=1.0, calibration=None, state_dtype=torch.int8)
    assert_matches_dense(emodel, model, clip, tol=1e-4)
    emodel = eventful_fx.compile(model, budget=0.5, calibration=None)
    emodel(clip[:1])
    gates = emodel.decision.model.gates
    windowed = [g for g in gates.values() if g.num_tokens == 784]
    assert sorted(g.selectable for g in windowed) == [400, 400, 784, 784]
    assert all(k <= gates[name].selectable for name, k in emodel.decision.ks.items())


def test_windows_of_several_streams_convert_and_stay_per_stream(sam_and_clip):
    """A window partition folds each stream's windows into the batch axis ([B * windows, ws, ws, C]). With
    two streams that axis was read as tokens mixed with the batch: every windowed qkv stayed dense (0.74
    convertible, budget 0.25 infeasible). Each stream's output must still be its own single-stream run."""
    model, clip = sam_and_clip
    other = builtin_clip(size=SIZE, max_frames=3, name="real")
    both = torch.stack([clip, other], dim=1)  # [T, 2, 3, H, W]
    report = eventful_fx.analyze(model, both[0], budget=0.25)
    assert report.convertible_linear_count == report.linear_count == 16
    assert report.plan.fraction <= 0.26
    assert_matches_dense(eventful_fx.compile(model, budget=1.0, calibration=None), model, both, tol=1e-4)
    paired = eventful_fx.compile(model, budget=0.25, calibration=None)
    alone = [eventful_fx.compile(model, budget=0.25, calibration=None) for _ in range(2)]
    with torch.no_grad():
        for frame in both:
            out = paired(frame)
            for stream, single in enumerate(alone):
                assert (out[stream] - single(frame[stream:stream + 1])[0]).abs().max() < 1e-4
    assert 0 < paired.stats.fraction <= 0.27
