"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

Why samples fail: 256 DDPM-100 samples (sampling seed 1) from a checkpoint, each invalid one
sorted as blank, several blobs or a low IoU (with its best-matching shape), plus where the
mid-gray pixels lie (within a pixel of a shape's boundary, inside it, or in the background)
and the bounding boxes of the failures. Run from the repository root:
python benchmarks/results/cpu_tries/failure_modes.py runs/exp/base16/recipe.pt
"""

import collections
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, ".")
import diffusion_utils as du  # noqa: E402

torch.set_num_threads(2)
trainer = du.load_trainer(sys.argv[1], device="cpu")
result = du.sample(trainer.sampling_model, trainer.schedule, 256, steps=100, seed=1, progress=False)
images = du.model_to_uint8(result.images)
print(du.evaluate_samples(result.images))
readings = [du.read_shape(image) for image in images]
reasons = collections.Counter()
for r in readings:
    if not r.valid:
        shape = du.CLASS_NAMES[r.label] if r.label >= 0 else ""
        reasons["blank" if r.blobs == 0 else f"several blobs ({shape})" if r.blobs > 1 else f"low IoU ({shape})"] += 1
print(dict(reasons))
mask = images > 127
mid = (images > du.MID_GRAY[0]) & (images < du.MID_GRAY[1])
kernel = np.ones((3, 3), np.uint8)
edge = np.stack([cv2.dilate(m.astype(np.uint8), kernel) ^ cv2.erode(m.astype(np.uint8), kernel) for m in mask]).astype(bool)
print(
    f"mid-gray {mid.mean():.4f}: within a pixel of a boundary {(mid & edge).mean():.4f}, inside {(mid & mask & ~edge).mean():.4f}, background {(mid & ~mask & ~edge).mean():.4f}"
)
for k, r in enumerate(readings):
    if not r.valid and r.blobs == 1:
        ys, xs = np.nonzero(mask[k])
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        print(f"image {k}: {du.CLASS_NAMES[r.label]} IoU {r.iou:.3f}, bounding box {w}x{h} (w/h {w / h:.2f}), fills {mask[k].sum() / (w * h):.2f} of it")
