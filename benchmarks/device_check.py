"""One run that checks and times eventful_fx on a device (a lent GPU, or the CPU): correctness first, then speed.

Checks (each against the dense model on the same device): budget 1.0 equals dense; a batch of
two streams gives stream 0 what it gets alone; `torch.compile` of the eventful model equals the
eager eventful model. Then the speed table of `bench_cpu.py` (every dense baseline, the eventful
model eager and under Inductor), printed and written as JSON with the device's name.

    python benchmarks/device_check.py --device cuda --out "$OUT/device_check.json"   # on a lent GPU
    python benchmarks/device_check.py --device cpu --models vit_tiny_patch16_224 --frames 4 --budgets 0.5
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

import eventful_fx
from eventful_fx.baselines import BASELINES, dense_baselines
from eventful_fx.measure import format_table, measure
from eventful_fx.video import builtin_clip


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def checks(model, frames) -> dict:
    """Worst relative error of each check over the frames (each must be <= 1e-4)."""
    exact, alone, batched = (eventful_fx.compile(model, budget=b, calibration=None) for b in (1.0, 0.25, 0.25))
    compiled = torch.compile(eventful_fx.compile(model, budget=0.25, calibration=None))
    eager = eventful_fx.compile(model, budget=0.25, calibration=None)
    worst = {"budget 1.0 vs dense": 0.0, "stream 0 in a batch vs alone": 0.0, "torch.compile vs eager": 0.0}
    with torch.no_grad():
        for frame in frames:
            x = frame[None]
            worst["budget 1.0 vs dense"] = max(worst["budget 1.0 vs dense"], rel(exact(x), model(x)))
            pair = batched(torch.cat([x, x.flip(-1)]))
            worst["stream 0 in a batch vs alone"] = max(worst["stream 0 in a batch vs alone"], rel(pair[:1], alone(x)))
            worst["torch.compile vs eager"] = max(worst["torch.compile vs eager"], rel(compiled(x), eager(x)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="vit_base_patch16_384,vit_base_patch16_224")
    parser.add_argument("--budgets", default="1.0,0.5,0.25,0.125")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "device_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report = {"device": name, "torch": torch.__version__, "models": {}}
    rows = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False).eval().to(device)
        frames = builtin_clip(size=model.pretrained_cfg["input_size"][-1], max_frames=args.frames).to(device)
        start = time.perf_counter()
        result = report["models"][model_name] = {"checks": checks(model, frames[:4])}
        result["checks_s"] = time.perf_counter() - start
        print(model_name, json.dumps(result["checks"]), flush=True)
        baselines = dense_baselines(model, BASELINES)
        for inductor in (False, True):
            for budget in (float(b) for b in args.budgets.split(",")):
                row = measure(model, frames, budget, name=f"{model_name}{' +inductor' if inductor else ''}",
                              baselines=baselines, inductor=inductor, progress=False)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
        result["rows"] = [r.as_dict() for r in rows if r.model.startswith(model_name)]
    print(f"\n{name}\n{format_table(rows)}")
    failed = {m: c for m, r in report["models"].items() for c, v in r["checks"].items() if v > 1e-4}
    print("checks:", "all within 1e-4" if not failed else f"FAILED {failed}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
