"""torch.compile(model, backend="eventful"): the same eventful model through Dynamo."""
import subprocess
import sys

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import eventful_fx
from eventful_fx.video import builtin_clip
from helpers import rel_err


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=2).eval()  # Inductor's compile time grows with depth


def test_backend_compiles_the_eventful_graph_with_inductor_exact_at_one_equal_to_eager():
    """The default: Dynamo's graph becomes an EventfulModule that Inductor compiles, once for the flush and once
    for the incremental frames; it gives what the eager eventful graph gives, and resets to a dense frame."""
    torch._dynamo.reset()
    frames = builtin_clip(size=224, max_frames=5)
    model = _vit()
    exact = torch.compile(model, backend=eventful_fx.backend(budget=1.0, calibration=None))
    cheap = torch.compile(model, backend="eventful", options={"calibration": None})  # default budget 0.25
    eager = torch.compile(model, backend=eventful_fx.backend(budget=0.25, calibration=None, inductor=False))
    errors = []
    counters.clear()
    try:
        with torch.no_grad():
            for t, frame in enumerate(frames):
                if t == 2:  # compiled for the flush (frame 0) and the incremental frames (frame 1): no more
                    torch._dynamo.config.error_on_recompile = True
                x = frame[None]
                dense = model(x)
                assert rel_err(exact(x), dense) <= 1e-4
                out = cheap(x)
                assert rel_err(out, eager(x)) <= 1e-4
                errors.append(rel_err(out, dense))
            assert errors[0] <= 1e-5 < errors[-1]
            assert counters["inductor"], "no graph went through Inductor"
            cheap_modules = [m for m in eventful_fx.compiled_modules() if m.budget == 0.25]
            assert len(cheap_modules) == 2 and all(m.stats.macs <= 0.27 * m.stats.dense_macs for m in cheap_modules)
            eventful_fx.reset()
            assert rel_err(cheap(frames[2][None]), model(frames[2][None])) <= 1e-5  # a flush after reset
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_backend_under_inference_mode_then_outside():
    torch._dynamo.reset()
    frames = builtin_clip(size=224, max_frames=3)
    model = _vit()
    compiled = torch.compile(model, backend=eventful_fx.backend(budget=1.0, calibration=None))
    with torch.inference_mode():
        first = compiled(frames[:1])
    assert rel_err(first, model(frames[:1]).detach()) <= 1e-4
    for frame in frames[1:]:  # was: "Inplace update to inference tensor outside InferenceMode"
        with torch.no_grad():
            assert rel_err(compiled(frame[None]), model(frame[None])) <= 1e-4


def test_backend_options_are_checked():
    with pytest.raises(ValueError, match="inductor must be True or False"):
        eventful_fx.backend(inductor="yes")
    with pytest.raises(ValueError, match="no meaning with inductor=False"):
        eventful_fx.backend(inductor=False, mode="reduce-overhead")


def test_backend_name_resolves_without_importing_eventful_fx_and_takes_options(tmp_path):
    """The entry point (pyproject.toml, torch_dynamo_backends): a script that never imports eventful_fx."""
    script = tmp_path / "plain_user.py"
    script.write_text(
        "import sys, timm, torch\n"
        "torch.manual_seed(0)\n"
        "model = timm.create_model('vit_tiny_patch16_224', depth=2).eval()\n"
        "assert 'eventful_fx' not in sys.modules\n"
        "compiled = torch.compile(model, backend='eventful', options={'budget': 0.5, 'calibration': None, 'inductor': False})\n"
        "torch.manual_seed(1)\n"
        "frames = torch.randn(3, 1, 3, 224, 224)\n"
        "frames[1:] = frames[0] + 0.05 * frames[1:]\n"
        "with torch.no_grad():\n"
        "    errors = [float((compiled(f) - model(f)).norm() / model(f).norm()) for f in frames]\n"
        "from eventful_fx.backend import compiled_modules\n"
        "(emodel,) = compiled_modules()\n"
        "print(errors[0], errors[-1], emodel.budget, emodel.stats.fraction)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    first, last, budget, fraction = map(float, out.stdout.split()[-4:])
    assert first <= 1e-5 and 0 < last and budget == 0.5 and fraction <= 0.52


def test_graphs_after_a_graph_break_convert():
    """Dynamo cuts a model where forward reads values into numpy: the graph after the cut starts from the
    tokens the first graph returned, with no patch embedding to find them from, and converted nothing.
    Those tokens now carry their layout from the graph that returned them."""
    from eventful_fx.backend import compiled_modules
    from test_capture import NumpyViT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NumpyViT().eval()
    clip = torch.nn.functional.interpolate(builtin_clip(size=224, max_frames=6), size=64)
    compiled = torch.compile(model, backend=eventful_fx.backend(budget=0.25, calibration=None, inductor=False))
    exact = torch.compile(NumpyViT().eval(), backend=eventful_fx.backend(budget=1.0, calibration=None,
                                                                          inductor=False))
    exact._orig_mod.load_state_dict(model.state_dict())
    errors = []
    with torch.no_grad():
        for frame in clip:
            dense = model(frame[None])
            assert rel_err(exact(frame[None]), dense) <= 1e-4
            errors.append(rel_err(compiled(frame[None]), dense))
    # Dynamo compiles the blocks' graph twice (the float read through numpy becomes an input on the second
    # frame): the later one ran the last frames, incrementally; the stem is the smallest graph
    cheap = [m for m in compiled_modules() if m.budget == 0.25 and m.stats.dense_macs and not m.stats.flush]
    blocks = max(cheap, key=lambda m: m.stats.dense_macs)
    assert blocks.decision.ks, "the graph after the break converted nothing"
    assert blocks.stats.macs <= 0.35 * blocks.stats.dense_macs  # the blocks, after the cut, run on a quarter
    assert errors[-1] < 0.5
