"""Attention modes: dense, query-gated and incremental equal SDPA where they must."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from eventful_fx.runtime import (DenseAttention, IncrementalAttention, QueryGatedAttention, TokenBuffer, TokenGate,
                                 Threshold, TopK)
from helpers import rel_err

MODES = ["dense", "query", "incremental"]


class GatedAttention:
    """gate -> qkv projection -> attention in one of the three modes -> full [B, H, N, d]."""

    def __init__(self, mode, num_tokens, dim, heads, policy, seed=0):
        torch.manual_seed(seed)
        self.mode, self.heads, self.qkv = mode, heads, nn.Linear(dim, 3 * dim)
        self.gate = TokenGate(policy)
        self.qkv_buffer, self.out_buffer = TokenBuffer(num_tokens), TokenBuffer(num_tokens)
        self.attn = {"dense": DenseAttention, "query": QueryGatedAttention,
                     "incremental": lambda: IncrementalAttention(num_tokens)}[mode]()

    def split(self, qkv):
        return qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

    def dense(self, x, mask=None):
        return F.scaled_dot_product_attention(*self.split(self.qkv(x)), attn_mask=mask)

    def __call__(self, x, mask=None):
        idx, selected = self.gate(x)
        qkv_selected = self.qkv(selected)
        q_sel, k_sel, v_sel = self.split(qkv_selected)
        if self.mode == "incremental":
            return self.attn(q_sel, k_sel, v_sel, idx, mask)
        q, k, v = self.split(self.qkv_buffer(qkv_selected, idx))
        if self.mode == "dense":
            return self.attn(q, k, v, mask)
        out_sel = self.attn(q_sel, k, v, idx, mask)
        return self.out_buffer(out_sel.transpose(1, 2), idx).transpose(1, 2).clone()

    def reset(self, streams=None):
        for op in (self.gate, self.qkv_buffer, self.out_buffer, self.attn):
            op.reset(streams)


def masks(kind, batch, heads, tokens):
    if kind == "additive":
        return torch.randn(1, heads, tokens, tokens)
    if kind == "bool":
        mask = torch.rand(batch, 1, tokens, tokens) > 0.3
        mask[0, 0, 1] = False  # a row masked everywhere: SDPA gives 0 there
        return mask
    return None


def test_dense_attention_is_sdpa_and_counts_macs():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    bias = torch.randn(1, 3, 5, 7)
    op = DenseAttention()
    assert torch.equal(op(q, k, v, bias, scale=0.3), F.scaled_dot_product_attention(q, k, v, bias, scale=0.3))
    assert op.matmul_macs == 2 * 3 * 5 * 7 * (4 + 6) and op.state_bytes() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [TopK(9), Threshold(0.0)])
@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
def test_full_budget_equals_dense_every_frame(mode, policy, mask_kind):
    layer = GatedAttention(mode, num_tokens=9, dim=12, heads=3, policy=policy)
    mask = masks(mask_kind, 2, 3, 9)
    for x in torch.randn(10, 2, 9, 12):
        assert rel_err(layer(x, mask), layer.dense(x, mask)) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_repeated_frame_selects_nothing_and_keeps_output(mode):
    layer = GatedAttention(mode, num_tokens=9, dim=12, heads=3, policy=Threshold(0.0))
    x, bias = torch.randn(2, 9, 12), torch.randn(1, 3, 9, 9)
    previous = layer(x, bias).clone()
    out = layer(x.clone(), bias)
    assert layer.gate.last_counts == 0
    assert rel_err(out, previous) <= 1e-6


def changed_frames(generator, frames, batch, heads, tokens, head_dim, changed):
    """q, k, v whose only change per frame is at tokens idx (padded with duplicates like a gate)."""
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    streams = torch.arange(batch)[:, None]
    yield q, k, v, torch.arange(tokens).expand(batch, tokens), (q, k, v)
    for _ in range(frames - 1):
        idx = torch.stack([torch.randperm(tokens, generator=generator)[:changed] for _ in range(batch)])
        idx[-1, changed // 2:] = idx[-1, 0]  # the last stream pads with its first token
        fresh = [torch.randn(batch, heads, changed, head_dim, generator=generator) for _ in range(3)]
        for t in fresh:
            t[-1, :, changed // 2:] = t[-1, :, :1]
        q, k, v = (full.clone() for full in (q, k, v))
        for full, t in zip((q, k, v), fresh):
            full.transpose(1, 2)[streams, idx] = t.transpose(1, 2)
        yield *fresh, idx, (q, k, v)


@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
def test_incremental_delta_algebra_is_exact(mask_kind):
    batch, heads, tokens, changed = 2, 3, 16, 5
    op, mask = IncrementalAttention(tokens), masks(mask_kind, batch, heads, tokens)
    frames = changed_frames(torch.Generator().manual_seed(0), 10, batch, heads, tokens, 8, changed)
    for q_sel, k_sel, v_sel, idx, full in frames:
        out = op(q_sel, k_sel, v_sel, idx, mask)
        assert rel_err(out, F.scaled_dot_product_attention(*full, attn_mask=mask)) <= 1e-5
    assert op.matmul_macs == batch * heads * tokens * changed * 5 * 8
    assert op.state_bytes() == 4 * batch * heads * tokens * (4 * 8 + tokens + 2)
    op.reset()
    assert op.state_bytes() == 0


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(2, 12), head_dim=st.integers(1, 8),
       changed_fraction=st.floats(0.0, 1.0), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_incremental_and_query_gated_match_dense_when_only_selected_tokens_change(
        batch, heads, tokens, head_dim, changed_fraction, with_bias, seed):
    changed = max(1, round(changed_fraction * tokens))
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(batch, 1, tokens, tokens, generator=generator) if with_bias else None
    incremental, query_gated = IncrementalAttention(tokens), QueryGatedAttention()
    for q_sel, k_sel, v_sel, idx, (q, k, v) in changed_frames(generator, 4, batch, heads, tokens, head_dim, changed):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert rel_err(incremental(q_sel, k_sel, v_sel, idx, bias), expected) <= 1e-5
        rows = expected.transpose(1, 2)[torch.arange(batch)[:, None], idx].transpose(1, 2)
        assert rel_err(query_gated(q_sel, k, v, idx, bias), rows) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [TopK(3), Threshold(0.8)])
def test_batch_equals_single_streams_with_per_stream_reset(mode, policy):
    batch, tokens = 3, 8
    bias = torch.randn(1, 2, tokens, tokens)
    batched = GatedAttention(mode, tokens, dim=8, heads=2, policy=policy)
    singles = [GatedAttention(mode, tokens, dim=8, heads=2, policy=policy) for _ in range(batch)]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, 8, generator=generator)
    for t in range(8):
        if t == 4:
            batched.reset(streams=[1])
            singles[1].reset()
        out = batched(x, bias)
        assert rel_err(out, torch.cat([s(x[b:b + 1], bias) for b, s in enumerate(singles)])) <= 1e-5
        x = x.clone()
        changed = torch.rand(batch, tokens, generator=generator) < torch.tensor([[0.5], [0.1], [0.0]])
        x[changed] += torch.randn(int(changed.sum()), 8, generator=generator)


def test_unsupported_arguments_raise_clearly():
    q = torch.randn(1, 2, 4, 3)
    idx = torch.arange(4).expand(1, 4)
    for op, args in ((IncrementalAttention(4), (q, q, q, idx)), (QueryGatedAttention(), (q, q, q, idx))):
        with pytest.raises(NotImplementedError, match="is_causal"):
            op(*args, is_causal=True)
    with pytest.raises(ValueError, match="all 4 tokens"):
        IncrementalAttention(4)(q[:, :, :2], q[:, :, :2], q[:, :, :2], idx[:, :2])


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("bias", ["per_row", "shared", None])
def test_row_gated_windows_equal_a_per_window_reference(streams, bias):
    """Windowed attention as SAM spells it: q [streams * windows * heads, n, d], each batch entry one
    window's head. The selected tokens' rows equal softmax(q kᵀ·s + bias) v over their own window only;
    every other row keeps the output it had."""
    from eventful_fx.runtime import RowGatedAttention

    torch.manual_seed(0)
    windows, heads, n, d = 3, 2, 5, 4
    entries = streams * windows * heads
    rows_per_stream = windows * heads * n

    def inputs():
        q, k, v = (torch.randn(entries, n, d) for _ in range(3))
        mask = {"per_row": torch.randn(entries, n, n), "shared": torch.randn(heads, 1, n, n).expand(
            heads, windows, n, n).reshape(1, windows * heads, n, n)[0].repeat(streams, 1, 1), None: None}[bias]
        return q, k, v, mask

    def reference(q, k, v, mask):  # window by window, written out
        out = torch.empty_like(q)
        for e in range(entries):
            logits = q[e] @ k[e].T / d ** 0.5 + (0 if mask is None else mask[e])
            out[e] = logits.softmax(-1) @ v[e]
        return out

    # token t (window w, position p) of a stream has rows (w * heads + h) * n + p, one per head
    rows_of = torch.tensor([[(w * heads + h) * n + p for h in range(heads)] for w in range(windows) for p in range(n)])
    attn = RowGatedAttention(rows_of, streams * rows_per_stream)
    first = inputs()
    kept = attn(*first[:3], torch.arange(windows * n).expand(streams, -1), first[3]).clone()
    assert rel_err(kept, reference(*first)) < 1e-6
    second = inputs()
    idx = torch.tensor([[0, 7, 8, 14], [3, 4, 5, 9]])[:streams]  # window 0 and 1 and 2; stream 1 other tokens
    out = attn(*second[:3], idx, second[3])
    fresh = reference(*second)
    selected = torch.zeros(streams * rows_per_stream, dtype=torch.bool)
    for b in range(streams):
        selected[rows_of[idx[b]].flatten() + b * rows_per_stream] = True
    out, fresh, kept = (t.reshape(-1, d) for t in (out, fresh, kept))
    assert (out[selected] - fresh[selected]).abs().max() < 1e-5
    assert torch.equal(out[~selected], kept[~selected])
    assert attn.matmul_macs < entries * n * n * 2 * d  # not every row recomputed
