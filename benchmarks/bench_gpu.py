"""GPU speed in one command: the dense model three ways against the eventful one, at the same dtype (issue 13).

For each configuration (model, streams) the dense model runs eagerly, under `torch.compile`
and under `torch.compile(mode="reduce-overhead")` (CUDA graphs); the eventful model at each
budget runs eagerly and under `torch.compile(mode="reduce-overhead")`, all in float16 (or
`--dtype bfloat16`), alternating frame by frame in this one process on the built-in clip
(each stream a shifted copy). The speedup is against the fastest dense run of the same
configuration; errors are against the dense eager output of the same frame, on every output
token. It also checks that an incremental frame of the eager eventful model does not wait for
the device (`torch.cuda.set_sync_debug_mode`). Where Triton runs, the eventful model also runs with its
gates on PyTorch's ops ("torch gates"), and the Triton kernels are first timed alone against the ops
they replace (`runtime/triton_kernels.py`). Rows are written as JSON after each
configuration, so a run cut short still leaves what it measured; `--minutes` stops starting
new configurations after that long.

    python benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json"        # a lent GPU: about 8 minutes
    python benchmarks/bench_gpu.py --device cpu --dtype bfloat16 --configs vit_tiny_patch16_224:2 --frames 4 --size 96
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import timm
import torch
from torch._dynamo.utils import counters

import eventful_fx
from eventful_fx.runtime import triton_kernels
from eventful_fx.video import builtin_clip

# the targets first (SAM at 1024, 8 streams of ViT-B/384), should `--minutes` cut the run short
CONFIGS = ("samvit_base_patch16:1,vit_base_patch16_384:8,vit_base_patch16_224:1,vit_base_patch16_384:1,"
           "vit_base_patch16_224:8")
WARMUP = 3  # untimed frames per run: the flush, the first incremental frame (a recompile), CUDA graph recording


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _clip(size: int, streams: int, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[T, streams, 3, H, W]: stream s is the built-in clip shifted by 3 s frames."""
    clip = builtin_clip(size=size, max_frames=frames + 3 * streams)
    return torch.stack([clip[3 * s:3 * s + frames] for s in range(streams)], dim=1).to(device, dtype)


def _host_syncs(emodel, frame: torch.Tensor) -> int | None:
    """Device waits during one incremental frame of the eager eventful model (None off CUDA)."""
    if frame.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            emodel(frame)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _torch_gates(run):
    def call(x):
        triton_kernels.ENABLED = False
        try:
            return run(x)
        finally:
            triton_kernels.ENABLED = True
    return call


