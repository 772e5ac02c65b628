"""Linear layers of gated regions: the fastest kernel for k-row inputs.

A gated region multiplies k rows by the model's weights, k well below N. On CPU, PyTorch's
default GEMM (MKL) has a per-call cost that does not shrink with the rows (as if it packed
the weight on every call: 4.1 ms at 43 rows against 22 ms at 577 for ViT-B's fc1), while
oneDNN with a weight packed once scales with the rows (2.0 ms against 25 ms); at N rows MKL
is often the faster one again. Which wins depends on the shape, the row count, the thread count and the
CPU, so `SparseLinear` times both the first time it meets a (shape, rows, threads) bucket
and keeps the winner for the process. Results of the two kernels differ only by rounding.

Under `torch.compile` the whole choice is one custom op, `eventful_fx::kernel_linear`, that
Dynamo and Inductor call without looking inside (they cannot trace the packing, and Inductor
insists a packed oneDNN weight be a graph constant); it keeps one `SparseLinear`, with its
packed copy, per live weight tensor. A packed copy is tied to its weight object by a weak
reference, never by address alone: a model freed and another of the same shapes built in its
memory would otherwise be multiplied by the first one's packed weights.
"""
from __future__ import annotations

import math
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import flop_registry, register_flop_formula

KERNELS = ("auto", "torch", "onednn")


def _linear_pointwise_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """So that `FlopCounterMode` counts the oneDNN kernel like `F.linear` (torch 2.14 has no formula for it)."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


if torch.ops.mkldnn._linear_pointwise not in flop_registry:
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_pointwise_flops)


# (in, out, bias, dtype, threads, row bucket) -> "torch" | "onednn": the timing is per process, like cuDNN's benchmark mode
_choices: dict[tuple, str] = {}


def _onednn_usable(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and torch.backends.mkldnn.is_available()
            and not weight.is_inference()  # no version counter: an in-place update could not be seen
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _row_bucket(rows: int) -> int:
    # buckets a factor sqrt(2) apart: near the crossover the two kernels are within a few percent anyway
    return int(2 * math.log2(rows))


class SparseLinear(torch.nn.Module):
    """forward(x, weight, bias) == F.linear(x, weight, bias), on the faster CPU kernel for x's row count.

    Reads the weight as an argument on every call (a parameter of the captured model, or a
    graph input under torch.compile) and re-packs its oneDNN copy whenever the weight's
    storage or version changes, so loading new weights after compiling is safe.
    """

    def __init__(self, kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"linear kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self._packed: Tensor | None = None
        self._packed_key = None
        self._packed_of = None  # weak reference to the weight the packed copy was made from

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if torch.compiler.is_compiling():  # one opaque op for Dynamo: the choice, packing and timing stay eager
            return kernel_linear(x, weight, bias, self.kernel)
        return self.eager(x, weight, bias)

    def eager(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The product on the kernel picked for these rows (what `kernel_linear` runs)."""
        if self.kernel == "torch" or not _onednn_usable(x, weight):
            return F.linear(x, weight, bias)
        if self.kernel == "onednn":
            return self._onednn(x, weight, bias)
        rows = x.numel() // max(x.shape[-1], 1)
        key = (weight.shape[1], weight.shape[0], bias is not None, x.dtype, torch.get_num_threads(), _row_bucket(rows))
        choice = _choices.get(key)
        if choice is None:
            choice = _choices[key] = self._time(x, weight, bias)
            if choice == "torch":  # the packed copy (as large as the weight) is not needed for these rows
                self._packed = self._packed_key = self._packed_of = None
        return self._onednn(x, weight, bias) if choice == "onednn" else F.linear(x, weight, bias)

    def _onednn(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.shape)
        if self._packed_key != key or self._packed_of() is not weight:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
            self._packed_key, self._packed_of = key, weakref.ref(weight)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def _time(self, x: Tensor, weight: Tensor, bias: Tensor | None, repeats: int = 5, margin: float = 0.97) -> str:
        """The kernel to keep: oneDNN only if its best time beats torch's by `margin` (noise must not flip a tie)."""
        kernels = {"torch": lambda: F.linear(x, weight, bias), "onednn": lambda: self._onednn(x, weight, bias)}
        best = dict.fromkeys(kernels, math.inf)
        with _disable_current_modes():  # a FlopCounterMode (any dispatch mode) around the call must not count the trials
            for run in kernels.values():  # warm-up: packing, first-touch allocations
                run()
            for _ in range(repeats):  # alternating, so a slow spell of a noisy machine hits both
                for name, run in kernels.items():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
        return "onednn" if best["onednn"] < margin * best["torch"] else "torch"


# under torch.compile: (id of a live weight tensor, kernel) -> (weak reference to it, its SparseLinear)
_compiled: dict[tuple, tuple[weakref.ref, SparseLinear]] = {}


def _forget(key: tuple, dead: weakref.ref) -> None:
    if _compiled.get(key, (None,))[0] is dead:  # not an entry made since for a new tensor with the same id
        del _compiled[key]


@torch.library.custom_op("eventful_fx::kernel_linear", mutates_args=())
def kernel_linear(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: str) -> Tensor:
    """`SparseLinear(kernel)(x, weight, bias)` as one op Dynamo and Inductor do not look into."""
    key = (id(weight), kernel)
    entry = _compiled.get(key)
    if entry is None or entry[0]() is not weight:
        entry = _compiled[key] = (weakref.ref(weight, lambda dead, key=key: _forget(key, dead)), SparseLinear(kernel))
    # `eager`, not the module's call: is_compiling() is process-wide, so while another thread exports
    # a model it also reads True here, and forward would call this op again (RecursionError)
    return entry[1].eager(x, weight, bias)


@kernel_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_flop_formula(torch.ops.eventful_fx.kernel_linear)(_linear_pointwise_flops)
