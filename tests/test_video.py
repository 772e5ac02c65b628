"""Video input: real decoding with PyAV, no mocks."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eventful_fx.video import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    builtin_clip,
    builtin_clip_path,
    iter_frames,
    read_frames,
    video_path,
)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return builtin_clip()


def test_builtin_clip_shipped():
    path = builtin_clip_path()
    assert path.is_file() and path.suffix == ".mp4"
    assert path.parent.name == "data" and path.parent.parent.name == "eventful_fx"
    assert path.stat().st_size <= 400_000
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (256, 256)
        assert s.average_rate == 12


def test_builtin_clip_shape_and_normalisation(clip):
    assert clip.shape == (24, 3, 224, 224)
    assert clip.dtype == torch.float32
    assert torch.isfinite(clip).all()
    # roughly normalised: values of ImageNet-normalised natural-ish images
    assert -1.0 < clip.mean().item() < 1.0
    assert 0.3 < clip.std().item() < 1.5
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert clip.min().item() >= lo - 1e-3 and clip.max().item() <= hi + 1e-3


def test_builtin_clip_is_video_like(clip):
    diffs = (clip[1:] - clip[:-1]).abs()  # [23, 3, H, W]
    consecutive = diffs.mean(dim=(1, 2, 3))
    overall = (clip[-1] - clip[0]).abs().mean()
    assert (consecutive > 0).all(), "every frame must change"
    assert consecutive.mean() < 0.3 * overall, "consecutive frames must differ only a little"
    # the moving disc: per-16x16-patch change is localised
    per_patch = F.avg_pool2d(diffs.mean(1, keepdim=True), 16).flatten(1)  # [23, 196]
    ratio = per_patch.max(dim=1).values / per_patch.median(dim=1).values
    assert ratio.median() > 8, ratio
    # and it is the object that moves: the hot patch wanders across the frame
    hot = per_patch.argmax(dim=1)
    cols = hot % 14
    assert cols.max() - cols.min() >= 8


def test_real_builtin_clip_is_shipped_with_its_licence_and_is_one_shot():
    path = builtin_clip_path("real")
    assert path.stat().st_size <= 2_000_000
    licence = (path.parent / "bunny.LICENSE").read_text()
    assert "Blender Foundation" in licence and "creativecommons.org/licenses/by/3.0" in licence
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.average_rate) == (640, 360, 25)
    x = builtin_clip(size=224, max_frames=40, name="real")
    assert x.shape == (40, 3, 224, 224)
    step = (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))
    # one continuous shot: no frame jumps like a scene cut, and frames do change
    assert step.max() < 4 * step.median() and (step > 0).sum() >= 35
    assert step.mean() < 0.5 * (x[-1] - x[0]).abs().mean()


def test_video_names():
    assert video_path(None) == video_path("builtin") == builtin_clip_path()
    assert video_path("builtin:real") == builtin_clip_path("real")
    assert video_path(str(builtin_clip_path())) == builtin_clip_path()
    with pytest.raises(ValueError, match="choose one of"):
        video_path("builtin:cartoon")
    with pytest.raises(FileNotFoundError, match="builtin:real"):
        video_path("/no/such/clip.mp4")


def test_builtin_clip_sizes():
    x = builtin_clip(size=64, max_frames=3)
    assert x.shape == (3, 3, 64, 64)
    # 256 -> 256 is a pure crop-free identity resize: mean/std=0/1 gives raw [0, 1] pixels
    raw = read_frames(builtin_clip_path(), size=256, max_frames=1, mean=(0.0,) * 3,
                      std=(1.0,) * 3)
    assert raw.shape == (1, 3, 256, 256)
    assert 0.0 <= raw.min() and raw.max() <= 1.0 and raw.max() > 0.9


def _write_video(path, frames: np.ndarray, fps: int = 10) -> None:
    """Encode uint8 RGB ``[T, H, W, 3]`` with PyAV as near-losslessly as available."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.time_base = Fraction(1, fps)
        s.options = {"crf": "0"} if codec == "libx264" else {"qscale": "1"}
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode())


