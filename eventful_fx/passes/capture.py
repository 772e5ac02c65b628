"""Capture: a model and an example input -> an FX graph with a value recorded on every node.

`torch.export(strict=False)` is the default path: its pre-decomposition aten graph keeps
`aten.linear`, `aten.layer_norm` and `aten.scaled_dot_product_attention` whole. When export
fails, `fx.symbolic_trace` (with timm's untraceable modules and functions kept as leaves)
plus shape propagation gives the same annotations.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import threading
import traceback
import warnings

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.shape_prop import ShapeProp


class CaptureError(RuntimeError):
    """No tracer could capture the model (the model itself runs on the input)."""


class InputError(ValueError):
    """The model itself rejects the input: nothing to capture."""


# export and fx tracing set process-wide modes (fake tensor and proxy mode stacks): two threads
# capturing at once corrupt them for every later capture, so captures take turns
_capture_lock = threading.RLock()


def capture(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> fx.GraphModule:
    """Graph of `model` specialised to the shapes of `example_inputs`, every node with meta["val"]."""
    kwargs = dict(example_kwargs or {})
    was_training = model.training
    with _capture_lock:
        model.eval()
        try:
            with torch.no_grad():
                try:
                    with _quiet(), _fake_data_ptr():
                        try:
                            return torch.export.export(model, tuple(example_inputs), kwargs, strict=False).module()
                        except GuardOnDataDependentSymNode:
                            # a value read from a tensor (`.item()`) in an assert or a branch: trace with real
                            # values, keeping the example's path and the checks as runtime asserts in the graph
                            return torch.export.draft_export(model, tuple(example_inputs), kwargs,
                                                             strict=False).module()
                except Exception as export_error:  # noqa: BLE001 - any failure sends us to the fallback
                    _check_model_runs(model, example_inputs, kwargs)
                    try:
                        with _quiet():
                            return _symbolic_trace(model, _positional(model, example_inputs, kwargs))
                    except Exception as trace_error:  # noqa: BLE001
                        raise CaptureError(
                            f"could not capture {type(model).__name__}{_where(export_error)}: torch.export failed: "
                            f"{_first_line(export_error)}{_hint(export_error)}; fx.symbolic_trace failed: "
                            f"{_first_line(trace_error)}") from None  # (eventful_fx.compile then tries Dynamo)
        finally:
            model.train(was_training)


def _check_model_runs(model, args: tuple, kwargs: dict) -> None:
    """Raise InputError, leading with the model's own message, when the model cannot run on the input at all."""
    try:
        with _quiet():
            model(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        shapes = ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor)
                           else repr(a) for a in (*args, *kwargs.values()))
        raise InputError(f"{type(model).__name__} cannot run on input ({shapes}): "
                         f"{type(error).__name__}: {_first_line(error)}") from None


@contextlib.contextmanager
def _fake_data_ptr():
    """`data_ptr()` of a traced (fake) tensor answers a distinct number instead of raising.

    Models assert `x.data_ptr() != y.data_ptr()` to catch in-place bugs; export traces with
    tensors that have no storage, so the assert alone would stop the capture. Distinct
    tensors get distinct numbers (their ids), as distinct storages would."""
    real = torch.Tensor.data_ptr

    def data_ptr(self):
        try:
            return real(self)
        except RuntimeError:
            return id(self)

    torch.Tensor.data_ptr = data_ptr
    try:
        yield
    finally:
        torch.Tensor.data_ptr = real


# torch, eventful_fx and the standard library: a frame outside them is the user's (or the model's) code
LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep,
                os.path.dirname(contextlib.__file__) + os.sep)


def _where(error: BaseException) -> str:
    """ ' at FILE:LINE (`code`)': the model's own line where tracing failed, when the traceback has one."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(LIBRARY_DIRS)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)"


def _hint(error: BaseException) -> str:
    text = str(error)
    if "data-dependent" in text or "data dependent" in text:
        return (" (a value read from a tensor, e.g. `.item()`, decides control flow or an assert: move the check "
                "out of forward, or write it as torch._check(...))")
    if ".numpy()" in text or "__array" in text:
        return " (forward reads tensor values into numpy: compute that step with torch ops)"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:400]


@contextlib.contextmanager
def _quiet():
    """Tracers print tracebacks and warnings of their own on the way to an exception: keep them off the console."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _positional(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Keyword arguments bound to their positions (symbolic_trace's graph takes positional inputs only)."""
    if not kwargs:
        return tuple(args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    if any(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in inspect.signature(model.forward).parameters.values()):
        raise TypeError("keyword-only arguments cannot be traced by fx.symbolic_trace")
    return tuple(bound.args)


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

    graph = Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(*example_inputs)
    for node in gm.graph.nodes:  # ShapeProp leaves tensor_meta: expose values under the export key
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            node.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return gm
