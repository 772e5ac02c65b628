"""Token heatmap videos: which tokens the gates recomputed on each frame, and where the error sits.

`write_heatmap(emodel, frames, path)` runs the frames through an EventfulModule and writes a
video (`.mp4` with H.264, or `.gif`, encoded with PyAV): each frame with the tokens recomputed
by the first, a middle and the last gate tinted red, green and blue (a token every gate took
turns white; untouched tokens stay as they are) and, given the dense model of a backbone, a
second panel with each output token's error against the dense output (black: none, bright:
the clip's largest). Stream 0 of each batch is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch

from .video import IMAGENET_MEAN, IMAGENET_STD

GATE_COLOURS = ((255, 40, 40), (40, 255, 40), (60, 120, 255))  # first, middle, last gate


def chosen_gates(emodel) -> list[tuple[str, torch.nn.Module]]:
    """The first, a middle and the last gate (graph order) whose tokens lie on the patch grid."""
    gates = [(name, m) for name, m in emodel.graph_module.named_modules()
             if getattr(m, "grid_index", None) is not None and hasattr(m, "last_idx")]
    if not gates:
        raise ValueError("write_heatmap: no gate of this model reads tokens on a patch grid (nothing to draw)")
    picks = sorted({0, len(gates) // 2, len(gates) - 1})
    return [gates[i] for i in picks]


def token_mask(gate) -> np.ndarray:
    """[H, W] bool: the grid tokens the gate recomputed on its last call (stream 0)."""
    mask = np.zeros(int(np.prod(gate.grid)), dtype=bool)
    idx = gate.last_idx
    if idx is not None and idx.numel():
        places = gate.grid_index.to(idx.device)[idx[0]]
        mask[places[places >= 0].cpu().numpy()] = True
    return mask.reshape(gate.grid[-2:])


def _image(frame: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] uint8."""
    rgb = frame.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum(np.arange(height) * grid.shape[0] // height, grid.shape[0] - 1)
    cols = np.minimum(np.arange(width) * grid.shape[1] // width, grid.shape[1] - 1)
    return grid[rows][:, cols]


def _overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.55) -> np.ndarray:
    out = image.astype(np.float32)
    tint = np.zeros_like(out)
    count = np.zeros(image.shape[:2], dtype=np.float32)
    for mask, colour in zip(masks, GATE_COLOURS):
        big = _upsample(mask, *image.shape[:2])
        tint[big] += colour
        count += big
    covered = count > 0
    tint[covered] = np.minimum(tint[covered], 255)
    out[covered] = (1 - alpha) * out[covered] + alpha * tint[covered]
    return out.round().astype(np.uint8)


def _error_panel(errors: np.ndarray, scale: float, height: int, width: int) -> np.ndarray:
    level = np.clip(errors / max(scale, 1e-12), 0, 1)
    big = _upsample(level, height, width)
    return np.stack([255 * big, 180 * big ** 2, 40 * big ** 4], axis=-1).round().astype(np.uint8)


def _token_errors(out, dense, grid: tuple[int, ...]) -> np.ndarray | None:
    """Per grid token of stream 0: ||eventful - dense|| / ||dense|| over its channels, for outputs of tokens
    [B, N, C] (class / register tokens first) or of a feature map [B, C, H, W] on the token grid."""
    out, dense = (o[0] if isinstance(o, (tuple, list)) else o for o in (out, dense))
    cells = int(np.prod(grid[-2:]))
    if isinstance(out, torch.Tensor) and out.ndim == 4 and tuple(out.shape[-2:]) == tuple(grid[-2:]):
        out, dense = (o.flatten(2).transpose(1, 2) for o in (out, dense))  # a map on the grid: its cells as tokens
    if not (isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[1] >= cells):
        return None
    a, b = out[0, -cells:].float(), dense[0, -cells:].float()
    errors = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    return errors.cpu().numpy().reshape(grid[-2:])


def write_heatmap(emodel, frames: torch.Tensor, path: str | Path, *, dense_model: torch.nn.Module | None = None,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  fps: int = 8) -> list[np.ndarray]:
    """Run `frames` [T, 3, H, W] through `emodel` (from its current state) and write the heatmap video.

    `dense_model`: the dense model of a backbone whose output is tokens [B, N, C] or a feature
    map [B, C, H, W] on the token grid (or a tuple starting with one): adds the error panel. Returns, per frame, the drawn gates'
    masks [gates, H_grid, W_grid] (True: recomputed).
    """
    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise ValueError(f"write_heatmap: {path.name}: write .mp4 or .gif")
    rendered, errors_seen, drawn = [], [], []
    with torch.no_grad():
        for frame in frames:
            x = frame[None]
            out = emodel(x)
            gates = [gate for _, gate in chosen_gates(emodel)]
            masks = [token_mask(gate) for gate in gates]
            drawn.append(np.stack(masks))
            image = _overlay(_image(frame, mean, std), masks)
            errors = None
            if dense_model is not None:
                errors = _token_errors(out, dense_model(x), gates[0].grid)
                if errors is not None:
                    errors_seen.append(errors)
            rendered.append((image, errors))
    scale = max((float(e.max()) for e in errors_seen), default=1.0)
    pictures = [np.concatenate([image, _error_panel(errors, scale, *image.shape[:2])], axis=1)
                if errors is not None else image for image, errors in rendered]
    _encode(pictures, path, fps)
    return drawn


def _encode(pictures: list[np.ndarray], path: Path, fps: int) -> None:
    height, width = pictures[0].shape[:2]
    gif = path.suffix == ".gif"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("gif" if gif else "libx264", rate=fps)
        stream.width, stream.height = width + (width % 2 and not gif), height + (height % 2 and not gif)
        stream.pix_fmt = "rgb8" if gif else "yuv420p"
        for picture in pictures:
            if picture.shape[:2] != (stream.height, stream.width):  # H.264 wants even sides
                picture = np.pad(picture, ((0, stream.height - height), (0, stream.width - width), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
