"""Does the release's fixed lr 1e-10 on the summed loss move torchvision's VGG-16 as it moves
Caffe's? FCN-32s at full width, the release's recipe (voc-fcn32s/solver.prototxt: SGD lr 1e-10,
momentum 0.99, weight decay 5e-4, biases 2x lr without decay, batch 1, loss summed over the
pixels; dropout 0.5), trained on one real VOC image and its mask, in up to three arms from the
same initial weights and the same dropout draws:

  ours    torchvision's layout on (x / 255 - mean) / std, conv1_1's gradient scaled by
          (255 std)^2 per input channel (fcn.caffe_conv1_steps), as fcn.py trains
  caffe   the Caffe-scaled twin: conv1_1's weights divided by 255 std, fed 0-255 pixels minus
          the mean, no scaling (the release's arithmetic; tests/test_fcn.py checks the two
          step for step at a small width)
  plain   (--plain) torchvision's layout without the scaling, as a bare port would train

Per layer (conv1_1 ... conv5_3, fc6, fc7, score_fr) after steps 1, 10 and 100 (those within
--steps, and the last): moved = ||w_t - w_0|| / ||w_0||; step = the size of that step, lr ||v||
/ ||w_t|| (v the momentum buffer, weight decay in it); applied = ||w_t - w_0|| over the length
of the steps summed in float64: below 1 where float32 rounds steps away. score_fr starts at
zero (§4.3): its ||w_t|| is given instead. Without --weights the net starts from fcn.FCN's
random init (He, zero scores; torchvision's layout): the ImageNet weights cannot be downloaded
on this machine. --weights takes a torchvision VGG-16 state_dict (vgg16-397923af.pth).

    python bench/fcn_update_size.py --steps 100 --out bench/results/fcn_update_size.json
    python bench/fcn_update_size.py --weights ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import fcn  # noqa: E402
import metrics  # noqa: E402

VOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                   "voc_sample", "VOCdevkit", "VOC2012")
NAMES = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1",
         "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "score_fr"]
RECIPE = {"lr": 1e-10, "momentum": 0.99, "weight_decay": 5e-4, "bias_lr_mult": 2,
          "loss": "summed over the pixels", "batch": 1, "dropout": 0.5}


def layers(model):
    """(name, weight) of the 16 trained layers, in order."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    return list(zip(NAMES, [m.weight for m in convs] + [model.fc6.weight, model.fc7.weight,
                                                        model.score_fr.weight]))


