"""Capture: a model and an example input -> an FX graph with a value recorded on every node.

`torch.export(strict=False)` is the default path: its pre-decomposition aten graph keeps
`aten.linear`, `aten.layer_norm` and `aten.scaled_dot_product_attention` whole. When export
fails, `fx.symbolic_trace` (with timm's untraceable modules and functions kept as leaves)
plus shape propagation gives the same annotations.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


class CaptureError(RuntimeError):
    pass


def capture(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Graph of `model` specialised to the shapes of `example_inputs`, every node with meta["val"]."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                return torch.export.export(model, tuple(example_inputs), strict=False).module()
            except Exception as export_error:  # noqa: BLE001 - any failure sends us to the fallback
                try:
                    return _symbolic_trace(model, example_inputs)
                except Exception as trace_error:  # noqa: BLE001
                    raise CaptureError(
                        f"could not capture {type(model).__name__}: torch.export failed with {export_error!r}; "
                        f"fx.symbolic_trace failed with {trace_error!r}"
                    ) from trace_error
    finally:
        model.train(was_training)


def _symbolic_trace(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    leaf_modules, autowrap = (), ()
    try:  # timm knows which of its modules and functions fx cannot trace through
        from timm.layers import _fx as timm_fx

        leaf_modules = tuple(getattr(timm_fx, "_leaf_modules", ()))
        autowrap = tuple(getattr(timm_fx, "_autowrap_functions", ()))
    except ImportError:
        pass

    class Tracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=autowrap)

        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(*example_inputs)
    for node in gm.graph.nodes:  # ShapeProp leaves tensor_meta: expose values under the export key
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            node.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return gm
