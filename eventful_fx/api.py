"""EventfulModule: the stateful model `eventful_fx.compile` returns.

Owns the lazy capture (on the first frame, or at once with `example_input=`), the plan for
the current budget (with the error model calibrated on a clip: `calibration.py`), the
per-frame statistics, the reset of every stateful op, and the stream state as a state_dict
entry (so a running stream can be saved, copied, pickled and resumed elsewhere).

Inputs are checked before anything moves: a frame with a different shape, dtype, device,
batch size (number of streams) or non-tensor argument, or a model whose parameters or
submodules were replaced, re-captures with a warning and starts with a flush; a frame holding
NaN or inf raises before touching state; a call that raises midway resets every stream, so
the next frame is a dense flush instead of a mix of old and new state. Inference only: the
graph runs without autograd (outputs carry no grad) and as the model runs in eval mode.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .calibration import CALIBRATION_FRAMES, Calibration, base_fraction, calibrate, gate_groups
from .cost_model.planner import Decision, ErrorFit, Planner
from .passes.canonicalize import FuseExplicitAttention
from .passes.capture import LIBRARY_DIRS, CaptureError, capture
from .passes.neighbours import MATCH_RADIUS, attach_neighbours
from .passes.regions import find_regions
from .passes.rewrite import ATTENTION_MODES, EventfulRewrite, Plan, RegionGate
from .passes.tokens import TokenAnalysis
from .runtime import StatefulOp, Threshold, TopK
from .runtime.linear import KERNELS
from .video import builtin_clip


@dataclass
class FrameStats:
    """Work done on the last frame (multiply-accumulates; gate and buffer overhead included in `macs`)."""

    macs: int = 0
    dense_macs: int = 0
    overhead_macs: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # tokens updated per gate (padded count under threshold)
    flush: bool = False

    @property
    def fraction(self) -> float:
        return self.macs / self.dense_macs if self.dense_macs else 1.0


# tensors returned by eventful graphs of `torch.compile`'s backend, with their token ids: Dynamo cuts a model
# where it cannot trace (a value read into numpy), and the graph after the cut reads the tokens the graph
# before it returned, with no patch embedding of its own to find them from (`TokenAnalysis` seeds)
# (by id: a WeakKeyDictionary would compare tensors with ==)
_TOKEN_OUTPUTS: dict[int, tuple[weakref.ref, tuple]] = {}


def _token_ids_of(x) -> tuple | None:
    entry = _TOKEN_OUTPUTS.get(id(x)) if isinstance(x, torch.Tensor) else None
    return entry[1] if entry is not None and entry[0]() is x else None


def _remember_token_ids(tensor: torch.Tensor, ids: tuple) -> None:
    key = id(tensor)
    _TOKEN_OUTPUTS[key] = (weakref.ref(tensor, lambda _: _TOKEN_OUTPUTS.pop(key, None)), ids)


class EventfulModule(torch.nn.Module):
    """A model that recomputes, frame after frame, only the tokens that changed."""

    seed_from_outputs = False  # the backend's modules: inputs returned by another eventful graph carry tokens

    def __init__(self, model: torch.nn.Module, budget: float = 0.25, *, policy: str = "topk",
                 threshold: float = 0.1, attention: str = "query", refresh: int | None = None,
                 check_finite: bool = True, example_input=None, memory_cap_bytes: int | None = None,
                 dense_residual: bool = True, linear_kernel: str = "auto", state_dtype: torch.dtype | str | None = "auto",
                 calibration="builtin", neighbour_reuse: bool = False):
        super().__init__()
        _check_budget(budget)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"eventful_fx.compile takes a torch.nn.Module, got {type(model).__name__}")
        if policy not in ("topk", "threshold"):
            raise ValueError(f"policy must be 'topk' or 'threshold', got {policy!r}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
            raise ValueError(f"threshold must be a token change >= 0, got {threshold!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if memory_cap_bytes is not None and (not isinstance(memory_cap_bytes, int) or isinstance(memory_cap_bytes, bool)
                                             or memory_cap_bytes < 0):
            raise ValueError(f"memory_cap_bytes must be a number of bytes >= 0 or None, got {memory_cap_bytes!r}")
        if linear_kernel not in KERNELS:
            raise ValueError(f"linear_kernel must be one of {KERNELS}, got {linear_kernel!r}")
        if state_dtype is not None and state_dtype != "auto" and state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be 'auto', one of {_STATE_DTYPES} or None, got {state_dtype!r}")
        if not (calibration is None or isinstance(calibration, (torch.Tensor, list, tuple))
                or (isinstance(calibration, str) and calibration == "builtin")):
            raise ValueError(f"calibration must be 'builtin', None or frames [T, ...] to calibrate on, "
                             f"got {calibration!r}")
        if refresh is not None and (not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 1):
            raise ValueError(f"refresh must be a whole number of frames >= 1 or None, got {refresh!r}")
        self.model = model  # its train/eval mode stays the user's: the captured graph is taken in eval mode
        self._budget = budget
        self.policy, self.threshold, self.attention, self.refresh = policy, threshold, attention, refresh
        self.check_finite = check_finite
        self.memory_cap_bytes = memory_cap_bytes
        self.dense_residual = dense_residual
        if not isinstance(neighbour_reuse, bool):
            raise ValueError(f"neighbour_reuse must be True or False, got {neighbour_reuse!r}")
        self.neighbour_reuse = neighbour_reuse
        self.linear_kernel = linear_kernel
        self.state_dtype_option = state_dtype
        self.state_dtype = None if state_dtype == "auto" else state_dtype  # resolved per capture (`_build`)
        self._calibration_source = calibration
        self._forget_graph()
        if example_input is None and isinstance(calibration, torch.Tensor):
            example_input = calibration[:1]  # a calibration clip is an example of the input
        if example_input is not None:
            self._build(_as_tuple(example_input), {})

    def _forget_graph(self) -> None:
        """No capture yet: the state a module has before its first frame (and after unpickling, until rebuilt)."""
        # the eventful graph is kept out of the module tree (plain attribute): state_dict, .to() and
        # parameters() see the user's model once; the graph's stream state travels as extra state
        self.__dict__["graph_module"] = None
        self.planner: Planner | None = None
        self.decision: Decision | None = None  # the structure, each gate's k, predicted MACs and state bytes
        self._signature = None
        self._batch = None
        self._frames_since_flush = 0
        self.stats = FrameStats()
        self._calibrations: dict[float, Calibration] = {}  # per calibration point (`calibration.base_fraction`)
        self._calibrating = False
        self._model_parts = None
        self._parts_generation = -1
        self._warned_inference_only = False
        self._params_require_grad = False
        self._output_ids: list | None = None
        self._dynamo = None  # where no tracer captures one graph: torch.compile with eventful graphs (`_via_dynamo`)
        self._dynamo_modules: list[EventfulModule] = []

    # -- public ---------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        _check_budget(value)
        self._budget = value
        for module in self._dynamo_modules:
            module.budget = value
        if self.graph_module is not None:
            self._apply_plan()  # same structure: new k only; a structure change rewrites (no re-capture) and flushes

    @property
    def plan(self) -> Plan | None:
        return self._plan if self.graph_module is not None else None

    def reset(self, streams: Sequence[int] | None = None) -> None:
        """Start a new video: the next frame is a dense flush (for all streams, or only `streams`, batch indices)."""
        for module in self._dynamo_modules:
            module.reset(streams)
        if streams is not None and self._dynamo is None:
            streams = _check_streams(streams, self._batch)
        for module in self._stateful():
            module.reset(streams)
        if streams is None:
            self._frames_since_flush = 0

    def calibrate(self, frames, fraction: float | None = None) -> Calibration:
        """Fit the planner's error model to this model on a clip and re-plan (see `calibration.py`).

        `frames`: [T, ...] consecutive frames of one stream (every stream of a batch gets
        them), or a list of input tuples; `fraction`: the calibration point (default: the
        one nearest the budget). It runs on a second eventful graph: the streams' state is
        untouched, and the plan stays a pure function of the budget.
        """
        return self._calibrate([frames], fraction)

    def _calibrate(self, clips: list, fraction: float | None = None) -> Calibration:
        """`calibrate` on several clips at once, each counting alone (see `calibration.calibrate`)."""
        if self._dynamo is not None:
            raise NotImplementedError(_VIA_DYNAMO.format(what="calibration"))
        fraction = fraction or base_fraction(self._budget)
        inputs = [[_as_tuple(x) for x in frames] if not isinstance(frames, torch.Tensor) else None for frames in clips]
        if self.graph_module is None:
            self._build(inputs[0][0] if inputs[0] else (clips[0][:1],), {})
        inputs = [clip_inputs or [(f[None].expand(self._batch, *f.shape),) for f in frames]
                  for clip_inputs, frames in zip(inputs, clips)]
        self._calibrating = True
        try:
            with _inference_only():
                calibration = calibrate(_Replica(self), inputs, fraction)
        finally:
            self._calibrating = False
        self._calibrations[fraction] = calibration
        self._apply_plan()
        return calibration

    def state_bytes(self) -> int:
        return sum(m.state_bytes() for m in [*self._stateful(), *self._dynamo_modules])

    def forward(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        signature = (spec, tuple(_signature(x) for x in leaves))
        if self.check_finite:
            _check_finite(leaves)
        grad_enabled = torch.is_grad_enabled()
        with _inference_only():
            if any(isinstance(x, torch.Tensor) and x.is_inference() for x in leaves):
                # state must outlive an inference_mode block: it is never built from inference tensors
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_inference() else t,
                                                    (args, kwargs))
            if self._dynamo is not None:
                return self._dynamo_forward(args, kwargs)
            if self.graph_module is None:
                self._build(args, kwargs)
                if self._dynamo is not None:
                    return self._dynamo_forward(args, kwargs)
            elif signature != self._signature:
                _warn(f"eventful_fx: input changed from {_describe(self._signature)} to {_describe(signature)}; "
                      "re-capturing the model and starting with a dense flush")
                self._build(args, kwargs)
            elif self._model_changed():
                _warn("eventful_fx: a parameter, buffer or submodule of the model was replaced since the capture; "
                      "re-capturing the model and starting with a dense flush")
                self._build(args, kwargs)
            if self.refresh is not None and self._frames_since_flush >= self.refresh:
                for module in self._stateful():  # a flush of the same video: frames stay consecutive
                    module.reset()
                self._frames_since_flush = 0
            flush = self._frames_since_flush == 0
            self._warn_inference_only(leaves, grad_enabled)
            try:
                out = self.graph_module(*args, **kwargs)
            except BaseException as error:
                self.reset()  # some ops may have moved on and others not: the next frame starts clean
                if hasattr(error, "add_note"):
                    if "Runtime assertion failed" in str(error):
                        error.add_note("eventful_fx: a check the capture kept failed: an assert of the model's on "
                                       "a value read from a tensor, or a branch on one (the graph follows the path "
                                       "the first frame took; this input takes another)")
                    error.add_note("eventful_fx: every stream was reset; the next frame is a dense flush")
                raise
        self._frames_since_flush += 1
        self._update_stats(flush)
        if self._output_ids:
            tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            for tensor, ids in zip(tensors, self._output_ids):
                if ids is not None:
                    _remember_token_ids(tensor, ids)
        return out

    # -- saving and copying ---------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The stream state, as tensors and plain values (`torch.load(weights_only=True)` reads it back).

        Weights are not in it: `state_dict()` holds them once, under `model.`."""
        if self._dynamo is not None:
            raise NotImplementedError(_VIA_DYNAMO.format(what="saving the stream state"))
        state = {"version": _STATE_VERSION, "budget": self._budget, "options": self._options()}
        if self.graph_module is None:
            return state
        spec, leaves = self._signature
        state.update(
            inputs=pytree.treespec_dumps(spec),
            leaves=[{"shape": list(x[1]), "dtype": str(x[2]).removeprefix("torch."), "device": str(x[3])}
                    if x[0] == "tensor" else {"value": x[2]} for x in leaves],
            frames_since_flush=self._frames_since_flush,
            calibrations={str(p): dataclasses.asdict(c) for p, c in self._calibrations.items()},
            ops={name: m.stream_state() for name, m in self.graph_module.named_modules()
                 if isinstance(m, StatefulOp)})
        return state

    def set_extra_state(self, state: dict) -> None:
        """Resume the saved streams: rebuild the graph for the saved input and load every op's state."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("eventful_fx: this state was not saved by this version of EventfulModule.state_dict()")
        if state["options"] != self._options():
            raise ValueError(f"eventful_fx: the state was saved with options {state['options']}, this module has "
                             f"{self._options()}; compile with the same options to load it")
        _check_budget(state["budget"])
        self._budget = state["budget"]
        if "inputs" not in state:  # saved before its first frame
            self._forget_graph()
            return
        leaves = [torch.zeros(x["shape"], dtype=getattr(torch, x["dtype"]), device=x["device"]) if "shape" in x
                  else x["value"] for x in state["leaves"]]
        args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(state["inputs"]))
        calibrations = {float(p): Calibration(**c) for p, c in state["calibrations"].items()}
        with _inference_only():
            self._build(args, kwargs, calibrations)
        ops = {name: m for name, m in self.graph_module.named_modules() if isinstance(m, StatefulOp)}
        if set(ops) != set(state["ops"]):
            raise ValueError("eventful_fx: the saved stream state does not fit this model's eventful graph "
                             f"(ops {sorted(set(state['ops']) ^ set(ops))[:4]} differ); was it saved from "
                             "another model?")
        for name, module in ops.items():  # copies: a state_dict shares its tensors with the module it came from
            module.load_stream_state(pytree.tree_map_only(
                torch.Tensor, lambda t: t.clone(memory_format=torch.contiguous_format), state["ops"][name]))
        self._frames_since_flush = state["frames_since_flush"]

    def __getstate__(self) -> dict:
        # the graph holds kernels' packed weights (not picklable) and closures: rebuilt on load from the state
        keep = {k: v for k, v in self.__dict__.items() if k not in _REBUILT}
        keep["_saved_streams"] = self.get_extra_state()
        return keep

    def __setstate__(self, state: dict) -> None:
        saved = state.pop("_saved_streams")
        self.__dict__.update(state)
        self._forget_graph()
        self.set_extra_state(saved)

    def _options(self) -> dict:
        """The options the stream state depends on (the graph's structure and the state's dtype)."""
        return {"policy": self.policy, "attention": self.attention, "dense_residual": self.dense_residual,
                "neighbour_reuse": self.neighbour_reuse,
                "state_dtype": str(self.state_dtype_option)}

    # -- internals ------------------------------------------------------------------------
    @torch.compiler.disable  # under torch.compile: capture, analysis and planning run eagerly, once
    def _build(self, args: tuple, kwargs: dict, calibrations: dict | None = None) -> None:
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        signature = (spec, tuple(_signature(x) for x in leaves))
        key = None if self.seed_from_outputs else \
            (id(self.model), self.model.training, signature, self.dense_residual, self.attention, self.neighbour_reuse)
        key = key if key is not None and _hashable(key) else None
        captured = _cached_capture(key, self.model)
        if captured is None:
            try:
                captured = self._capture(args, kwargs, leaves)
            except CaptureError as error:
                if self.seed_from_outputs:  # one of Dynamo's graphs already
                    raise
                self._via_dynamo(error)
                return
            _keep_capture(key, self.model, captured)
        *captured, self._output_ids = captured
        self._captured = gm, infos, regions, sites, _ = tuple(captured)
        self._batch = self._captured[4]
        self._dense_macs = sum(i.macs for i in infos.values())
        self._signature = signature
        self._model_parts, self._parts_generation = _model_parts(self.model), _registrations
        self._params_require_grad = any(p.requires_grad for p in self.model.parameters())
        self.planner = Planner(gm, infos, regions, sites, self._batch, attention=self.attention,
                               memory_cap_bytes=self.memory_cap_bytes, state_dtype=self.state_dtype)
        if self.state_dtype_option == "auto":
            self._resolve_state_dtype(gm, infos, regions, sites)
        self._calibrations = dict(calibrations or {})  # a new graph: its gates must be measured again
        self.__dict__["graph_module"] = None
        self.decision = None
        self._apply_plan()

    def _capture(self, args: tuple, kwargs: dict, leaves: list) -> tuple:
        """The model's graph, its token analysis and gated regions: (gm, infos, regions, sites, batch, output ids)."""
        gm = FuseExplicitAttention().call(capture(self.model, tuple(args), kwargs))
        seeds = None
        if self.seed_from_outputs:
            seeds = {i: _token_ids_of(x) for i, x in enumerate(leaves) if _token_ids_of(x) is not None}
        analysis = TokenAnalysis(gm, seeds)
        infos = analysis.run()
        regions, sites = find_regions(gm, infos, dense_residual=self.dense_residual)
        attach_neighbours(gm, infos, regions, sites, self.attention, MATCH_RADIUS if self.neighbour_reuse else 0)
        output_ids = analysis.output_ids if self.seed_from_outputs else None
        return gm, infos, regions, sites, _batch_size(infos, leaves), output_ids

    def _via_dynamo(self, error: CaptureError) -> None:
        """No tracer captures the model as one graph: let Dynamo cut it where it cannot trace (the line the
        error names runs eagerly) and run each graph it captures eventfully, with the same options. A graph
        after a cut finds its tokens from the graph that returned them (`seed_from_outputs`)."""
        options = {"policy": self.policy, "threshold": self.threshold, "attention": self.attention,
                   "refresh": self.refresh, "check_finite": self.check_finite,
                   "memory_cap_bytes": self.memory_cap_bytes, "dense_residual": self.dense_residual,
                   "linear_kernel": self.linear_kernel, "state_dtype": self.state_dtype_option,
                   "calibration": None, "neighbour_reuse": self.neighbour_reuse}
        modules = self._dynamo_modules

        def eventful_graph(gm: torch.fx.GraphModule, example_inputs):
            gm.eval()
            module = EventfulModule(gm, self._budget, **options)
            module.seed_from_outputs = True
            modules.append(module)
            return module

        self._dynamo = torch.compile(self.model, backend=eventful_graph)
        _warn(f"eventful_fx: {error}. Running the graphs torch.compile (Dynamo) captures around that line instead, "
              "each eventful with its own state (no calibration, no saved state)")

    def _dynamo_forward(self, args: tuple, kwargs: dict):
        before = {id(m): m.stats for m in self._dynamo_modules}
        out = self._dynamo(*args, **kwargs)
        ran = [m for m in self._dynamo_modules if m.stats is not before.get(id(m))]
        self.stats = FrameStats(macs=sum(m.stats.macs for m in ran), dense_macs=sum(m.stats.dense_macs for m in ran),
                                overhead_macs=sum(m.stats.overhead_macs for m in ran),
                                tokens={f"graph{i}.{g}": k for i, m in enumerate(ran) for g, k in m.stats.tokens.items()},
                                flush=any(m.stats.flush for m in ran))
        return out

    def _resolve_state_dtype(self, gm, infos, regions, sites) -> None:
        """state_dtype="auto": the model's dtype, unless one stream's state would outweigh the model's weights;
        then float16 (half the state), and int8 with a scale per token where float16 still would (a quarter;
        SAM-B at 1024; top-k policy only). On ViT-S at budget 0.25 the all-token error moves from 0.1493 (float32) to 0.1493
        (float16) and 0.1490 (int8); the logits error from 0.0477 to 0.0477 and 0.0495."""
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        dtypes = {t.dtype for t in self.model.parameters()}
        self.state_dtype = None
        # per stream, so a stream gets the same dtype, and the same output, alone or in a batch
        if not weights or dtypes - {torch.float32, torch.float64} or \
                self.planner.plan(self._budget).state_bytes <= weights * self._batch:
            return  # (a graph from torch.compile holds no weights: they are its inputs)
        # int8 rounds a token by about 1% of its range: under a threshold that can read as a change, and a
        # repeated frame would then settle one block per frame, so the threshold policy stops at float16
        for self.state_dtype in (torch.float16, torch.int8) if self.policy == "topk" else (torch.float16,):
            self.planner = Planner(gm, infos, regions, sites, self._batch, attention=self.attention,
                                   memory_cap_bytes=self.memory_cap_bytes, state_dtype=self.state_dtype)
            if self.planner.plan(self._budget).state_bytes <= weights * self._batch:
                return

    def _model_changed(self) -> bool:
        """Whether a parameter, buffer or submodule of the model was replaced since the capture.

        Walking the model costs ~0.3 ms on ViT-B, so it is walked only after something, anywhere,
        registered a parameter, buffer or module (global hooks count them)."""
        if self._parts_generation == _registrations:
            return False
        parts = _model_parts(self.model)
        changed = len(parts) != len(self._model_parts) or any(
            a[0] != b[0] or a[1] is not b[1] for a, b in zip(parts, self._model_parts))
        if not changed:
            self._parts_generation = _registrations
        return changed

    def _warn_inference_only(self, leaves, grad_enabled: bool) -> None:
        """Say once that grad and training mode are not honoured, when a call looks as if it wanted them."""
        if self._warned_inference_only:
            return
        wants_grad = grad_enabled and (self._params_require_grad or any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in leaves))
        if not (wants_grad or self.model.training):
            return
        self._warned_inference_only = True
        _warn("eventful_fx: EventfulModule runs inference only: outputs carry no gradient, and the model runs as "
              "in eval mode (dropout off, norm statistics frozen) whatever its mode; train the dense model. "
              "Call it under torch.inference_mode() or torch.no_grad(), with model.eval(), to silence this.")

    def _rewrite(self, plan: Plan) -> None:
        """Build the eventful graph for a plan's structure (which gates, which attention modes): no re-capture."""
        gm, infos, regions, sites, batch = self._captured
        self.__dict__["graph_module"] = EventfulRewrite(infos, regions, sites, plan, batch, self.linear_kernel,
                                                        self.state_dtype).call(gm)
        self._plan = plan
        self._frames_since_flush = 0
        # looked up once per rewrite, not per frame: stats read every gate and stateful op after each call
        self._gate_modules = {name: m for name, m in self.graph_module.named_children() if isinstance(m, RegionGate)}
        self._stateful_modules = [m for m in self.graph_module.modules() if isinstance(m, StatefulOp)]

    def _gates(self) -> dict[str, RegionGate]:
        return self._gate_modules

    def _stateful(self):
        return [] if self.graph_module is None else self._stateful_modules

    def _calibration_clips(self) -> list | None:
        """The clips to calibrate on: the user's, or both built-in clips at the input's size (image inputs only).

        Two clips, because a fit to one clip's motion can starve gates another video needs (the synthetic
        pan alone moved ViT-S/224's plan at 0.5 to 1.5x the uniform plan's error on a real camera clip)."""
        source = self._calibration_source
        if source is None or isinstance(source, (torch.Tensor, list, tuple)):
            return None if source is None else [source]
        spec, leaves = self._signature
        if spec != pytree.tree_flatten(((None,), {}))[1] or leaves[0][0] != "tensor":
            return None  # not a single frame tensor: the uniform plan
        runs = len(gate_groups(self.decision.model)) + 3 if self.decision is not None else 9
        calibration_macs = self._dense_macs * CALIBRATION_FRAMES * len(BUILTIN_CALIBRATION_CLIPS) * runs
        if calibration_macs > BUILTIN_CALIBRATION_MAX_MACS:
            return None  # minutes, not seconds (SAM at 1024): the uniform plan; emodel.calibrate(frames) still fits
        _, shape, dtype, device = leaves[0]
        if len(shape) != 4 or shape[1] != 3 or not dtype.is_floating_point:
            return None  # not a batch of RGB frames: the uniform plan
        h, w = shape[2:]
        clips = [builtin_clip(size=max(h, w), max_frames=CALIBRATION_FRAMES, name=name)
                 for name in BUILTIN_CALIBRATION_CLIPS]
        if h != w:
            clips = [torch.nn.functional.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
                     for c in clips]
        return [c.to(device=device, dtype=dtype) for c in clips]

    def _apply_plan(self) -> None:
        """Plan for the current budget; rewrite only when the structure (gated regions, attention modes) changes.

        Below budget 1 (top-k policy) the plan uses the error model calibrated at the nearest
        calibration point, measured the first time it is needed."""
        point = base_fraction(self._budget)
        if self._budget < 1 and point not in self._calibrations and not self._calibrating \
                and self.policy == "topk":
            clips = self._calibration_clips()
            if clips is not None:
                self.planner.fits.pop(self.attention, None)
                self._plan_for_budget()
                key = self._builtin_calibration_key(point) if isinstance(self._calibration_source, str) else None
                if key in _BUILTIN_CALIBRATIONS:  # the same weights, graph and plan structure measured before
                    _BUILTIN_CALIBRATIONS.move_to_end(key)
                    self._calibrations[point] = _BUILTIN_CALIBRATIONS[key]
                    self._apply_plan()
                    return
                calibration = self._calibrate(clips, point)
                if key is not None:
                    _BUILTIN_CALIBRATIONS[key] = calibration
                    while len(_BUILTIN_CALIBRATIONS) > BUILTIN_CALIBRATIONS_KEPT:
                        _BUILTIN_CALIBRATIONS.popitem(last=False)
                return
        calibration = self._calibrations.get(point)
        current = self.planner.fits.get(self.attention)
        if calibration is not None and (current is None or current.weights is not calibration.weights):
            self.planner.set_fit(self.attention, ErrorFit(calibration.weights, calibration.intercept))
        self._plan_for_budget()

    def _builtin_calibration_key(self, point: float) -> tuple:
        """What a calibration on the built-in clips depends on: the captured graph's code and every weight's
        bytes, the input, the options, the plan's structure and the calibration point."""
        gm = self._captured[0]
        digest = hashlib.blake2b(gm.code.encode(), digest_size=16)
        for name, t in sorted([*gm.named_parameters(), *gm.named_buffers()], key=lambda item: item[0]):
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        return (digest.hexdigest(), repr(self._signature), tuple(sorted(self._options().items())),
                self.linear_kernel, str(self.state_dtype), self.memory_cap_bytes, self.decision.key, point)

    @property
    def calibration(self) -> Calibration | None:
        """The calibration the current plan uses (None: the uniform plan)."""
        return self._calibrations.get(base_fraction(self._budget)) if self._budget < 1 else None

    def _plan_for_budget(self) -> None:
        decision = self.planner.plan(self._budget)
        predicted = decision.predicted_macs / self._dense_macs
        if self.memory_cap_bytes is not None and len(decision.gated) < len(self.planner.candidates) \
                and predicted > self._budget * 1.001:
            _warn(f"eventful_fx: memory_cap_bytes={self.memory_cap_bytes} leaves state for {len(decision.gated)} of "
                  f"{len(self.planner.candidates)} gates, so the plan predicts {predicted:.3f} of the dense MACs "
                  f"against the budget {self._budget}; raise the cap to meet the budget")
        elif not decision.feasible:
            _warn(f"eventful_fx: budget {self._budget} is below what this model can reach (every gate at its "
                  f"least k predicts {predicted:.3f} of the dense MACs)")
        if self.graph_module is None or self.decision is None or decision.key != self.decision.key:
            self._rewrite(Plan(gates={name: TopK(1) for name in decision.gated}, attention=decision.attention))
        self.decision = decision
        gates = self._gates()
        if self.policy == "threshold":
            policies = {name: Threshold(self.threshold) for name in gates}
        else:
            policies = {name: TopK(decision.ks[name]) for name in gates}
        for name, gate in gates.items():
            gate.policy = policies[name]
        sites = self._captured[3]
        self._plan = Plan(gates=policies, attention={s.name: decision.model.converted_sites.get(s.name, "dense")
                                                     for s in sites})

    def _update_stats(self, flush: bool) -> None:
        gm = self.graph_module
        gates = self._gates()
        macs = gm.dense_macs_static
        for name, region_macs in gm.region_macs.items():
            macs += region_macs * gates[name].last_k / gates[name].num_tokens
        overhead = 0
        for module in self._stateful():
            macs += module.matmul_macs
            overhead += module.overhead_macs
        self.stats = FrameStats(macs=int(round(macs)) + overhead, dense_macs=self._dense_macs, overhead_macs=overhead,
                                tokens={name: g.last_k for name, g in gates.items()}, flush=flush)


