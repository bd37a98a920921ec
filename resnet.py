"""ResNet: K. He, X. Zhang, S. Ren, J. Sun, "Deep residual learning for image recognition",
CVPR 2016, arXiv:1512.03385.

    python resnet.py --depth 20                              # CIFAR-10, the paper's §4.2 recipe
    python resnet.py --depth 110                             # the same, with the 400-step warm-up
    python resnet.py --depth 50 --data imagenet              # §3.4 recipe, 10-crop test
    python resnet.py --depth 50 --eval-only --pretrained     # torchvision's weights on ImageNet val
    python resnet.py --depth 56 --plain --eval-every 1       # plain-56, Fig. 6's curves
    python resnet.py --depth 34 --shortcut C --data imagenet # Table 3's option C
    python resnet.py --data shapes --quick                   # offline, seconds on a CPU
    torchrun --nproc_per_node=2 resnet.py --depth 110        # data-parallel, same global batch

Paper: CIFAR-10 test error (Table 6) ResNet-20/32/44/56/110: 8.75 / 7.51 / 7.17 / 6.97 / 6.43 %
(110: best of 5 runs, mean 6.61 %). ImageNet val, 10-crop (Table 3): ResNet-50 22.85 % top-1 /
6.71 % top-5, ResNet-101 21.75 / 6.05, ResNet-152 21.43 / 5.71.
Ours: see the README's results table (the command and hardware of every figure are there).

Two families, chosen by --depth. ImageNet depths 18/34/50/101/152 (Table 1): 7x7/2 stem, max-pool,
four stages of basic (18, 34) or bottleneck (50+) blocks, projection shortcuts where the shape
changes (option B, §3.3); the module names (conv1, bn1, layer1..4, downsample, fc) and therefore
the state_dict are torchvision.models.resnet18..152's. CIFAR depths 20/32/44/56/110/1202 (§4.2):
6n+2 layers, a 3x3 stem with 16 maps, three stages of n basic blocks on 32x32/16x16/8x8 maps with
16/32/64 filters, global average pooling, a 10-way fc, and the paper's option-A shortcuts (identity;
stride-2 subsampling and zero-padded extra channels where the shape changes: no parameters).

Shortcuts (§3.3, §4.1 Table 3), --shortcut: A zero-padding identity (parameter-free), B projections
(1x1 conv + BN) where the shape changes and identity elsewhere, C projections in every block. The
default is the paper's: A on the CIFAR depths (§4.2), B on the ImageNet ones (torchvision's layout;
checkpoints of the defaults keep the names resnetD, the others are saved as resnetD-A/B/C). A on
the bottleneck networks and B/C on CIFAR are built though the paper trains neither; --pretrained
(torchvision's weights) is option B's only. --plain: the same network without any shortcut, each
block's output relu(F(x)) where the residual block's is relu(F(x) + x) (Fig. 3 middle; BN after
every convolution, §3.4): plain-20/32/44/56 of Fig. 6, plain-18/34 of Table 2; saved as plainD,
with the same parameters as option A's network. Each epoch's history row holds the training error,
the running error of the augmented batches as they are trained on, and with --eval-every 1 the test
error: Fig. 6's dashed and bold curves (bench/resnet_fig6.py draws them).

Recipe. CIFAR (§4.2): SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k
and 48k iterations, stop at 64k (chosen on a 45k/5k train/val split: --holdout; the final runs
train on the whole 50k); 4-pixel zero padding, random 32x32 crop,
horizontal flip; test on the single 32x32 view. The schedule is counted in iterations (a per-step
scheduler); --epochs sets another total length and the milestones keep their fractions (1/2, 3/4).
ImageNet (§3.4): SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 divided by 10 every 30
epochs for 90 (torchvision's reference; see DEPARTURES), random-size crops, flips, PCA colour;
10-crop test (data.ten_crop_predict), the single centre crop reported as well.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

# CIFAR-10 test error and parameter counts, Table 6 (110: best of 5 runs; the mean is 6.61 %).
CIFAR_ERROR = {20: 0.0875, 32: 0.0751, 44: 0.0717, 56: 0.0697, 110: 0.0643, 1202: 0.0793}
CIFAR_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}
# ImageNet val, 10-crop top-1 / top-5 error: Table 3 (option B shortcuts, as here) for 34-152;
# ResNet-18's 27.88 % is Table 2's (option A shortcuts; no top-5 figure is given).
IMAGENET_ERROR = {18: (0.2788, None), 34: (0.2452, 0.0746), 50: (0.2285, 0.0671),
                  101: (0.2175, 0.0605), 152: (0.2143, 0.0571)}
CIFAR_DEPTHS = tuple(CIFAR_ERROR)
IMAGENET_DEPTHS = tuple(IMAGENET_ERROR)
# §4.2: "lr 0.1, divided by 10 at 32k and 48k iterations, terminate training at 64k"
# --quick: the first 2,000 / 500 images and a budget of steps (batch 64: 31 steps an epoch), the
# §4.2 schedule's milestones kept at the same fractions of it.
QUICK = {"epochs": 15, "batch_size": 64}
CIFAR_RECIPE = dict(iterations=64000, milestones=(32000, 48000), batch_size=128, lr=0.1,
                    weight_decay=1e-4, warmup=400)
# §3.4: batch 256, lr 0.1, wd 1e-4; ÷10 every 30 epochs of 90 as torchvision's reference
IMAGENET_RECIPE = dict(epochs=90, milestones=(30, 60), batch_size=256, lr=0.1, weight_decay=1e-4)


def is_cifar_depth(depth):
    """The CIFAR family is every 6n+2 (§4.2) that is not an ImageNet depth (50 = 6*8+2 is)."""
    return depth not in IMAGENET_DEPTHS and depth >= 8 and (depth - 2) % 6 == 0


# Table 2 (plain-18/34, top-1 only) and Table 3 (plain-34's top-5; ResNet-34 with each option):
# ImageNet val, 10-crop top-1 / top-5 error.
PLAIN_IMAGENET_ERROR = {18: (0.2794, None), 34: (0.2854, 0.1002)}
RESNET34_OPTION_ERROR = {"A": (0.2503, 0.0776), "B": (0.2452, 0.0746), "C": (0.2419, 0.0740)}


def paper_figures(depth, shortcut=None, plain=False):
    """The paper's figures for this network, or a note saying why there are none."""
    shortcut = shortcut or default_shortcut(depth)
    ref = "He et al. 2015, arXiv:1512.03385"
    if is_cifar_depth(depth):
        if plain:
            return {"reference": f"{ref}, Fig. 6 left", "data": "cifar10",
                    "note": f"plain-{depth}: curves only (Fig. 6), no table figure"}
        if shortcut != "A":
            return {"reference": f"{ref}, §4.2", "data": "cifar10",
                    "note": f"the CIFAR networks use option A only; no figure for {shortcut}"}
        if depth not in CIFAR_ERROR:
            return {"reference": f"{ref}, §4.2 (6n+2 layers)", "data": "cifar10",
                    "note": f"Table 6 has no ResNet-{depth}"}
        return {"reference": f"{ref}, Table 6", "data": "cifar10",
                "test_error": CIFAR_ERROR[depth], "parameters": CIFAR_PARAMS[depth],
                **({"test_error_mean_of_5": 0.0661} if depth == 110 else {})}
    if plain and depth not in PLAIN_IMAGENET_ERROR:
        return {"reference": ref, "data": "imagenet", "note": f"no plain-{depth} in the paper"}
    if plain:
        top1, top5 = PLAIN_IMAGENET_ERROR[depth]
        table = "Tables 2, 3" if depth == 34 else "Table 2"
    elif depth == 34:
        (top1, top5), table = RESNET34_OPTION_ERROR[shortcut], "Table 3"
    elif depth == 18 and shortcut != "C":  # Table 2's ResNet-18 has option A shortcuts
        (top1, top5), table = IMAGENET_ERROR[18], "Table 2"
    elif depth != 18 and shortcut == "B":
        (top1, top5), table = IMAGENET_ERROR[depth], "Table 3"
    else:
        return {"reference": f"{ref}, Table 3", "data": "imagenet",
                "note": f"no ResNet-{depth} with option {shortcut} shortcuts in the paper"}
    return {"reference": f"{ref}, {table} (10-crop)", "data": "imagenet", "test_error": top1,
            "top5_error": top5}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES_CIFAR = [
    "inputs normalised with the training set's per-channel mean and deviation (the paper "
    "subtracts the per-pixel mean)",
    "ResNet-110/1202 warm-up: a fixed 400 iterations at lr 0.01, not 'until the training error "
    "is below 80 %' (about 400 iterations in the paper), so that resume is exact",
    "one process holds the whole batch of 128 (the paper: two GPUs, BN statistics per GPU); "
    "under torchrun BN statistics are per process, as in the paper",
]
DEPARTURES_IMAGENET = [
    "bottleneck stride on the 3x3 convolution (torchvision's 'v1.5'); the paper strides the "
    "first 1x1 of conv3_1, conv4_1, conv5_1",
    "lr / 10 every 30 epochs for 90 epochs (torchvision's reference recipe) instead of 'when the "
    "error plateaus' for up to 60e4 iterations (= 120 epochs at batch 256)",
    "scale augmentation by RandomResizedCrop (8-100 % of the area, aspect 3/4-4/3) instead of "
    "the short side resized to a random size in [256, 480] and a random 224 crop",
    "per-channel mean/std normalisation (the paper subtracts the per-pixel mean)",
    "10-crop test on the central 256x256 square of the image resized to 256 (not on the whole "
    "resized image); single-crop figures are the 224 centre crop",
]


