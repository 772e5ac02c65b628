"""Where an incremental frame's time goes: a per-op profile of the eventful model (issue 13).

Runs the built-in clip through `eventful_fx.compile(model, budget=...)` and profiles the
incremental frames after a warm-up with `torch.profiler`. The eventful graph's own modules
(gates, buffers, the k-row linears, gated attention) are timed as ranges, inclusive of the ops
inside them; every other top-level op of the graph (layer norms, GELU, residual adds, the patch
embedding) by its name; what the ops leave of the frame's wall time is Python and dispatch. The
dense model with packed linears (`eventful_fx.baselines`) is profiled the same way beside it.

Then, without the profiler, the kernel floor: the frame's k-row linears and gated attention
calls (recorded with their arguments on one incremental frame) and the patch embedding,
replayed back to back with nothing else, timed alternating with the eventful frame and the
dense model (eager and packed). Its speedup is what the plan could give if gates, buffers,
norms, adds and Python cost nothing: the ceiling of this plan on these kernels.

    python benchmarks/profile_frame.py --model vit_base_patch16_224 --budget 0.25
    python benchmarks/profile_frame.py --model vit_base_patch16_384 --frames 6
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import eventful_fx
from eventful_fx.baselines import packed_linears
from eventful_fx.video import builtin_clip

# eventful modules timed as a whole; their class names, as the profile's categories
MODULE_CATEGORIES = {"SparseLinear": "linears (k rows)", "RegionGate": "gates", "RegionBuffer": "buffers",
                     "TokenBuffer": "buffers", "QueryGatedAttention": "attention (gated)",
                     "RowGatedAttention": "attention (gated)", "IncrementalAttention": "attention (gated)"}
OP_CATEGORIES = {"aten::addmm": "linears (dense)", "aten::linear": "linears (dense)", "aten::mm": "linears (dense)",
                 "mkldnn::_linear_pointwise": "linears (dense)",
                 "aten::scaled_dot_product_attention": "attention (dense)",
                 "aten::layer_norm": "layer norm", "aten::gelu": "GELU", "aten::add": "residual adds",
                 "aten::conv2d": "patch embedding", "aten::convolution": "patch embedding"}


def _label_modules(graph_module: torch.nn.Module) -> list:
    """A profiler range around every eventful module's call, named by its category."""
    handles = []
    for module in graph_module.modules():
        category = MODULE_CATEGORIES.get(type(module).__name__)
        if category is None:
            continue
        ranges = []
        handles.append(module.register_forward_pre_hook(
            lambda m, a, c=category, r=ranges: r.append(record_function(c).__enter__()) and None))
        handles.append(module.register_forward_hook(
            lambda m, a, o, r=ranges: r.pop().__exit__(None, None, None) and None))
    return handles


