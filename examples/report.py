"""Which parts of a model can run eventfully, and why the others cannot.

    python examples/report.py samvit_base_patch16 448
"""
import sys

import timm
import torch

import eventful_fx

name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
kwargs = {"img_size": size} if len(sys.argv) > 2 else {}
model = timm.create_model(name, pretrained=False, **kwargs).eval()
report = eventful_fx.analyze(model, torch.randn(1, 3, size, size))
print(report)
