"""Token buffer: the full output of a gated region, kept across frames.

Owns the [B, N, *C] tensor into which each frame's freshly computed tokens are written.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .gate import flat_token_index, move_rows
from .state import StatefulOp, decode_tokens, encode_tokens, tensor_bytes


class TokenBuffer(StatefulOp):
    """forward(fresh [R, k, *C], idx [B, k]) -> full [R, N, *C], with R a multiple of B.

    Row r of `fresh` belongs to stream r // (R / B) (attention heads give several rows per
    stream, all on their stream's tokens). Writes in place and returns the internal tensor
    itself (no copy): it is overwritten by the next call, so a caller that keeps a frame's
    output must clone it. Duplicate indices carry identical data (gate padding), so the
    write order does not matter. With a `state_dtype` other than the tokens' dtype the
    buffer is kept in that dtype and each call returns a converted copy (unrounded where every
    token is fresh: a flush, budget 1). `torch.int8` keeps one float32 scale per token beside it
    (`encode_tokens`): a quarter of float32.
    """

    def __init__(self, num_tokens: int, state_dtype: torch.dtype | None = None, neighbour_reuse: bool = False) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.state_dtype = state_dtype
        # its gate may move rows (neighbour reuse): their copy is counted on every call, for all N (worst case)
        self.neighbour_reuse = neighbour_reuse
        self._full: Tensor | None = None
        self._scale: Tensor | None = None  # [R, N] per-token scales of an int8 state

    def reset(self, streams: Sequence[int] | None = None) -> None:
        # a per-stream reset needs nothing here: the gate's flush rewrites every token of the stream
        if streams is None:
            self._full = self._scale = None

    def state_bytes(self) -> int:
        return tensor_bytes(self._full, self._scale)

    def stream_state(self) -> dict:
        return {"full": self._full, "scale": self._scale}

    def load_stream_state(self, state: dict) -> None:
        self._full, self._scale = state["full"], state.get("scale")

    def holds(self, fresh: Tensor) -> bool:
        """Whether it holds a full value that tokens like `fresh` [R, k, *C] can be written into (else the
        next call starts from zeros: only a call writing every token then returns a whole value)."""
        full = self._full
        return full is not None and full.shape[0] == fresh.shape[0] and full.shape[2:] == fresh.shape[2:] \
            and full.dtype == (self.state_dtype or fresh.dtype) and full.device == fresh.device

    def forward(self, fresh: Tensor, idx: Tensor, moves: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`moves`: the gate's reference moves on this call (`TokenGate.moves`), applied before the write."""
        batch, k = idx.shape
        rows, token_shape, fresh_dtype = fresh.shape[0], fresh.shape[2:], fresh.dtype
        if rows % batch:
            raise ValueError(f"TokenBuffer: {rows} rows of fresh tokens do not split into {batch} streams")
        full, dtype = self._full, self.state_dtype or fresh.dtype
        if not self.holds(fresh):
            full = self._full = fresh.new_zeros(rows, self.num_tokens, *token_shape, dtype=dtype)
            self._scale = fresh.new_zeros(rows, self.num_tokens, dtype=torch.float32) if dtype == torch.int8 else None
        elif moves is not None:
            move_rows(full.view(rows * self.num_tokens, *token_shape), moves, self.num_tokens, rows // batch)
            if self._scale is not None:
                move_rows(self._scale.view(-1), moves, self.num_tokens, rows // batch)
        moved = full.numel() if self.neighbour_reuse else 0
        if dtype == fresh_dtype:
            self._write(full, fresh, idx)
            self.overhead_macs = fresh.numel() + moved
            return full
        data, scale = encode_tokens(fresh, dtype)
        self._write(full, data, idx)
        if scale is not None:
            self._write(self._scale, scale, idx)
        out = decode_tokens(full, self._scale, fresh_dtype)
        self.overhead_macs = fresh.numel() + full.numel() + moved
        if k == self.num_tokens:
            # every token is fresh (a flush, budget 1): they go out unrounded, so those frames stay exact.
            # Not below: a token returned unrounded now and rounded on a repeated frame would look changed
            self._write(out, fresh, idx)
            self.overhead_macs += fresh.numel()
        return out

    def _write(self, full: Tensor, fresh: Tensor, idx: Tensor) -> None:
        batch, k = idx.shape
        rows, token_shape = fresh.shape[0], fresh.shape[2:]
        if batch == 1:  # one stream: write along the token axis, straight from a strided source
            full.index_copy_(1, idx[0], fresh)
        else:
            if rows != batch:
                idx = idx.repeat_interleave(rows // batch, 0)
            full.view(rows * self.num_tokens, *token_shape).index_copy_(
                0, flat_token_index(idx, self.num_tokens), fresh.reshape(rows * k, *token_shape))
