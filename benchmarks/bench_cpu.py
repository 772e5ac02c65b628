"""Dense vs eventful on the CPU: per-frame wall-clock, MAC ratio and fidelity on the built-in clip.

Dense and eventful calls alternate frame by frame in this one process (see eventful_fx.measure),
so the speedup is a ratio measured under the same machine load, against the fastest of three
dense models (eager, linears on the packed oneDNN kernel, Inductor; `eventful_fx.baselines`).
Prints a table and writes JSON.

    python benchmarks/bench_cpu.py                       # ViT-B/16 at 224 and 384, budgets 1, 0.5, 0.25, 0.125
    python benchmarks/bench_cpu.py --models vit_base_patch16_384 --budgets 0.25 --frames 12
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import timm
import torch

from eventful_fx.baselines import BASELINES, dense_baselines
from eventful_fx.measure import format_table, measure
from eventful_fx.video import builtin_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224,vit_base_patch16_384")
    parser.add_argument("--budgets", default="1.0,0.5,0.25,0.125")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--attention", default="query")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="dense models timed (eager always)")
    parser.add_argument("--inductor", action="store_true", help="the eventful model under torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_cpu.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)  # a model's weights must not depend on which models were listed before it
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg["input_size"][-1]
        frames = builtin_clip(size=size, max_frames=args.frames)
        baselines = dense_baselines(model, args.baselines.split(","))  # one Inductor compilation per model
        for budget in (float(b) for b in args.budgets.split(",")):
            rows.append(measure(model, frames, budget, name=name, attention=args.attention, baselines=baselines,
                                inductor=args.inductor))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in info.split()]
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    machine = {"cpu": names[0] if names else platform.processor() or platform.machine(), "flags": flags,
               "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "frames": args.frames, "attention": args.attention,
                                          "inductor": args.inductor,
                                          "results": [r.as_dict() for r in rows]}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
