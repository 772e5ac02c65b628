"""A dense-feature backbone (SAM's ViT, timm `samvit_base_patch16`) feeding a small segmentation head, run
eventfully on the built-in clip, with a heatmap of the tokens recomputed and of the features' error.

    python examples/dense_features.py            # writes dense_features.mp4 (about 35 s on 2 cores)
"""
import timm
import torch

import eventful_fx
from eventful_fx.video import builtin_clip
from eventful_fx.viz import write_heatmap


class Segmenter(torch.nn.Module):
    """SAM's image encoder (windowed and global attention, neck to 256 channels) and a 1x1-conv head."""

    def __init__(self, size: int = 256, classes: int = 8):
        super().__init__()
        self.backbone = timm.create_model("samvit_base_patch16", pretrained=False, img_size=size)
        self.head = torch.nn.Conv2d(256, classes, 1)

    def forward(self, x):
        features = self.backbone.forward_features(x)  # [B, 256, size/16, size/16]
        return features, self.head(features)


torch.manual_seed(0)
model = Segmenter().eval()
frames = builtin_clip(size=256, max_frames=8)
emodel = eventful_fx.compile(model, budget=0.5)
write_heatmap(emodel, frames, "dense_features.mp4", dense_model=model)
print(f"last frame: {emodel.stats.fraction:.3f} of the dense MACs; wrote dense_features.mp4")
