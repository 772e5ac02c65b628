"""Where an incremental frame's time goes: a per-op profile of the eventful model (issue 13).

Runs the built-in clip through `eventful_fx.compile(model, budget=...)` and profiles the
incremental frames after a warm-up with `torch.profiler`. The eventful graph's own modules
(gates, buffers, the k-row linears, gated attention) are timed as ranges, inclusive of the ops
inside them; every other top-level op of the graph (layer norms, GELU, residual adds, the patch
embedding) by its name; what the ops leave of the frame's wall time is Python and dispatch. The
dense model with packed linears (`eventful_fx.baselines`) is profiled the same way beside it.

    python benchmarks/profile_frame.py --model vit_base_patch16_224 --budget 0.25
    python benchmarks/profile_frame.py --model vit_base_patch16_384 --frames 6
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--frames", type=int, default=8, help="profiled incremental frames (after 4 of warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default: results/profile_<model>_<budget>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.default_cfg["input_size"][-1]
    clip = builtin_clip(size=size, max_frames=4 + args.frames)
    emodel = eventful_fx.compile(model, budget=args.budget)
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
    rows = sorted(set(eventful) | set(baseline), key=lambda c: -eventful.get(c, 0.0))
    print(f"{args.model}, budget {args.budget}, {args.threads} threads, {args.frames} frames; ms per frame "
          f"(profiler on: wall {eventful_wall:.1f} eventful, {dense_wall:.1f} dense with packed linears)")
    print(f"| {'category':<24} | eventful ms | share | dense ms |")
    print(f"|{'-' * 26}|---|---|---|")
    for category in rows:
        print(f"| {category:<24} | {eventful.get(category, 0.0):.1f} | {eventful.get(category, 0.0) / eventful_wall:.0%}"
              f" | {baseline.get(category, 0.0):.1f} |")
    out = Path(args.out or Path(__file__).parent / "results" / f"profile_{args.model}_{args.budget}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "budget": args.budget, "threads": args.threads,
                               "frames": args.frames, "cpu": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "eventful_ms": eventful, "eventful_wall_ms": eventful_wall,
                               "dense_ms": baseline, "dense_wall_ms": dense_wall}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
