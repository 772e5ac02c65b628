"""Token gate and token buffer: flush, exactness at k = N, selection semantics, padding, batching."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from eventful_fx.runtime import TokenBuffer, TokenGate, Threshold, TopFraction, TopK, gather_rows, gather_tokens
from helpers import rel_err


def make_region(channels, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(channels, 2 * channels)
    return lambda x: torch.tanh(linear(x))


class GatedRegion:
    def __init__(self, region, num_tokens, policy):
        self.region, self.gate, self.buffer = region, TokenGate(policy), TokenBuffer(num_tokens)

    def __call__(self, x):
        idx, selected = self.gate(x)
        return self.buffer(self.region(selected), idx).clone()

    def reset(self, streams=None):
        self.gate.reset(streams)
        self.buffer.reset(streams)


class NaiveStream:
    """One stream of the gate + buffer semantics, written with loops and host syncs."""

    def __init__(self, region, policy):
        self.region, self.policy, self.ref, self.full = region, policy, None, None

    def __call__(self, x):  # x [N, *C]
        if self.ref is None:
            self.ref, self.full = x.clone(), self.region(x)
            return x.shape[0]
        score = (x - self.ref).reshape(x.shape[0], -1).norm(dim=1)
        if isinstance(self.policy, Threshold):
            chosen = (score > self.policy.threshold).nonzero().flatten()
        else:
            chosen = score.topk(self.policy.count(x.shape[0])).indices
        self.ref[chosen] = x[chosen]
        self.full[chosen] = self.region(x[chosen])
        return len(chosen)


def test_policies_validate_and_count():
    assert TopK(5).count(3) == 3 and TopK(0).count(3) == 0
    assert TopFraction(0.25).count(196) == 49 and TopFraction(0.1).count(30) == 3
    assert Threshold(0.5).count(10) is None
    for bad in (lambda: TopK(-1), lambda: TopK(2.0), lambda: TopFraction(1.5), lambda: Threshold(-0.1),
                lambda: Threshold(float("nan"))):
        with pytest.raises(ValueError):
            bad()


def test_gather_tokens_and_rows():
    torch.manual_seed(0)
    idx = torch.tensor([[3, 0, 3], [1, 2, 4]])
    streams = torch.arange(2)[:, None]
    shared, per_stream = torch.randn(1, 5, 4), torch.randn(2, 5, 4)
    assert torch.equal(gather_tokens(shared, idx), shared[0][idx])
    assert torch.equal(gather_tokens(per_stream, idx), per_stream[streams, idx])
    for mask in (torch.randn(1, 3, 5, 6), torch.randn(2, 1, 5, 6), torch.rand(2, 3, 5, 6) > 0.5):
        assert torch.equal(gather_rows(mask, idx), mask.expand(2, -1, -1, -1)[streams, :, idx].transpose(1, 2))
    assert torch.equal(gather_rows(shared[0, :, :], idx), shared[0][idx].unsqueeze(1))
    row_broadcast = torch.randn(2, 1, 1, 6)
    assert gather_rows(row_broadcast, idx) is row_broadcast


@pytest.mark.parametrize("policy", [TopK(12), TopFraction(1.0), Threshold(0.0)])
def test_full_budget_equals_dense_every_frame(policy):
    region, frames = make_region(8), torch.randn(10, 2, 12, 8)
    gated = GatedRegion(region, 12, policy)
    for frame in frames:
        assert rel_err(gated(frame), region(frame)) <= 1e-5
        assert gated.gate.last_counts == 12


def test_repeated_frame_selects_nothing_and_keeps_output():
    region, frame = make_region(8), torch.randn(2, 12, 8)
    gated = GatedRegion(region, 12, Threshold(0.0))
    first = gated(frame)
    idx, selected = gated.gate(frame.clone())
    assert gated.gate.last_counts == 0 and idx.shape == (2, 0) and selected.shape == (2, 0, 8)
    assert torch.equal(gated.buffer(region(selected), idx), first)


def test_small_changes_accumulate_until_selected():
    gate = TokenGate(Threshold(1.0))
    x = torch.zeros(1, 4, 3)
    gate(x)
    for step in range(1, 4):
        x = x.clone()
        x[0, 2, 0] += 0.4  # 0.4, 0.8, 1.2 away from the reference
        idx, _ = gate(x)
        assert idx.tolist() == ([[2]] if step == 3 else [[]])


def test_top_k_picks_largest_changes_and_updates_reference_there():
    gate = TokenGate(TopK(2))
    x = torch.randn(2, 6, 5)
    gate(x)
    delta = torch.zeros_like(x)
    delta[0, 4], delta[0, 1], delta[0, 0] = 3.0, 2.0, 1.0
    delta[1, 5], delta[1, 3] = 1.0, 0.5
    idx, selected = gate(x + delta)
    assert [sorted(row) for row in idx.tolist()] == [[1, 4], [3, 5]]
    assert torch.equal(selected, (x + delta)[torch.arange(2)[:, None], idx])
    idx, _ = gate(x + delta)
    assert 0 in idx[0].tolist()  # token 0's change is still pending against the reference


@pytest.mark.parametrize("refresh", [True, False])
@pytest.mark.parametrize("k", [8, 4])
def test_a_gate_before_query_gated_attention_refreshes_its_stalest_tokens(k, refresh):
    """Tokens 6..15 never change. Scores alone fill the slots the 6 changing tokens leave with the
    same two static tokens (ties go to the lower index); a gate in front of query-gated attention
    scores a skipped token's staleness too, so at k = 8 its 2 spare slots go round all 10 static
    tokens in 5 frames. With fewer slots than changing tokens, the changes still come first."""
    gate = TokenGate(TopK(k))
    gate.refresh_stalest = refresh
    x = torch.randn(2, 16, 3)
    gate(x)
    picked = set()
    for step in range(1, 6):
        moved = x.clone()
        moved[:, :6] += step
        idx, _ = gate(moved)
        static = [set(row) - set(range(6)) for row in idx.tolist()]
        assert all(len(s) == max(0, k - 6) for s in static)
        picked |= static[0]
    assert picked == (set() if k < 6 else set(range(6, 16)) if refresh else {6, 7})
    ages = 2 * 16 * 4 if refresh else 0
    assert gate.state_bytes() == 2 * 16 * 3 * 4 + 2 * 16 * 4 + ages  # reference, distances, ages


def test_a_still_scene_builds_up_no_staleness():
    """Staleness is the context motion a token missed, not frames waited: after 40 repeated frames
    the tokens that then move are the ones recomputed (frames waited would have outscored them)."""
    gate = TokenGate(TopK(8))
    gate.refresh_stalest = True
    x = torch.randn(1, 16, 3)
    for _ in range(40):
        gate(x)
    moved = x.clone()
    moved[:, :6] += 1.0  # tokens the repeated frames kept selecting (ties go to the lower index)
    idx, _ = gate(moved)
    assert set(range(6)) <= set(idx[0].tolist())


def test_threshold_pads_ragged_streams():
    gate = TokenGate(Threshold(0.5))
    x = torch.randn(3, 6, 4)
    gate(x)
    y = x.clone()
    y[0, [1, 2, 5]] += 2.0
    y[1, 3] += 2.0  # stream 2 unchanged
    idx, selected = gate(y)
    assert gate.last_counts.tolist() == [3, 1, 0]
    assert idx.tolist() == [[1, 2, 5], [3, 3, 3], [0, 0, 0]]
    assert torch.equal(selected[2], x[2, [0, 0, 0]]) and torch.equal(selected[1], y[1, [3, 3, 3]])


def test_channel_dims_and_shape_change_flush():
    gate, buffer = TokenGate(TopK(2)), TokenBuffer(5)
    x = torch.randn(2, 5, 2, 3)
    idx, selected = gate(x)
    assert torch.equal(buffer(selected * 2, idx), x * 2)
    y = x.clone()
    y[1, 3, 1, 2] += 1.0
    idx, selected = gate(y)
    assert 3 in idx[1].tolist() and torch.equal(buffer(selected * 2, idx), y * 2)
    z = torch.randn(3, 5, 2, 3)  # new batch size: a full flush
    idx, selected = gate(z)
    assert gate.last_counts == 5 and torch.equal(buffer(selected * 2, idx), z * 2)
    assert gate.state_bytes() == z.numel() * 4 + 3 * 5 * 4  # reference + a distance per token
    assert buffer.state_bytes() == z.numel() * 4
    gate.reset(), buffer.reset()
    assert gate.state_bytes() == buffer.state_bytes() == 0


def test_per_stream_reset_flushes_only_that_stream():
    gate = TokenGate(TopK(1))
    x = torch.randn(3, 4, 2)
    gate(x)
    gate.reset(streams=[1])
    idx, _ = gate(x + 1)
    assert gate.last_counts.tolist() == [1, 4, 1]
    assert sorted(idx[1].tolist()) == [0, 1, 2, 3] and len(set(idx[0].tolist())) == 1
    gate.reset(streams=[7])
    with pytest.raises(IndexError):
        gate(x)


def perturbed_frames(generator, frames, batch, tokens, channels):
    x = torch.randn(batch, tokens, channels, generator=generator)
    out = [x]
    for _ in range(frames - 1):
        x = x.clone()
        changed = torch.rand(batch, tokens, generator=generator) < torch.rand(batch, 1, generator=generator)
        x[changed] += torch.randn(int(changed.sum()), channels, generator=generator)
        out.append(x)
    return out


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 10), channels=st.integers(1, 5),
       k=st.integers(0, 11), threshold=st.sampled_from([None, 0.0, 0.7, 2.0]),
       reset_frame=st.integers(1, 4), reset_stream=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_batch_matches_naive_single_streams(batch, tokens, channels, k, threshold, reset_frame, reset_stream, seed):
    policy = TopK(k) if threshold is None else Threshold(threshold)
    region = make_region(channels, seed)
    gated = GatedRegion(region, tokens, policy)
    naive = [NaiveStream(region, policy) for _ in range(batch)]
    singles = [GatedRegion(region, tokens, policy) for _ in range(batch)]
    for t, x in enumerate(perturbed_frames(torch.Generator().manual_seed(seed), 5, batch, tokens, channels)):
        if t == reset_frame and reset_stream < batch:
            gated.reset(streams=[reset_stream])
            naive[reset_stream].ref = None
            singles[reset_stream].reset()
        out = gated(x)
        assert rel_err(out, torch.cat([single(x[b:b + 1]) for b, single in enumerate(singles)])) <= 1e-5
        counts = [stream(x[b]) for b, stream in enumerate(naive)]
        expected = torch.stack([stream.full for stream in naive])
        assert rel_err(out, expected) <= 1e-5
        last = gated.gate.last_counts
        assert (last.tolist() if torch.is_tensor(last) else [last] * batch) == counts


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("policy", [TopK(4), Threshold(0.8)])
def test_scoring_only_changed_tokens_picks_what_full_scoring_picks(batch, policy):
    """A gate told which tokens of its input moved (those a buffer rewrote) selects as if it scored all."""
    torch.manual_seed(0)
    num_tokens, channels = 12, 6
    told, blind = TokenGate(policy, always=(0,)), TokenGate(policy, always=(0,))
    x = torch.randn(batch, num_tokens, channels)
    for frame in range(8):
        if frame:
            changed = torch.stack([torch.randperm(num_tokens)[:3] for _ in range(batch)])
            x = x.clone()
            for b in range(batch):
                x[b, changed[b]] += torch.randn(3, channels) * (0.2 + frame % 3)
        if frame == 5:
            for gate in (told, blind):
                gate.reset(streams=[batch - 1])
        idx_told, sel_told = told(x, changed if frame else None)
        idx_blind, sel_blind = blind(x)
        assert torch.equal(idx_told, idx_blind)
        torch.testing.assert_close(sel_told, sel_blind)
        torch.testing.assert_close(told._score, blind._score)
        if frame and frame != 5:
            assert told.overhead_macs < blind.overhead_macs  # 3 tokens scored, not 12


def test_scoring_changed_tokens_with_a_static_stream():
    """Under a threshold, a stream that selects nothing pads with token 0, whose distance must survive."""
    torch.manual_seed(1)
    num_tokens, channels = 10, 4
    told, blind = TokenGate(Threshold(0.5)), TokenGate(Threshold(0.5))
    x = torch.randn(2, num_tokens, channels)
    told(x), blind(x)
    for frame in range(6):
        changed = torch.stack([torch.tensor([0, 3, 7]), torch.tensor([1, 2, 5])])
        x = x.clone()
        x[0, changed[0]] += 0.3 * (frame + 1)  # stream 0 moves; stream 1 never does
        idx_told, sel_told = told(x, changed)
        idx_blind, sel_blind = blind(x)
        assert torch.equal(idx_told, idx_blind)
        torch.testing.assert_close(sel_told, sel_blind)
        torch.testing.assert_close(told._score, blind._score)
        assert told.overhead_macs < blind.overhead_macs


def test_a_rounded_reference_does_not_count_as_change():
    gate = TokenGate(Threshold(0.1), state_dtype=torch.bfloat16)
    x = 100 * torch.randn(1, 50, 64)  # bfloat16 rounds these by ~0.2 per token
    gate(x)
    for changed in (None, torch.arange(50)[None]):
        idx, _ = gate(x, changed)
        assert idx.shape[1] == 0
    assert gate.state_bytes() == 50 * 64 * 2 + 50 * 4  # reference in bfloat16, distances in float32
