"""Token buffer: the full output of a gated region, kept across frames.

Owns the [B, N, *C] tensor into which each frame's freshly computed tokens are written.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .gate import flat_token_index
from .state import StatefulOp, tensor_bytes


class TokenBuffer(StatefulOp):
    """forward(fresh [B, k, *C], idx [B, k]) -> full [B, N, *C].

    Writes in place and returns the internal tensor itself (no copy): it is overwritten by
    the next call, so a caller that keeps a frame's output must clone it. Duplicate
    indices carry identical data (gate padding), so the write order does not matter.
    """

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self._full: Tensor | None = None

    def reset(self, streams: Sequence[int] | None = None) -> None:
        # a per-stream reset needs nothing here: the gate's flush rewrites every token of the stream
        if streams is None:
            self._full = None

    def state_bytes(self) -> int:
        return tensor_bytes(self._full)

    def forward(self, fresh: Tensor, idx: Tensor) -> Tensor:
        batch, k = idx.shape
        token_shape = fresh.shape[2:]
        full = self._full
        if (full is None or full.shape[0] != batch or full.shape[2:] != token_shape
                or full.dtype != fresh.dtype or full.device != fresh.device):
            full = self._full = fresh.new_zeros(batch, self.num_tokens, *token_shape)
        full.view(batch * self.num_tokens, *token_shape).index_copy_(
            0, flat_token_index(idx, self.num_tokens), fresh.reshape(batch * k, *token_shape))
        self.overhead_macs = fresh.numel()
        return full