class _Replica:
    """A second eventful graph of a module's current plan, with state of its own: calibration runs it with
    plans of its choosing while the module's streams keep theirs. Parameters are shared, not copied."""

    def __init__(self, emodel: EventfulModule):
        gm, infos, regions, sites, batch = emodel._captured
        self.graph_module = EventfulRewrite(infos, regions, sites, emodel._plan, batch, emodel.linear_kernel,
                                            emodel.state_dtype).call(gm)
        self.gates = {n: m for n, m in self.graph_module.named_children() if isinstance(m, RegionGate)}
        self.stateful = [m for m in self.graph_module.modules() if isinstance(m, StatefulOp)]
        # the reference is the captured dense graph: eval-mode semantics whatever the user's model mode
        self.model, self.decision = gm, emodel.decision

    def set_policies(self, policies: dict) -> None:
        for name, gate in self.gates.items():
            gate.policy = policies[name]

    def reset(self) -> None:
        for module in self.stateful:
            module.reset()


_STATE_DTYPES = (torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_VERSION = 1
# the built-in calibration runs (groups + 3) plans over its clips' frames: above this many MACs (ViT-B/224:
# ~1.6e12, about 12 s on two cores; ViT-B/384: ~5e12; SAM-B at 1024: ~43e12) it would cost minutes, so the
# default plan stays uniform
BUILTIN_CALIBRATION_MAX_MACS = 6e12
BUILTIN_CALIBRATION_CLIPS = ("synthetic", "real")  # the built-in clips (`video.builtin_clip`), each counting alone
# Captures by (model, input signature, analysis options), shared by every module built on them in this
# process (a StreamPool's batch sizes, a second camera's module, calibration): torch.export takes ~80% of
# a build (1.5-2 s for ViT-Ti on two cores), and nothing modifies a capture after `_capture`. An entry is
# used only while its model is alive with the same parameters, buffers and submodules (by identity); a
# graph holding runtime asserts (a branch or check on a value the first frame read) is not shared, since
# another module's first frame may take the other path.
_CAPTURES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
CAPTURES_KEPT = 8
# re-entrant: a garbage collection inside a locked section may run a dying model's callback on this thread
_captures_lock = threading.RLock()


def _cached_capture(key: tuple | None, model: torch.nn.Module) -> tuple | None:
    if key is None:
        return None
    with _captures_lock:
        entry = _CAPTURES.get(key)
        if entry is not None:
            _CAPTURES.move_to_end(key)
    if entry is None:
        return None
    model_ref, parts, captured = entry
    same = model_ref() is model and len(parts) == len(now := _model_parts(model)) and all(
        name == now_name and ref() is part for (name, ref), (now_name, part) in zip(parts, now))
    return captured if same else None


def _keep_capture(key: tuple | None, model: torch.nn.Module, captured: tuple) -> None:
    if key is None or any(n.op == "call_function" and n.target in _RUNTIME_ASSERTS for n in captured[0].graph.nodes):
        return
    # the entry goes with its model (the capture holds the model's weights)
    entry = (weakref.ref(model, lambda dead: _drop_capture(key, dead)),
             [(name, weakref.ref(part)) for name, part in _model_parts(model)], captured)
    with _captures_lock:
        _CAPTURES[key] = entry
        while len(_CAPTURES) > CAPTURES_KEPT:
            _CAPTURES.popitem(last=False)


def _drop_capture(key: tuple, dead: weakref.ref) -> None:
    with _captures_lock:
        if _CAPTURES.get(key, (None,))[0] is dead:  # not a newer entry under the same key
            del _CAPTURES[key]


def _hashable(key: tuple) -> bool:
    try:
        hash(key)
    except TypeError:  # an input tree whose spec holds a list (a dict's keys): built without the cache
        return False
    return True


_RUNTIME_ASSERTS = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg,
                    torch.ops.aten._assert_async.default)


