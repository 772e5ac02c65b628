"""The three ways an attention site runs on a gated frame: dense, query-gated, incremental.

All take SDPA's layout ([B, H, N, d]) and arguments (`attn_mask` additive or bool,
broadcastable to [B, H, Nq, N]; `scale` defaulting to 1/sqrt(d)). `IncrementalAttention`
owns the caches of the paper's eventful attention; the other two hold no state.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.utils.flop_counter import bmm_flop, flop_registry, register_flop_formula, sdpa_flop_count

from .buffer import TokenBuffer
from .gate import gather_rows, gather_tokens
from .state import StatefulOp, tensor_bytes

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:  # torch 2.14 counts the GPU kernels of SDPA, not the CPU one
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)
if torch.ops.aten.baddbmm_ not in flop_registry:  # incremental attention's in-place update of U
    @register_flop_formula(torch.ops.aten.baddbmm_)
    def _baddbmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return bmm_flop(a_shape, b_shape)


def _batch_size(*tensors: Tensor) -> int:
    return math.prod(torch.broadcast_shapes(*(t.shape[:-2] for t in tensors)))


def _only_plain_attention(mode: str, dropout_p: float, is_causal: bool) -> None:
    if is_causal:
        raise NotImplementedError(
            f"{mode}: is_causal is not supported on gated attention; pass an explicit attn_mask "
            "or run this site with DenseAttention")
    if dropout_p:
        raise NotImplementedError(f"{mode}: dropout_p > 0 (training-mode dropout) is not supported")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask


class DenseAttention(StatefulOp):
    """F.scaled_dot_product_attention on the full (buffered) q, k, v."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                scale: float | None = None, *, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
        self.matmul_macs = _batch_size(q, k, v) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


