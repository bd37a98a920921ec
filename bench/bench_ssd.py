"""Inference images/s of ssd.py's SSD300 against torchvision's ssd300_vgg16, and the shapes-det
quick run.

    python bench/bench_ssd.py [--batch-size 8] [--iters 2] [--quick-run]

Same run, same 300x300 input and batch, weights=None / weights_backbone=None, on the current
device. "network" is the forward pass alone (ours: SSD.forward; torchvision: its backbone and
head on the already-transformed batch); "+ post-processing" adds decoding, NMS and top-200
(ours: ssd.postprocess; torchvision: its whole eval forward, which also resizes and
normalises the images). With --quick-run, `ssd.py --data shapes-det --quick` is run too and its
mAP and wall time printed.
"""
import argparse
import os
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssd  # noqa: E402


def timed(fn, iters):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after a warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick-run", action="store_true", help="also run ssd.py --data shapes-det "
                   "--quick and report its mAP and time")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, 300, 300, device=device)
    ours = ssd.SSD(20, 300).to(device).eval()
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                   num_classes=21).to(device).eval()
    tv.score_thresh, tv.nms_thresh, tv.detections_per_img = 0.01, 0.45, 200  # the paper's

    def tv_network():
        feats = list(tv.backbone(x).values())
        return tv.head(feats)

    def ours_full():
        scores, offsets = ours(x)
        return ssd.postprocess(scores, offsets, ours.anchors)

    rows = [("ours SSD300 network", timed(lambda: ours(x), args.iters)),
            ("torchvision ssd300_vgg16 network", timed(tv_network, args.iters)),
            ("ours + post-processing", timed(ours_full, args.iters)),
            ("torchvision + post-processing", timed(lambda: tv(list(x)), args.iters))]
    print(f"batch {args.batch_size} at 300x300 on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; parameters ours "
          f"{sum(p.numel() for p in ours.parameters()):,}, torchvision "
          f"{sum(p.numel() for p in tv.parameters()):,}")
    for name, sec in rows:
        print(f"{name:36s} {args.batch_size / sec:8.2f} images/s")
    if args.quick_run:
        import subprocess
        t0 = time.time()
        out = "runs/bench_ssd_quick"
        r = subprocess.run([sys.executable, "ssd.py", "--data", "shapes-det", "--quick",
                            "--device", str(device), "--out", out, "--log-every", "1000"],
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           capture_output=True, text=True)
        last = [line for line in r.stdout.splitlines() if line.startswith("map ")]
        print(f"shapes-det --quick: {last[-1] if last else r.stderr.strip()[-200:]} in "
              f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
