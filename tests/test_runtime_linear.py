"""SparseLinear: the k-row linear of gated regions gives F.linear's values on every kernel it may pick."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import eventful_fx
from eventful_fx.runtime.linear import SparseLinear
from eventful_fx.video import builtin_clip


@pytest.mark.parametrize("kernel", ["auto", "torch", "onednn"])
@pytest.mark.parametrize("rows", [0, 1, 37, 300])
def test_matches_f_linear(kernel, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(2, rows, 64)
    linear = SparseLinear(kernel)
    for b in (bias, None):
        torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(2, 64, rows).transpose(1, 2)  # a permuted view, as regions often hand over
    torch.testing.assert_close(linear(strided, weight, bias), F.linear(strided, weight, bias), rtol=1e-5, atol=1e-5)
    tied = torch.randn(64, 96).t()  # a transposed weight (tied embeddings)
    torch.testing.assert_close(SparseLinear(kernel)(x, tied, bias), F.linear(x, tied, bias), rtol=1e-5, atol=1e-5)


def test_new_weights_are_used_after_an_in_place_update():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 16), torch.randn(1, 5, 16)
    linear = SparseLinear("onednn")
    linear(x, weight)
    with torch.no_grad():
        weight.mul_(-2)  # what load_state_dict does: an in-place copy into the same storage
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_new_weight_in_a_freed_weights_memory_is_not_taken_for_it():
    """Under torch.compile the packed copies were keyed by address: a model freed and another of the same
    shapes built in its memory was multiplied by the first one's packed weights (relative error ~1)."""
    x = torch.randn(8, 512)
    for seed in range(6):
        torch.manual_seed(seed)
        weight = torch.nn.Parameter(torch.randn(1024, 512))  # 2 MB: freed and re-allocated at the same address
        with torch.no_grad():
            torch.nn.init.normal_(weight)  # the same version count on every new weight
            out = torch.ops.eventful_fx.kernel_linear(x, weight, None, "onednn")
        assert (out - F.linear(x, weight)).abs().max() <= 1e-3, seed
        del weight


def test_eventful_model_follows_weights_loaded_after_compile():
    clip = builtin_clip(size=224, max_frames=5)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    emodel = eventful_fx.compile(model, budget=1.0, linear_kernel="onednn")  # packed copies of the weights
    emodel(clip[0][None])
    emodel(clip[1][None])
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    model.load_state_dict(other.state_dict())
    emodel.reset()
    with torch.no_grad():
        for frame in clip[2:5]:
            out, dense = emodel(frame[None]), other(frame[None])
            assert (out - dense).norm() <= 1e-4 * dense.norm()


def test_inference_mode_weights_fall_back_to_torch():
    with torch.inference_mode():  # such weights have no version counter to watch
        weight, x = torch.randn(32, 16), torch.randn(1, 5, 16)
        for kernel in ("auto", "onednn"):
            torch.testing.assert_close(SparseLinear(kernel)(x, weight), F.linear(x, weight))


def test_flop_counter_counts_the_onednn_kernel():
    weight, x = torch.randn(48, 32), torch.randn(3, 10, 32)
    with FlopCounterMode(display=False) as counter:
        SparseLinear("onednn")(x, weight)
    assert counter.get_total_flops() == 2 * 30 * 32 * 48


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="linear kernel"):
        SparseLinear("blas")
    with pytest.raises(ValueError, match="linear_kernel"):
        eventful_fx.compile(torch.nn.Linear(2, 2), linear_kernel="fast")
