"""Hugging Face `transformers` vision models (tiny configs, untrained): converted, exact at budget 1, cheap at
0.25, and through the command line from a local checkpoint directory with its image-processor settings."""
from __future__ import annotations

import json

import pytest
import torch

import eventful_fx
from eventful_fx.cli import main
from eventful_fx.zoo import HFTokensAndLogits, preprocessing
from helpers import assert_matches_dense, rel_err

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64,
            patch_size=8)


def _model(name: str):
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    extra = {"num_labels": 10} if name.endswith("ForImageClassification") else {}
    return cls(cls.config_class(**TINY, **extra)).eval()


@pytest.mark.parametrize("name", ["ViTModel", "ViTForImageClassification", "Dinov2Model"])
def test_hf_model_exact_at_budget_one_and_cheap_at_a_quarter(name, frames_of):
    model = HFTokensAndLogits(_model(name)).eval()  # every output token (and the logits) is compared
    clip = frames_of(64, 5)
    assert_matches_dense(eventful_fx.compile(model, budget=1.0), model, clip, tol=1e-5)
    cheap = eventful_fx.compile(model, budget=0.25, calibration=None)
    errors = assert_matches_dense(cheap, model, clip, tol=0.2)
    assert errors[0] <= 1e-5 and errors[-1] > 1e-6  # a flush, then real savings
    assert abs(cheap.stats.fraction - 0.25) <= 0.01


def test_hf_output_objects_pass_through(frames_of):
    model = _model("ViTForImageClassification")
    emodel = eventful_fx.compile(model, budget=1.0)
    x = frames_of(64, 1)
    with torch.no_grad():
        out, dense = emodel(x), model(x)
    assert type(out).__name__ == "ImageClassifierOutput" and rel_err(out.logits, dense.logits) <= 1e-5


def test_cli_runs_a_checkpoint_directory_with_its_preprocessing(tmp_path, capsys):
    model = _model("ViTForImageClassification")
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    assert preprocessing(model, str(tmp_path)) == {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    out = tmp_path / "run.json"
    assert main(["run", "--model", "hf:ViTForImageClassification", "--checkpoint", str(tmp_path), "--frames", "3",
                 "--baselines", "eager", "--json", str(out)]) == 0
    assert "3 frames of 64x64" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["token_error"] is not None and row["logit_error"] is not None and row["mac_fraction"] < 0.3
    assert main(["run", "--model", "hf:NoSuchModel"]) == 2
    assert "unknown transformers model" in capsys.readouterr().err