def profile_frames(run, frames) -> tuple[dict[str, float], float]:
    """Per frame: ms by category (top-level events only, so nothing counts twice), and wall ms."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for frame in frames:
            run(frame[None])
        wall = (time.perf_counter() - start) * 1e3 / len(frames)
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        name = event.name
        category = name if name in MODULE_CATEGORIES.values() else OP_CATEGORIES.get(name, "other ops")
        totals[category] += event.cpu_time_total / 1e3 / len(frames)
    totals["Python and dispatch"] = max(wall - sum(totals.values()), 0.0)
    return dict(totals), wall


# the eventful graph's compute kernels: what a frame cannot do without at its plan's row counts
FLOOR_MODULES = ("SparseLinear", "QueryGatedAttention", "RowGatedAttention", "IncrementalAttention", "DenseAttention")


def record_kernel_calls(graph_module: torch.nn.Module, run_frame) -> list:
    """(module, args, kwargs) of every outermost FLOOR_MODULES call of one frame, arguments as passed."""
    calls, depth = [], [0]

    def enter(module, args, kwargs):
        if depth[0] == 0:
            calls.append((module, args, kwargs))
        depth[0] += 1

    def leave(module, args, kwargs, out):
        depth[0] -= 1

    handles = []
    for module in graph_module.modules():
        if type(module).__name__ in FLOOR_MODULES:
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
    run_frame()
    for handle in handles:
        handle.remove()
    return calls


def kernel_floor(model, emodel, dense, frames, rounds: int) -> tuple[dict[str, float], collections.Counter]:
    """Median ms of the eventful frame, its kernel floor and the dense models, alternating per round;
    the floor's calls by module type."""
    calls = record_kernel_calls(emodel.graph_module, lambda: emodel(frames[0][None]))
    patch_embed = getattr(model, "patch_embed", None)

    def floor(frame):
        if patch_embed is not None:
            patch_embed(frame[None])
        for module, args, kwargs in calls:
            module(*args, **kwargs)

    runs = {"eventful": lambda f: emodel(f[None]), "kernel floor": floor,
            "dense eager": lambda f: model(f[None]), "dense packed": lambda f: dense(f[None])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        frame = frames[1 + i % (len(frames) - 1)]
        for name, run in runs.items():
            start = time.perf_counter()
            run(frame)
            times[name].append((time.perf_counter() - start) * 1e3)
    return ({name: statistics.median(t) for name, t in times.items()},
            collections.Counter(type(module).__name__ for module, _, _ in calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--frames", type=int, default=8, help="profiled incremental frames (after 4 of warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan", choices=("default", "uniform"), default="default",
                        help="default: calibrated on the built-in clip; uniform: every gate keeps the budget's share")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds of the kernel-floor timing")
    parser.add_argument("--out", default=None, help="JSON path (default: results/profile_<model>_<budget>[_uniform].json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.default_cfg["input_size"][-1]
    clip = builtin_clip(size=size, max_frames=4 + args.frames)
    emodel = eventful_fx.compile(model, budget=args.budget,
                                 calibration="builtin" if args.plan == "default" else None)
    dense = packed_linears(model)
    with torch.no_grad():
        for frame in clip[:4]:  # the flush, calibration, kernel choice and first allocations
            emodel(frame[None])
            dense(frame[None])
        handles = _label_modules(emodel.graph_module)
        eventful, eventful_wall = profile_frames(emodel, clip[4:])
        for handle in handles:
            handle.remove()
        baseline, dense_wall = profile_frames(dense, clip[4:])
        floor, floor_calls = kernel_floor(model, emodel, dense, clip[4:], args.rounds)
    rows = sorted(set(eventful) | set(baseline), key=lambda c: -eventful.get(c, 0.0))
    print(f"{args.model}, budget {args.budget}, {args.plan} plan, {args.threads} threads, {args.frames} frames; ms per frame "
          f"(profiler on: wall {eventful_wall:.1f} eventful, {dense_wall:.1f} dense with packed linears)")
    print(f"| {'category':<24} | eventful ms | share | dense ms |")
    print(f"|{'-' * 26}|---|---|---|")
    for category in rows:
        print(f"| {category:<24} | {eventful.get(category, 0.0):.1f} | {eventful.get(category, 0.0) / eventful_wall:.0%}"
              f" | {baseline.get(category, 0.0):.1f} |")
    fastest = min(floor["dense eager"], floor["dense packed"])
    print(f"\nprofiler off, medians of {args.rounds} alternating rounds (ms): " + ", ".join(
        f"{name} {ms:.1f}" for name, ms in floor.items()))
    print(f"speedup against the fastest dense model: eventful {fastest / floor['eventful']:.2f}x, "
          f"kernel floor {fastest / floor['kernel floor']:.2f}x (the ceiling of this plan on these kernels); "
          f"the rest of the eventful frame: {1 - floor['kernel floor'] / floor['eventful']:.0%}; "
          f"floor calls: {dict(floor_calls)} and the patch embedding")
    suffix = "" if args.plan == "default" else f"_{args.plan}"
    out = Path(args.out or Path(__file__).parent / "results" / f"profile_{args.model}_{args.budget}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "budget": args.budget, "plan": args.plan, "threads": args.threads,
                               "frames": args.frames, "cpu": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "eventful_ms": eventful, "eventful_wall_ms": eventful_wall,
                               "dense_ms": baseline, "dense_wall_ms": dense_wall,
                               "unprofiled_median_ms": floor, "floor_calls": floor_calls}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
