"""An eventful transformer block assembled by hand from the runtime ops, on a real timm Block."""
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from eventful_fx.runtime import (DenseAttention, IncrementalAttention, QueryGatedAttention, StatefulOp, TokenBuffer,
                                 TokenGate, Threshold, TopFraction, TopK)
from helpers import rel_err

MODES = ["dense", "query", "incremental"]


class EventfulBlock(nn.Module):
    """norm -> gate -> qkv -> buffer -> attention -> gate -> proj -> buffer -> residual;
    norm -> gate -> MLP -> buffer -> residual, with the weights of a timm Block."""

    def __init__(self, block, num_tokens, policy, mode):
        super().__init__()
        self.block, self.mode = block, mode
        self.qkv_gate, self.proj_gate, self.mlp_gate = TokenGate(policy), TokenGate(policy), TokenGate(policy)
        self.qkv_buffer, self.attn_buffer = TokenBuffer(num_tokens), TokenBuffer(num_tokens)
        self.proj_buffer, self.mlp_buffer = TokenBuffer(num_tokens), TokenBuffer(num_tokens)
        self.attention = {"dense": DenseAttention, "query": QueryGatedAttention,
                          "incremental": lambda: IncrementalAttention(num_tokens)}[mode]()
        self.linear_macs = 0

    def ops(self):
        return [m for m in self.modules() if isinstance(m, StatefulOp)]

    def reset(self, streams=None):
        for op in self.ops():
            op.reset(streams)

    def linear(self, layer, tokens):
        self.linear_macs += layer.in_features * layer.out_features * tokens.shape[0] * tokens.shape[1]
        return layer(tokens)

    def heads(self, qkv):
        attn = self.block.attn
        q, k, v = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def forward(self, x):
        blk, attn = self.block, self.block.attn
        self.linear_macs = 0
        idx, selected = self.qkv_gate(blk.norm1(x))
        qkv_selected = self.linear(attn.qkv, selected)
        if self.mode == "incremental":
            out = self.attention(*self.heads(qkv_selected), idx).transpose(1, 2).flatten(2)
        else:
            q, k, v = self.heads(self.qkv_buffer(qkv_selected, idx))
            if self.mode == "dense":
                out = self.attention(q, k, v).transpose(1, 2).flatten(2)
            else:
                out_selected = self.attention(self.heads(qkv_selected)[0], k, v, idx)
                out = self.attn_buffer(out_selected.transpose(1, 2).flatten(2), idx)
        idx, selected = self.proj_gate(attn.norm(out))
        x = x + blk.ls1(self.proj_buffer(self.linear(attn.proj, selected), idx))
        idx, selected = self.mlp_gate(blk.norm2(x))
        mlp = blk.mlp
        hidden = mlp.norm(mlp.act(self.linear(mlp.fc1, selected)))
        return x + blk.ls2(self.mlp_buffer(self.linear(mlp.fc2, hidden), idx))


def timm_block(dim, heads):
    torch.manual_seed(0)
    return Block(dim=dim, num_heads=heads).eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [TopK(16), Threshold(0.0)])
@torch.no_grad()
def test_full_budget_matches_timm_block_every_frame(mode, policy):
    block = timm_block(dim=32, heads=4)
    eventful = EventfulBlock(block, 16, policy, mode)
    for x in torch.randn(10, 2, 16, 32):
        assert rel_err(eventful(x), block(x)) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_repeated_frame_returns_previous_output(mode):
    block = timm_block(dim=32, heads=4)
    eventful = EventfulBlock(block, 16, Threshold(0.0), mode)
    x = torch.randn(2, 16, 32)
    previous = eventful(x)
    assert rel_err(eventful(x.clone()), previous) <= 1e-6 and eventful.linear_macs == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [TopFraction(0.25), Threshold(0.5)])
@torch.no_grad()
def test_batch_equals_single_streams(mode, policy):
    block, batch, tokens = timm_block(dim=32, heads=4), 3, 16
    batched = EventfulBlock(block, tokens, policy, mode)
    singles = [EventfulBlock(block, tokens, policy, mode) for _ in range(batch)]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, tokens, 32, generator=generator)
    for t in range(6):
        if t == 3:
            batched.reset(streams=[2])
            singles[2].reset()
        out = batched(x)
        assert rel_err(out, torch.cat([s(x[b:b + 1]) for b, s in enumerate(singles)])) <= 1e-5
        x = x.clone()
        changed = torch.rand(batch, tokens, generator=generator) < torch.tensor([[0.5], [0.1], [0.0]])
        x[changed] += torch.randn(int(changed.sum()), 32, generator=generator)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_quarter_budget_costs_under_30_percent_of_dense_at_vit_b_sizes(mode):
    tokens, dim = 196, 768
    block = timm_block(dim=dim, heads=12)
    eventful = EventfulBlock(block, tokens, TopK(tokens // 4), mode)
    eventful(torch.randn(1, tokens, dim))
    eventful(torch.randn(1, tokens, dim))
    macs = eventful.linear_macs + sum(op.matmul_macs + op.overhead_macs for op in eventful.ops())
    dense = 12 * dim * dim * tokens + 2 * tokens * tokens * dim
    assert macs <= 0.30 * dense, macs / dense
