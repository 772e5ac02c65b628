"""Cost per token row of the kernels a gated frame runs, by row count and thread count.

Why a sparse frame costs more per MAC than the dense one: a ViT-B/16 block's four linears
(on the kernel `SparseLinear` would take: oneDNN with a packed weight or PyTorch's MKL GEMM)
and the fused attention of k queries against 577 keys, at the k of a budget plan and at the
dense model's 577. Calls of every configuration alternate round after round in this one
process, so a slow spell of the machine hits all of them; medians per row are printed as a
table and written as JSON.

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --rows 64,150,577 --threads 1,2 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LINEARS = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}  # (out, in) of ViT-B/16
HEADS, HEAD_DIM, KEYS = 12, 64, 577


def _block_linears(kernel: str, weights: dict, packed: dict, inputs: dict) -> None:
    for name, (weight, bias) in weights.items():
        if kernel == "mkl":
            F.linear(inputs[name], weight, bias)
        else:
            torch.ops.mkldnn._linear_pointwise(inputs[name], packed[name], bias, "none", [], "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="43,96,150,192,275,577")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kernels.json"))
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]

    torch.manual_seed(0)
    weights = {name: (torch.randn(out, inp) * inp ** -0.5, torch.randn(out)) for name, (out, inp) in LINEARS.items()}
    packed = {name: torch.ops.mkldnn._reorder_linear_weight(w, None) for name, (w, _) in weights.items()}
    inputs = {rows: {name: torch.randn(rows, inp) for name, (_, inp) in LINEARS.items()} for rows in rows_list}
    keys, values = torch.randn(1, HEADS, KEYS, HEAD_DIM), torch.randn(1, HEADS, KEYS, HEAD_DIM)
    queries = {rows: torch.randn(1, HEADS, rows, HEAD_DIM) for rows in rows_list}
    runs = {}
    for rows in rows_list:
        for kernel in ("onednn", "mkl"):
            runs[("block linears", kernel, rows)] = lambda k=kernel, r=rows: _block_linears(k, weights, packed, inputs[r])
        runs[("attention", "flash", rows)] = lambda r=rows: F.scaled_dot_product_attention(queries[r], keys, values)

    times: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for threads in threads_list:
                torch.set_num_threads(threads)
                for key, run in runs.items():
                    run()  # warm-up at this thread count
                    start = time.perf_counter()
                    run()
                    times.setdefault((threads, *key), []).append(time.perf_counter() - start)

    results = []
    for (op, kernel, rows) in runs:
        per_row = {t: statistics.median(times[(t, op, kernel, rows)]) / rows * 1e6 for t in threads_list}
        results.append({"op": op, "kernel": kernel, "rows": rows, "us_per_row": per_row})
    head = "| op | kernel | rows | " + " | ".join(f"{t} thr µs/row" for t in threads_list) + " |"
    print(head)
    print("|" + "---|" * (3 + len(threads_list)))
    for r in results:
        print(f"| {r['op']} | {r['kernel']} | {r['rows']} | "
              + " | ".join(f"{r['us_per_row'][t]:.1f}" for t in threads_list) + " |")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "rounds": args.rounds, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
