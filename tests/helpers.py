"""What the tests compare with: the dense model's own output, frame by frame."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over every floating tensor of two outputs of the same structure (tensors, tuples, dicts)."""
    err = norm = 0.0
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            x, y = x.detach(), y.detach()
            err += float((x.double() - y.double()).pow(2).sum())
            norm += float(y.double().pow(2).sum())
    return (err / max(norm, 1e-60)) ** 0.5


def assert_matches_dense(emodel, model, frames, tol: float, **kwargs) -> list[float]:
    """Run consecutive frames [T, ...] (one stream, or [T, B, ...] for B streams) through the eventful
    and the dense model; every frame's relative error over all outputs must be <= tol. Returns the errors."""
    errors = []
    with torch.no_grad():
        for frame in frames:
            x = frame[None] if frame.ndim == 3 else frame
            errors.append(rel_err(emodel(x, **kwargs), model(x, **kwargs)))
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] <= tol, f"frame {worst}: relative error {errors[worst]:.3g} > {tol:.3g} (all: {errors})"
    return errors
