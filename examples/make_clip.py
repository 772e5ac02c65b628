"""Render and encode the built-in test clip ``eventful_fx/data/clip.mp4``.

The clip is procedural and deterministic (fixed seed): a colourful textured background
(smooth multi-scale value noise plus a few soft shapes and gradients) seen through a
slow sub-pixel camera pan, and a bright textured disc crossing the frame. Consecutive
frames therefore differ only a little, except around the moving disc and along edges
shifted by the pan -- the kind of input eventful models are meant for.

256x256, 24 frames at 12 fps, yuv420p, H.264 (libx264) when the PyAV build has it,
else MPEG-4 Part 2. Only numpy and PyAV are needed::

    python examples/make_clip.py            # writes eventful_fx/data/clip.mp4
    python examples/make_clip.py out.mp4
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SIZE = 256
FRAMES = 24
FPS = 12
SEED = 20230813
PAN = (1.6, 0.7)  # camera pan in pixels per frame (x, y), sub-pixel on purpose

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "eventful_fx" / "data" / "clip.mp4"


def _bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a periodic ``[h, w, c]`` grid at continuous coordinates (u: x, v: y)."""
    h, w = grid.shape[:2]
    x0 = np.floor(u).astype(np.int64)
    y0 = np.floor(v).astype(np.int64)
    fx = (u - x0)[..., None]
    fy = (v - y0)[..., None]
    # smoothstep weights: C1-continuous value noise, no visible grid creases
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    x0 %= w
    y0 %= h
    x1 = (x0 + 1) % w
    y1 = (y0 + 1) % h
    top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
    bot = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-mask from a signed distance (negative inside), in pixels."""
    return np.clip(0.5 - d, 0.0, 1.0)[..., None]


class Scene:
    """Background defined in continuous world coordinates, so panning is exact."""

    def __init__(self, seed: int = SEED) -> None:
        rng = np.random.default_rng(seed)
        # (cell size in px, amplitude, colour grid)
        self.octaves = [
            (96.0, 0.45, rng.uniform(0, 1, (8, 8, 3))),
            (40.0, 0.25, rng.uniform(0, 1, (16, 16, 3))),
            (14.0, 0.14, rng.uniform(0, 1, (32, 32, 3))),
            (5.0, 0.07, rng.uniform(0, 1, (64, 64, 1)).repeat(3, axis=2)),
        ]
        self.disc_texture = rng.uniform(0, 1, (6, 6, 1))

    def background(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        img = np.zeros(x.shape + (3,))
        total = 0.0
        for cell, amp, grid in self.octaves:
            img += amp * _bilinear(grid, x / cell, y / cell)
            total += amp
        img /= total
        # broad colour gradients
        img[..., 0] += 0.25 * (x / 400.0 - 0.3)
        img[..., 2] += 0.25 * (y / 400.0 - 0.3)
        # a few static shapes: dark bar, teal square, orange ring
        bar = _soft(np.maximum(np.abs(x - 70) - 9, np.abs(y - 180) - 120))
        img = img * (1 - bar) + bar * np.array([0.08, 0.08, 0.12])
        sq = _soft(np.maximum(np.abs(x - 250) - 38, np.abs(y - 90) - 30))
        img = img * (1 - sq) + sq * (0.6 * np.array([0.1, 0.65, 0.6]) + 0.4 * img)
        r = np.hypot(x - 190, y - 250)
        ring = _soft(np.abs(r - 34) - 6)
        img = img * (1 - ring) + ring * np.array([0.95, 0.55, 0.1])
        return img

    def disc(self, x: np.ndarray, y: np.ndarray, cx: float, cy: float, t: float):
        """Bright textured disc of radius 22 px centred at (cx, cy) in screen space."""
        dx, dy = x - cx, y - cy
        mask = _soft(np.hypot(dx, dy) - 22.0)
        # the texture rotates with the disc so its interior changes too
        a = 0.25 * t
        u = (np.cos(a) * dx - np.sin(a) * dy) / 9.0 + 3.0
        v = (np.sin(a) * dx + np.cos(a) * dy) / 9.0 + 3.0
        tex = _bilinear(self.disc_texture, u, v)
        colour = np.array([1.0, 0.95, 0.75]) * (0.75 + 0.25 * tex)
        return mask, colour


def render(seed: int = SEED, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Return ``[frames, size, size, 3]`` uint8 RGB frames."""
    scene = Scene(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        bg = scene.background(xs + 20 + PAN[0] * t, ys + 10 + PAN[1] * t)
        # the disc crosses the frame from left to right on a gentle arc
        s = t / (frames - 1)
        cx = -10 + s * (size + 20)
        cy = 0.35 * size + 0.3 * size * np.sin(np.pi * s)
        mask, colour = scene.disc(xs, ys, cx, cy, t)
        img = bg * (1 - mask) + colour * mask
        out[t] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def encode(frames: np.ndarray, path: Path, fps: int = FPS) -> str:
    """Encode uint8 RGB frames to ``path``; return the codec name used."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if codec == "libx264":
            # single thread + fixed settings: byte-identical output run to run
            stream.options = {"crf": "20", "preset": "medium", "threads": "1"}
        else:
            stream.bit_rate = 1_000_000
            stream.options = {"threads": "1"}
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            frame.time_base = stream.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return codec


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    codec = encode(render(), out)
    print(f"wrote {out} ({codec}, {FRAMES} frames {SIZE}x{SIZE} @ {FPS} fps, "
          f"{out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