# ---------------------------------------------------------------------------------------------
# Model

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # BN follows: no bias


class BasicBlock(nn.Module):
    """Fig. 2 / Fig. 5 left: two 3x3 convolutions, F(x) + x, ReLU after the addition. `plain`:
    the same two layers without the shortcut (the plain baselines, Fig. 3 middle): relu(F(x))."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, plain=False):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample  # None: the identity shortcut (or none, when plain)
        self.plain = plain

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.plain:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """Fig. 5 right: 1x1 reduce, 3x3, 1x1 restore (x4). The stride is on the 3x3 convolution, as
    in torchvision ("ResNet v1.5"); the paper strides the first 1x1 (see DEPARTURES). `plain`:
    without the shortcut, as BasicBlock's."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, plain=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.plain = plain

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if not self.plain:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ShortcutA(nn.Module):
    """Option (A) of §3.3 / §4.1, the CIFAR networks' (§4.2): the identity, subsampled by taking
    every `stride`-th pixel (what a stride-2 1x1 identity convolution does), with the extra
    channels filled with zeros (appended after the input's, as fb.resnet.torch). No parameters."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.stride, self.extra = stride, planes - inplanes

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (W, H, C) pairs: zeros after channel C-1


def make_shortcut(option, inplanes, outplanes, stride):
    """A block's shortcut module (None: the identity), §3.3 and Table 3's options: (A) zero-padding
    identity where the shape changes, parameter-free; (B) a 1x1 projection + BN (Eqn. 2; BN after
    every convolution, §3.4) where the shape changes, identity elsewhere; (C) projections
    everywhere. Across map sizes the shortcut has stride 2 (§3.3)."""
    changes = stride != 1 or inplanes != outplanes
    if option == "C" or (option == "B" and changes):
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(outplanes))
    if option == "A" and changes:
        return ShortcutA(inplanes, outplanes, stride)
    return None


def make_stage(block, inplanes, planes, blocks, stride, option, plain):
    """A stage of `blocks` blocks, the first with `stride`; a plain stage has no shortcut at all.
    Returns (the stage, its output channels)."""
    out, layers = planes * block.expansion, []
    for i in range(blocks):
        s = stride if i == 0 else 1
        sc = None if plain else make_shortcut(option, inplanes, out, s)
        layers.append(block(inplanes, planes, s, sc, plain))
        inplanes = out
    return nn.Sequential(*layers), out


def _init(model):
    """He et al.'s init [13] for convolutions (normal, fan_out, ReLU gain, as torchvision and
    fb.resnet.torch), BN scale 1 and shift 0; the fc keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """The ImageNet networks of Table 1 with torchvision's module names (option B: its layout and
    state_dict); `shortcut` A or C, or `plain` (Table 2's plain-18/34), otherwise the same."""

    def __init__(self, block, layers, num_classes=1000, in_channels=3, shortcut="B",
                 plain=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # conv2_x .. conv5_x; "down-sampling is performed by conv3_1, conv4_1, conv5_1" (Table 1)
        c = 64
        self.layer1, c = make_stage(block, c, 64, layers[0], 1, shortcut, plain)
        self.layer2, c = make_stage(block, c, 128, layers[1], 2, shortcut, plain)
        self.layer3, c = make_stage(block, c, 256, layers[2], 2, shortcut, plain)
        self.layer4, c = make_stage(block, c, 512, layers[3], 2, shortcut, plain)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class CifarResNet(nn.Module):
    """§4.2: 3x3 conv with 16 maps, then 3 stages of n basic blocks with 16, 32, 64 filters on
    32x32, 16x16, 8x8 maps (stride 2 at the first 3x3 of stages 2 and 3), global average
    pooling, fc: 6n + 2 weighted layers. Option-A shortcuts (§4.2) unless `shortcut` says
    otherwise; `plain`: Fig. 6's plain-20/32/44/56, the same layers without shortcuts."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, shortcut="A", plain=False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers, not {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv3x3(in_channels, 16), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, c = make_stage(BasicBlock, 16, 16, n, 1, shortcut, plain)
        self.layer2, c = make_stage(BasicBlock, c, 32, n, 2, shortcut, plain)
        self.layer3, c = make_stage(BasicBlock, c, 64, n, 2, shortcut, plain)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


IMAGENET_LAYERS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                   50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                   152: (Bottleneck, (3, 8, 36, 3))}
SHORTCUTS = ("A", "B", "C")


def default_shortcut(depth):
    """The paper's option for each family: A on CIFAR (§4.2), B on ImageNet (§4.1, Table 3:
    ResNet-50/101/152 use B; torchvision's layout is B)."""
    return "A" if is_cifar_depth(depth) else "B"


def resnet(depth=50, num_classes=1000, in_channels=3, shortcut=None, plain=False):
    """The model factory: CIFAR depths 6n+2 (Table 6: 20, 32, 44, 56, 110, 1202) give the §4.2
    network, ImageNet depths (18, 34, 50, 101, 152) the torchvision-compatible Table 1 network.
    `shortcut` A, B or C (§3.3, Table 3; None: the family's default); `plain`: no shortcuts."""
    if plain and shortcut is not None:
        raise ValueError(f"a plain network has no shortcuts; shortcut={shortcut!r} with plain")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; use one of {SHORTCUTS}")
    kw = dict(num_classes=num_classes, in_channels=in_channels,
              shortcut=shortcut or default_shortcut(depth), plain=plain)
    if is_cifar_depth(depth):
        return CifarResNet(depth, **kw)
    if depth in IMAGENET_LAYERS:
        return ResNet(*IMAGENET_LAYERS[depth], **kw)
    raise ValueError(f"unknown ResNet depth {depth}; use 6n+2 (CIFAR, e.g. {CIFAR_DEPTHS}) or "
                     f"one of {IMAGENET_DEPTHS} (ImageNet)")


def arch_name(args):
    """The network's name in checkpoints: resnetD with the family's default shortcut (the names
    of older checkpoints), resnetD-A/B/C with another, plainD without shortcuts."""
    if args.plain:
        return f"plain{args.depth}"
    return f"resnet{args.depth}" + ("" if args.shortcut == default_shortcut(args.depth)
                                    else f"-{args.shortcut}")


def title(args):
    """As the paper writes it: plain-20, ResNet-34 (with the option where not the default)."""
    if args.plain:
        return f"plain-{args.depth}"
    return f"ResNet-{args.depth}" + ("" if args.shortcut == default_shortcut(args.depth)
                                     else f" (option {args.shortcut} shortcuts)")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_pretrained(model, depth):
    """torchvision's ImageNet weights (IMAGENET1K_V1, trained with torchvision's reference
    recipe); with another number of classes, every layer but the fc (fine-tuning)."""
    if depth not in IMAGENET_DEPTHS:
        raise data.DataError(f"--pretrained needs an ImageNet depth {IMAGENET_DEPTHS}; there are "
                             f"no published weights of the CIFAR ResNet-{depth}")
    weights = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1
    state = data.torchvision_weights(weights)
    if model.fc.out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("fc.")})
    data.load_weights(model, state, f"torchvision's ResNet-{depth} weights")


