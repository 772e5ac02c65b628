"""The dense models an eventful model is timed against: what a careful user would run instead.

A speedup is only as honest as its baseline. Three dense versions of the same model:

- `eager`: the model as it is (on CPU, PyTorch's GEMM for every linear);
- `packed`: a copy whose `nn.Linear` layers run on the kernel `SparseLinear` would pick for
  their row count (on CPU, oneDNN with the weight packed once often beats the default GEMM
  at every row count, and the eventful graph's linears use it too);
- `inductor`: `torch.compile` (Inductor, with freezing: weights folded as constants).

`measure` times each on every frame and reports the speedup against the fastest. A baseline
that cannot be built or run on this machine (Inductor without a C++ compiler) is left out
with the reason, never silently.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from .runtime.linear import SparseLinear

BASELINES = ("eager", "packed", "inductor")


class _KernelLinear(nn.Module):
    """An nn.Linear whose product runs on `SparseLinear`'s kernel choice (same weights, same result up to rounding)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel = SparseLinear("auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias)


def packed_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` (sharing its weights) with every nn.Linear on the faster kernel for its rows."""
    packed = copy.copy(model)
    packed._modules = dict(model._modules)
    for name, child in model.named_children():
        packed._modules[name] = _KernelLinear(child) if type(child) is nn.Linear else packed_linears(child)
    return packed


def dense_baselines(model: nn.Module, names: Sequence[str] = BASELINES) -> tuple[dict[str, Callable], dict[str, str]]:
    """The dense versions of `model` named (see `BASELINES`), and for each left out, why."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown dense baselines {unknown}; choose from {BASELINES}")
    built: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == "eager":
            built[name] = model
        elif name == "packed":
            built[name] = packed_linears(model)
        else:
            try:
                built[name] = torch.compile(model, options={"freezing": True})
            except Exception as e:  # noqa: BLE001 - any failure leaves this baseline out, with its reason
                skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0]
    return built, skipped
