"""A bounded load test of `eventful-fx serve` on localhost: streams sending at a fixed rate.

Each of `--streams` clients sends `--frames` frames of the built-in real clip (each stream
starts at another frame) at `--fps` frames per second, over HTTP, to one Ray Serve
application on this machine; a frame is sent at its capture time or, when the server is
behind, as soon as the stream's previous answer arrives (no frame is dropped). Latency is
answer time minus capture time, so it includes waiting behind the stream's earlier frames.
The same deployment is run at each budget in turn (budget 1.0 is the dense baseline: every
frame recomputes every token) in one process.

    python benchmarks/bench_serve.py                       # ViT-B/224, 8 streams x 60 frames at 2 fps
    python benchmarks/bench_serve.py --model vit_small_patch16_224 --fps 4 --budgets 1.0,0.25
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve

from eventful_fx import serve as es
from eventful_fx.video import builtin_clip


def drive(url: str, frames: np.ndarray, fps: float, start: float, out: dict) -> None:
    latencies, fractions, flushes = [], [], 0
    with es.StreamClient(url) as stream:
        for t, frame in enumerate(frames):
            capture = start + t / fps
            time.sleep(max(0.0, capture - time.perf_counter()))
            stream.send(frame)
            latencies.append(time.perf_counter() - capture)
            fractions.append(stream.mac_fraction)
            flushes += stream.flushed
    out.update(latencies=latencies, fractions=fractions, flushes=flushes)


def load_test(url: str, clips: list[np.ndarray], fps: float) -> dict:
    results = [{} for _ in clips]
    start = time.perf_counter() + 0.5
    threads = [threading.Thread(target=drive, args=(url, c, fps, start, r)) for c, r in zip(clips, results)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    latencies = sorted(x for r in results for x in r["latencies"])
    fractions = [x for r in results for x in r["fractions"][1:]]  # frame 0 of each stream is its dense flush
    return {"frames": len(latencies), "wall_s": wall, "fps": len(latencies) / wall,
            "offered_fps": fps * len(clips),
            "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * float(np.quantile(latencies, 0.99)),
            "mac_fraction": statistics.fmean(fractions), "flushes": sum(r["flushes"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--fps", type=float, default=2.0, help="frames per second per stream")
    p.add_argument("--budgets", default="1.0,0.25")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-wait", type=float, default=0.05, help="seconds a replica waits to fill a batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_serve.json"))
    args = p.parse_args()

    clip = builtin_clip(args.size, name="real").numpy()
    clips = [np.roll(clip, -7 * i, axis=0)[:args.frames] for i in range(args.streams)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for budget in (float(b) for b in args.budgets.split(",")):
            url = es.run(args.model, budget, replicas=args.replicas, size=args.size, max_batch=args.streams,
                         batch_wait_s=args.batch_wait, threads=args.threads, port=8321)
            es.StreamClient(url).send(clips[0][0])  # the replica's first frame builds its graph: not timed
            row = {"model": args.model, "budget": budget, "streams": args.streams, "replicas": args.replicas,
                   **load_test(url, clips, args.fps)}
            rows.append(row)
            serve.delete(es.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'model':24} {'budget':>6} {'streams':>7} {'offered':>8} {'served':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'MACs':>6}")
    for r in rows:
        print(f"{r['model']:24} {r['budget']:6.2f} {r['streams']:7d} {r['offered_fps']:7.1f}/s {r['fps']:7.1f}/s "
              f"{r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['mac_fraction']:6.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