# ---------------------------------------------------------------------------------------------
# Recipe: the iteration schedule

def lr_factor(iteration, milestones, warmup=0):
    """The lr multiplier at a 0-based iteration: / 10 per milestone reached; x 0.1 during the
    warm-up (§4.2, ResNet-110: "0.01 to warm up the training ... then go back to 0.1")."""
    if iteration < warmup:
        return 0.1
    return 0.1 ** sum(iteration >= m for m in milestones)


def schedule(recipe, steps_per_epoch, epochs=None):
    """(total iterations, milestones in iterations). CIFAR: the paper's 64k iterations unless
    `epochs` is given; ImageNet: 90 epochs. Another length keeps the milestones' fractions."""
    if recipe == "cifar":
        r = CIFAR_RECIPE
        total = r["iterations"] if epochs is None else epochs * steps_per_epoch
        return total, [round(m * total / r["iterations"]) for m in r["milestones"]]
    r = IMAGENET_RECIPE
    total = (epochs or r["epochs"]) * steps_per_epoch
    return total, [round(m * total / r["epochs"]) for m in r["milestones"]]


# ---------------------------------------------------------------------------------------------
# Data glue: ImageNet's transforms (the in-memory sets come from data.classification_loaders)

def imagenet_transforms(size=224):
    """§3.4's training pipeline (RandomResizedCrop as the scale augmentation, flips, PCA colour)
    and the test view: the central (256/224 x size)^2 square of the image resized to 256/224 x
    size, from which both the centre crop and the ten crops are cut."""
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    big = round(size * 256 / 224)
    train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                           data.PCAColour(), data.Normalize(mean, std)])
    test_tf = v2.Compose([v2.ToImage(), v2.Resize(big, antialias=True), v2.CenterCrop(big),
                          v2.ToDtype(torch.float32, scale=True), data.Normalize(mean, std)])
    return train_tf, test_tf