def sample(voc, image_id):
    """The image normalised as fcn.py feeds it (1, 3, H, W), the same as 0-255 pixels minus the
    mean (Caffe's input, RGB order), and the mask (1, H, W; 255 void)."""
    image = data.load_image(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"))
    mask = torch.as_tensor(np.array(Image.open(os.path.join(voc, "SegmentationClass",
                                                            f"{image_id}.png"))), dtype=torch.long)
    x = data.segmentation_transforms(False)(image).as_subclass(torch.Tensor)[None]
    std = torch.tensor(data.IMAGENET_STD)[None, :, None, None]
    return x, x * 255 * std, mask[None]


def build(state, arm):
    model = fcn.FCN("32s", 21)
    model.load_state_dict(state)
    if arm == "caffe":
        std = torch.tensor(data.IMAGENET_STD)[None, :, None, None]
        with torch.no_grad():
            model.features[0].weight.div_(255 * std)
    if arm == "ours":
        fcn.caffe_conv1_steps(model)
    return model


def train(model, x, y, steps, log_at, seed):
    """`steps` SGD steps of the release's recipe; the per-layer figures at the `log_at` steps."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    lr = RECIPE["lr"]
    opt = torch.optim.SGD([{"params": weights, "lr": lr},
                           {"params": biases, "lr": RECIPE["bias_lr_mult"] * lr,
                            "weight_decay": 0.0}],
                          lr=lr, momentum=RECIPE["momentum"], weight_decay=RECIPE["weight_decay"])
    named = layers(model)
    w0 = {n: w.detach().clone() for n, w in named}
    summed = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in named}
    torch.manual_seed(seed)  # the same dropout draws in every arm
    model.train()
    losses, at, t0 = [], {}, time.time()
    for step in range(1, steps + 1):
        loss = fcn.fcn_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for n, w in named:  # the step just taken: -lr v (the weights' group)
            summed[n] -= lr * opt.state[w]["momentum_buffer"].double()
        if step in log_at:
            rows = {}
            for n, w in named:
                moved, norm0, norm, total = (float(t.norm()) for t in (
                    w.detach() - w0[n], w0[n], w.detach(), summed[n]))
                rows[n] = {"moved": moved / norm0 if norm0 else None, "norm": norm,
                           "step": lr * float(opt.state[w]["momentum_buffer"].norm()) / norm
                           if norm else None,
                           "applied": moved / total if total else None}
            at[step] = rows
            print(f"  step {step}: loss {loss.item():.4g}, {time.time() - t0:.0f} s")
    return {"loss": losses, "at": at, "seconds_per_step": (time.time() - t0) / steps}


def cell(r, key="moved"):
    if r[key] is None:
        return f"norm {r['norm']:.2e}" if key == "moved" else "-"
    return f"{r[key]:.3f}" if key == "applied" else f"{r[key]:.2e}"


def print_tables(results):
    """The first arm's figures at each logged step, then every arm's at the steps they share."""
    first, rows = next(iter(results.items()))
    steps = sorted(rows["at"])
    print(f"\n{first}: moved ||w_t - w_0|| / ||w_0|| after each step; at step {steps[-1]}: "
          f"that step's size and the part of the summed steps applied in float32")
    print("| layer | " + " | ".join(f"moved @{s}" for s in steps) + f" | step @{steps[-1]} | "
          f"applied @{steps[-1]} |")
    print("|---" * (len(steps) + 3) + "|")
    for n in NAMES:
        last = rows["at"][steps[-1]][n]
        print(f"| {n} | " + " | ".join(cell(rows["at"][s][n]) for s in steps) +
              f" | {cell(last, 'step')} | {cell(last, 'applied')} |")
    common = sorted(set.intersection(*(set(r["at"]) for r in results.values())))
    if len(results) > 1:
        print(f"\nmoved, every arm, at steps {', '.join(map(str, common))}")
        print("| layer | " + " | ".join(f"{a} @{s}" for s in common for a in results) + " |")
        print("|---" * (len(common) * len(results) + 1) + "|")
        for n in NAMES:
            print(f"| {n} | " + " | ".join(cell(results[a]["at"][s][n]) for s in common
                                         for a in results) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", default=VOC, help="a VOC2012 tree (default: ../shared/data's sample)")
    p.add_argument("--image", default="2007_000033",
                   help="the image id (default: 2007_000033, 500x366, a seg11valid image)")
    p.add_argument("--steps", type=int, default=100, help="SGD steps per arm (default: 100)")
    p.add_argument("--weights", default=None,
                   help="a torchvision VGG-16 state_dict (default: random init, see above)")
    p.add_argument("--plain", action="store_true", help="also the arm without the scaling")
    p.add_argument("--caffe-steps", type=int, default=None,
                   help="steps of the caffe and plain arms (default: --steps)")
    p.add_argument("--log-at", type=int, nargs="+", default=[1, 10, 100],
                   help="the steps after which the figures are taken (default: 1 10 100; "
                   "the last step is always taken)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    x, x_caffe, y = sample(args.voc, args.image)
    model = fcn.FCN("32s", 21)
    if args.weights:
        fcn.convolutionize_vgg16(model, torch.load(args.weights, weights_only=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    print(f"FCN-32s, {args.image} ({x.shape[-2]}x{x.shape[-1]}), "
          f"{'weights ' + args.weights if args.weights else 'random init'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {metrics.hardware('cpu')}")
    results = {}
    for arm in ["ours", "caffe"] + (["plain"] if args.plain else []):
        steps = args.steps if arm == "ours" else (args.caffe_steps or args.steps)
        log_at = sorted({s for s in args.log_at if s <= steps} | {steps})
        print(f"{arm}: {steps} steps")
        results[arm] = train(build(state, arm), x_caffe if arm == "caffe" else x, y, steps,
                             log_at, args.seed + 1)
    print_tables(results)
    if args.out:
        record = {"bench": "fcn_update_size.py", "image": args.image,
                  "size": list(x.shape[-2:]), "init": args.weights or "random (fcn.FCN, He)",
                  "recipe": RECIPE, "steps": {a: len(r["loss"]) for a, r in results.items()},
                  "arms": results,
                  "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                  "hardware": metrics.hardware("cpu"),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"written {args.out}")
    return results


if __name__ == "__main__":
    main()