# built-in calibrations measured in this process, by what they depend on (`_builtin_calibration_key`): a second
# module of the same model (another camera, a StreamPool replica, a re-capture back to an earlier input size)
# plans at once instead of spending seconds measuring the same thing again
_BUILTIN_CALIBRATIONS: "collections.OrderedDict[tuple, Calibration]" = collections.OrderedDict()
BUILTIN_CALIBRATIONS_KEPT = 32
# rebuilt from the saved stream state when unpickled or deep-copied (see __getstate__)
_VIA_DYNAMO = ("eventful_fx: {what} is not available for a model run through Dynamo's graphs (no tracer captured "
               "it as one graph: see the warning of its first call)")
_REBUILT = ("graph_module", "planner", "decision", "_captured", "_plan", "_gate_modules", "_stateful_modules",
            "_model_parts", "_signature", "stats")

# parameter, buffer and module registrations anywhere in the process: a module whose count moved
# since its capture checks whether its own model's parts were replaced
_registrations = 0


def _count_registration(*_args):
    global _registrations
    _registrations += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


def _model_parts(model: torch.nn.Module) -> list[tuple[str, object]]:
    """Every parameter, buffer and submodule of the model by name, as objects (compared by identity)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False),
            *model.named_modules(remove_duplicate=False)]


@contextlib.contextmanager
def _inference_only():
    """The context every eventful call runs in: no autograd, and never inference mode, whatever the caller's.

    State built under `torch.inference_mode()` would be inference tensors, which a later call
    outside it could not update in place; `no_grad` runs as fast here."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _warn(message: str) -> None:
    """A warning attributed to the user's line: the first caller outside eventful_fx and torch."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _batch_size(infos, leaves) -> int:
    for node, info in infos.items():
        if info.kind == "patch_embed":
            return node.meta["val"].shape[0]
    first = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
    return first.shape[0] if first is not None and first.ndim > 0 else 1


def _check_budget(budget) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not (0 < budget <= 1) or math.isnan(budget):
        raise ValueError(f"budget must be a fraction of the dense model's MACs in (0, 1], got {budget!r}")


def _check_streams(streams, batch: int | None) -> list[int]:
    """Stream indices for a per-stream reset: whole numbers within the batch (negative ones count from the end)."""
    if isinstance(streams, int) and not isinstance(streams, bool):
        streams = [streams]
    if isinstance(streams, torch.Tensor):
        streams = streams.tolist() if streams.ndim == 1 and not streams.is_floating_point() else [streams]
    if not isinstance(streams, (list, tuple, range)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in streams):
        raise TypeError(f"reset(streams=...) takes a list of stream indices (ints), got {streams!r}")
    if batch is not None and not all(-batch <= s < batch for s in streams):
        raise IndexError(f"reset(streams={list(streams)}): this module runs {batch} stream(s) per call "
                         f"(indices 0..{batch - 1}); nothing was reset")
    return [s % batch if batch else s for s in streams]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _signature(x) -> tuple:
    """What a capture specialised on, for one input leaf: a tensor's shape, dtype and device, a plain value
    itself; any other object by identity (a new object re-captures: its contents cannot be compared)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    if isinstance(x, _PLAIN):
        return ("value", type(x), x)
    return ("object", type(x), id(x))


@torch.compiler.disable  # a host read: under torch.compile it runs eagerly, with no graph-break warning
def _check_finite(leaves: list) -> None:
    for x in leaves:  # parameters (graph inputs under torch.compile) are the model's business
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.is_floating_point() \
                and not bool(torch.isfinite(x).all()):
            raise ValueError("input frame holds NaN or inf values; the eventful state was left untouched")


def _describe(signature) -> str:
    _, leaves = signature
    parts = [f"{list(x[1])} {str(x[2]).removeprefix('torch.')} on {x[3]}" if x[0] == "tensor" else
             f"{x[2]!r}" if x[0] == "value" else f"a {x[1].__name__} object" for x in leaves]
    return "(" + ", ".join(parts) + ")"


def compile(model: torch.nn.Module, budget: float = 0.25, **options) -> EventfulModule:  # noqa: A001
    """Wrap `model` into an EventfulModule (lazy: captures on the first call)."""
    return EventfulModule(model, budget, **options)
