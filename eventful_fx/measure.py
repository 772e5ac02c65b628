"""Measuring an eventful model against its dense original on one video, in one process.

Dense and eventful calls alternate frame by frame, so all see the same machine load. The
dense model runs three ways (`baselines.py`: eager, linears on the packed oneDNN kernel,
Inductor) and the speedup is taken against the fastest of them: the ratio of median
wall-clock times over the incremental frames (the first frame is a flush for the eventful
model and a warm-up, or compilation, for all); `paired_speedup` is the median of the
per-frame ratios, robust to a machine whose speed drifts. Fidelity is the relative error
||eventful - dense|| / ||dense|| of all outputs together, averaged over the incremental
frames; for a model that returns (tokens, logits) (`zoo.TokensAndLogits`) also of each: the
error on every output token, the logits error and how often the top-1 class agrees.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from .api import compile as eventful_compile
from .baselines import BASELINES, dense_baselines
from .calibration import output_error


@dataclass
class Measurement:
    model: str
    budget: float
    frames: int
    tokens: int
    dense_ms: float        # median per incremental frame, of the fastest dense baseline
    eventful_ms: float     # median per incremental frame
    mac_fraction: float    # eventful / dense MACs, mean over incremental frames (overhead included)
    rel_error: float       # mean over the incremental frames, all outputs together
    max_rel_error: float
    frame_speedups: list[float] = field(default_factory=list)  # dense / eventful per incremental frame
    token_error: float | None = None     # (tokens, logits) models: mean error on every output token
    logit_error: float | None = None     # ... on the logits
    top1_agreement: float | None = None  # ... fraction of frames whose top-1 class matches dense
    frame_errors: list[float] = field(default_factory=list)   # per incremental frame, all outputs
    baseline: str = "eager"                                      # the fastest dense baseline
    baseline_ms: dict[str, float] = field(default_factory=dict)  # median per incremental frame, each baseline
    baselines_skipped: dict[str, str] = field(default_factory=dict)  # baselines left out, and why
    compile_s: dict[str, float] = field(default_factory=dict)    # first call of each (Inductor: its compilation)
    records: list[dict] = field(default_factory=list)  # per incremental frame: times, MACs, tokens per gate, errors

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.eventful_ms

    @property
    def paired_speedup(self) -> float:
        """Median over frames of dense / eventful time of the same frame, run back to back: robust
        to a machine whose speed drifts over the run (the ratio of medians is not)."""
        return statistics.median(self.frame_speedups) if self.frame_speedups else self.speedup

    @property
    def speedup_vs_eager(self) -> float:
        return self.baseline_ms.get("eager", self.dense_ms) / self.eventful_ms

    @property
    def mac_reduction(self) -> float:
        return 1.0 / self.mac_fraction

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "paired_speedup": self.paired_speedup,
                "speedup_vs_eager": self.speedup_vs_eager, "mac_reduction": self.mac_reduction}


def _rel(out, ref) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _all_outputs_error(out, ref) -> float:
    err, norm = output_error(out, ref)
    return (err / max(norm, 1e-30)) ** 0.5


def _timed(fn, x):
    """fn(x) and its wall-clock milliseconds; on a GPU, from an idle device to the result's completion."""
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    out = fn(x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return out, (time.perf_counter() - start) * 1e3


def measure(model: torch.nn.Module, frames: torch.Tensor, budget: float, *, name: str = "", progress: bool = True,
            baselines: Sequence[str] | tuple[dict, dict] = BASELINES, inductor: bool = False,
            **options) -> Measurement:
    """Run `frames` [T, C, H, W] through the dense baselines and the eventful model, alternating.

    `baselines`: names from `baselines.BASELINES`, or what `dense_baselines` built (to share an
    Inductor compilation between budgets). The eager model is always run: fidelity is measured
    against it. `inductor`: run the eventful model under `torch.compile` (its first two calls
    compile: the flush, then the first incremental frame).
    """
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"frames must be [T >= 2, C, H, W], got shape {tuple(frames.shape)}")
    model = model.eval()
    dense_fns, skipped = baselines if isinstance(baselines, tuple) and len(baselines) == 2 and \
        isinstance(baselines[0], dict) else dense_baselines(model, baselines)
    dense_fns, skipped = {"eager": model, **dense_fns}, dict(skipped)
    emodel = eventful_compile(model, budget=budget, **options)
    run = torch.compile(emodel) if inductor else emodel
    times: dict[str, list[float]] = {b: [] for b in dense_fns}
    compile_s: dict[str, float] = {}
    eventful_ms, fractions, errors, token_errors, logit_errors, agree, records = [], [], [], [], [], [], []
    with torch.no_grad():
        for t, frame in enumerate(tqdm(frames, desc=f"{name or 'model'} @ budget {budget}", disable=not progress,
                                       leave=False)):
            x = frame[None]
            dense, eager_ms = _timed(model, x)
            frame_ms = {}
            for b, fn in list(dense_fns.items()):
                try:
                    ms = eager_ms if b == "eager" else _timed(fn, x)[1]
                except Exception as e:  # noqa: BLE001 - a baseline that fails here is left out, with its reason
                    skipped[b] = f"{type(e).__name__}: {e}".splitlines()[0]
                    del dense_fns[b], times[b]
                    continue
                if t == 0:
                    compile_s[b] = ms / 1e3
                else:
                    times[b].append(ms)
                    frame_ms[b] = ms
            out, e_ms = _timed(run, x)
            if t == 0:
                compile_s["eventful"] = e_ms / 1e3
                continue  # the flush: dense for the eventful model, a warm-up (or compilation) for the baselines
            errors.append(_all_outputs_error(out, dense))
            record = {"frame": t, "eventful_ms": e_ms, "dense_ms": frame_ms, "mac_fraction": emodel.stats.fraction,
                      "tokens_per_gate": dict(emodel.stats.tokens), "error": errors[-1]}
            if isinstance(dense, tuple) and len(dense) == 2:  # (tokens, logits)
                token_errors.append(_rel(out[0], dense[0]))
                logit_errors.append(_rel(out[1], dense[1]))
                labels = dense[1].argmax(-1).flatten().tolist(), out[1].argmax(-1).flatten().tolist()
                agree.append(float(labels[0] == labels[1]))
                record.update(token_error=token_errors[-1], logit_error=logit_errors[-1], top1_dense=labels[0],
                              top1_eventful=labels[1], top1_agrees=labels[0] == labels[1])
            records.append(record)
            eventful_ms.append(e_ms)
            fractions.append(emodel.stats.fraction)
    baseline_ms = {b: statistics.median(v) for b, v in times.items()}
    fastest = min(baseline_ms, key=baseline_ms.get)
    tokens = max(emodel.stats.tokens.values(), default=0)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return Measurement(
        model=name, budget=budget, frames=len(frames), tokens=tokens,
        dense_ms=baseline_ms[fastest], eventful_ms=statistics.median(eventful_ms),
        mac_fraction=sum(fractions) / len(fractions),
        rel_error=mean(errors), max_rel_error=max(errors),
        frame_speedups=[d / e for d, e in zip(times[fastest], eventful_ms)],
        token_error=mean(token_errors), logit_error=mean(logit_errors), top1_agreement=mean(agree),
        frame_errors=errors, baseline=fastest, baseline_ms=baseline_ms, baselines_skipped=skipped,
        compile_s=compile_s, records=records,
    )


