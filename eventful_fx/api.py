"""EventfulModule: the stateful model `eventful_fx.compile` returns.

Owns the lazy capture (on the first frame, or at once with `example_input=`), the plan for
the current budget (with the error model calibrated on a clip: `calibration.py`), the
per-frame statistics and the reset of every stateful op. A frame
with a different shape, dtype, device or batch size (number of streams) re-captures, with a
warning, and starts with a flush; a frame holding NaN or inf raises before touching state.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from .calibration import CALIBRATION_FRAMES, Calibration, base_fraction, calibrate
from .cost_model.planner import Decision, ErrorFit, Planner
from .passes.capture import capture
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


class EventfulModule(torch.nn.Module):
    """A model that recomputes, frame after frame, only the tokens that changed."""

    def __init__(self, model: torch.nn.Module, budget: float = 0.25, *, policy: str = "topk",
                 threshold: float = 0.1, attention: str = "query", refresh: int | None = None,
                 check_finite: bool = True, example_input=None, memory_cap_bytes: int | None = None,
                 dense_residual: bool = True, linear_kernel: str = "auto", state_dtype: torch.dtype | None = None,
                 calibration="builtin"):
        super().__init__()
        _check_budget(budget)
        if policy not in ("topk", "threshold"):
            raise ValueError(f"policy must be 'topk' or 'threshold', got {policy!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if memory_cap_bytes is not None and memory_cap_bytes < 0:
            raise ValueError(f"memory_cap_bytes must be a number of bytes >= 0 or None, got {memory_cap_bytes!r}")
        if linear_kernel not in KERNELS:
            raise ValueError(f"linear_kernel must be one of {KERNELS}, got {linear_kernel!r}")
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {_STATE_DTYPES} or None, got {state_dtype!r}")
        if not (calibration is None or isinstance(calibration, (torch.Tensor, list, tuple))
                or (isinstance(calibration, str) and calibration == "builtin")):
            raise ValueError(f"calibration must be 'builtin', None or frames [T, ...] to calibrate on, "
                             f"got {calibration!r}")
        if refresh is not None and refresh < 1:
            raise ValueError(f"refresh must be a positive number of frames or None, got {refresh!r}")
        self.model = model.eval()
        self._budget = budget
        self.policy, self.threshold, self.attention, self.refresh = policy, threshold, attention, refresh
        self.check_finite = check_finite
        self.memory_cap_bytes = memory_cap_bytes
        self.dense_residual = dense_residual
        self.linear_kernel = linear_kernel
        self.state_dtype = state_dtype
        self.graph_module: fx.GraphModule | None = None
        self.planner: Planner | None = None
        self.decision: Decision | None = None  # the structure, each gate's k, predicted MACs and state bytes
        self._signature = None
        self._frames_since_flush = 0
        self.stats = FrameStats()
        self._calibrations: dict[float, Calibration] = {}  # per calibration point (`calibration.base_fraction`)
        self._calibration_source = calibration
        self._calibrating = False
        if example_input is None and isinstance(calibration, torch.Tensor):
            example_input = calibration[:1]  # a calibration clip is an example of the input
        if example_input is not None:
            self._build(_as_tuple(example_input))

    # -- public ---------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        _check_budget(value)
        self._budget = value
        if self.graph_module is not None:
            self._apply_plan()  # same structure: new k only; a structure change rewrites (no re-capture) and flushes

    @property
    def plan(self) -> Plan | None:
        return self._plan if self.graph_module is not None else None

    def reset(self, streams: Sequence[int] | None = None) -> None:
        """Start a new video: the next frame is a dense flush (for all streams, or only `streams`)."""
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
        fraction = fraction or base_fraction(self._budget)
        inputs = [_as_tuple(x) for x in frames] if not isinstance(frames, torch.Tensor) else None
        if self.graph_module is None:
            self._build(inputs[0] if inputs else (frames[:1],))
        if inputs is None:
            batch = self._signature[0][0][0] if self._signature and self._signature[0] else 1
            inputs = [(f[None].expand(batch, *f.shape),) for f in frames]
        self._calibrating = True
        try:
            calibration = calibrate(_Replica(self), inputs, fraction)
        finally:
            self._calibrating = False
        self._calibrations[fraction] = calibration
        self._apply_plan()
        return calibration

    def state_bytes(self) -> int:
        return sum(m.state_bytes() for m in self._stateful())

    def forward(self, *inputs):
        signature = tuple(_signature(x) for x in inputs)
        if self.check_finite:
            for x in inputs:  # parameters (graph inputs under torch.compile) are the model's business
                if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.is_floating_point() \
                        and not bool(torch.isfinite(x).all()):
                    raise ValueError("input frame holds NaN or inf values; the eventful state was left untouched")
        if self.graph_module is None:
            self._build(inputs)
        elif signature != self._signature:
            warnings.warn(f"eventful_fx: input changed from {self._signature} to {signature}; re-capturing "
                          "the model and starting with a dense flush", stacklevel=2)
            self._build(inputs)
        if self.refresh is not None and self._frames_since_flush >= self.refresh:
            for module in self._stateful():  # a flush of the same video: frames stay consecutive
                module.reset()
            self._frames_since_flush = 0
        flush = self._frames_since_flush == 0
        with torch.no_grad():
            out = self.graph_module(*inputs)
        self._frames_since_flush += 1
        self._update_stats(flush)
        return out

    # -- internals ------------------------------------------------------------------------
    def _build(self, inputs: tuple) -> None:
        gm = capture(self.model, inputs)
        infos = TokenAnalysis(gm).run()
        regions, sites = find_regions(gm, infos, dense_residual=self.dense_residual)
        batch = _batch_size(infos, inputs)
        self._captured = (gm, infos, regions, sites, batch)
        self._dense_macs = sum(i.macs for i in infos.values())
        self._signature = tuple(_signature(x) for x in inputs)
        self.planner = Planner(gm, infos, regions, sites, batch, attention=self.attention,
                               memory_cap_bytes=self.memory_cap_bytes, state_dtype=self.state_dtype)
        self._calibrations = {}  # a new graph: its gates must be measured again
        self.graph_module = None
        self._apply_plan()

    def _rewrite(self, plan: Plan) -> None:
        """Build the eventful graph for a plan's structure (which gates, which attention modes): no re-capture."""
        gm, infos, regions, sites, batch = self._captured
        self.graph_module = EventfulRewrite(infos, regions, sites, plan, batch, self.linear_kernel,
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

    def _calibration_frames(self) -> torch.Tensor | None:
        """The clip to calibrate on: the user's, or the built-in clip at the input's size (image inputs only)."""
        source = self._calibration_source
        if source is None or isinstance(source, (torch.Tensor, list, tuple)):
            return source
        shape, dtype, device = self._signature[0] if len(self._signature) == 1 and isinstance(
            self._signature[0], tuple) else ((), None, None)
        if len(shape) != 4 or shape[1] != 3 or not dtype.is_floating_point:
            return None  # not a batch of RGB frames: the uniform plan
        h, w = shape[2:]
        frames = builtin_clip(size=max(h, w), max_frames=CALIBRATION_FRAMES)
        if h != w:
            frames = torch.nn.functional.interpolate(frames, size=(h, w), mode="bilinear", align_corners=False)
        return frames.to(device=device, dtype=dtype)

    def _apply_plan(self) -> None:
        """Plan for the current budget; rewrite only when the structure (gated regions, attention modes) changes.

        Below budget 1 (top-k policy) the plan uses the error model calibrated at the nearest
        calibration point, measured the first time it is needed."""
        point = base_fraction(self._budget)
        if self._budget < 1 and point not in self._calibrations and not self._calibrating \
                and self.policy == "topk":
            frames = self._calibration_frames()
            if frames is not None:
                self.planner.fits.pop(self.attention, None)
                self._plan_for_budget()
                self.calibrate(frames, point)
                return
        calibration = self._calibrations.get(point)
        current = self.planner.fits.get(self.attention)
        if calibration is not None and (current is None or current.weights is not calibration.weights):
            self.planner.set_fit(self.attention, ErrorFit(calibration.weights, calibration.intercept))
        self._plan_for_budget()

    @property
    def calibration(self) -> Calibration | None:
        """The calibration the current plan uses (None: the uniform plan)."""
        return self._calibrations.get(base_fraction(self._budget)) if self._budget < 1 else None

    def _plan_for_budget(self) -> None:
        decision = self.planner.plan(self._budget)
        if not decision.feasible:
            warnings.warn(f"eventful_fx: budget {self._budget} is below what this model can reach (every gate at its "
                          f"least k predicts {decision.predicted_macs / self._dense_macs:.3f} of the dense MACs)",
                          stacklevel=3)
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
        self.model, self.decision = emodel.model, emodel.decision

    def set_policies(self, policies: dict) -> None:
        for name, gate in self.gates.items():
            gate.policy = policies[name]

    def reset(self) -> None:
        for module in self.stateful:
            module.reset()


_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _batch_size(infos, inputs) -> int:
    for node, info in infos.items():
        if info.kind == "patch_embed":
            return node.meta["val"].shape[0]
    return inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 0 else 1


def _check_budget(budget) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not (0 < budget <= 1) or math.isnan(budget):
        raise ValueError(f"budget must be a fraction of the dense model's MACs in (0, 1], got {budget!r}")


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _signature(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device)
    return type(x)


def compile(model: torch.nn.Module, budget: float = 0.25, **options) -> EventfulModule:  # noqa: A001
    """Wrap `model` into an EventfulModule (lazy: captures on the first call)."""
    return EventfulModule(model, budget, **options)
