"""Token heatmap videos (`eventful_fx.viz`, `eventful-fx run --heatmap`): decodable, and tinted exactly where
the gates recomputed tokens."""
from __future__ import annotations

import av
import numpy as np
import pytest
import timm
import torch

import eventful_fx
from eventful_fx.cli import main
from eventful_fx.viz import _image, write_heatmap
from eventful_fx.zoo import Tokens


def _backbone():
    torch.manual_seed(0)
    return Tokens(timm.create_model("vit_tiny_patch16_224", pretrained=False)).eval()


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_heatmap_decodes_and_tints_the_recomputed_tokens(suffix, frames_of, tmp_path):
    backbone = _backbone()
    clip = frames_of(224, 5)
    path = tmp_path / f"heat{suffix}"
    masks = write_heatmap(eventful_fx.compile(backbone, budget=0.25, calibration=None), clip, path,
                          dense_model=backbone)
    frames = _decode(path)
    assert len(frames) == 5 and frames[0].shape == (224, 448, 3)  # the frame, then the error panel
    assert masks[0].all() and not masks[-1].all() and masks[-1].any()  # a flush, then some tokens
    for t in (2, 4):
        drawn = frames[t][:, :224].astype(np.float32)
        plain = _image(clip[t], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).astype(np.float32)
        changed = np.abs(drawn - plain).mean(-1)
        tinted = masks[t].any(0).repeat(16, 0).repeat(16, 1)
        assert changed[tinted].mean() > 3 * changed[~tinted].mean() + 5, (changed[tinted].mean(), changed[~tinted].mean())
        assert frames[t][:, 224:].max() > 100  # the error panel shows where tokens are off


def test_bad_heatmap_path(tmp_path, capsys):
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        write_heatmap(eventful_fx.compile(_backbone()), torch.zeros(1, 3, 224, 224), tmp_path / "h.avi")
    assert main(["run", "--heatmap", str(tmp_path / "h.avi")]) == 2
    assert ".mp4 or .gif" in capsys.readouterr().err


def test_cli_heatmap(tmp_path):
    out = tmp_path / "h.mp4"
    assert main(["run", "--model", "vit_tiny_patch16_224", "--size", "96", "--frames", "3", "--baselines", "eager",
                 "--heatmap", str(out)]) == 0
    frames = _decode(out)
    assert len(frames) == 3 and frames[0].shape == (96, 192, 3)


def test_error_panel_reads_feature_maps_on_the_token_grid():
    from eventful_fx.viz import _token_errors

    dense = torch.randn(1, 8, 4, 6)
    out = dense.clone()
    out[0, :, 1, 2] += 1.0  # one cell off
    errors = _token_errors((out, None), (dense, None), (4, 6))
    assert errors.shape == (4, 6) and errors[1, 2] > 0 and np.count_nonzero(errors) == 1
