"""Token gate: picks the tokens of each stream that changed enough to be recomputed.

Owns the reference copy of its input and the per-stream flush bookkeeping, plus the
token-indexing helpers (`gather_tokens`, `gather_rows`) that gated regions use to index
per-token constants and attention masks with the gate's indices.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import triton_kernels
from .policy import Policy
from .state import StatefulOp, decode_tokens, encode_tokens, tensor_bytes


def flat_token_index(idx: Tensor, num_tokens: int) -> Tensor:
    """[B, k] token indices -> [B*k] row indices into a [B*N, ...] flattened tensor."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * num_tokens
    return (idx + offsets).reshape(-1)


def gather_tokens(x: Tensor, idx: Tensor, dim: int = 1) -> Tensor:
    """Index the token axis `dim` of x [1 or B, ...] with idx [B, k] (batch 1 broadcasts to B)."""
    dim = dim % x.ndim
    if dim == 0:
        raise ValueError("gather_tokens: dim 0 is the batch axis, not a token axis")
    batch, k = idx.shape
    if x.shape[0] == 1:
        # one shared table: a single index_select, then split the flat index into (B, k)
        return x[0].index_select(dim - 1, idx.reshape(-1)).unflatten(dim - 1, (batch, k)).movedim(dim - 1, 0)
    if x.shape[0] != batch:
        raise ValueError(f"gather_tokens: batch {x.shape[0]} of x does not broadcast to {batch}")
    if dim == 1:
        return x.flatten(0, 1).index_select(0, flat_token_index(idx, x.shape[1])).unflatten(0, (batch, k))
    streams = torch.arange(batch, device=idx.device).unsqueeze(1)
    # advanced indices on dims 0 and `dim` put the (B, k) axes first
    return x[(streams,) + (slice(None),) * (dim - 1) + (idx,)].movedim(1, dim)


def gather_rows(mask: Tensor, idx: Tensor) -> Tensor:
    """Query rows idx [B, k] of an attention bias/mask [(1|B), (1|H), N, M] -> [B, (1|H), k, M].

    A mask with fewer dims is read as broadcast on the leading ones; a row axis of size 1
    already broadcasts over queries and is returned unchanged.
    """
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] == 1:
        return mask
    return gather_tokens(mask, idx, dim=2)


def gather_table(table: Tensor, axes: Sequence[int], positions: Sequence[int], idx: Tensor,
                 run_sizes: Sequence[int]) -> Tensor:
    """A per-token table's rows for the selected tokens idx [B, k] of a token run of `run_sizes`.

    Axis `axes[i]` of the table is indexed by coordinate `positions[i]` of the run (a grid
    run (H, W) has coordinates idx // W and idx % W: a relative-position table per row or
    column); the (adjacent) indexed axes become [B, k] at axes[0].
    """
    strides = [math.prod(run_sizes[p + 1:]) for p in range(len(run_sizes))]
    index: list = [slice(None)] * table.ndim
    for axis, p in zip(axes, positions):
        index[axis] = torch.div(idx, strides[p], rounding_mode="floor") % run_sizes[p]
    return table[tuple(index)]


