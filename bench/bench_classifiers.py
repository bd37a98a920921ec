"""Training and evaluation images/s of vgg19.py, resnet.py, resnext.py and googlenet.py against
torchvision's model of the same architecture.

    python bench/bench_classifiers.py [--batch-size 8] [--iters 2] [--size 160] [--only resnet50]

Same run, same input, weights=None, on the current device, in fp32, channels-last and bf16
autocast. One SGD step per training iteration, after one warm-up iteration. Models without a
torchvision counterpart (CIFAR ResNet-20 and ResNeXt-29) are timed at 32x32 for reference.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import googlenet  # noqa: E402
import resnet  # noqa: E402
import resnext  # noqa: E402
import vgg19  # noqa: E402


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
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out  # GoogLeNet's aux outputs
                loss = F.cross_entropy(out.float(), y)
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


# name: (ours, torchvision's or None, input size or None for --size)
MODELS = {
    "vgg19": (lambda: vgg19.vgg19(), lambda: torchvision.models.vgg19(weights=None), None),
    "resnet50": (lambda: resnet.resnet(50), lambda: torchvision.models.resnet50(weights=None),
                 None),
    "resnext50_32x4d": (lambda: resnext.resnext(50, 32, 4),
                        lambda: torchvision.models.resnext50_32x4d(weights=None), None),
    "googlenet": (lambda: googlenet.googlenet(),
                  lambda: torchvision.models.googlenet(weights=None, aux_logits=True,
                                                       init_weights=True), None),
    "resnet20 (CIFAR)": (lambda: resnet.resnet(20, 10), None, 32),
    "resnext29_8x64d (CIFAR)": (lambda: resnext.resnext(29, 8, 64, 10), None, 32),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="timed iterations per measurement")
    p.add_argument("--size", type=int, default=160, help="ImageNet-model input size")
    p.add_argument("--only", nargs="*", default=None, help="model names to time")
    args = p.parse_args(argv)
    device = data.select_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.iters} timed iterations, ImageNet models at {args.size}x{args.size}")
    print(f"{'model':<34}{'mode':<15}{'train img/s':>12}{'eval img/s':>12}")
    for name, (ours, theirs, size) in MODELS.items():
        if args.only and name not in args.only:
            continue
        s = size or args.size
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, s, s, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        for mode, cl, amp in (("fp32", False, False), ("channels-last", True, False),
                              ("bf16 autocast", False, True)):
            for who, make in (("torchvision", theirs), ("ours", ours)):
                if make is None:
                    continue
                torch.manual_seed(0)
                m = make()
                tr = measure(m, x, y, args.iters, True, cl, amp, device)
                ev = measure(m, x, y, args.iters, False, cl, amp, device)
                print(f"{name + ' ' + who:<34}{mode:<15}{tr:>12.1f}{ev:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
