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