class QueryGatedAttention(StatefulOp):
    """Attention of the selected queries only, against the full buffered keys and values.

    forward(q_sel [B, H, kq, d], k, v [B, H, N, d], idx [B, kq]) -> [B, H, kq, d]; the
    mask's query rows are gathered with idx.
    """

    def forward(self, q_sel: Tensor, k: Tensor, v: Tensor, idx: Tensor, attn_mask: Tensor | None = None,
                scale: float | None = None, *, dropout_p: float = 0.0, is_causal: bool = False,
                mask_rows_selected: bool = False) -> Tensor:
        """`mask_rows_selected`: attn_mask holds the selected queries' rows already (a bias computed
        from the queries on the gate's tokens), so it is not gathered."""
        _only_plain_attention("QueryGatedAttention", dropout_p, is_causal)
        self.matmul_macs = _batch_size(q_sel, k, v) * q_sel.shape[-2] * k.shape[-2] * (q_sel.shape[-1] + v.shape[-1])
        self.overhead_macs = 0
        if q_sel.shape[-2] == 0:
            return q_sel.new_empty(*q_sel.shape[:-1], v.shape[-1])
        if attn_mask is not None and not mask_rows_selected:
            if q_sel.ndim == 3:  # [B*H, k, d] queries (heads folded into the batch): [B, H, ...] for the gather
                rows = attn_mask.shape[0] if attn_mask.ndim == 3 else 1
                attn_mask = attn_mask.reshape(idx.shape[0] if rows > 1 else 1, -1, *attn_mask.shape[-2:])
                attn_mask = gather_rows(attn_mask, idx)
                attn_mask = attn_mask.expand(idx.shape[0], q_sel.shape[0] // idx.shape[0], *attn_mask.shape[-2:]) \
                    .flatten(0, 1)
            else:
                attn_mask = gather_rows(attn_mask, idx)
            self.overhead_macs = attn_mask.numel()
        return F.scaled_dot_product_attention(q_sel, k, v, attn_mask=attn_mask, scale=scale)


class IncrementalAttention(StatefulOp):
    """The paper's eventful self-attention: exact, at O(k·N·d) per frame.

    Caches Q, K, V, a per-row stabiliser m, E = exp(Q Kᵀ·scale + bias - m) [B, H, N, N],
    U = E V and s = E.sum(-1); the output is U / s. For the changed tokens J = idx it
    rewrites columns J of E and corrects U and s by the deltas of those columns, then
    recomputes rows J outright (with a fresh stabiliser). Rows that are never recomputed
    keep their old stabiliser, so in float32 a logit of theirs would have to grow by
    ~80 over their last row max before exp overflows.

    The first call after a reset is a flush: it must pass all N tokens. A per-stream reset
    needs nothing here, since the gate's flush passes every token of that stream, which
    rewrites all its rows.
    """

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self._cache: dict[str, Tensor] | None = None

    def reset(self, streams: Sequence[int] | None = None) -> None:
        if streams is None:
            self._cache = None

    def state_bytes(self) -> int:
        return tensor_bytes(*self._cache.values()) if self._cache else 0

    def stream_state(self) -> dict:
        return {"cache": self._cache}

    def load_stream_state(self, state: dict) -> None:
        self._cache = state["cache"]

    def forward(self, q_sel: Tensor, k_sel: Tensor, v_sel: Tensor, idx: Tensor, attn_mask: Tensor | None = None,
                scale: float | None = None, *, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
        _only_plain_attention("IncrementalAttention", dropout_p, is_causal)
        batch, heads, k, head_dim = q_sel.shape
        n, value_dim = self.num_tokens, v_sel.shape[-1]
        scale = head_dim ** -0.5 if scale is None else scale
        c = self._cache
        if c is None or c["V"].shape != (batch, heads, n, value_dim) or c["Q"].shape[-1] != head_dim \
                or c["V"].dtype != q_sel.dtype or c["V"].device != q_sel.device:
            if k != n:
                raise ValueError(
                    f"IncrementalAttention: the first call after a reset (or a change of shape, dtype or "
                    f"device) must pass all {n} tokens, got {k}")
            return self._flush(q_sel, k_sel, v_sel, idx, attn_mask, scale)
        self.matmul_macs = self.overhead_macs = 0
        if k == 0:
            return self._output()
        Q, K, V, E, U, s, m = (c[name] for name in "QKVEUsm")

        flat_rows = _flat_rows(idx, heads, n)
        columns = idx.view(batch, 1, 1, k).expand(batch, heads, n, k)
        v_old = V.view(-1, value_dim).index_select(0, flat_rows).view(batch, heads, k, value_dim)
        e_old = E.gather(-1, columns)
        for cache, fresh in ((Q, q_sel), (K, k_sel), (V, v_sel)):
            cache.view(-1, cache.shape[-1]).index_copy_(0, flat_rows, fresh.reshape(-1, cache.shape[-1]))

        # columns J: every row sees new keys and values there
        logits = torch.matmul(Q, k_sel.transpose(-1, -2)).mul_(scale)
        if attn_mask is not None:
            mask = _as_4d(attn_mask)
            logits.add_(_additive(mask if mask.shape[-1] == 1 else gather_tokens(mask, idx, dim=3), logits.dtype))
        e_new = logits.sub_(m).exp_()
        # padded duplicates of a token must enter the sums once
        once = _first_occurrence(idx).to(e_new.dtype).view(batch, 1, 1, k)
        U_flat = U.view(batch * heads, n, value_dim)
        U_flat.baddbmm_((e_new * once).view(-1, n, k), v_sel.reshape(-1, k, value_dim))
        U_flat.baddbmm_((e_old * once).view(-1, n, k), v_old.view(-1, k, value_dim), alpha=-1)
        s.add_(((e_new - e_old) * once).sum(-1, keepdim=True))
        E.scatter_(-1, columns, e_new)

        # rows I = J: the changed queries, recomputed whole with a fresh stabiliser
        row_logits = torch.matmul(q_sel, K.transpose(-1, -2)).mul_(scale)
        if attn_mask is not None:
            row_logits.add_(_additive(gather_rows(attn_mask, idx), row_logits.dtype))
        row_m, row_e, row_u, row_s = _softmax_parts(row_logits, V)
        for cache, fresh in ((E, row_e), (U, row_u), (s, row_s), (m, row_m)):
            cache.view(-1, cache.shape[-1]).index_copy_(0, flat_rows, fresh.view(-1, cache.shape[-1]))

        bh = batch * heads
        self.matmul_macs = bh * n * k * (2 * head_dim + 3 * value_dim)
        self.overhead_macs = bh * k * (3 * n + 2 * head_dim + 3 * value_dim + 2)
        return self._output()

    def _flush(self, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
        batch, heads, n, _ = q.shape
        # idx may list the tokens in any order (a permutation): put them in token order first
        flat_rows = _flat_rows(idx, heads, n)
        Q, K, V = (torch.empty(batch, heads, n, t.shape[-1], dtype=t.dtype, device=t.device) for t in (q, k, v))
        for cache, fresh in ((Q, q), (K, k), (V, v)):
            cache.view(-1, cache.shape[-1]).index_copy_(0, flat_rows, fresh.reshape(-1, cache.shape[-1]))
        logits = torch.matmul(Q, K.transpose(-1, -2)).mul_(scale)
        if attn_mask is not None:
            logits.add_(_additive(attn_mask, logits.dtype))
        m, E, U, s = _softmax_parts(logits, V)
        self._cache = dict(Q=Q, K=K, V=V, E=E, U=U, s=s, m=m)
        self.matmul_macs = batch * heads * n * n * (q.shape[-1] + v.shape[-1])
        self.overhead_macs = q.numel() + k.numel() + v.numel()
        return self._output()

    def _output(self) -> Tensor:
        s = self._cache["s"]
        # a row masked everywhere has U = s = 0 and, like SDPA, outputs 0
        return self._cache["U"] / s.masked_fill(s == 0, 1)


def _flat_rows(idx: Tensor, heads: int, num_tokens: int) -> Tensor:
    """idx [B, k] -> rows (b*H + h)*N + idx[b, j] of a [B*H*N, ...] flattened cache."""
    batch = idx.shape[0]
    head_offsets = torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * num_tokens
    return (idx.unsqueeze(1) + head_offsets).reshape(-1)


def _as_4d(mask: Tensor) -> Tensor:
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def _softmax_parts(logits: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stabiliser, unnormalised weights, weighted values and row sums of softmax(logits) @ values."""
    m = logits.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0)  # a row masked everywhere: exp(-inf - 0) = 0, no nan
    e = (logits - m).exp_()
    return m, e, torch.matmul(e, values), e.sum(-1, keepdim=True)


def _first_occurrence(idx: Tensor) -> Tensor:
    """[B, k] bool: True at the first slot holding each token (no host sync)."""
    sorted_idx, order = idx.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    return torch.empty_like(first).scatter_(1, order, first)


ROW_CHUNK = 16  # query rows per packed chunk of `RowGatedAttention`


class RowGatedAttention(StatefulOp):
    """Query-gated attention for queries that cannot be carried as a token subset: windowed attention.

    A window partition moves the windows into SDPA's batch axes (SAM: q [B·windows·heads, n, d]), so
    the selected tokens' queries are rows spread over many batch entries. Each selected token's rows
    (one per head) are recomputed against the keys and values of their own batch entry (their window),
    packed in chunks of up to ROW_CHUNK rows of one entry, all in one SDPA call; every other row keeps its
    output, as query-gated attention keeps the contexts of the queries it skips. The full output is
    state, in a `TokenBuffer` over the rows (`rows` of them, in the state dtype).

    forward(q [*E, n, d], k, v [*E, m, d], idx [B, k], attn_mask, scale) -> [*E, n, dv], full.
    `rows_of` [N, R]: the first stream's flat query rows (batch entry · n + position) of each of the
    gate's N tokens; stream b's rows follow at b · (rows per stream). A call with no output kept (the
    first, or after a reset) or where every stream selects every token computes every row in one
    dense call (packing all rows made budget 1.0 on SAM-B at 1024 1.7x slower).
    """

    def __init__(self, rows_of: Tensor, rows: int, state_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rows_of = rows_of
        self.output = TokenBuffer(rows, state_dtype)  # the full output [1, rows, dv]: all of the op's state

    def forward(self, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, attn_mask: Tensor | None = None,
                scale: float | None = None, *, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
        _only_plain_attention("RowGatedAttention", dropout_p, is_causal)
        entries_shape, (n, head_dim), value_dim = q.shape[:-2], q.shape[-2:], v.shape[-1]
        entries, keys = math.prod(entries_shape), k.shape[-2]
        rows_total = entries * n
        batch, count = idx.shape
        every_row = not self.output.holds(q.new_empty(1, 0, value_dim))
        if not every_row and count == len(self.rows_of):  # a flush or budget 1: every stream takes every token?
            every_row = bool((idx.sort(dim=1).values == torch.arange(count, device=idx.device)).all())
        if every_row:
            full = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            self.output(full.reshape(1, rows_total, value_dim), torch.arange(rows_total, device=q.device)[None])
            self.matmul_macs, self.overhead_macs = entries * n * keys * (head_dim + value_dim), 0
            return full
        self.rows_of = rows_of = self.rows_of.to(q.device)
        per_stream = rows_total // batch
        rows = (rows_of[idx] + (torch.arange(batch, device=q.device) * per_stream).view(batch, 1, 1)).reshape(-1)
        if rows.numel() == 0:
            self.matmul_macs = self.overhead_macs = 0
            return self.output(q.new_empty(1, 0, value_dim), rows[None]).view(*entries_shape, n, value_dim)
        entry, position = rows // n, rows % n
        # each batch entry's selected rows go to chunks of up to `cap` rows, every chunk with its entry's keys:
        # padding to the fullest entry instead cost 2.2x the rows' own work on SAM at 320 px (3 of 4 windows)
        per_entry = torch.bincount(entry, minlength=entries)
        cap = min(ROW_CHUNK, int(per_entry.max()))  # the host syncs: chunk size, then chunk count
        chunks_of = (per_entry + cap - 1) // cap
        first_chunk = torch.cumsum(chunks_of, 0) - chunks_of
        order = torch.argsort(entry, stable=True)
        rank = torch.empty_like(entry)
        rank[order] = torch.arange(len(entry), device=q.device) - (torch.cumsum(per_entry, 0) - per_entry)[entry[order]]
        chunk, slot = first_chunk[entry] + rank // cap, rank % cap
        chunk_entry = torch.repeat_interleave(torch.arange(entries, device=q.device), chunks_of)
        chunks = len(chunk_entry)
        q_packed = q.new_zeros(chunks, cap, head_dim)
        q_packed[chunk, slot] = q.reshape(entries, n, head_dim)[entry, position]
        k_packed = k.expand(*entries_shape, keys, k.shape[-1]).reshape(entries, keys, -1).index_select(0, chunk_entry)
        v_packed = v.expand(*entries_shape, keys, value_dim).reshape(entries, keys, -1).index_select(0, chunk_entry)
        mask = None
        if attn_mask is not None:
            mask = q.new_zeros(chunks, cap, keys)
            mask[chunk, slot] = _mask_rows(_additive(attn_mask, q.dtype), entries_shape, entry, position, keys)
        fresh = F.scaled_dot_product_attention(q_packed, k_packed, v_packed, attn_mask=mask, scale=scale)[chunk, slot]
        self.matmul_macs = chunks * cap * keys * (head_dim + value_dim)
        # gathers of q, mask and fresh rows, and the keys and values each chunk reads (`output` counts its writes)
        self.overhead_macs = len(rows) * (head_dim + value_dim + (keys if mask is not None else 0)) + \
            chunks * keys * (head_dim + value_dim)
        return self.output(fresh.unsqueeze(0), rows[None]).view(*entries_shape, n, value_dim)


def _mask_rows(mask: Tensor, entries_shape: torch.Size, entry: Tensor, position: Tensor, keys: int) -> Tensor:
    """Rows (entry, position) of a mask broadcastable to [*entries_shape, n, keys] -> [L, keys], never
    materialising the broadcast (a bias shared by every window stays one table)."""
    while mask.ndim < len(entries_shape) + 2:
        mask = mask.unsqueeze(0)
    coords = torch.unravel_index(entry, tuple(entries_shape)) if len(entries_shape) else ()
    index = tuple(c if mask.shape[i] > 1 else torch.zeros_like(c) for i, c in enumerate(coords))
    index += (position if mask.shape[-2] > 1 else torch.zeros_like(position),)
    return mask[index].expand(len(entry), keys)
