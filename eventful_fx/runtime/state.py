"""The protocol every stateful runtime op follows: per-call cost counters, reset, memory.

The rewrite pass and the statistics read these attributes without knowing which op they
look at, so every op in `eventful_fx.runtime` derives from `StatefulOp`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class StatefulOp(nn.Module):
    """Protocol of every stateful runtime op.

    `matmul_macs`: multiply-accumulates of matrix products done on the last call.
    `overhead_macs`: gate scoring, gathers and writes of the last call, as MACs-equivalent
    element work (scoring N*C, a gather or write of k tokens k*C).
    Both are Python ints computed from shapes, so reading them never syncs the device.
    """

    matmul_macs: int
    overhead_macs: int

    def __init__(self) -> None:
        super().__init__()
        self.matmul_macs = 0
        self.overhead_macs = 0

    def reset(self, streams: Sequence[int] | None = None) -> None:
        """Forget the state: None = every stream; otherwise only these batch indices."""

    def state_bytes(self) -> int:
        return 0

    def stream_state(self) -> dict:
        """The state as tensors and plain values, for `EventfulModule.state_dict()` (stateless ops: empty)."""
        return {}

    def load_stream_state(self, state: dict) -> None:
        """Take back what `stream_state()` gave (state of the same op in the same graph)."""


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def encode_tokens(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens x [R, n, *C] in a state dtype: a cast, or for int8 the values over one float32 scale per
    token [R, n] (its largest magnitude / 127), so each token keeps its own range."""
    if dtype != torch.int8:
        return x.to(dtype), None
    # largest magnitude in one reduction (abs().amax() would first copy x); rounded in place: this runs per frame
    largest = torch.linalg.vector_norm(x.detach(), ord=math.inf, dim=tuple(range(2, x.ndim)), dtype=torch.float32)
    scale = largest.clamp_min(torch.finfo(torch.float32).tiny) / 127
    data = (x / scale.view(*scale.shape, *[1] * (x.ndim - 2))).round_().to(torch.int8)
    return data, scale


def decode_tokens(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The tokens `encode_tokens` kept, in `dtype`."""
    if scale is None:
        return data.to(dtype)
    return data.to(dtype).mul_(scale.view(*scale.shape, *[1] * (data.ndim - scale.ndim)).to(dtype))
