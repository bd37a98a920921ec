"""Training and evaluation images/s of alexnet.py's models against torchvision's AlexNet.

    python bench/bench_alexnet.py [--batch-size 16] [--iters 3] [--size 224]

Same run, same input size and batch, weights=None, on the current device: fp32, channels-last and
bf16 autocast (--amp). The paper variant (LRN, groups=2) has no torchvision counterpart and is
timed alongside for reference. One SGD step per training iteration, after one warm-up iteration.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alexnet  # noqa: E402
import data  # noqa: E402


def measure(model, x, y, iters, train, channels_last, amp, device):
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train(train)
    start = None
    for i in range(iters + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if train:
                loss = F.cross_entropy(model(x), y)
            else:
                with torch.no_grad():
                    model(x)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * len(x) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    device = data.select_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    models = {"torchvision.models.alexnet": lambda: torchvision.models.alexnet(weights=None),
              "alexnet.py torchvision": lambda: alexnet.alexnet(),
              "alexnet.py paper": lambda: alexnet.alexnet(variant="paper")}
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.size}x{args.size}, {args.iters} timed iterations")
    print(f"{'model':<28}{'mode':<15}{'train img/s':>12}{'eval img/s':>12}")
    for mode, cl, amp in (("fp32", False, False), ("channels-last", True, False),
                          ("bf16 autocast", False, True)):
        for name, make in models.items():
            torch.manual_seed(0)
            m = make()
            tr = measure(m, x, y, args.iters, True, cl, amp, device)
            ev = measure(m, x, y, args.iters, False, cl, amp, device)
            print(f"{name:<28}{mode:<15}{tr:>12.1f}{ev:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
