"""Inference images/s of ssd.py's SSD300 against torchvision's ssd300_vgg16, the training step's
time, and the shapes-det quick run.

    python bench/bench_ssd.py [--batch-size 8] [--iters 2] [--quick-run]
    python bench/bench_ssd.py --train-step [--batch-size 32] [--iters 5]

Same run, same 300x300 input and batch, weights=None / weights_backbone=None, on the current
device. "network" is the forward pass alone (ours: SSD.forward; torchvision: its backbone and
head on the already-transformed batch); "+ post-processing" adds decoding, NMS and top-200
(ours: ssd.postprocess; torchvision: its whole eval forward, which also resizes and
normalises the images). With --quick-run, `ssd.py --data shapes-det --quick` is run too and its
mAP and wall time printed.

--train-step times, per batch of shapes-det training images (their own boxes, 1-4 an image),
"targets + loss": ssd.train_collate's padded boxes to the device, the whole batch matched and
encoded against SSD300's 8,732 default boxes (build_targets), the MultiBox loss and its backward
to the predictions (random ones: the network is left out); and "training step": the --quick
network's (96 px, width 0.25, BN) forward, targets, loss, backward and SGD step.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssd  # noqa: E402


def timed(fn, iters, device=torch.device("cpu")):
    """Seconds per call: the median of `iters` timed calls after a warm-up (a shared machine's
    stalls stay out of it), each waiting for its queued CUDA kernels."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_times(batch_size, iters, device):
    """[(name, seconds per batch)] of the training step's parts (see the module's docstring)."""
    import data
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    rows = []
    for size, name in ((300, "targets + loss (SSD300, 8,732 boxes)"),
                       (96, "training step (--quick network, 96 px)")):
        ds = data.detection_dataset("shapes-det", "train", quick=True,
                                    transforms=ssd.train_transforms(size, mean, std, kind="none"))
        x, boxes, labels = ssd.train_collate([ds[i] for i in range(batch_size)])
        if device.type == "cuda":
            x, boxes, labels = x.pin_memory(), boxes.pin_memory(), labels.pin_memory()
        torch.manual_seed(0)
        model = ssd.SSD(6, size, 0.25, bn=True).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scores = torch.randn(batch_size, len(model.anchors), 7, device=device, requires_grad=True)
        offsets = torch.randn(batch_size, len(model.anchors), 4, device=device,
                              requires_grad=True)

        def step(full=size == 96):
            classes, targets = ssd.build_targets(
                boxes.to(device, non_blocking=True) / size,
                labels.to(device, non_blocking=True), model.anchors)
            out = model(x.to(device, non_blocking=True)) if full else (scores, offsets)
            loss, _ = ssd.multibox_loss(*out, classes, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if full:
                optimizer.step()
        rows.append((name, timed(step, iters, device)))
    return rows


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after a warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick-run", action="store_true", help="also run ssd.py --data shapes-det "
                   "--quick and report its mAP and time")
    p.add_argument("--train-step", action="store_true", help="only the training step's times "
                   "(see above)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.train_step:
        with torch.enable_grad():
            rows = train_step_times(args.batch_size, args.iters, device)
        print(f"batch {args.batch_size} on {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        for name, sec in rows:
            print(f"{name:40s} {1000 * sec:9.1f} ms")
        return
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

    rows = [("ours SSD300 network", timed(lambda: ours(x), args.iters, device)),
            ("torchvision ssd300_vgg16 network", timed(tv_network, args.iters, device)),
            ("ours + post-processing", timed(ours_full, args.iters, device)),
            ("torchvision + post-processing", timed(lambda: tv(list(x)), args.iters, device))]
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
