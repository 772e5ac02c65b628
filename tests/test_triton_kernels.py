"""The Triton kernels (`runtime/triton_kernels.py`) on the CPU, under Triton's interpreter.

The interpreter is chosen when Triton's decorators run, so the checks run in a fresh Python with
TRITON_INTERPRET=1 (all in one, each in its own namespace). The kernels are compared with their torch references, and a gated model whose gates
run them with the same model on PyTorch's ops (and, at budget 1, with the dense model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


RUNNER = """
import json, sys, traceback
results = {}
for name, code in json.loads(sys.stdin.read()).items():
    scope = {}
    try:
        exec(code, scope)
        results[name] = {"error": None, "value": scope.get("value")}
    except Exception:
        results[name] = {"error": traceback.format_exc()[-3000:], "value": None}
print(json.dumps(results))
"""
CHECKS: dict[str, str] = {}  # name -> code, run together in one interpreted Python (one start-up, ~5 s)


def check(code: str):
    def register(test):
        CHECKS[test.__name__] = textwrap.dedent(code)
        return test
    return register


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(CHECKS), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@check("""
        import torch
        from eventful_fx.runtime import triton_kernels as tk
        tk.ENABLED = True
        assert tk.INTERPRET and tk.enabled(torch.zeros(1))
        torch.manual_seed(0)
        for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-3)]:
            x, ref = torch.randn(2, 37, 300).to(dtype), torch.randn(2, 37, 300).to(dtype)
            rows_x = x[:, :, 10:290].reshape(74, 280)  # row stride 300, not 280
            ref_280 = ref[:, :, 10:290].contiguous()
            got, want = tk.token_distance(rows_x, ref_280, 2), tk.token_distance_reference(rows_x, ref_280, 2)
            assert got.shape == (2, 37) and got.dtype == torch.float32, got.shape
            assert torch.allclose(got, want, rtol=tol), (got - want).abs().max()
            flat_x, flat_ref = x.reshape(74, 300), ref
            rows = torch.tensor([3, 40, 40, 73, 0])  # a padded stream repeats a row
            distance = tk.token_distance(flat_x, flat_ref, 2)
            refs, distances = (flat_ref.clone(), flat_ref.clone()), (distance.clone(), distance.clone())
            taken = tk.gate_take(flat_x, refs[0], rows, distances[0])
            expected = tk.gate_take_reference(flat_x, refs[1], rows, distances[1])
            assert torch.equal(taken, expected) and torch.equal(*refs) and torch.equal(*distances)
            assert not torch.equal(refs[0], flat_ref)
        for bias in (True, False):
            a, w = torch.randn(21, 96), torch.randn(70, 96)
            b = torch.randn(70) if bias else None
            rows = torch.randperm(40)[:21]
            outs = torch.zeros(40, 70), torch.zeros(40, 70)
            tk.gathered_linear_into(a, w, b, rows, outs[0])
            tk.gathered_linear_into_reference(a, w, b, rows, outs[1])
            assert torch.allclose(*outs, atol=1e-4), (outs[0] - outs[1]).abs().max()
            untouched = torch.ones(40, dtype=torch.bool)
            untouched[rows] = False
            assert (outs[0][untouched] == 0).all()
        # schemas, fake implementations (what torch.compile traces) and the mutations they declare
        x, ref = torch.randn(2, 37, 64), torch.randn(2, 37, 64)
        rows = torch.tensor([3, 40, 40, 73, 0])
        distance = tk.token_distance(x.reshape(74, 64), ref, 2)
        torch.library.opcheck(tk.token_distance, (x.reshape(74, 64), ref, 2))
        torch.library.opcheck(tk.gate_take, (x.reshape(74, 64), ref.clone(), rows, distance.clone()))
        torch.library.opcheck(tk.gathered_linear_into, (torch.randn(5, 64), torch.randn(32, 64), torch.randn(32), rows,
                                                        torch.zeros(80, 32)))
""")
def test_kernels_equal_their_references(interpreted):
    result = interpreted["test_kernels_equal_their_references"]
    assert result["error"] is None, result["error"]


@check("""
        import torch
        from eventful_fx.runtime import triton_kernels as tk
        from eventful_fx.runtime.gate import TokenGate
        from eventful_fx.runtime.policy import TopK
        torch.manual_seed(0)
        frames = torch.randn(5, 2, 30, 48).cumsum(0)  # two streams drifting over five frames

        def run(compiled, triton):
            tk.ENABLED = triton
            gate = TokenGate(TopK(7))
            call = torch.compile(gate, fullgraph=True) if compiled else gate
            return [tuple(t.clone() for t in call(f)) for f in frames], gate

        (fused, fused_gate), (plain, plain_gate) = run(True, True), run(False, False)
        for (i1, s1), (i2, s2) in zip(fused, plain):
            assert torch.equal(i1, i2) and torch.allclose(s1, s2)
        assert torch.equal(fused_gate._ref, plain_gate._ref)
""")
def test_a_gate_on_the_kernels_compiles_in_one_graph(interpreted):
    result = interpreted["test_a_gate_on_the_kernels_compiles_in_one_graph"]
    assert result["error"] is None, result["error"]


@check("""
        import timm, torch, eventful_fx
        from eventful_fx.runtime import triton_kernels as tk
        from eventful_fx.video import builtin_clip
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False).eval()
        clip = builtin_clip(size=64, max_frames=6)
        frames = torch.stack([clip, clip.flip(-1)], 1)  # [T, 2 streams, C, H, W]
        dense = torch.stack([model(f) for f in frames]).detach()

        def run(budget, triton):
            tk.ENABLED = triton
            emodel = eventful_fx.compile(model, budget=budget, calibration=None, example_input=frames[0])
            with torch.inference_mode():
                return torch.stack([emodel(f) for f in frames])

        errors = {}
        for budget in (0.25, 1.0):
            on_triton, on_torch = run(budget, True), run(budget, False)
            assert torch.allclose(on_triton, on_torch, atol=1e-5), (budget, (on_triton - on_torch).abs().max())
            errors[budget] = ((on_triton - dense).norm() / dense.norm()).item()
        assert errors[1.0] < 1e-4, errors
        value = errors[0.25]
""")
def test_a_model_on_triton_gates_equals_torch_gates_and_dense(interpreted):
    """Two streams of a small ViT: the gates on the Triton kernels pick the same tokens and give the same
    outputs as on PyTorch's ops, and budget 1 equals the dense model."""
    result = interpreted["test_a_model_on_triton_gates_equals_torch_gates_and_dense"]
    assert result["error"] is None, result["error"]
    assert result["value"] > 1e-3  # budget 0.25 does gate: a path that selected everything would pass above
