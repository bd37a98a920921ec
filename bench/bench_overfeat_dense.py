"""OverFeat §3.3: images/s of convolutional dense evaluation against the same windows computed
crop by crop with the original (fully-connected) network, beside the ratio of their FLOPs
(torch.utils.flop_counter), the speed-up the shared convolutions allow.

    python bench/bench_overfeat_dense.py [--variant fast] [--width 1] [--scale 389] [--images 4]

For each image of side --scale: dense = overfeat.DenseNet (the FC layers as convolutions) on
the whole image, one score per window at the net's total stride (32 fast, 36 accurate), and with
--offsets §3.3's offset max-pooling (windows at stride 32 / 2 = 16 for the fast net); crops = the
original net on every one of those windows cut out of the image (batched). The padded layers
(conv3-5 pad 1) see zeros at a crop's border but the neighbouring pixels in the whole image,
so the two differ: on the fast net these zeros reach most of the 6x6 fc window (3 padded layers),
so with random weights the differences are as large as the spread of the logits between windows.
The script prints the argmax agreement and the differences next to the speed-up; that the window
mapping itself is exact is tested on an unpadded net (tests/test_overfeat.py,
test_convolutionize_unpadded_net_equals_the_net_on_every_crop_exactly). Random He-init weights:
the speed does not depend on them.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import overfeat  # noqa: E402


def timed(fn, iters, device):
    """fn's output and seconds per call; on CUDA the queue is drained before each clock read
    (the calls only enqueue kernels: without it the clock would time their launches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync()
    return out, (time.perf_counter() - start) / iters


def crops_of(x, size, stride, h, w):
    """The h x w windows of side `size` at `stride`, row-major: (N * h * w, C, size, size)."""
    return torch.cat([x[:, :, i * stride:i * stride + size, j * stride:j * stride + size]
                      for i in range(h) for j in range(w)]).contiguous()


def flops(fn):
    """FLOPs of one call of fn, by torch.utils.flop_counter (convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="fast", choices=["fast", "accurate", "alexnet"],
                   help="the network (default: fast, Table 1)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    p.add_argument("--scale", type=int, default=389, help="image side (default: 389, Table 5)")
    p.add_argument("--images", type=int, default=4, help="images per timed batch (default 4)")
    p.add_argument("--iters", type=int, default=2, help="timed repetitions (default 2)")
    p.add_argument("--offsets", action="store_true",
                   help="§3.3 offset pooling: windows at total stride / pooling stride")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    args = p.parse_args(argv)
    device = data.select_device(args.device)
    torch.manual_seed(0)
    model = overfeat.overfeat(args.variant, 1000, width=args.width).to(device).eval()
    overfeat.init_weights(model, "kaiming")
    dense = overfeat.DenseNet(model).eval()
    x = torch.randn(args.images, 3, args.scale, args.scale, device=device)
    size, stride = model.input_size, overfeat.total_stride(model)
    if args.offsets:
        maps, t_dense = timed(lambda: dense(x, offsets=True), args.iters, device)
        k = dense.stride if isinstance(dense.stride, int) else dense.stride[0]
        grid = overfeat.interleave(dict(zip([(a, b) for a in range(k) for b in range(k)],
                                            maps)), k)  # (N, K, k h, k w) at stride / k
        stride //= k
    else:
        grid, t_dense = timed(lambda: dense(x), args.iters, device)
    h, w = grid.shape[-2:]
    windows = crops_of(x, size, stride, h, w)
    logits, t_crop = timed(lambda: torch.cat([model(c) for c in windows.split(64)]),
                           args.iters, device)
    # crops are row-major over (i, j) then image: back to (N, K, h, w)
    crop_map = logits.view(h, w, args.images, -1).permute(2, 3, 0, 1)
    agree = (crop_map.argmax(1) == grid.argmax(1)).float().mean().item()
    diff = (crop_map - grid).abs().max().item()
    # relative to the spread of the logits over windows (~1.4: as large as that spread)
    rel = ((crop_map - grid).std() / grid.std(dim=(2, 3)).mean()).item()
    print(f"overfeat {args.variant} width {args.width:g}, {args.images} images of "
          f"{args.scale}x{args.scale} on {device}, {h}x{w} windows of {size} at stride {stride}"
          f"{' (offset pooling)' if args.offsets else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    # The work each path must do: the dense one shares the convolutions between windows, the
    # classifier still runs once per window (and per offset); the speed-up can reach this ratio.
    f_dense = flops(lambda: dense(x, offsets=args.offsets))
    f_crop = flops(lambda: torch.cat([model(c) for c in windows.split(64)]))
    print(f"dense: {args.images / t_dense:.2f} images/s   crop by crop: "
          f"{args.images / t_crop:.2f} images/s   speed-up x{t_crop / t_dense:.1f}   FLOP "
          f"ratio x{f_crop / f_dense:.1f} ({f_crop / 1e9:.1f} / {f_dense / 1e9:.1f} GFLOP)   "
          f"speed-up / FLOP ratio {t_crop / t_dense / (f_crop / f_dense):.2f}")
    print(f"same windows: argmax agreement {100 * agree:.1f} %, max |logit difference| "
          f"{diff:.3g}, std of the difference / std over windows {rel:.2f} (padding at the "
          f"crop borders)")
    return {"dense_images_per_s": args.images / t_dense, "crop_images_per_s": args.images / t_crop,
            "flop_ratio": f_crop / f_dense, "speed_up": t_crop / t_dense,
            "windows": h * w, "argmax_agreement": agree, "max_logit_difference": diff,
            "relative_difference": rel}


if __name__ == "__main__":
    main()