def _median_ms(fn, device: torch.device, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_rows(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The Triton kernels against the PyTorch ops they replace, at ViT-B/384's sizes (N = 577, k = 144)."""
    from eventful_fx.runtime import TokenGate, TopK
    rows = []
    for streams in (1, 8):
        x = torch.randn(streams, 577, 768, device=device, dtype=dtype)
        for kind in ("torch", "triton"):
            gate = TokenGate(TopK(144))
            gate(x)
            run = _torch_gates(gate) if kind == "torch" else gate
            moved = x + 0.1
            rows.append({"kernel": f"gate, {streams} streams", "impl": kind,
                         "ms": _median_ms(lambda: run(moved), device)})
    a = torch.randn(144, 768, device=device, dtype=dtype)
    weight, bias = torch.randn(3072, 768, device=device, dtype=dtype), torch.randn(3072, device=device, dtype=dtype)
    where = torch.randperm(577, device=device)[:144]
    out = torch.zeros(577, 3072, device=device, dtype=dtype)
    for kind, fn in (("torch", triton_kernels.gathered_linear_into_reference),
                     ("triton", triton_kernels.gathered_linear_into)):
        rows.append({"kernel": "linear 768->3072 on 144 rows into a buffer", "impl": kind,
                     "ms": _median_ms(lambda: fn(a, weight, bias, where, out), device)})
    return rows


def run_config(name: str, streams: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    counters.clear()
    torch.manual_seed(0)
    sized = {"img_size": args.size} if args.size else {}
    model = timm.create_model(name, pretrained=False, **sized).eval().to(device, dtype)
    size = args.size or model.pretrained_cfg["input_size"][-1]
    frames = _clip(size, streams, args.frames, device, dtype)
    runs = {"dense eager": model, "dense compile": torch.compile(model),
            "dense cudagraphs": torch.compile(model, mode="reduce-overhead")}
    eager_eventful = {}
    for budget in args.budgets:
        eager_eventful[budget] = runs[f"eventful {budget} eager"] = eventful_fx.compile(model, budget=budget)
        if triton_kernels.enabled(frames[0]):  # the same model with its gates on PyTorch's ops
            runs[f"eventful {budget} eager, torch gates"] = _torch_gates(eventful_fx.compile(model, budget=budget))
        runs[f"eventful {budget} cudagraphs"] = torch.compile(eventful_fx.compile(model, budget=budget),
                                                              mode="reduce-overhead")
    times = {r: [] for r in runs}
    errors = {r: [] for r in runs}
    first_ms, failed = {}, {}
    with torch.no_grad():
        for t, frame in enumerate(frames):
            dense = None
            for run_name, run in runs.items():
                if run_name in failed:
                    continue
                try:
                    _sync(device)
                    start = time.perf_counter()
                    out = run(frame)
                    _sync(device)
                    ms = (time.perf_counter() - start) * 1e3
                    out = out.float()  # a copy: CUDA graphs overwrite their outputs on the next replay
                except Exception as error:  # noqa: BLE001 - one failing run must not cost the others' numbers
                    failed[run_name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    print(f"  {run_name} failed on frame {t}: {failed[run_name]}", flush=True)
                    continue
                if run_name == "dense eager":
                    dense = out
                if t < WARMUP:
                    first_ms[run_name] = first_ms.get(run_name, 0.0) + ms  # compile and planning included
                else:
                    times[run_name].append(ms)
                if t and dense is not None:
                    errors[run_name].append(_rel(out, dense))
        syncs = {b: _host_syncs(m, frames[-1]) for b, m in eager_eventful.items()}
    medians = {r: statistics.median(v) for r, v in times.items() if v}
    dense_runs = {r: ms for r, ms in medians.items() if r.startswith("dense")}
    fastest = min(dense_runs, key=dense_runs.get) if dense_runs else None
    rows = []
    for run_name, ms in medians.items():
        rows.append({"run": run_name, "ms": ms, "first_frames_s": first_ms.get(run_name, 0.0) / 1e3,
                     "vs_fastest_dense": dense_runs[fastest] / ms if fastest else None,
                     "rel_error": statistics.mean(errors[run_name]) if errors[run_name] else None})
    macs = {b: m.stats.fraction for b, m in eager_eventful.items()}
    return {"model": name, "streams": streams, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "fastest_dense": fastest, "rows": rows, "failed": failed, "mac_fraction": macs,
            "host_syncs_per_incremental_frame": syncs,
            # Inductor's reasons for running a graph without CUDA graphs (mutated inputs, CPU ops, ...)
            "cudagraph_counters": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}


def format_rows(results: list[dict]) -> str:
    lines = ["| model | streams | run | ms | vs fastest dense | rel. error (all tokens) | first 3 frames s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            speed = f"{row['vs_fastest_dense']:.2f}×" if row["vs_fastest_dense"] else "—"
            err = f"{row['rel_error']:.1e}" if row["rel_error"] is not None else "—"
            lines.append(f"| {r['model']} | {r['streams']} | {row['run']} | {row['ms']:.2f} | {speed} | {err} | "
                         f"{row['first_frames_s']:.1f} |")
        for run_name, why in r["failed"].items():
            lines.append(f"| {r['model']} | {r['streams']} | {run_name} | failed: {why} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--configs", default=CONFIGS, help="model:streams, comma-separated")
    parser.add_argument("--budgets", default="0.25", help="comma-separated")
    parser.add_argument("--frames", type=int, default=12, help="per run, the first 3 untimed")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--minutes", type=float, default=7.0, help="start no configuration after this long")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_gpu.json"))
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; pass --device cpu for a smoke test")
    if args.frames <= WARMUP:
        raise SystemExit(f"bench_gpu: --frames must exceed the {WARMUP} untimed frames")
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report = {"device": card, "torch": torch.__version__,
              "budgets": args.budgets, "frames": args.frames, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if triton_kernels.enabled(torch.empty(0, device=device)):
        report["kernels"] = kernel_rows(device, dtype)
        for row in report["kernels"]:
            print(f"{row['kernel']}, {row['impl']}: {row['ms']:.3f} ms", flush=True)
    start = time.perf_counter()
    for config in args.configs.split(","):
        if (time.perf_counter() - start) / 60 > args.minutes:
            report.setdefault("skipped", []).append(config)
            print(f"{config}: skipped, past {args.minutes} minutes", flush=True)
            continue
        name, streams = config.rsplit(":", 1)
        began = time.perf_counter()
        result = run_config(name, int(streams), args, device, dtype)
        result["seconds"] = time.perf_counter() - began
        report["results"].append(result)
        print(format_rows([result]).split("\n", 2)[2], flush=True)
        print(f"  host syncs per incremental frame: {result['host_syncs_per_incremental_frame']}; "
              f"CUDA graph counters {result['cudagraph_counters']}; {result['seconds']:.0f} s", flush=True)
        out.write_text(json.dumps(report, indent=1))
        torch._dynamo.reset()  # each configuration compiles afresh; earlier graphs need not stay resident
    print(f"\n{card}, {args.dtype}, budgets {args.budgets}\n{format_rows(report['results'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
