"""Fidelity at equal MACs: eventful_fx's plans against the original Eventful Transformers, on every output token.

ViT-B/16 at 224 (untrained, seed 0; `--model` takes any timm ViT). Two things users read, each compiled as users would:
the backbone's tokens after the last block (`zoo.Tokens`: no final norm, no head) and the
classifier's logits (with top-1 agreement). Error = ||eventful - dense|| / ||dense||, mean
over the incremental frames of 16-frame clips: the built-in clip, the real camera clip
"bikes" (used while tuning) and "carphone" (kept out of all tuning: the held-out check).
The original's points come from `original_tokenwise.py` at k = N/2, N/4, N/8.

    python benchmarks/bench_fidelity.py                    # table, JSON and PNG (~12 min on 2 cores)
    python benchmarks/bench_fidelity.py --clips builtin --plans default,incremental,"residual gates" --budgets 0.25
    python benchmarks/bench_fidelity.py --model vit_small_patch16_224 --clips builtin,carphone   # other timm ViTs
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
import eventful_fx  # noqa: E402
from eventful_fx.video import builtin_clip, camera_clip  # noqa: E402
from eventful_fx.zoo import Tokens  # noqa: E402
from original_tokenwise import ORIGINAL_MAC_FRACTION, OriginalTokenwise, mac_fraction  # noqa: E402

PLANS = {  # name -> compile options
    "default": {},
    "uniform": {"calibration": None},                              # one k/N for every gate: the original's stand-in
    "incremental": {"attention": "incremental"},
    "residual gates": {"dense_residual": False, "calibration": None},  # the default before issue 10
    "neighbour reuse": {"neighbour_reuse": True},                  # skipped tokens may take a neighbour's results
}
HELD_OUT = "carphone"


def clip(name: str, size: int, frames: int) -> torch.Tensor:
    return builtin_clip(size, frames) if name == "builtin" else camera_clip(name, size, frames)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def run_plan(model, frames, dense, budget, options):
    emodel = eventful_fx.compile(model, budget=budget, **options)
    errors, agree, macs = [], [], []
    with torch.no_grad():
        for t, frame in enumerate(frames):
            out = emodel(frame[None])
            if t:
                errors.append(rel(out, dense[t]))
                macs.append(emodel.stats.fraction)
                if out.ndim == 2:
                    agree.append(float(out.argmax(-1).item() == dense[t].argmax(-1).item()))
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"macs": mean(macs), "error": mean(errors), "max_frame_error": max(errors), "top1": mean(agree)}


def run_original(vit, frames, dense_tokens, dense_logits, divisor):
    n = dense_tokens[0].shape[1]
    ref = OriginalTokenwise(vit, k=n // divisor)
    tok, lg, agree = [], [], []
    for t, frame in enumerate(frames):
        tokens, logits = ref(frame[None])
        if t:
            tok.append(rel(tokens, dense_tokens[t]))
            lg.append(rel(logits, dense_logits[t]))
            agree.append(float(logits.argmax(-1).item() == dense_logits[t].argmax(-1).item()))
    # the authors' own count where it is at hand, else the same count from the model's dimensions
    macs = ORIGINAL_MAC_FRACTION[divisor] if divisor in ORIGINAL_MAC_FRACTION and n == 197 and vit.embed_dim == 768 and len(vit.blocks) == 12 \
        else mac_fraction(vit, n, n // divisor)
    count = len(tok)
    return {"macs": macs, "tokens": sum(tok) / count, "logits": sum(lg) / count, "top1": sum(agree) / count}


def original_at(points: list[dict], key: str, macs: float) -> float:
    """The original's error at a MAC fraction: linear in log error between its points (extrapolated at the ends)."""
    pts = sorted((p["macs"], math.log(p[key])) for p in points)
    i = next((i for i in range(1, len(pts) - 1) if macs < pts[i][0]), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return math.exp(y0 + (y1 - y0) * (macs - x0) / (x1 - x0))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = list(results["clips"])
    fig, axes = plt.subplots(2, len(clips), figsize=(4.2 * len(clips), 7), squeeze=False)
    for col, name in enumerate(clips):
        r = results["clips"][name]
        for row, (key, label) in enumerate((("tokens", "all output tokens"), ("logits", "logits"))):
            ax = axes[row][col]
            orig = r["original"]
            ax.plot([p["macs"] for p in orig], [p[key] for p in orig], "k--o", label="original (token-wise gates)")
            for plan, rows in r[key].items():
                ax.plot([x["macs"] for x in rows], [x["error"] for x in rows], "-o", label=plan)
            ax.set_yscale("log")
            ax.set_xlabel("MACs / dense")
            ax.set_ylabel(f"rel. error, {label}")
            ax.set_title(f"{name}{' (held out)' if name == HELD_OUT else ''}: {label}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}, error vs MACs: eventful_fx plans and the original")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm VisionTransformer")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--init-values", type=float, default=None,
                        help="LayerScale's initial value (untrained DINOv2's 1e-5 makes every block near identity)")
    parser.add_argument("--clips", default="builtin,bikes,carphone")
    parser.add_argument("--plans", default="default,uniform", help=f"for the tokens, of: {', '.join(PLANS)}")
    parser.add_argument("--logit-plans", default="default,uniform", help="for the logits")
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: results/bench_fidelity[_MODEL].json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    kwargs = {k: v for k, v in (("img_size", args.size), ("init_values", args.init_values)) if v is not None}
    vit = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    size = vit.patch_embed.img_size[0]
    backbone = Tokens(vit).eval()
    label = f"{args.model} at {size} (untrained, seed 0" + \
        (f", LayerScale init {args.init_values:g})" if args.init_values is not None else ")")
    results = {"model": label, "frames": args.frames, "held_out": HELD_OUT, "clips": {}}
    lines = [f"{'clip':<9} {'output':<7} {'plan':<15} {'budget':>6} {'MACs':>6} {'error':>7} {'original':>8} "
             f"{'ratio':>6} {'top-1':>5}"]
    for name in args.clips.split(","):
        frames = clip(name, size, args.frames)
        with torch.no_grad():
            dense_tokens = [backbone(f[None]) for f in frames]
            dense_logits = [vit(f[None]) for f in frames]
        # where the original's k = N/8 still costs more than the lowest budget (its attention is dense),
        # k = N/16 too, so the comparison interpolates instead of extrapolating
        n = dense_tokens[0].shape[1]
        divisors = (2, 4, 8, 16) if mac_fraction(vit, n, n // 8) > min(budgets) * 1.2 else (2, 4, 8)
        original = [run_original(vit, frames, dense_tokens, dense_logits, d) for d in divisors]
        entry = results["clips"][name] = {"original": original, "tokens": {}, "logits": {}}
        for key, model, dense, plans in (("tokens", backbone, dense_tokens, args.plans),
                                         ("logits", vit, dense_logits, args.logit_plans)):
            for plan in plans.split(","):
                rows = entry[key][plan] = []
                for budget in budgets:
                    row = {"budget": budget, **run_plan(model, frames, dense, budget, PLANS[plan])}
                    row["original_at_macs"] = original_at(original, key, row["macs"])
                    row["ratio"] = row["error"] / row["original_at_macs"]
                    rows.append(row)
                    top1 = f"{row['top1']:.0%}" if row["top1"] is not None else ""
                    lines.append(f"{name:<9} {key:<7} {plan:<15} {budget:>6.3f} {row['macs']:>6.3f} "
                                 f"{row['error']:>7.2%} {row['original_at_macs']:>8.2%} {row['ratio']:>5.2f}x {top1:>5}")
                    print(lines[-1], flush=True)
        for p, d in zip(original, divisors):
            lines.append(f"{name:<9} {'both':<7} {'original N/' + str(d):<15} {'':>6} {p['macs']:>6.3f} "
                         f"{p['tokens']:>7.2%} {p['logits']:>8.2%} (tokens / logits)")
            print(lines[-1], flush=True)
    print("\n".join(["", *lines]))
    default = "bench_fidelity.json" if args.model == "vit_base_patch16_224" and size == 224 \
        else f"bench_fidelity_{args.model}_{size}.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