def score_dtype(x_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype a gate keeps its per-token distances in: float32, or wider when its input or state is."""
    return torch.promote_types(torch.promote_types(x_dtype, state_dtype), torch.float32)


def _token_distances(x: Tensor, ref: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """||x - ref|| per token of [B, n, ...] tensors, in `dtype` (`scale`: ref's per-token scales, int8)."""
    if x.dtype != ref.dtype:  # the reference holds x rounded to the state dtype: compare like with like
        x, ref = decode_tokens(*encode_tokens(x, ref.dtype), dtype), decode_tokens(ref, scale, dtype)
    return torch.linalg.vector_norm((x - ref).reshape(*x.shape[:2], -1), dim=-1, dtype=dtype)


def _rows(x: Tensor, channels: int) -> Tensor:
    """x [B, N, *C] as rows [B*N, C] with unit-strided channels (what the Triton kernels index)."""
    rows = x.reshape(-1, channels)
    return rows if rows.stride(1) == 1 else rows.contiguous()


SKETCH_DIM = 32  # channels neighbour matching ranks candidates on (evenly spaced; the full channels then confirm)


def move_rows(flat: Tensor, moves: tuple[Tensor, Tensor], num_tokens: int, rows_per_stream: int = 1) -> None:
    """Copy token rows of flat [B*R*N, ...] from moves[1] to moves[0] (flat stream-token indices over [B, N]).

    Every row a stream holds (R: one per head) moves with its token. Reads happen before writes.
    """
    to, frm = moves
    if rows_per_stream > 1:
        heads = torch.arange(rows_per_stream, device=to.device)

        def rows(i: Tensor) -> Tensor:
            first_row = (i // num_tokens * rows_per_stream).unsqueeze(1)
            return ((first_row + heads) * num_tokens + (i % num_tokens).unsqueeze(1)).reshape(-1)
        to, frm = rows(to), rows(frm)
    flat.index_copy_(0, to, flat.index_select(0, frm))


def _rank(score: Tensor) -> Tensor:
    # a stable sort breaks ties (e.g. unchanged tokens, all at 0) towards the lower token
    # index, so a stream's choice never depends on the batch it runs in; topk does not promise that
    return torch.sort(score, dim=1, descending=True, stable=True).indices


# Weight of a skipped token's staleness in the score of a gate in front of query-gated attention.
# A token the gate skips keeps its attention output, computed over the keys and values of the frame
# it was last selected on; its own input score never sees that context move. Each frame moves the
# context by the change the gate lets through, sum(||x - ref|| over the selected tokens) / N; a
# token scores ||x - ref|| + w * (that motion summed over the frames since it was selected), with
# w = STALENESS_WEIGHT once the gate updates half its tokens, falling to 0 at a quarter
# (`staleness_weight`): where k is scarce it belongs to the tokens that changed. Static frames add
# nothing, so a still scene does not build up staleness. ViT-B/224 at budget 0.5 (every gate k/N
# ~ 1/2), all-token error: bikes 2.74% -> 2.2%, carphone (held out) 4.28% -> 4.0%, built-in clip
# 9.96% -> 9.9%; logits no worse (benchmarks/RESULTS.md, "What was tried", for the weights and
# forms measured).
STALENESS_WEIGHT, STALENESS_FROM, STALENESS_FULL = 0.1, 0.25, 0.5


def staleness_weight(count: int, num_tokens: int) -> float:
    """w of the staleness term for a gate keeping `count` of `num_tokens` tokens (see STALENESS_WEIGHT)."""
    ramp = (count / num_tokens - STALENESS_FROM) / (STALENESS_FULL - STALENESS_FROM)
    return STALENESS_WEIGHT * min(1.0, max(0.0, ramp))


class TokenGate(StatefulOp):
    """Selects, per stream, the tokens whose distance to the reference is largest.

    forward(x [B, N, *C], changed [B, c] | None) -> (idx [B, k] int64, selected [B, k, *C]).
    The reference is updated only at the selected tokens, so small changes accumulate until
    selected. `changed`, when given, promises that x moved only at those tokens since the
    last call: only they are scored again.
    All streams share one k per call (the largest count); a stream with fewer selected
    tokens repeats its first selected token (or, when it selects none, token 0 with its
    reference data), so recomputing padded slots rewrites values already held downstream.
    Threshold policies sync the host once per call to learn that k.

    `neighbours` [N, M] (column 0: the token itself) turns on neighbour reuse: each token is
    compared, on 32 evenly spaced channels, with the references of its M - 1
    candidates; where one is closer, also on the full channels, its reference is moved into
    the token's slot before the selection, and `moves` (to, from: flat indices over [B, N])
    tells the region's buffers to move their rows the same way (`move_rows`). A token the
    gate then skips takes its neighbour's results instead of its own older ones. Such a gate
    scores every token on every call (`changed` is not used). `state_dtype` stores
    the reference in another dtype (float16 halves it); x is rounded to it before scoring,
    so an unchanged token scores 0 whatever the dtype; scores are float32 or wider. int8 keeps a
    float32 scale per token beside the reference (`encode_tokens`).

    `refresh_stalest` (set by the rewrite on gates in front of query-gated attention) keeps
    per token the context motion it has missed since it was last selected, and under top-k
    adds it to its score (`STALENESS_WEIGHT`) when k is more than a quarter of the tokens.
    """

    def __init__(self, policy: Policy, always: Sequence[int] = (), state_dtype: torch.dtype | None = None,
                 neighbours: Tensor | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.neighbours = neighbours
        self.moves: tuple[Tensor, Tensor] | None = None  # the last call's reference moves
        self.last_idx: Tensor | None = None  # the tokens the last call selected, [B, k] (for pictures)
        self.state_dtype = state_dtype
        # tokens updated on every frame whatever their score: class and register tokens summarise
        # the whole image, so their small per-frame changes matter more than their size says
        self.always = tuple(always)
        self._always_idx: Tensor | None = None
        self.last_counts: Tensor | int = 0
        self._ref: Tensor | None = None
        self._ref_scale: Tensor | None = None  # [B, N] per-token scales of an int8 reference
        self._score: Tensor | None = None  # distance of the last call's input to the reference, per token
        self.refresh_stalest = False
        self._missed: Tensor | None = None  # [B, N] float32: context motion since each token was selected
        self._scored = 0
        self._pending_flush: set[int] = set()

    def reset(self, streams: Sequence[int] | None = None) -> None:
        if streams is None:
            self._ref = self._ref_scale = self._score = self._missed = None
            self._pending_flush.clear()
        else:
            self._pending_flush.update(int(s) for s in streams)

    def state_bytes(self) -> int:
        return tensor_bytes(self._ref, self._ref_scale, self._score, self._missed)

    def stream_state(self) -> dict:
        return {"ref": self._ref, "ref_scale": self._ref_scale, "score": self._score, "missed": self._missed,
                "pending_flush": sorted(self._pending_flush)}

    def load_stream_state(self, state: dict) -> None:
        self._ref, self._ref_scale, self._score = state["ref"], state.get("ref_scale"), state["score"]
        self._missed = state.get("missed")
        self._pending_flush = set(state["pending_flush"])

    def forward(self, x: Tensor, changed: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`changed` [B, c]: the only tokens where x can differ from the last call's x (None: any)."""
        batch, num_tokens = x.shape[:2]
        channels = math.prod(x.shape[2:])
        ref = self._ref
        self.moves = None
        if ref is None or ref.shape != x.shape or ref.dtype != (self.state_dtype or x.dtype) or ref.device != x.device:
            return self._flush_all(x)
        flushed, flush = self._take_flush(batch, x.device)

        if self.neighbours is not None:
            self._score = distance = self._match(x, ref, flush)
        else:
            self._score = distance = self._distance(x, ref, None if flush is not None else changed)
        score = distance
        if self.always:
            if self._always_idx is None or self._always_idx.device != x.device:
                self._always_idx = torch.tensor(self.always, device=x.device)
            # ...but only in streams where something changed: a repeated frame still updates nothing
            moved = (distance > getattr(self.policy, "threshold", 0.0)).any(1, keepdim=True)
            score = distance.index_copy(1, self._always_idx,
                                        torch.where(moved, math.inf, distance.index_select(1, self._always_idx)))
        count = self.policy.count(num_tokens)
        weight = staleness_weight(count, num_tokens) if self._missed is not None and count is not None else 0.0
        if weight:
            score = score + weight * self._missed
        if count is None:
            chosen = score > self.policy.threshold
            if flush is not None:
                chosen |= flush.unsqueeze(1)
            counts = chosen.sum(1)
            most, least = torch.stack([counts.max(), counts.min()]).tolist()  # the one host sync
            if most == 0:
                return self._select_nothing(x)
            k_call, ragged, any_empty = most, most != least, least == 0
            # a stable sort puts the chosen tokens first; a stream that chose none gets token 0 first
            ranking = torch.sort(chosen.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k_call]
        elif flush is None:
            if count == 0:
                return self._select_nothing(x)
            k_call, ragged, any_empty = count, False, False
            ranking = _rank(score)[:, :count]
        else:
            # flushed streams take all N tokens; the others keep their count and pad
            k_call = num_tokens
            ragged = count != num_tokens and len(flushed) < batch
            any_empty = ragged and count == 0
            counts = torch.where(flush, num_tokens, count)
            ranking = _rank(score)
        self.last_counts = counts if ragged else k_call

        idx = ranking
        if ragged:
            first = ranking[:, :1]
            if any_empty:
                first = first.masked_fill(counts.unsqueeze(1) == 0, 0)
            slot = torch.arange(k_call, device=x.device)
            idx = torch.where(slot < counts.unsqueeze(1), ranking, first)

        scale = self._ref_scale
        # under a threshold the staleness term is never read: no bookkeeping per frame for it
        pending = distance.sum(1, keepdim=True) if self._missed is not None and count is not None else None
        if scale is None and not any_empty and ref.dtype == x.dtype and triton_kernels.enabled(x):
            rows = idx[0] if batch == 1 else flat_token_index(idx, num_tokens)
            selected = triton_kernels.gate_take(_rows(x, channels), ref, rows, distance)
        else:
            selected = self._take(x, ref, idx, k_call, counts if any_empty else None)
            kept = distance[:, 0].clone() if any_empty else None
            distance.scatter_(1, idx, 0.0)
            if any_empty:  # token 0 of an empty stream kept its old reference, and its distance
                distance[:, 0] = torch.where(counts == 0, kept, distance[:, 0])
        if pending is not None:  # the change written this frame (each selected token once), per token
            self._missed.add_((pending - distance.sum(1, keepdim=True)) / num_tokens).scatter_(1, idx, 0.0)
        self.overhead_macs = self._scoring_macs(batch, num_tokens, channels) + 2 * batch * k_call * channels
        self.last_idx = idx
        return idx, selected.view(batch, k_call, *x.shape[2:])

    def _take(self, x: Tensor, ref: Tensor, idx: Tensor, k_call: int, counts: Tensor | None) -> Tensor:
        """The selected tokens of x [B, k, *C], written into the reference (`counts`: given when a stream
        selected none; its token 0 is then recomputed from the reference's data)."""
        batch, num_tokens = x.shape[:2]
        scale = self._ref_scale
        if batch == 1:  # one stream (never empty here): index the token axis directly
            selected = x[0].index_select(0, idx[0])
            data, data_scale = encode_tokens(selected[None], ref.dtype)
            ref[0].index_copy_(0, idx[0], data[0])
            if scale is not None:
                scale[0].index_copy_(0, idx[0], data_scale[0])
        else:
            flat_idx = flat_token_index(idx, num_tokens)
            ref_flat = ref.view(batch * num_tokens, *ref.shape[2:])
            selected = x.reshape(batch * num_tokens, *x.shape[2:]).index_select(0, flat_idx)
            if counts is not None:
                # an empty stream recomputes token 0 from what it was last computed from
                empty = (counts == 0).repeat_interleave(k_call).view(-1, *[1] * (x.ndim - 2))
                kept = decode_tokens(ref_flat.index_select(0, flat_idx)[None],
                                     None if scale is None else scale.view(-1).index_select(0, flat_idx)[None], x.dtype)
                selected = torch.where(empty, kept[0], selected)
            data, data_scale = encode_tokens(selected[None], ref.dtype)
            ref_flat.index_copy_(0, flat_idx, data[0])
            if scale is not None:
                scale.view(-1).index_copy_(0, flat_idx, data_scale[0])
        return selected

    def _scoring_macs(self, batch: int, num_tokens: int, channels: int) -> int:
        """Scoring's work: distances; with neighbour reuse also the candidates' distances on the sketch
        channels, the full-channel check and the reference moves (the last two counted for every token)."""
        if self.neighbours is None:
            return batch * self._scored * channels
        return batch * num_tokens * (3 * channels + self.neighbours.shape[1] * min(SKETCH_DIM, channels))

    def _match(self, x: Tensor, ref: Tensor, flush: Tensor | None) -> Tensor:
        """Move closer neighbours' references into place (sets `moves`); the distances [B, N] after the moves."""
        batch, num_tokens = x.shape[:2]
        self._scored = num_tokens
        dtype = score_dtype(x.dtype, ref.dtype)
        distance = _token_distances(x, ref, dtype, self._ref_scale)
        stored = ref
        if self._ref_scale is not None:  # match on values as the reference holds them
            ref, x = decode_tokens(ref, self._ref_scale, dtype), decode_tokens(*encode_tokens(x, ref.dtype), dtype)
        table = self.neighbours = self.neighbours.to(x.device)
        rows, refs = x.reshape(batch, num_tokens, -1), ref.reshape(batch, num_tokens, -1)
        channels = rows.shape[-1]
        step = max(1, channels // SKETCH_DIM)
        sketch_x, sketch_ref = (t[:, :, : step * SKETCH_DIM: step].to(dtype).contiguous() for t in (rows, refs))
        # squared distances up to the token's own norm: |candidate|^2 - 2 x.candidate (one small product per token)
        rows_of = (table.view(1, -1) + torch.arange(batch, device=x.device).view(-1, 1) * num_tokens).view(-1)
        candidates = sketch_ref.view(batch * num_tokens, -1).index_select(0, rows_of)
        dots = torch.bmm(candidates.view(batch * num_tokens, table.shape[1], -1), sketch_x.view(batch * num_tokens, -1, 1))
        norms = sketch_ref.square().sum(-1).view(-1).index_select(0, rows_of)
        nearest = (norms - 2 * dots.view(-1)).view(batch, num_tokens, -1).argmin(-1)  # [B, N]
        source = table.expand(batch, -1, -1).gather(2, nearest.unsqueeze(-1)).squeeze(-1)  # [B, N]
        own = torch.arange(num_tokens, device=x.device)
        moved = source != own
        if flush is not None:
            moved &= ~flush.unsqueeze(1)  # a flushed stream recomputes every token anyway
        stream, token = torch.nonzero(moved, as_tuple=True)
        if stream.numel() == 0:
            return distance
        to, frm = stream * num_tokens + token, stream * num_tokens + source[stream, token]
        flat_x, flat_ref = rows.reshape(batch * num_tokens, -1), refs.reshape(batch * num_tokens, -1)
        closer = _token_distances(flat_x.index_select(0, to)[None], flat_ref.index_select(0, frm)[None], dtype)[0]
        own_distance = distance.view(-1).index_select(0, to)
        better = closer < own_distance
        # a candidate that is not closer moves onto itself (a no-op copy): no second host sync to filter it out
        frm, closer = torch.where(better, frm, to), torch.where(better, closer, own_distance)
        move_rows(stored.view(batch * num_tokens, -1), (to, frm), num_tokens)
        for per_token in (self._ref_scale, self._missed):
            if per_token is not None:
                move_rows(per_token.view(-1), (to, frm), num_tokens)
        distance.view(-1).index_copy_(0, to, closer)
        self.moves = (to, frm)
        return distance

    def _flush_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, num_tokens = x.shape[:2]
        # a contiguous copy: the in-place writes on its flat view must land in the reference
        data, self._ref_scale = encode_tokens(x.detach(), self.state_dtype or x.dtype)
        self._ref = torch.empty_like(data, memory_format=torch.contiguous_format).copy_(data)
        self._pending_flush.clear()
        if self.always:  # made here, with the state, so that incremental frames find it (no recompile)
            self._always_idx = torch.tensor(self.always, device=x.device)
        self._score = torch.zeros(batch, num_tokens, dtype=score_dtype(x.dtype, self._ref.dtype), device=x.device)
        self._missed = torch.zeros(batch, num_tokens, dtype=torch.float32, device=x.device) \
            if self.refresh_stalest else None
        self.last_counts = num_tokens
        self.overhead_macs = x.numel()
        idx = self.last_idx = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
        return idx, x

    def _distance(self, x: Tensor, ref: Tensor, changed: Tensor | None) -> Tensor:
        """||x - ref|| per token [B, N]: in full, or at the `changed` tokens only, on the last call's distances.

        The reference moves only where tokens are selected (their distance is then 0) and x
        only at `changed`, so elsewhere the last call's distance still holds: a gate reading
        a buffer scores the k tokens written into it, not all N.
        """
        batch, num_tokens = x.shape[:2]
        last, dtype = self._score, score_dtype(x.dtype, ref.dtype)
        if changed is None or last is None or last.shape != (batch, num_tokens):
            self._scored = num_tokens
            if self._ref_scale is None and x.dtype == ref.dtype and dtype == torch.float32 \
                    and triton_kernels.enabled(x):
                return triton_kernels.token_distance(_rows(x, ref.numel() // (batch * num_tokens)), ref, batch)
            return _token_distances(x, ref, dtype, self._ref_scale)
        self._scored = changed.shape[1]
        if self._scored == 0:
            return last
        scale = None if self._ref_scale is None else gather_tokens(self._ref_scale, changed)
        moved = _token_distances(gather_tokens(x, changed), gather_tokens(ref, changed), dtype, scale)
        return last.scatter_(1, changed, moved)

    def _take_flush(self, batch: int, device: torch.device) -> tuple[list[int], Tensor | None]:
        pending = self._pending_flush
        self._pending_flush = set()
        if not pending:
            return [], None
        if not all(-batch <= s < batch for s in pending):
            raise IndexError(f"TokenGate.reset: stream indices {sorted(pending)} out of range for batch size {batch}")
        flushed = sorted({s % batch for s in pending})
        flush = torch.zeros(batch, dtype=torch.bool, device=device)
        for stream in flushed:  # scalar fills: unlike a copy from host memory, they never wait for the device
            flush[stream] = True
        return flushed, flush

    def _select_nothing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, num_tokens = x.shape[:2]
        self.last_counts = 0
        self.overhead_macs = self._scoring_macs(batch, num_tokens, math.prod(x.shape[2:]))
        idx = self.last_idx = torch.empty(batch, 0, dtype=torch.long, device=x.device)
        return idx, x.new_empty(batch, 0, *x.shape[2:])
