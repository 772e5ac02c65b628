"""Measuring an eventful model against its dense original on one video, in one process.

Dense and eventful calls alternate frame by frame, so both see the same machine load; speed
is the ratio of their median wall-clock times over the incremental frames (the first frame
is a flush for the eventful model and a warm-up for both); `paired_speedup` is the median of
the per-frame ratios, robust to a machine whose speed drifts. Fidelity is the relative error
||eventful - dense|| / ||dense|| of all outputs together, averaged over the incremental
frames; for a model that returns (tokens, logits) (`zoo.TokensAndLogits`) also of each: the
error on every output token, the logits error and how often the top-1 class agrees.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .api import compile as eventful_compile
from .calibration import output_error


@dataclass
class Measurement:
    model: str
    budget: float
    frames: int
    tokens: int
    dense_ms: float        # median per incremental frame
    eventful_ms: float     # median per incremental frame
    mac_fraction: float    # eventful / dense MACs, mean over incremental frames (overhead included)
    rel_error: float       # mean over the incremental frames, all outputs together
    max_rel_error: float
    frame_speedups: list[float] = field(default_factory=list)  # dense / eventful per incremental frame
    token_error: float | None = None     # (tokens, logits) models: mean error on every output token
    logit_error: float | None = None     # ... on the logits
    top1_agreement: float | None = None  # ... fraction of frames whose top-1 class matches dense
    frame_errors: list[float] = field(default_factory=list)   # per incremental frame, all outputs

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.eventful_ms

    @property
    def paired_speedup(self) -> float:
        """Median over frames of dense / eventful time of the same frame, run back to back: robust
        to a machine whose speed drifts over the run (the ratio of medians is not)."""
        return statistics.median(self.frame_speedups) if self.frame_speedups else self.speedup

    @property
    def mac_reduction(self) -> float:
        return 1.0 / self.mac_fraction

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "paired_speedup": self.paired_speedup,
                "mac_reduction": self.mac_reduction}


def _rel(out, ref) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _all_outputs_error(out, ref) -> float:
    err, norm = output_error(out, ref)
    return (err / max(norm, 1e-30)) ** 0.5


def _timed(fn, x):
    start = time.perf_counter()
    out = fn(x)
    return out, (time.perf_counter() - start) * 1e3


def measure(model: torch.nn.Module, frames: torch.Tensor, budget: float, *, name: str = "", progress: bool = True,
            **options) -> Measurement:
    """Run `frames` [T, C, H, W] through the dense model and its eventful version, alternating."""
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"frames must be [T >= 2, C, H, W], got shape {tuple(frames.shape)}")
    model = model.eval()
    emodel = eventful_compile(model, budget=budget, **options)
    dense_ms, eventful_ms, fractions, errors, token_errors, logit_errors, agree = [], [], [], [], [], [], []
    with torch.no_grad():
        for t, frame in enumerate(tqdm(frames, desc=f"{name or 'model'} @ budget {budget}", disable=not progress,
                                       leave=False)):
            x = frame[None]
            dense, d_ms = _timed(model, x)
            out, e_ms = _timed(emodel, x)
            if t == 0:
                continue  # the flush: dense for the eventful model, a warm-up for both
            errors.append(_all_outputs_error(out, dense))
            if isinstance(dense, tuple) and len(dense) == 2:  # (tokens, logits)
                token_errors.append(_rel(out[0], dense[0]))
                logit_errors.append(_rel(out[1], dense[1]))
                agree.append(float(bool((out[1].argmax(-1) == dense[1].argmax(-1)).all())))
            dense_ms.append(d_ms)
            eventful_ms.append(e_ms)
            fractions.append(emodel.stats.fraction)
    tokens = max(emodel.stats.tokens.values(), default=0)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return Measurement(
        model=name, budget=budget, frames=len(frames), tokens=tokens,
        dense_ms=statistics.median(dense_ms), eventful_ms=statistics.median(eventful_ms),
        mac_fraction=sum(fractions) / len(fractions),
        rel_error=mean(errors), max_rel_error=max(errors),
        frame_speedups=[d / e for d, e in zip(dense_ms, eventful_ms)],
        token_error=mean(token_errors), logit_error=mean(logit_errors), top1_agreement=mean(agree),
        frame_errors=errors,
    )


def format_table(rows: list[Measurement]) -> str:
    header = f"{'model':<26} {'budget':>6} {'MACs':>6} {'saved':>6} {'dense ms':>9} {'eventful ms':>11} " \
             f"{'speedup':>7} {'paired':>7} {'MAC red.':>8} {'rel. err':>8} {'tokens':>8} {'logits':>8} {'top-1':>5}"
    lines = [header, "-" * len(header)]
    opt = (lambda v, spec: format(v, spec) if v is not None else "")
    for r in rows:
        lines.append(f"{r.model:<26} {r.budget:>6.3f} {r.mac_fraction:>6.3f} {1 - r.mac_fraction:>6.1%} "
                     f"{r.dense_ms:>9.1f} {r.eventful_ms:>11.1f} {r.speedup:>6.2f}x {r.paired_speedup:>6.2f}x "
                     f"{r.mac_reduction:>7.2f}x {r.rel_error:>8.2e} {opt(r.token_error, '>8.2e'):>8} "
                     f"{opt(r.logit_error, '>8.2e'):>8} {opt(r.top1_agreement, '>5.0%'):>5}")
    return "\n".join(lines)
