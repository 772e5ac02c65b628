"""One classifier, several camera streams in one batch: each stream keeps its own state, and one can be
reset (a new video on that camera) without touching the others.

    python examples/many_streams.py
"""
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip

torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
emodel = eventful_fx.compile(model, budget=0.25)
clip = builtin_clip(size=224, max_frames=10)
streams = [clip, clip.flip(-1), clip.flip(-2)]  # three "cameras"

with torch.no_grad():
    for t in range(len(clip)):
        if t == 5:
            emodel.reset(streams=[1])  # camera 1 switched to another scene: its next frame is a dense flush
        batch = torch.stack([s[t] for s in streams])
        out, dense = emodel(batch), model(batch)
        errors = ((out - dense).norm(dim=-1) / dense.norm(dim=-1)).tolist()
        print(f"frame {t:2d}: MACs {emodel.stats.fraction:.2f} of dense, "
              f"logits error per stream {', '.join(f'{e:.3f}' for e in errors)}")
