"""Time metrics.detection_map on a VOC2007-test-sized set of detections.

    python bench/bench_map.py [--images 4952] [--per-image 40]

Random scenes (1-4 ground-truth boxes of 20 classes per image, 10 % difficult) and jittered
detections (40 per image by default, 30 % with a wrong class), so that AP is neither 0 nor 1.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402


def scenes(n_images, per_image, seed=0):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(n_images):
        m = rng.integers(1, 5)
        xy = rng.uniform(0, 400, (m, 2))
        boxes = np.c_[xy, xy + rng.uniform(10, 100, (m, 2))]
        labels = rng.integers(0, 20, m)
        gts.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                    "difficult": torch.tensor(rng.random(m) < 0.1)})
        src = rng.integers(0, m, per_image)
        d = boxes[src] + rng.normal(0, 10, (per_image, 4))
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
        lab = np.where(rng.random(per_image) < 0.3, rng.integers(0, 20, per_image), labels[src])
        dets.append({"boxes": torch.tensor(d), "scores": torch.tensor(rng.random(per_image)),
                     "labels": torch.tensor(lab)})
    return dets, gts


def main(argv=None):
    p = argparse.ArgumentParser(description="Time metrics.detection_map on a VOC-sized set.")
    p.add_argument("--images", type=int, default=4952, help="images (VOC2007 test: 4,952)")
    p.add_argument("--per-image", type=int, default=40, help="detections per image")
    args = p.parse_args(argv)
    dets, gts = scenes(args.images, args.per_image)
    for use_07 in (True, False):
        t = time.perf_counter()
        r = metrics.detection_map(dets, gts, 20, use_07_metric=use_07)
        print(f"{args.images} images, {args.images * args.per_image:,} detections, "
              f"{'VOC07 11-point' if use_07 else 'area'} AP: mAP {r['map']:.4f} in "
              f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
