"""Tiny hand-written vision transformers for tests (no timm, no torchvision).

`TinyViT`: conv patch embedding, class token, position embedding, pre-norm blocks with
their own qkv `nn.Linear` + `F.scaled_dot_product_attention` + MLP, final norm, head on the
class token. `TransformerEncoderViT`: the same stem around `nn.TransformerEncoder`
(batch_first, norm_first), so attention goes through `nn.MultiheadAttention`.
Both default to dim 64 on a 64x64 image with 4x4 patches (256 tokens + class token), so the
token-wise layers dominate the MACs as in a real ViT (a 16x16 patch conv would outweigh a dim-64 block).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchStem(nn.Module):
    """Conv patch embedding + class token + learned position embedding -> [B, 1 + N, C]."""

    def __init__(self, img_size: int = 64, patch: int = 4, dim: int = 64, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.num_patches = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, img_size: int = 64, patch: int = 4, dim: int = 64, depth: int = 3, heads: int = 4,
                 num_classes: int = 10):
        super().__init__()
        self.img_size = img_size
        self.stem = PatchStem(img_size, patch, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TransformerEncoderViT(nn.Module):
    def __init__(self, img_size: int = 64, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 num_classes: int = 10):
        super().__init__()
        self.img_size = img_size
        self.stem = PatchStem(img_size, patch, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.stem(x))[:, 0])


# -- ViTDet-style backbones, written from the ViTDet and SAM papers in two styles ---------------------------------

class DetAttentionExplicit(nn.Module):
    """Explicit attention (q·kᵀ, + bias, softmax, ·v) with a decomposed relative-position bias
    computed from q by einsum (MViTv2/ViTDet), over a [B, H, W, C] grid."""

    def __init__(self, dim: int, heads: int, grid: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_h = nn.Parameter(torch.randn(2 * grid - 1, dim // heads) * 0.1)
        self.rel_w = nn.Parameter(torch.randn(2 * grid - 1, dim // heads) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                   # [b, heads, hw, d]
        idx_h = torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1
        idx_w = torch.arange(w)[:, None] - torch.arange(w)[None, :] + w - 1
        r_q = q.reshape(b, self.heads, h, w, -1)
        bias_h = torch.einsum("bnhwd,hkd->bnhwk", r_q, self.rel_h[idx_h])
        bias_w = torch.einsum("bnhwd,wkd->bnhwk", r_q, self.rel_w[idx_w])
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = (attn + bias).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def window_unpartition(x: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    (hp, wp), (h, w) = padded, hw
    b = x.shape[0] // (hp * wp // size // size)
    x = x.view(b, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous()


class DetBlockExplicit(nn.Module):
    attention = DetAttentionExplicit

    def __init__(self, dim: int, heads: int, grid: int, window: int = 0):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = self.attention(dim, heads, window or grid)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.window:
            y, padded = window_partition(y, self.window)
        y = self.attn(y)
        if self.window:
            y = window_unpartition(y, self.window, padded, (h, w))
        x = x + y
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _ViTDet(nn.Module):
    """A conv patch embedding to a [B, H, W, C] grid, absolute position embedding, windowed and global
    blocks of `block` (dim, heads, grid, window; window 0 = global); returns the grid."""

    def __init__(self, block, img_size: int, patch: int, dim: int, heads: int, depth: int, window: int,
                 global_blocks: tuple[int, ...]):
        super().__init__()
        grid = img_size // patch
        self.img_size = img_size
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, grid, grid, dim) * 0.02)
        self.blocks = nn.ModuleList(block(dim, heads, grid, 0 if i in global_blocks else window) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return x


class ViTDetExplicit(_ViTDet):
    """ViTDet in the explicit style: windowed blocks on a grid padded to a multiple of the window and
    partitioned by view/permute, global blocks, all with decomposed relative-position bias from q."""

    def __init__(self, img_size: int = 96, patch: int = 8, dim: int = 64, heads: int = 4, depth: int = 4,
                 window: int = 5, global_blocks: tuple[int, ...] = (1, 3)):
        super().__init__(DetBlockExplicit, img_size, patch, dim, heads, depth, window, global_blocks)

class DetAttentionSDPA(nn.Module):
    """SDPA with a relative-position bias precomputed from a learned table (one value per head and
    relative offset, Swin-style): the bias depends on positions only, never on the tokens' values."""

    def __init__(self, dim: int, heads: int, side: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * side - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
        offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + side - 1
        self.register_buffer("index", offsets[..., 0] * (2 * side - 1) + offsets[..., 1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B', n, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        bias = self.table[self.index].permute(2, 0, 1)  # [heads, n, n]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DetBlockSDPA(DetBlockExplicit):
    """The same block with SDPA attention and windows cut by unfold (no padding)."""

    attention = DetAttentionSDPA

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C], H and W multiples of the window
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window:
            s = self.window
            windows = y.unfold(1, s, s).unfold(2, s, s)                  # [B, h/s, w/s, C, s, s]
            y = self.attn(windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, s * s, c))
            y = y.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        else:
            y = self.attn(y.reshape(b, h * w, c)).view(b, h, w, c)
        x = x + y
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTDetSDPA(_ViTDet):
    """ViTDet in the fused style: SDPA everywhere, precomputed relative-position biases, windows cut
    with `unfold` (the grid a multiple of the window), a global block every other block."""

    def __init__(self, img_size: int = 96, patch: int = 8, dim: int = 64, heads: int = 4, depth: int = 4,
                 window: int = 4, global_blocks: tuple[int, ...] = (1, 3)):
        super().__init__(DetBlockSDPA, img_size, patch, dim, heads, depth, window, global_blocks)
