"""OverFeat §4.3's greedy merge: overfeat.greedy_merge (the pairwise score matrix computed once,
updated per merge) against the pure-Python pair loop it replaced, on the same boxes.

    python bench/bench_greedy_merge.py [--boxes 80 150 300] [--repeats 3] [--threads 2]

The boxes are what a localiser emits: clusters of jittered boxes around a few objects plus
scattered ones, with random confidences, in a 231-pixel image; merge threshold 0.9 (the
shapes-det default). It checks that both give the same boxes and scores, then prints the time of
each and the ratio. The loop is kept here, and in the tests, as the reference.
"""
import argparse
import os
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import overfeat  # noqa: E402


def reference_greedy_merge(boxes, scores, threshold, size):
    """The loop as it was: every pair's match score recomputed for every merge."""
    def match_score(a, b):
        ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
        iou = torchvision.ops.box_iou(a[None], b[None])[0, 0]
        return float(torch.dist(ca, cb) / size + 1 - iou)

    boxes, scores = [b for b in boxes.float()], [float(s) for s in scores]
    while len(boxes) > 1:
        best, pair = None, None
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                s = match_score(boxes[i], boxes[j])
                if best is None or s < best:
                    best, pair = s, (i, j)
        if best > threshold:
            break
        i, j = pair
        merged, conf = (boxes[i] + boxes[j]) / 2, scores[i] + scores[j]
        boxes = [b for k, b in enumerate(boxes) if k not in pair] + [merged]
        scores = [s for k, s in enumerate(scores) if k not in pair] + [conf]
    order = sorted(range(len(boxes)), key=lambda k: -scores[k])
    return torch.stack([boxes[k] for k in order]), torch.tensor([scores[k] for k in order])


def localiser_boxes(n, size=231, objects=3, seed=0):
    """n boxes: 80 % jittered around `objects` random objects, the rest anywhere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 2, generator=g) * size * 0.6 + size * 0.2
    sides = torch.rand(objects, 2, generator=g) * size * 0.3 + size * 0.15
    k = int(0.8 * n)
    who = torch.randint(0, objects, (k,), generator=g)
    c = centres[who] + torch.randn(k, 2, generator=g) * size * 0.04
    s = sides[who] * (1 + 0.1 * torch.randn(k, 2, generator=g))
    c = torch.cat([c, torch.rand(n - k, 2, generator=g) * size])
    s = torch.cat([s, torch.rand(n - k, 2, generator=g) * size * 0.4 + 10])
    boxes = torch.cat([c - s / 2, c + s / 2], 1).clamp(0, size)
    return boxes, torch.rand(n, generator=g)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[80, 150])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"greedy merge, threshold {args.threshold}, {torch.get_num_threads()} threads")
    print("boxes | merged to | loop s | matrix s | speed-up | same output")
    for n in args.boxes:
        boxes, scores = localiser_boxes(n)
        ref, t_ref = best_of(lambda: reference_greedy_merge(boxes, scores, args.threshold, 231),
                             1)
        new, t_new = best_of(lambda: overfeat.greedy_merge(boxes, scores, args.threshold, 231),
                             args.repeats)
        same = (ref[0].shape == new[0].shape and torch.equal(ref[0], new[0])
                and torch.allclose(ref[1], new[1]))
        print(f"{n} | {len(new[0])} | {t_ref:.3f} | {t_new:.4f} | {t_ref / t_new:.0f}x | {same}")


if __name__ == "__main__":
    main()
