"""Views of zoo models that expose what users read: a ViT's output tokens next to its logits.

A class-token head hides most of an eventful model's error (most tokens never reach it), so
fidelity is measured on every output token of the backbone as well as on the logits.
`TokensAndLogits` runs a timm VisionTransformer once and returns both: the tokens after the
last block (no final norm, no head: what a detector or segmenter head reads) and the logits.
`Tokens` returns the tokens alone (a backbone). Both share the model's parameters.
"""
from __future__ import annotations

import torch


class TokensAndLogits(torch.nn.Module):
    """(tokens [B, N, C] after the last block, logits [B, classes]) of a timm VisionTransformer."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        missing = [a for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head") if not hasattr(vit, a)]
        if missing:
            raise TypeError(f"TokensAndLogits needs a timm VisionTransformer; {type(vit).__name__} has no "
                            f"{', '.join(missing)}")
        self.vit = vit

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        tokens = vit.blocks(x)
        return tokens, vit.forward_head(vit.norm(tokens))


class Tokens(TokensAndLogits):
    """The tokens [B, N, C] after the last block of a timm VisionTransformer: the backbone, no final norm, no head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))))


class FeaturesAndHead(torch.nn.Module):
    """(features, head output) of any timm model: `forward_features` (for SAM/ViTDet the neck's
    [B, C, H, W] map a detector reads) and `forward_head` on them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError(f"FeaturesAndHead needs a timm model; {type(model).__name__} has no forward_features")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.forward_head(features)


class HFTokensAndLogits(torch.nn.Module):
    """A Hugging Face `transformers` vision model seen as timm's are: the tokens after its last layer (before
    the final norm) and, for an image classifier, its logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
            raise TypeError(f"HFTokensAndLogits needs a transformers model; got {type(model).__name__}")
        self.model = model

    def forward(self, x: torch.Tensor):
        out = self.model(pixel_values=x, output_hidden_states=True)
        logits = getattr(out, "logits", None)
        return out.hidden_states[-1] if logits is None else (out.hidden_states[-1], logits)


def tokens_and_logits(model: torch.nn.Module) -> torch.nn.Module:
    """`TokensAndLogits(model)` for a timm VisionTransformer, `FeaturesAndHead` for another timm model
    (SAM, ViTDet), `HFTokensAndLogits` for a transformers model, else the model itself."""
    for view in (TokensAndLogits, FeaturesAndHead, HFTokensAndLogits):
        try:
            return view(model).eval()
        except TypeError:
            pass
    return model


def load_checkpoint(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load trained weights from a local file into `model`, never running code from the file.

    `.safetensors` files are read with safetensors; anything else with
    `torch.load(weights_only=True)` (a state_dict, or a training checkpoint holding one under
    "state_dict", "model" or "module"). A file that does not fit raises ValueError in one line.
    """
    import os

    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint: no such file: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code, truncated files, other formats: one line each
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--checkpoint: cannot read {path} as weights only ({first[:200]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint: {path} holds no state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"--checkpoint: {path} does not fit {type(model).__name__}: "
                         f"{lines[0][:300] if lines else str(e)[:300]}") from None
    return model


def preprocessing(model: torch.nn.Module, checkpoint: str | None = None) -> dict:
    """The mean and std the model was trained with, for `video.read_frames`: timm's `pretrained_cfg`, or a
    transformers checkpoint directory's image-processor config (`preprocessor_config.json`)."""
    import json
    import os

    config = os.path.join(checkpoint, "preprocessor_config.json") if checkpoint else None
    if config and os.path.isfile(config):
        with open(config) as f:
            cfg = json.load(f)
        return {k: tuple(cfg[key]) for k, key in (("mean", "image_mean"), ("std", "image_std")) if key in cfg}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