def imagenet_loaders(args, device):
    """ImageNet's loaders with `imagenet_transforms`; --eval-only reads the val folder alone
    (train is None)."""
    train_tf, test_tf = imagenet_transforms(args.img_size)
    kw = dict(data_dir=args.data_dir, download=False, quick=args.quick)
    test_set = data.classification_dataset("imagenet", "test", transform=test_tf, **kw)
    test = data.make_loader(test_set, 50, False, args.workers, device,  # rank r: r, r + W, ...
                            gpu_decode=args.gpu_decode)
    train_set, train = [], None
    if not args.eval_only:
        train_set = data.classification_dataset("imagenet", "train", transform=train_tf, **kw)
        train = data.make_loader(train_set, args.batch_size // args.world, True, args.workers,
                                 device, seed=args.seed, gpu_decode=args.gpu_decode)
    classes = getattr(test_set, "names", None) or test_set.dataset.names
    info = {"classes": classes, "mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD,
            "in_channels": 3, "image_size": args.img_size,
            "sizes": (len(train_set), 0, len(test_set))}
    return train, None, test, info


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model, loader, optimizer, scheduler, scaler, args, device, epoch, progress,
                    steps):
    """At most `steps` iterations (the last epoch of an iteration budget is cut short); the
    scheduler steps after every iteration. Returns the epoch's mean training loss and its training
    error: the running error of the augmented batches as they were trained on (Fig. 6's dashed
    curves), counted on the device and read once, at the epoch's end, over every rank's."""
    model.train()
    wrong, n = torch.zeros((), dtype=torch.int64, device=device), 0
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        wrong += (out.detach().argmax(1) != y).sum()  # no host sync: read after the epoch
        n += len(y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        progress.step(len(y) * args.world, loss, lr, epoch, n=len(y))
    # the losses and errors read here, over every rank's samples
    return progress.epoch_loss(), metrics.global_mean(wrong, n, device)


@torch.no_grad()
def predict(model, x, size, ten_crop=False, channels_last=False):
    """Softmax probabilities of the single view (the centre `size` crop when x is larger; CIFAR:
    the original 32x32 image, §4.2) or averaged over the ten crops (§3.4, data.ten_crop_predict)."""
    if ten_crop:
        return data.ten_crop_predict(model, x, size).float()
    if x.shape[-1] > size:
        x = v2.functional.center_crop(x, [size, size])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x).float().softmax(1)


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes, ten_crop=False):
    """Single-crop error (and ten-crop error with ten_crop, then test_error is the ten-crop one),
    accuracy, balanced error, and top-5 error when there are >= 100 classes, of the (unwrapped)
    model on the whole set: under torchrun each rank evaluates its share, gathered here."""
    model.eval()
    single, tens, targets = [], [], []
    size = args.img_size or 10 ** 9  # small sets: the image as it is
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with data.autocast(device, args.amp):
            single.append(predict(model, x, size, False, args.channels_last).cpu())
            if ten_crop:
                tens.append(predict(model, x, size, True).cpu())
        targets.append(y.cpu())
    if ten_crop:
        p1, out, y = data.gather_shards(torch.cat(single), torch.cat(tens), torch.cat(targets))
    else:
        p1, y = data.gather_shards(torch.cat(single), torch.cat(targets))
        out = p1
    r = metrics.classification_report(out, y, num_classes, views={"single_crop": p1})
    if ten_crop:
        r["ten_crop_error"] = r["test_error"]
    return r


