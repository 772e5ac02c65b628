"""StreamPool: many video streams, each with its own eventful state, run in batches of
whichever streams have a frame.

An `EventfulModule` runs a fixed batch of B streams per call: every call advances every
row's state. A server gets frames of an ever-changing set of streams, so this module owns
the mapping from stream ids to rows. Frames of p streams run as one batch on a module of
the next power-of-two batch size (padding rows repeat the first frame; their results are
dropped). A stream's state stays in its module's row while the same streams keep arriving
together (no copies in the steady state); when the set changes, the rows' states are
copied out per stream (`StatefulOp.stream_state`, sliced along the rows axis) and the
arriving streams' states copied in. A stream seen for the first time, or reset, starts
with a dense flush. Each stream's outputs are those of a batch-1 `EventfulModule` fed that
stream alone (the plan does not depend on the batch: tests/test_streams.py).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.utils._pytree as pytree

from .api import EventfulModule, _check_budget
from .api import compile as eventful_compile
from .runtime.state import StatefulOp

__all__ = ["StreamPool"]


def _take(value, batch: int, row: int, key: str = ""):
    """Row `row`'s share of one op's state for a batch of `batch` streams."""
    if isinstance(value, torch.Tensor):
        per_stream = value.shape[0] // batch
        return value[row * per_stream:(row + 1) * per_stream].clone()
    if isinstance(value, dict):
        return {k: _take(v, batch, row, k) for k, v in value.items()}
    if key == "pending_flush":  # stream indices of the batch: kept as "this stream is pending"
        return row in value
    return value


def _join(values: list, key: str = ""):
    """The inverse of `_take`: one state for the batch of streams `values` (row order)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values], k) for k in first}
    if key == "pending_flush":
        return [row for row, pending in enumerate(values) if pending]
    return first


class StreamPool:
    """Run frames of many streams, each keeping its own eventful state.

    `pool.run(frames, stream_ids)`: frames ``[p, ...]``, one per distinct stream id (any
    hashable); returns the model's outputs for those p frames. `close(id)` forgets a stream,
    `reset(id)` makes its next frame a dense flush. `max_batch` bounds the streams of one call.
    Options are those of `eventful_fx.compile`.
    """

    def __init__(self, model: torch.nn.Module, budget: float = 0.25, *, max_batch: int = 8, **options):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        _check_budget(budget)
        self.model, self.max_batch, self.options, self._budget = model, max_batch, options, budget
        self._modules: dict[int, EventfulModule] = {}
        self._rows: dict[int, list] = {}          # batch size -> the stream id in each row (None: free)
        self._where: dict[Hashable, int] = {}     # stream id -> the batch size whose module holds its state
        self._saved: dict[Hashable, dict] = {}    # stream id -> its state, while in no module
        self.last_stats = None

    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        _check_budget(value)
        self._budget = value
        for module in self._modules.values():
            module.budget = value

    @property
    def streams(self) -> list:
        """The ids of every stream with state (open streams)."""
        return [*self._where, *self._saved]

    def close(self, stream_id: Hashable) -> None:
        """Forget a stream's state (a later frame of the same id starts with a flush)."""
        self._saved.pop(stream_id, None)
        size = self._where.pop(stream_id, None)
        if size is not None:
            rows = self._rows[size]
            rows[rows.index(stream_id)] = None

    reset = close  # a stream with no state starts with a dense flush: the same thing

    def run(self, frames: torch.Tensor, stream_ids: Sequence[Hashable]):
        ids = list(stream_ids)
        if not isinstance(frames, torch.Tensor) or frames.ndim < 1 or frames.shape[0] != len(ids):
            raise ValueError(f"run: give one frame per stream id: {len(ids)} ids for frames of shape "
                             f"{tuple(getattr(frames, 'shape', ()))}")
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"run: stream ids must be distinct and at least one, got {ids}")
        if len(ids) > self.max_batch:
            raise ValueError(f"run: {len(ids)} streams in one call, max_batch is {self.max_batch}")
        size = 1 << (len(ids) - 1).bit_length()
        rows = ids + [None] * (size - len(ids))
        x = torch.cat([frames, frames[:1].expand(size - len(ids), *frames.shape[1:])]) if size > len(ids) else frames
        module = self._module(size)
        if self._rows.get(size) != rows:
            self._place(module, size, rows, x)
        out = module(x)
        self.last_stats = module.stats
        return pytree.tree_map_only(torch.Tensor, lambda t: t[:len(ids)].clone(), out)

    @torch.no_grad()
    def warm_up(self, frame: torch.Tensor) -> None:
        """Build every batch size's graph now (a capture each), not when traffic first needs it."""
        size = 1
        while True:
            module = self._module(size)
            if module.graph_module is None:
                self._evict(size)
                module(frame[None].expand(size, *frame.shape))
                module.reset()
            if size >= self.max_batch:
                break
            size *= 2

    # -- rows ---------------------------------------------------------------------------
    def _module(self, size: int) -> EventfulModule:
        if size not in self._modules:
            self._modules[size] = eventful_compile(self.model, budget=self._budget, **self.options)
            self._rows[size] = [None] * size
        return self._modules[size]

    @staticmethod
    def _ops(module: EventfulModule) -> dict[str, StatefulOp]:
        return {name: m for name, m in module.graph_module.named_modules() if isinstance(m, StatefulOp)}

    def _evict(self, size: int) -> None:
        """Copy the states of the streams in `size`'s module out of it, one per stream."""
        module, rows = self._modules[size], self._rows[size]
        if module.graph_module is not None and any(r is not None for r in rows):
            states = {name: op.stream_state() for name, op in self._ops(module).items()}
            for row, stream_id in enumerate(rows):
                if stream_id is not None:
                    self._saved[stream_id] = {name: _take(s, size, row) for name, s in states.items()}
                    del self._where[stream_id]
        self._rows[size] = [None] * size

    def _place(self, module: EventfulModule, size: int, rows: list, x: torch.Tensor) -> None:
        """Make `module`'s rows hold the states of the streams in `rows` (new ones flush)."""
        self._evict(size)
        for stream_id in rows:
            if stream_id in self._where:
                self._evict(self._where[stream_id])
        states = [self._saved.pop(s, None) if s is not None else None for s in rows]
        known = [s for s in states if s is not None]
        if known:
            if module.graph_module is None:
                with torch.no_grad():
                    module(x)  # the first call builds the graph (a flush of every row)
            ops = self._ops(module)
            # rows with no state (new streams, padding) borrow one and are flushed or ignored
            full = [s if s is not None else known[0] for s in states]
            for name, op in ops.items():
                op.load_stream_state(_join([s[name] for s in full]))
            new = [row for row, (s, stream_id) in enumerate(zip(states, rows)) if s is None and stream_id is not None]
            if new:
                module.reset(new)
        else:
            module.reset()
        self._rows[size] = rows
        self._where.update({s: size for s in rows if s is not None})
