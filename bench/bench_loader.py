"""The lecture's DataLoader pipeline against data.DeviceLoader, on MNIST-sized data.

    python bench/bench_loader.py [--device cuda] [--workers 2] [--batches 300]

The lecture (EE-559 §7) loads MNIST with torchvision.datasets.MNIST, per-sample PIL transforms
(RandomCrop(28, padding=3), ToTensor, Normalize) and a DataLoader, and remarks that for a set that
fits in memory this is inefficient. data.DeviceLoader keeps the whole set as one uint8 tensor on
the device and crops/normalises whole batches there. Both are measured in the same run: images/s
of the loader alone, and of LeNet-5 training (lenet5.py's lecture model, SGD, batch 100).

The images are the real MNIST (60,000 training, 10,000 test digits) of ../shared/data/MNIST/raw
when that folder is there, random digits otherwise (speed does not depend on the pixels); they are
written as plain idx files so that torchvision's own MNIST class reads them.
"""
import argparse
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lenet5  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "MNIST", "raw")


def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape))
        f.write(array.tobytes())


def make_mnist(root):
    """60k train + 10k test digits in MNIST's raw idx layout under root/MNIST/raw."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    names = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3),
                                                                           ("labels", 1))]
    if all(os.path.exists(os.path.join(SHARED, n + ".gz")) for n in names):
        for n in names:
            with gzip.open(os.path.join(SHARED, n + ".gz")) as f, \
                    open(os.path.join(raw, n), "wb") as g:
                g.write(f.read())
        return "real MNIST"
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"),
                  rng.integers(0, 10, count).astype(np.uint8))
    return "random digits"


def batches(loader, n):
    while True:
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return


def measure(loader, device, n_batches, model=None):
    """images/s over n_batches (after 5 warm-up batches), moving each batch to the device as the
    lecture's loop does; with a model, one SGD step per batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
    seen, start = 0, None
    for i, (x, y) in enumerate(batches(loader, n_batches + 5)):
        if i == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen, start = 0, time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if model is not None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count()),
                   help="DataLoader worker processes (the lecture uses 4; default: min(4, cores))")
    p.add_argument("--batch-size", type=int, default=100, help="the lecture's 100")
    p.add_argument("--batches", type=int, default=300, help="timed batches per measurement")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    device = data.select_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        origin = make_mnist(root)
        # The lecture's pipeline, verbatim apart from the normalisation constants, which are
        # computed from the training images here (the lecture's (33.32, 78.56) are on 0..255).
        train_set = datasets.MNIST(root, train=True, download=False)
        x, y = train_set.data[:, None], train_set.targets
        mean, std = data.channel_stats(x)
        lecture = DataLoader(
            datasets.MNIST(root, train=True, download=False, transform=transforms.Compose([
                transforms.RandomCrop(28, padding=3), transforms.ToTensor(),
                transforms.Normalize(mean, std)])),
            batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
        ours = data.DeviceLoader(x, y, args.batch_size, True, device, mean, std,
                                 augment=data.augment_for("mnist"))
        rows = {}
        for name, loader in (("lecture DataLoader", lecture), ("data.DeviceLoader", ours)):
            load = measure(loader, device, args.batches)
            torch.manual_seed(0)
            model = lenet5.lenet5().to(device)
            train = measure(loader, device, args.batches, model)
            rows[name] = {"loader_images_per_s": load, "lenet5_train_images_per_s": train}
    print(f"device {device}, {torch.get_num_threads()} threads, {args.workers} workers, batch "
          f"{args.batch_size}, {args.batches} timed batches, data: {origin}")
    print(f"{'pipeline':<22}{'loader alone img/s':>20}{'LeNet-5 training img/s':>26}")
    for name, r in rows.items():
        print(f"{name:<22}{r['loader_images_per_s']:>20,.0f}{r['lenet5_train_images_per_s']:>26,.0f}")
    a, b = rows["lecture DataLoader"], rows["data.DeviceLoader"]
    print(f"speed-up: loader x{b['loader_images_per_s'] / a['loader_images_per_s']:.1f}, "
          f"training x{b['lenet5_train_images_per_s'] / a['lenet5_train_images_per_s']:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "workers": args.workers, "data": origin,
                       "rows": rows, "torch": torch.__version__}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