def classify(args, state, device):
    """--classify PATH (an image or a folder): the likeliest classes of each image through the
    checkpoint's network (its classes, normalisation and input) or torchvision's ImageNet
    weights (--pretrained: short side 256, centre 224 crop); the single view of `evaluate`."""
    if args.weights:  # its network's name was checked in main (check_arch)
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
        imagenet = args.data == "imagenet"
    else:
        classes, (mean, std) = data.imagenet_class_names(), (data.IMAGENET_MEAN, data.IMAGENET_STD)
        shape, imagenet = (3, 224), True
    model = resnet(args.depth, len(classes), shape[0], args.shortcut, args.plain)
    if args.weights:
        data.load_weights(model, state, args.weights)
    else:
        load_pretrained(model, args.depth)
    model.to(device).eval()
    return data.classify_images(args.classify, args.out, lambda x: model(x.to(device)), classes,
                                mean, std, shape, imagenet=imagenet)


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="ResNet (He et al. 2015): the CIFAR networks of §4.2 "
                                "and the ImageNet networks of Table 1 (torchvision-compatible).")
    p.add_argument("--depth", type=int, default=20,
                   help=f"CIFAR 6n+2 (the paper's {CIFAR_DEPTHS}) or ImageNet {IMAGENET_DEPTHS} "
                   "(default: 20)")
    p.add_argument("--plain", action=argparse.BooleanOptionalAction, default=False,
                   help="the plain baseline: the same layers without shortcuts (Fig. 3 middle, "
                   "Fig. 6 left, Table 2; plain-20 ... plain-56, plain-18/34)")
    p.add_argument("--shortcut", type=str.upper, choices=SHORTCUTS, default=None,
                   help="A: zero-padding identity shortcuts, parameter-free; B: 1x1 projections "
                   "where the shape changes, identity elsewhere; C: projections everywhere "
                   "(§3.3, Table 3; default: A for the CIFAR depths as §4.2, B for the ImageNet "
                   "ones as Table 3 and torchvision)")
    data.add_data_args(p, None, "cifar10 | cifar100 | cifar10-jpg | imagenet | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32); cifar10 for a CIFAR depth, "
                       "imagenet for an ImageNet one")
    data.add_holdout_arg(p, why="§4.2 chose its schedule on a 45k/5k split")
    data.add_limit_arg(p)
    p.add_argument("--img-size", type=int, default=None,
                   help="ImageNet crop size (default: 224); shapes: the size the images are "
                   "drawn at (default: 32, 16 with --quick); the other sets keep their own size")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="10-crop test (default: on for ImageNet, as Table 3; off otherwise)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training length in passes; the lr milestones keep their fractions "
                   "(default: the paper's 64k iterations on small sets, 90 epochs on ImageNet; "
                   "--stop-after cuts a run short on this schedule)")
    p.add_argument("--warmup-iters", type=int, default=None,
                   help="iterations at lr/10 before the schedule (default: 400 for ResNet-110 "
                   "and -1202 on small sets, §4.2; else 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default: 128 on small sets, 256 on ImageNet)")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="(default: 1e-4)")
    data.add_classify_arg(p)
    data.add_runtime_args(p, data.quick_help(QUICK), workers=data.MACHINE,
                          pretrained_help="start from torchvision's ImageNet weights (ImageNet "
                          "depths only)")
    return p


