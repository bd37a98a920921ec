"""metrics.segmentation_scores on real data: FCN-8s's published prediction for VOC image
2007_000129 (../shared/data/fcn_demo/output.png, VOC colour map) against its ground truth
(label.png, palette indices, 255 = void).

    python bench/fcn_demo_scores.py
"""
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                    "fcn_demo")


def main():
    label = torch.as_tensor(np.array(Image.open(os.path.join(DEMO, "label.png"))), dtype=torch.long)
    rgb = np.array(Image.open(os.path.join(DEMO, "output.png")).convert("RGB")).astype(np.int64)
    cmap = np.array(data.voc_palette(21), dtype=np.int64).reshape(21, 3)
    code = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
    lut = {int(r * 65536 + g * 256 + b): k for k, (r, g, b) in enumerate(cmap)}
    pred = torch.as_tensor(np.vectorize(lambda v: lut[v])(code))
    cm = metrics.confusion_matrix(pred, label, 21, ignore_index=255)
    s = metrics.segmentation_scores(cm)
    present = [data.VOC_SEG_CLASSES[k] for k in range(21) if cm[k].sum() or cm[:, k].sum()]
    print(f"classes present: {', '.join(present)}; void pixels: {int((label == 255).sum())}")
    print(f"pixel_acc {100 * s['pixel_acc']:.2f}  mean_acc {100 * s['mean_acc']:.2f}  "
          f"mean_iou {100 * s['mean_iou']:.2f}  fw_iou {100 * s['fw_iou']:.2f}")
    print("SA = IoU per class: " + ", ".join(f"{data.VOC_SEG_CLASSES[k]} {100 * v:.2f}"
                                             for k, v in enumerate(s["sa"]) if v == v))


if __name__ == "__main__":
    main()
