"""Triton kernels for the GPU: a gate's scoring and its gather with reference update, and a gathered linear
that writes its rows straight into a buffer.

Each is a `torch.library.custom_op` with a fake implementation (`eventful_fx::token_distance`,
`eventful_fx::gate_take`, `eventful_fx::gathered_linear_into`), so a graph under `torch.compile` keeps
it whole (it is already fused), and each has a torch reference named like it with `_reference` after.
Eager PyTorch runs a gate as six kernels (subtract, norm, sort, gather, reference write, score reset);
with these it runs three (the sort stays PyTorch's), each row read once. `TokenGate` uses them on CUDA
tensors where Triton is installed (`enabled`); on the CPU they run only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before this module is imported), which is how the tests check them. The
gathered linear is not in the rewritten graphs yet: `benchmarks/bench_gpu.py` times it against
`F.linear` and an index copy on a lent GPU, and a pass fusing a gated linear with the buffer it feeds
waits for that number (no GPU has been lent so far).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without it
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_C = 256  # channels a program reads per step (ViT-B's 768 in three)
ENABLED = True  # False: gates run PyTorch's ops on every device (`benchmarks/bench_gpu.py` times both)


def enabled(x: Tensor) -> bool:
    """Whether a gate on x runs these kernels: CUDA (or the interpreter, for tests) with Triton installed."""
    return ENABLED and triton is not None and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def token_distance_reference(x: Tensor, ref: Tensor, streams: int) -> Tensor:
    return torch.linalg.vector_norm((x - ref.view(x.shape)).float(), dim=-1).view(streams, -1)


def gate_take_reference(x: Tensor, ref: Tensor, rows: Tensor, distance: Tensor) -> Tensor:
    selected = x.index_select(0, rows)
    ref.view(x.shape).index_copy_(0, rows, selected)
    distance.view(-1).index_fill_(0, rows, 0.0)
    return selected


def gathered_linear_into_reference(a: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, out: Tensor) -> None:
    out.index_copy_(0, rows, torch.nn.functional.linear(a, weight, bias).to(out.dtype))


if triton is not None:
    @triton.jit
    def _token_distance_kernel(x_ptr, ref_ptr, out_ptr, channels, x_stride, ref_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, channels, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < channels
            x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(ref_ptr + row * ref_stride + offs, mask=mask, other=0.0).to(tl.float32)
            acc += (x - r) * (x - r)
        tl.store(out_ptr + row, tl.sqrt(tl.sum(acc, axis=0)))

    @triton.jit
    def _gate_take_kernel(x_ptr, ref_ptr, rows_ptr, sel_ptr, dist_ptr, channels, x_stride, ref_stride,
                          BLOCK: tl.constexpr):
        m = tl.program_id(0)
        row = tl.load(rows_ptr + m)
        for start in range(0, channels, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < channels
            x = tl.load(x_ptr + row * x_stride + offs, mask=mask)
            tl.store(sel_ptr + m * channels + offs, x, mask=mask)
            tl.store(ref_ptr + row * ref_stride + offs, x, mask=mask)
        tl.store(dist_ptr + row, 0.0)

    @triton.jit
    def _gathered_linear_into_kernel(a_ptr, w_ptr, b_ptr, rows_ptr, out_ptr, m_rows, n_out, k_in,
                                     a_stride, w_stride, out_stride, HAS_BIAS: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, k_in, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_m[:, None] * a_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < m_rows) & (offs_k[None, :] < k_in), other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * w_stride + offs_k[:, None],
                        mask=(offs_n[None, :] < n_out) & (offs_k[:, None] < k_in), other=0.0)
            acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < n_out, other=0.0).to(tl.float32)[None, :]
        rows = tl.load(rows_ptr + offs_m, mask=offs_m < m_rows, other=0)
        tl.store(out_ptr + rows[:, None] * out_stride + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < m_rows) & (offs_n[None, :] < n_out))

    # the state (ref, distance) is passed whole and contiguous, never as a view: what a traced graph
    # mutates in place must be the tensor it holds
    @torch.library.custom_op("eventful_fx::token_distance", mutates_args=())
    def token_distance(x: Tensor, ref: Tensor, streams: int) -> Tensor:
        """||x - ref|| per row of x [R, C] (channels unit-strided) against a contiguous ref of R rows, in
        float32 [streams, R / streams]."""
        out = torch.empty(streams, x.shape[0] // streams, dtype=torch.float32, device=x.device)
        if x.shape[0]:
            _token_distance_kernel[(x.shape[0],)](
                x, ref, out, x.shape[1], x.stride(0), x.shape[1], BLOCK=BLOCK_C)
        return out

    @torch.library.custom_op("eventful_fx::gate_take", mutates_args=("ref", "distance"))
    def gate_take(x: Tensor, ref: Tensor, rows: Tensor, distance: Tensor) -> Tensor:
        """x's `rows` [M] of x [R, C], written into the contiguous ref of R rows as the new reference, their
        entries of the contiguous distance (R) set to 0; returns them [M, C]. A repeated row writes the
        same values twice."""
        selected = torch.empty(rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        if rows.shape[0]:
            _gate_take_kernel[(rows.shape[0],)](
                x, ref, rows, selected, distance, x.shape[1], x.stride(0), x.shape[1], BLOCK=BLOCK_C)
        return selected

    @torch.library.custom_op("eventful_fx::gathered_linear_into", mutates_args=("out",))
    def gathered_linear_into(a: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, out: Tensor) -> None:
        """out[rows[m]] = a[m] @ weight.T + bias: a linear on the selected rows a [M, K] whose results land
        in their tokens' rows of a buffer out [R, N] (one pass instead of a GEMM and an index copy)."""
        m_rows, k_in = a.shape
        n_out = weight.shape[0]
        if m_rows == 0:
            return
        block_m, block_n, block_k = 32, 64, 32
        grid = (triton.cdiv(m_rows, block_m), triton.cdiv(n_out, block_n))
        _gathered_linear_into_kernel[grid](
            a, weight, bias if bias is not None else a, rows, out, m_rows, n_out, k_in,
            a.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)

    @token_distance.register_fake
    def _(x: Tensor, ref: Tensor, streams: int) -> Tensor:
        return x.new_empty(streams, x.shape[0] // streams, dtype=torch.float32)

    @gate_take.register_fake
    def _(x: Tensor, ref: Tensor, rows: Tensor, distance: Tensor) -> Tensor:
        return x.new_empty(rows.shape[0], x.shape[1])

    @gathered_linear_into.register_fake
    def _(a: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, out: Tensor) -> None:
        return None
