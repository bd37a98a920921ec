"""mAP of the detector outputs shipped with ../shared/data/voc_sample, through the repository's
own VOC reader (data.VOCDetectionSet, data.parse_voc_xml) and metrics.detection_map.

    python bench/voc_sample_map.py [--root ../shared/data/voc_sample]

The detections are in the VOC results format (comp4_det_val_<class>.txt: image id, score, xmin,
ymin, xmax, ymax in VOC's 1-based pixel corners); they are converted like the annotations,
(xmin - 1, ymin - 1, xmax, ymax), so that plain IoU equals the devkit's "+1" IoU.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                       "voc_sample")


def read_results(folder, ids):
    """Per image {"boxes", "scores", "labels"} from the comp4_det_val_<class>.txt files."""
    rows = {i: [] for i in ids}
    for c, name in enumerate(data.VOC_CLASSES):
        path = os.path.join(folder, f"comp4_det_val_{name}.txt")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                image, score, x0, y0, x1, y1 = line.split()
                rows[image].append((c, float(score), float(x0) - 1, float(y0) - 1, float(x1),
                                    float(y1)))
    dets = []
    for i in ids:
        t = torch.tensor(rows[i], dtype=torch.float64).reshape(-1, 6)
        dets.append({"labels": t[:, 0].long(), "scores": t[:, 1], "boxes": t[:, 2:]})
    return dets


def main(argv=None):
    p = argparse.ArgumentParser(description="mAP of the shipped detections on the VOC sample.")
    p.add_argument("--root", default=DEFAULT, help="folder holding VOCdevkit/ and results/")
    args = p.parse_args(argv)
    ds = data.VOCDetectionSet(args.root, "2012", "val")
    ids = [os.path.splitext(os.path.basename(a))[0] for a in ds.annotations]
    gts = [ds.target(i) for i in range(len(ds))]
    dets = read_results(os.path.join(args.root, "results"), ids)
    print(f"{len(ids)} images, {sum(len(g['labels']) for g in gts)} objects "
          f"({sum(int(g['difficult'].sum()) for g in gts)} difficult), "
          f"{sum(len(d['labels']) for d in dets)} detections")
    for use_07 in (True, False):
        r = metrics.detection_map(dets, gts, 20, use_07_metric=use_07)
        print(f"{'VOC07 11-point' if use_07 else 'VOC12 area    '} mAP {100 * r['map']:.2f}  " +
              " ".join(f"{n[:5]} {100 * a:.1f}" for n, a in zip(data.VOC_CLASSES, r["ap"])))


if __name__ == "__main__":
    main()
