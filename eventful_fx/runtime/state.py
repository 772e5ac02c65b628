"""The protocol every stateful runtime op follows: per-call cost counters, reset, memory.

The rewrite pass and the statistics read these attributes without knowing which op they
look at, so every op in `eventful_fx.runtime` derives from `StatefulOp`.
"""
from __future__ import annotations

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
