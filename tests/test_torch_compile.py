"""torch.compile of an eventful model (issue 13): one graph, no recompile after the first incremental frame,
the same outputs as the eager eventful model."""
from __future__ import annotations

import timm
import torch

import eventful_fx
from helpers import rel_err


def test_compiled_eventful_model_matches_eager_without_breaks_or_recompiles(frames_of):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()  # Inductor time grows with depth
    clip = frames_of(224, 5)
    eager = eventful_fx.compile(model, budget=0.25, calibration=None)
    compiled = torch.compile(eventful_fx.compile(model, budget=0.25, calibration=None))
    with torch.inference_mode():
        first = compiled(clip[:1])  # capture and planning run eagerly inside the compiled call
        assert rel_err(first, model(clip[:1])) <= 1e-5 and rel_err(first, eager(clip[:1])) <= 1e-5
    with torch.no_grad():
        assert rel_err(compiled(clip[1:2]), eager(clip[1:2])) <= 1e-4  # the first incremental frame recompiles once
        explanation = torch._dynamo.explain(compiled._orig_mod.graph_module)(clip[2:3].clone())
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    # explain ran the graph once more: the eager model takes that frame too, so both streams stay in step
    with torch.no_grad():
        eager(clip[2:3])
    torch._dynamo.config.error_on_recompile = True
    try:
        with torch.no_grad():
            for frame in clip[3:]:
                assert rel_err(compiled(frame[None]), eager(frame[None])) <= 1e-4
    finally:
        torch._dynamo.config.error_on_recompile = False
    # FlopCounterMode sees the compiled graph's products, the oneDNN custom op included
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad():
        with FlopCounterMode(display=False) as eventful_flops:
            compiled(clip[4:5])
        with FlopCounterMode(display=False) as dense_flops:
            model(clip[4:5])
    fraction = eventful_flops.get_total_flops() / dense_flops.get_total_flops()
    assert 0.2 <= fraction <= compiled._orig_mod.stats.fraction + 0.01, fraction