def check_network(args):
    """The flags that build the network, checked together before anything is read (each bad pair
    a one-line error naming both flags); fills in the family's default shortcut option."""
    if args.plain and args.shortcut:
        raise data.DataError(f"--plain and --shortcut {args.shortcut} cannot combine: a plain "
                             f"network has no shortcuts (Fig. 3 middle); drop one of them")
    if args.plain and args.pretrained:
        raise data.DataError("--plain and --pretrained cannot combine: torchvision's weights are "
                             "the residual networks' (no plain network's are published); drop "
                             "one of them")
    if args.pretrained and args.shortcut not in (None, "B"):
        raise data.DataError(f"--shortcut {args.shortcut} and --pretrained cannot combine: "
                             f"torchvision's weights are of option B's network (projections "
                             f"where the shape changes); drop --shortcut or use --shortcut B")
    if not args.plain:
        args.shortcut = args.shortcut or default_shortcut(args.depth)


def check_arch(state, path, arch):
    """A checkpoint of another network (depth, plain or residual, shortcut option) is refused by
    the name it was saved under (`arch_name`); a bare state_dict names none."""
    if isinstance(state, dict) and isinstance(state.get("arch"), str) and state["arch"] != arch:
        raise data.DataError(f"checkpoint {path} is of '{state['arch']}', not '{arch}'; pass the "
                             f"matching --depth, --plain or --shortcut, or another checkpoint")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "resnet.py", ("depth", "plain", "shortcut", "img_size"),
                                  may_differ=("ten_crop",))
    data.check_positive(args, "batch_size", "epochs", "lr", "img_size")
    t0 = time.time()
    if not (is_cifar_depth(args.depth) or args.depth in IMAGENET_DEPTHS):
        raise data.DataError(f"unknown ResNet depth {args.depth}; use 6n+2 (CIFAR, e.g. "
                             f"{CIFAR_DEPTHS}) or one of {IMAGENET_DEPTHS} (ImageNet)")
    check_network(args)
    arch = arch_name(args)
    if args.weights and not args.resume:  # --weights of another network: refused before reading
        check_arch(state, args.weights, arch)
    cifar_net = is_cifar_depth(args.depth)
    args.data = args.data or ("cifar10" if cifar_net else "imagenet")
    data.check_task(args.data, "classification")
    imagenet = args.data == "imagenet"
    recipe = "imagenet" if imagenet else "cifar"  # the recipe follows the data, the net the depth
    data.apply_quick(args, QUICK)
    args.batch_size = args.batch_size or (256 if imagenet else 128)
    if args.img_size is not None and args.data not in ("imagenet", "shapes"):
        raise data.DataError(f"--img-size applies to imagenet and shapes; {args.data} is used at "
                             f"its own size")
    if args.img_size is None:
        args.img_size = 224 if imagenet else (16 if args.quick else 32) if args.data == "shapes" \
            else None
    args.ten_crop = imagenet if args.ten_crop is None else args.ten_crop
    if args.ten_crop and not imagenet:
        raise data.DataError("--ten-crop is the ImageNet test (crops of 224 from 256 images); "
                             "the small sets are tested on the single original view (§4.2)")
    if args.warmup_iters is None:
        args.warmup_iters = CIFAR_RECIPE["warmup"] if recipe == "cifar" and args.depth >= 110 \
            else 0
    device, rank, world, is_main = data.setup(args, "resnet.py")  # --dry-run: 1 epoch
    if args.classify:  # the user's images through the network: no data set read
        return classify(args, state, device)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. Small sets: the whole set on the device, 4-pixel padding + random crop + flip there
    # (§4.2), normalised with the training set's statistics. ImageNet: the §3.4 transforms.
    split = data.train_split(args)  # the whole training set unless --holdout
    if imagenet:
        train_loader, val_loader, test_loader, info = imagenet_loaders(args, device)
    else:
        train_loader, val_loader, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir,
            not args.no_download, args.quick, args.seed, augment=True, eval_batch_size=500,
            train_split=split, size=args.img_size, limit=args.limit, test_only=args.eval_only,
            stats=(state or {}).get("normalisation"),  # --eval-only: the test split alone
            gpu_decode=args.gpu_decode)
    train_loader, val_loader, test_loader = data.dry_run_batches(args, train_loader, val_loader,
                                                                 test_loader)
    classes, (n_train, n_val, n_test) = info["classes"], info["sizes"]

    model = resnet(args.depth, len(classes), info["in_channels"], args.shortcut,
                   args.plain).to(device)
    if args.pretrained:
        load_pretrained(model, args.depth)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # --eval-only has no training loader and no schedule to follow: 1 step an epoch, harmless
    steps_per_epoch = len(train_loader) if train_loader is not None else 1
    total_iters, milestones = schedule(recipe, steps_per_epoch, args.epochs)
    epochs = math.ceil(total_iters / steps_per_epoch)  # the last one may be cut short
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, milestones, args.warmup_iters))  # per iteration
    scaler = data.grad_scaler(device, args.amp)
    departures = DEPARTURES_IMAGENET if imagenet else DEPARTURES_CIFAR
    training = not args.eval_only  # --eval-only follows no schedule: none is reported
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "arch": arch, "parameters": count_parameters(model), "recipe": recipe,
              "iterations": total_iters if training else None,
              "milestones": milestones if training else None,
              "steps_per_epoch": steps_per_epoch if training else None,
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": departures}
    if is_main:
        print(f"resnet.py: {title(args)} on {args.data} ({n_train} train / {n_val} val / "
              f"{n_test} test), {config['parameters']:,} parameters, device {device}, "
              f"{args.world} process(es)" + (
                  f"; {total_iters} iterations ({epochs} epochs of {steps_per_epoch}), lr "
                  f"{args.lr} / 10 at {milestones}" +
                  (f", warm-up {args.warmup_iters}" if args.warmup_iters else "")
                  if training else ""))
        for d in departures:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        check_arch(state, ckpt_path, arch)  # an older run's, whose settings name no shortcut
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")

    net = data.wrap(model, args)

    if not args.eval_only:
        progress = metrics.Progress(steps_per_epoch, epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        progress.remaining = total_iters - scheduler.last_epoch  # for the ETA of a cut epoch
        for epoch in range(start_epoch, epochs):
            data.set_epoch(train_loader, epoch)
            steps = min(steps_per_epoch, total_iters - scheduler.last_epoch)
            loss, train_error = train_one_epoch(net, train_loader, optimizer, scheduler, scaler,
                                                args, device, epoch, progress, steps)
            row = {"epoch": epoch + 1, "iteration": scheduler.last_epoch, "train_loss": loss,
                   "train_error": train_error, "lr": progress.lr}
            if val_loader is not None:
                row["val_error"] = evaluate(model, val_loader, args, device,
                                           len(classes))["test_error"]
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                t = evaluate(model, test_loader, args, device, len(classes), ten_crop=args.ten_crop)
                row["test_error"] = t["test_error"]
                if "top5_error" in t:  # >= 100 classes
                    row["test_top5_error"] = t["top5_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{epochs} iteration {row['iteration']} train_loss "
                      f"{loss:.4f}" + "".join(f" {k} {100 * row[k]:.2f}%" for k in (
                          "train_error", "val_error", "test_error", "test_top5_error")
                          if k in row))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, **data.test_settings(info))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device, len(classes), ten_crop=args.ten_crop)
    keys = ["test_error", "test_accuracy", "balanced_error", "single_crop_error",
            "ten_crop_error", "top5_error", "single_crop_top5_error"]
    if is_main:
        print(f"test_error {100 * test['test_error']:.2f}% ({test['errors']}/{test['samples']}"
              f"{', ten-crop' if args.ten_crop else ''}) balanced_error "
              f"{100 * test['balanced_error']:.2f}%" +
              (f" single_crop_error {100 * test['single_crop_error']:.2f}%"
               if args.ten_crop else "") +
              (f" top5_error {100 * test['top5_error']:.2f}%" if "top5_error" in test else ""))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "resnet.py", args.data,
        {k: test[k] for k in keys if k in test},
        paper=paper_figures(args.depth, args.shortcut, args.plain), config=config,
        device=str(device), seconds=time.time() - t0, history=history,
        **metrics.class_records(test, classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "resnet.py")