def format_table(rows: list[Measurement]) -> str:
    """One row per measurement: each dense baseline's time, the eventful time, the speedup against the fastest
    baseline (named) and against eager, MACs and fidelity."""
    names = [b for b in BASELINES if any(b in r.baseline_ms for r in rows)]
    header = f"{'model':<26} {'budget':>6} {'MACs':>6} {'saved':>6} " + \
             "".join(f"{b + ' ms':>12}" for b in names) + f" {'eventful ms':>11} {'vs fastest':>16} " \
             f"{'paired':>7} {'vs eager':>8} {'MAC red.':>8} {'rel. err':>8} {'tokens':>8} {'logits':>8} {'top-1':>5}"
    lines = [header, "-" * len(header)]
    opt = (lambda v, spec: format(v, spec) if v is not None else "")
    for r in rows:
        dense = "".join(f"{opt(r.baseline_ms.get(b), '.1f'):>12}" for b in names)
        fastest = f"{r.speedup:.2f}x ({r.baseline})"
        lines.append(f"{r.model:<26} {r.budget:>6.3f} {r.mac_fraction:>6.3f} {1 - r.mac_fraction:>6.1%} {dense} "
                     f"{r.eventful_ms:>11.1f} {fastest:>16} {r.paired_speedup:>6.2f}x {r.speedup_vs_eager:>7.2f}x "
                     f"{r.mac_reduction:>7.2f}x {r.rel_error:>8.2e} {opt(r.token_error, '>8.2e'):>8} "
                     f"{opt(r.logit_error, '>8.2e'):>8} {opt(r.top1_agreement, '>5.0%'):>5}")
    skipped = {b: why for r in rows for b, why in r.baselines_skipped.items()}
    lines += [f"(dense baseline {b} left out: {why})" for b, why in skipped.items()]
    return "\n".join(lines)
