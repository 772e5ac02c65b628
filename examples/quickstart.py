"""Run a timm ViT eventfully on the built-in clip and watch the work it skips.

    python examples/quickstart.py
"""
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip

model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
emodel = eventful_fx.compile(model, budget=0.25)

with torch.no_grad():
    for t, frame in enumerate(builtin_clip(size=224, max_frames=12)):
        if t == 6:
            emodel.budget = 0.5  # re-planned on the spot: no re-capture
        out, dense = emodel(frame[None]), model(frame[None])
        err = ((out - dense).norm() / dense.norm()).item()
        s = emodel.stats
        print(f"frame {t:2d}: {s.macs / 1e9:5.2f} of {s.dense_macs / 1e9:5.2f} GMACs "
              f"({s.fraction:5.1%}){' flush' if s.flush else ''}, relative error vs dense {err:.2e}")
print(f"state held between frames: {emodel.state_bytes() / 2**20:.1f} MiB")