LEVELS = [30, 70, 110, 150, 190, 230]


@pytest.fixture(scope="module")
def small_video(tmp_path_factory):
    """6 frames, 64 high x 96 wide; frame i is flat grey LEVELS[i] with a white stripe
    in columns 0..11 that the centre crop must cut away."""
    frames = np.empty((len(LEVELS), 64, 96, 3), np.uint8)
    for i, g in enumerate(LEVELS):
        frames[i] = g
        frames[i, :, :12] = 255
    path = tmp_path_factory.mktemp("vid") / "small.mp4"
    _write_video(path, frames)
    return path


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Per-frame mean pixel value in 0..255 of frames read with mean 0 / std 1."""
    return x.mean(dim=(1, 2, 3)) * 255


def test_roundtrip_shape_resize_crop(small_video):
    x = read_frames(small_video, size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    # short side 64 -> 32, long side 96 -> 48, centre 32 columns keep 8..40 of 48,
    # i.e. original columns 16..80: the white stripe (0..11) is gone
    expected = torch.tensor(LEVELS, dtype=torch.float32)
    assert torch.allclose(_grey(x), expected, atol=3)
    assert (x * 255 - expected.view(-1, 1, 1, 1)).abs().max() < 8


def test_roundtrip_max_frames_and_start(small_video):
    full = read_frames(small_video, size=32)
    assert read_frames(small_video, size=32, max_frames=2).shape == (2, 3, 32, 32)
    tail = read_frames(small_video, size=32, start=3)
    assert tail.shape == (3, 3, 32, 32)
    assert torch.equal(tail, full[3:])
    mid = read_frames(small_video, size=32, start=2, max_frames=2, mean=(0,) * 3,
                      std=(1,) * 3)
    assert torch.allclose(_grey(mid), torch.tensor(LEVELS[2:4], dtype=torch.float32),
                          atol=3)
    assert read_frames(small_video, size=32, start=10).shape == (0, 3, 32, 32)
    assert read_frames(small_video, size=32, max_frames=0).shape == (0, 3, 32, 32)


def test_iter_frames_matches_read_frames(small_video):
    it = iter_frames(small_video, size=40, start=1, max_frames=4)
    frames = list(it)
    assert len(frames) == 4 and all(f.shape == (3, 40, 40) for f in frames)
    assert torch.equal(torch.stack(frames),
                       read_frames(small_video, size=40, start=1, max_frames=4))


def test_normalisation_default_is_imagenet(small_video):
    raw = read_frames(small_video, size=32, max_frames=1, mean=(0,) * 3, std=(1,) * 3)
    norm = read_frames(small_video, size=32, max_frames=1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm, (raw - mean) / std, atol=1e-5)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_frames(missing)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        next(iter_frames(missing))


def test_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        t = np.arange(800) / 8000
        samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None]
        f = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        f.sample_rate = 8000
        f.pts = 0
        c.mux(s.encode(f))
        c.mux(s.encode())
    with pytest.raises(ValueError, match="no video stream"):
        read_frames(path)


def test_not_a_media_file(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"this is not a video" * 10)
    with pytest.raises(ValueError, match="junk.mp4"):
        read_frames(path)


@pytest.mark.parametrize("size", [0, -3])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        read_frames(builtin_clip_path(), size=size)
    with pytest.raises(ValueError, match="size"):
        builtin_clip(size=size)


def test_bad_arguments():
    with pytest.raises(ValueError, match="start"):
        read_frames(builtin_clip_path(), start=-1)
    with pytest.raises(ValueError, match="max_frames"):
        read_frames(builtin_clip_path(), max_frames=-1)
    with pytest.raises(ValueError, match="std"):
        read_frames(builtin_clip_path(), std=(0.0, 1.0, 1.0))
