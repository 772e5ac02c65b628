"""Trained weights from local files (`--checkpoint`): loaded as weights only, a misfit refused in one line."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from eventful_fx.cli import main
from eventful_fx.zoo import load_checkpoint, preprocessing


def _vit(seed: int, name: str = "vit_tiny_patch16_224"):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


@pytest.mark.parametrize("fmt", ["state_dict.pt", "training.pt", "ddp.pt", "weights.safetensors"])
def test_weights_load_exactly(fmt, tmp_path):
    trained, fresh = _vit(1), _vit(0)
    state = trained.state_dict()
    path = str(tmp_path / fmt)
    if fmt == "weights.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"state_dict.pt": state, "training.pt": {"model": state, "epoch": 3},
                    "ddp.pt": {f"module.{k}": v for k, v in state.items()}}[fmt], path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        assert torch.equal(load_checkpoint(fresh, path)(x), trained(x))


class _Payload:
    def __reduce__(self):
        return os.system, (f"touch {os.environ['EVENTFUL_FX_MARKER']}",)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("EVENTFUL_FX_MARKER", str(marker))
    path = str(tmp_path / "evil.pt")
    torch.save({"weight": _Payload()}, path)
    with pytest.raises(ValueError, match="cannot read .* as weights only"):
        load_checkpoint(_vit(0), path)
    assert not marker.exists()


def test_weights_of_another_model_do_not_fit(tmp_path):
    path = str(tmp_path / "small.pt")
    torch.save(_vit(0, "vit_small_patch16_224").state_dict(), path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(_vit(0), path)
    assert "does not fit VisionTransformer" in str(error.value) and len(str(error.value).splitlines()) == 1


def test_cli_checkpoint(tmp_path, capsys):
    good = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in _vit(1).state_dict().items()}, good)
    assert main(["run", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    assert main(["run", "--model", "vit_tiny_patch16_224", "--checkpoint", good, "--frames", "2",
                 "--baselines", "eager"]) == 0


def test_preprocessing_follows_the_model_config():
    model = _vit(0)
    assert preprocessing(model) == {"mean": tuple(model.pretrained_cfg["mean"]), "std": tuple(model.pretrained_cfg["std"])}
    assert preprocessing(torch.nn.Linear(2, 2)) == {}
