"""ResNeXt: S. Xie, R. Girshick, P. Dollár, Z. Tu, K. He, "Aggregated residual transformations
for deep neural networks", CVPR 2017, arXiv:1611.05431.

    python resnext.py                                          # ResNeXt-29 8x64d on CIFAR-10 (§5.3)
    python resnext.py --cardinality 16 --data cifar100         # ResNeXt-29 16x64d on CIFAR-100
    python resnext.py --depth 50 --data imagenet               # ResNeXt-50 32x4d (§5.1)
    python resnext.py --depth 101 --bottleneck-width 8 --eval-only --pretrained  # 101 32x8d
    python resnext.py --data shapes --quick                    # offline, seconds on a CPU
    torchrun --nproc_per_node=2 resnext.py                     # data-parallel, same global batch

Paper: CIFAR-10 / CIFAR-100 test error (Table 7) ResNeXt-29 8x64d 3.65 / 17.77 %, 16x64d
3.58 / 17.31 % (34.4M and 68.1M parameters). ImageNet val, 224 single crop (Table 3): ResNeXt-50
32x4d 22.2 % top-1 (25.0M parameters, Table 1), ResNeXt-101 32x4d 21.2 %; (Table 4) ResNeXt-101
64x4d 20.4 / 5.3 % top-1 / top-5.
Ours: see the README's results table (the command and hardware of every figure are there).

The block (Fig. 3): the ResNet bottleneck whose 3x3 convolution is split into C groups ("paths")
of d channels each: 1x1 to C*d, grouped 3x3 (C groups), 1x1 to the output. Fig. 3(a) (C separate
1x1-3x3-1x1 paths, summed), (b) and (c) are the same function (§3.3); this file uses (c), the
grouped convolution, and the tests check the equivalence with (a) on shared weights.
ImageNet depths 50/101/152 (Table 1): the ResNet-50/101/152 layout with d = bottleneck width
(--bottleneck-width, the first stage's d) * (stage width / 64), torchvision's module names
(resnext50_32x4d, resnext101_32x8d, resnext101_64x4d load strictly). CIFAR depth 9n+2 (29 = the
paper's): a 3x3 stem with 64 maps, 3 stages of n blocks with output widths 256, 512, 1024 on 32,
16, 8 maps (§5.3, as the authors' code: stage widths 64, 128, 256 times 4), projection shortcuts
where the shape changes, global average pooling, fc.

Recipe. CIFAR (§5.3): SGD momentum 0.9, batch 128, weight decay 5e-4, lr 0.1 divided by 10 at
epochs 150 and 225 of 300; 4-pixel padding, random crop, flip (as ResNet). ImageNet (§4): SGD
momentum 0.9, batch 256, weight decay 1e-4, lr 0.1 divided by 10 three times (fb.resnet.torch's
schedule, every 30 epochs: here at 30, 60, 90 of 100), fb.resnet.torch's augmentation (scale
and aspect crops, colour jitter 0.4, PCA lighting 0.1, flips), 224 single-crop test of the
256-resized image. Down-sampling blocks stride their 3x3 (§4).
"""
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

# Table 7: CIFAR test error of ResNeXt-29 by cardinality (width 64), CIFAR-10 and CIFAR-100.
CIFAR_ERROR = {(8, 64): {"cifar10": 0.0365, "cifar100": 0.1777},
               (16, 64): {"cifar10": 0.0358, "cifar100": 0.1731}}
CIFAR_PARAMS = {(8, 64): 34.4e6, (16, 64): 68.1e6}
# ImageNet val, 224 single crop: Table 3 (50 and 101 32x4d top-1), Table 4 (101 64x4d).
IMAGENET_ERROR = {(50, 32, 4): (0.222, None), (101, 32, 4): (0.212, None),
                  (101, 64, 4): (0.204, 0.053)}
IMAGENET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# --quick on the small sets: the first 2,000 / 500 images, a thin net of the family (ResNeXt-20
# 2x4d, base 16) and a budget of steps (batch 64: 31 steps an epoch). On Fashion-MNIST ResNeXt-11
# ended at 27.6 % (batch 64) and 28.2 % (batch 32) test error, ResNeXt-20 at 25.4 %.
QUICK = {"depth": 20, "cardinality": 2, "bottleneck_width": 4, "base": 16, "epochs": 15,
         "batch_size": 64}
CIFAR_RECIPE = dict(epochs=300, milestones=(150, 225), batch_size=128, lr=0.1, weight_decay=5e-4)
IMAGENET_RECIPE = dict(epochs=100, milestones=(30, 60, 90), batch_size=256, lr=0.1,
                       weight_decay=1e-4)
TORCHVISION = {(50, 32, 4): "resnext50_32x4d", (101, 32, 8): "resnext101_32x8d",
               (101, 64, 4): "resnext101_64x4d"}


def paper_figures(depth, cardinality, width, data_name):
    if depth in IMAGENET_LAYERS:
        top1, top5 = IMAGENET_ERROR.get((depth, cardinality, width), (None, None))
        return {"reference": "Xie et al. 2016, arXiv:1611.05431, Tables 3-4 (224 single crop)",
                "data": "imagenet", "test_error": top1, "top5_error": top5}
    figures = CIFAR_ERROR.get((cardinality, width), {}) if depth == 29 else {}
    paper_data = "cifar100" if data_name == "cifar100" else "cifar10"  # the figure's own set
    return {"reference": "Xie et al. 2016, arXiv:1611.05431, Table 7", "data": paper_data,
            "test_error": figures.get(paper_data),
            "parameters": CIFAR_PARAMS.get((cardinality, width)) if depth == 29 else None}


def is_cifar_depth(depth):
    """The CIFAR family: 9n+2 layers (3 stages of n three-layer blocks, the stem and the fc)."""
    return depth not in IMAGENET_LAYERS and depth >= 11 and (depth - 2) % 9 == 0


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "inputs normalised with the training set's per-channel mean and deviation",
    "plain SGD momentum (the authors' fb.resnet.torch code uses Nesterov momentum; the paper "
    "does not mention it)",
    "ImageNet: lr / 10 at epochs 30, 60, 90 of 100 is our reading of 'divided by 10 three times "
    "using the schedule in [11]'; the colour jitter on uint8 pixels (fb.resnet.torch's on "
    "floats); single 224 centre-crop test (the paper's protocol for Tables 3-4)",
    "under torchrun BatchNorm statistics are per process (as on the paper's 8 GPUs)",
]


# ---------------------------------------------------------------------------------------------
# Model

class Block(nn.Module):
    """Fig. 3(c): 1x1 conv to C*d, 3x3 conv in C groups, 1x1 conv to `out`, each followed by BN;
    ReLU after the first two and after the addition. A down-sampling block strides its 3x3 (§4:
    "stride-2 convolutions in the 3x3 layer of the first block in each stage"; torchvision's
    layout too, whose weights load here)."""

    def __init__(self, inplanes, group_width, out, cardinality, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1,
                               groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample  # a projection (1x1 conv + BN) where the shape changes

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNeXt(nn.Module):
    """ImageNet (stem 7x7/2 + max-pool, 4 stages of widths 64..512 x 4) or CIFAR (stem 3x3 with
    64 maps, 3 stages of widths 64..256 x 4). d = floor(width * stage / 64) channels per group."""

    def __init__(self, layers, cardinality, width, num_classes, in_channels=3, cifar=False,
                 base=64):
        super().__init__()
        self.cardinality, self.width, self.inplanes = cardinality, width, base
        if cifar:
            self.conv1 = nn.Conv2d(in_channels, base, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, blocks in enumerate(layers):  # stride 2 at the first block of every later stage
            stages.append(self._make_layer(base * 2 ** i, blocks, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        if len(stages) == 4:
            self.layer4 = stages[3]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():  # He init for convolutions, BN scale 1 and shift 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride):
        group_width = (planes * self.width // 64) * self.cardinality  # C * d
        out = planes * 4
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Block(self.inplanes, group_width, out, self.cardinality, stride, downsample)]
        self.inplanes = out
        layers += [Block(out, group_width, out, self.cardinality) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if hasattr(self, "layer4"):
            x = self.layer4(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnext(depth=50, cardinality=32, width=4, num_classes=1000, in_channels=3, base=64):
    """The model factory: ImageNet depths 50/101/152 (torchvision-compatible), CIFAR depths 9n+2
    (29: ResNeXt-29 of §5.3; use cardinality 8 or 16 and width 64 for the paper's). `base`, the
    stem's channels and the first stage's width (the paper's 64), thins the net for CPU tests."""
    if depth in IMAGENET_LAYERS:
        return ResNeXt(IMAGENET_LAYERS[depth], cardinality, width, num_classes, in_channels,
                       base=base)
    if is_cifar_depth(depth):
        n = (depth - 2) // 9
        return ResNeXt((n, n, n), cardinality, width, num_classes, in_channels, cifar=True,
                       base=base)
    raise ValueError(f"unknown ResNeXt depth {depth}; use 9n+2 (CIFAR, the paper's 29) or one of "
                     f"{tuple(IMAGENET_LAYERS)} (ImageNet)")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def torchvision_name(depth, cardinality, width):
    """The torchvision model with these weights, or a one-line error naming those that exist."""
    name = TORCHVISION.get((depth, cardinality, width))
    if name is None:
        raise data.DataError(f"--pretrained: torchvision has no ResNeXt-{depth} {cardinality}x"
                             f"{width}d weights; use one of " +
                             ", ".join(f"--depth {d} --cardinality {c} --bottleneck-width {w}"
                                       for d, c, w in TORCHVISION))
    return name


def load_pretrained(model, depth, cardinality, width):
    """torchvision's ImageNet weights where they exist (50 32x4d, 101 32x8d, 101 64x4d); with
    another number of classes, every layer but the fc (fine-tuning)."""
    name = torchvision_name(depth, cardinality, width)
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    state = data.torchvision_weights(weights)
    if model.fc.out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("fc.")})
    data.load_weights(model, state, f"torchvision's {name} weights")


# ---------------------------------------------------------------------------------------------
# Recipe: step schedule in epochs

def lr_factor(epoch, milestones):
    return 0.1 ** sum(epoch >= m for m in milestones)


def schedule(recipe, epochs=None):
    """(epochs, milestones): the paper's, or another length with the milestones at the same
    fractions (CIFAR 1/2, 3/4; ImageNet 3/10, 6/10, 9/10)."""
    r = CIFAR_RECIPE if recipe == "cifar" else IMAGENET_RECIPE
    total = epochs or r["epochs"]
    return total, [round(m * total / r["epochs"]) for m in r["milestones"]]


# ---------------------------------------------------------------------------------------------
# Data glue: ImageNet's transforms (the in-memory sets come from data.classification_loaders)

def imagenet_transforms():
    """§4's training pipeline, fb.resnet.torch's (datasets/imagenet.lua, which the paper's code
    uses): RandomSizedCrop(224), ColorJitter(brightness, contrast, saturation 0.4, in random
    order), Lighting(0.1: AlexNet's PCA colour), flips; the test view: the 224 centre crop of
    the 256-resized image. The jitter runs on uint8 (ColorJitterU8, torchvision's formulas) before
    the float stage, which --gpu-decode then runs once per batch."""
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224, antialias=True),
                           v2.RandomHorizontalFlip(),
                           data.ColorJitterU8(brightness=0.4, contrast=0.4, saturation=0.4),
                           v2.ToDtype(torch.float32, scale=True), data.PCAColour(alphastd=0.1),
                           data.Normalize(mean, std)])
    test_tf = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                          v2.ToDtype(torch.float32, scale=True), data.Normalize(mean, std)])
    return train_tf, test_tf


def imagenet_loaders(args, device):
    """ImageNet's loaders with `imagenet_transforms`; --eval-only reads the val folder alone
    (train is None)."""
    train_tf, test_tf = imagenet_transforms()
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
            "in_channels": 3, "image_size": 224,
            "sizes": (len(train_set), 0, len(test_set))}
    return train, None, test, info


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model, loader, optimizer, scaler, args, device, epoch, progress):
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        progress.step(len(y) * args.world, loss, optimizer.param_groups[0]["lr"], epoch, n=len(y))
    return progress.epoch_loss()  # the losses read here, over every rank's samples


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes):
    """Single-view error (the 224 centre crop on ImageNet, the 32x32 image on CIFAR), accuracy,
    balanced error, and top-5 error when there are >= 100 classes, of the (unwrapped) model on
    the whole set: under torchrun each rank evaluates its share, gathered here."""
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            probs.append(model(x).float().softmax(1).cpu())
        targets.append(y.cpu())
    out, y = data.gather_shards(torch.cat(probs), torch.cat(targets))
    return metrics.classification_report(out, y, num_classes)


def classify(args, state, device):
    """--classify PATH (an image or a folder): the likeliest classes of each image through the
    checkpoint's network (`state`: its classes, normalisation and input) or torchvision's
    ImageNet weights (--pretrained: short side 256, centre 224 crop); the view of `evaluate`."""
    if args.weights:
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
        imagenet = args.data == "imagenet"
    else:
        classes, (mean, std) = data.imagenet_class_names(), (data.IMAGENET_MEAN, data.IMAGENET_STD)
        shape, imagenet = (3, 224), True
    model = resnext(args.depth, args.cardinality, args.bottleneck_width, len(classes), shape[0],
                    args.base)
    if args.weights:
        data.load_weights(model, state, args.weights)
    else:
        if args.base != 64:
            raise data.DataError("--pretrained needs --base 64 (the published weights)")
        load_pretrained(model, args.depth, args.cardinality, args.bottleneck_width)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory).eval()
    return data.classify_images(args.classify, args.out,
                                lambda x: model(x.to(device, memory_format=memory)), classes,
                                mean, std, shape, imagenet=imagenet)


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="ResNeXt (Xie et al. 2016): ResNeXt-29 on CIFAR "
                                "(§5.3) and ResNeXt-50/101/152 on ImageNet (torchvision-compatible).")
    p.add_argument("--depth", type=int, default=None,
                   help="CIFAR 9n+2 (the paper's 29) or ImageNet 50, 101, 152 (default: 29)")
    p.add_argument("--cardinality", type=int, default=None,
                   help="C, the number of paths (default: 8 for CIFAR, 32 for ImageNet)")
    p.add_argument("--bottleneck-width", type=int, default=None,
                   help="d, the paper's bottleneck width: the channels per path in the first "
                   "stage, doubled per stage (default: 64 for CIFAR, 4 for ImageNet)")
    p.add_argument("--base", type=int, default=None,
                   help="stem channels and first-stage width, doubled per stage (default: the "
                   "paper's 64)")
    data.add_data_args(p, None, "cifar10 | cifar100 | cifar10-jpg | imagenet | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32); cifar10 for a CIFAR depth "
                       "(the default 29), imagenet for an ImageNet one")
    data.add_holdout_arg(p)
    data.add_limit_arg(p)
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training set; the lr milestones keep their fractions "
                   "(default: 300 on small sets, 100 on ImageNet)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default: 128 on small sets, 256 on ImageNet)")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="(default: 5e-4 on small sets, 1e-4 on ImageNet)")
    # Channels-last is this script's default (set below; the runtime's --channels-last is then a
    # no-op): PyTorch's channels-first CPU kernels for grouped convolutions are far slower.
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="channels-first memory format (default: channels-last here, since "
                   "PyTorch's channels-first CPU kernels for grouped convolutions are far "
                   "slower: bench/bench_classifiers.py)")
    data.add_classify_arg(p)
    data.add_runtime_args(p, data.quick_help(QUICK) + "; on ImageNet the subset and 2 epochs",
                          workers=data.MACHINE, pretrained_help="start from torchvision's ImageNet "
                          "weights (50 32x4d, 101 32x8d, 101 64x4d)")
    p.set_defaults(channels_last=True)
    return p


def resolve_defaults(args):
    small = args.data not in (None, "imagenet")
    if small and (args.depth is None or is_cifar_depth(args.depth)):
        data.apply_quick(args, QUICK)
    if args.depth is None:
        args.depth = 29
    if not (is_cifar_depth(args.depth) or args.depth in IMAGENET_LAYERS):
        raise data.DataError(f"unknown ResNeXt depth {args.depth}; use 9n+2 (CIFAR, the paper's "
                             f"29) or one of {tuple(IMAGENET_LAYERS)} (ImageNet)")
    cifar_net = is_cifar_depth(args.depth)
    args.data = args.data or ("cifar10" if cifar_net else "imagenet")
    imagenet = args.data == "imagenet"
    args.base = args.base or 64
    args.cardinality = args.cardinality or (8 if cifar_net else 32)
    args.bottleneck_width = args.bottleneck_width or (64 if cifar_net else 4)
    args.batch_size = args.batch_size or (256 if imagenet else 128)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else \
        (1e-4 if imagenet else 5e-4)
    if args.epochs is None and args.quick:
        args.epochs = 2
    args.arch = f"resnext{args.depth}_{args.cardinality}x{args.bottleneck_width}d" + \
        ("" if args.base == 64 else f"_base{args.base}")
    if args.pretrained:  # before any data or model is built
        torchvision_name(args.depth, args.cardinality, args.bottleneck_width)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "resnext.py", ("depth", "cardinality", "bottleneck_width",
                                                       "base"))
    data.check_positive(args, "batch_size", "epochs", "lr", "bottleneck_width", "cardinality",
                        "base")
    t0 = time.time()
    resolve_defaults(args)
    weights = data.load_checkpoint(args.weights, args.arch) if args.weights else None  # checked first
    data.check_task(args.data, "classification")
    imagenet = args.data == "imagenet"
    recipe = "imagenet" if imagenet else "cifar"  # the recipe follows the data, the net the depth
    device, rank, world, is_main = data.setup(args, "resnext.py")  # --dry-run: 1 epoch
    if args.classify:  # the user's images through the network: no data set read
        return classify(args, weights, device)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. Small sets: the whole set on the device with ResNet's padding, crop and flip there;
    # ImageNet: the §4 transforms through a DataLoader.
    split = data.train_split(args)  # the whole training set unless --holdout
    if imagenet:
        train_loader, val_loader, test_loader, info = imagenet_loaders(args, device)
    else:
        train_loader, val_loader, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir,
            not args.no_download, args.quick, args.seed, augment=True, eval_batch_size=500,
            train_split=split, limit=args.limit, test_only=args.eval_only,
            stats=(state or {}).get("normalisation"),  # --eval-only: the test split alone
            gpu_decode=args.gpu_decode)
    train_loader, val_loader, test_loader = data.dry_run_batches(args, train_loader, val_loader,
                                                                 test_loader)
    classes, (n_train, n_val, n_test) = info["classes"], info["sizes"]

    model = resnext(args.depth, args.cardinality, args.bottleneck_width, len(classes),
                    info["in_channels"], args.base).to(device)
    if args.pretrained:
        if args.base != 64:
            raise data.DataError("--pretrained needs --base 64 (the published weights)")
        load_pretrained(model, args.depth, args.cardinality, args.bottleneck_width)
    if args.weights:
        data.load_weights(model, weights, args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    epochs, milestones = schedule(recipe, args.epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, milestones))
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "parameters": count_parameters(model), "recipe": recipe,
              "epochs": epochs, "milestones": milestones,
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": DEPARTURES}
    if is_main:
        print(f"resnext.py: ResNeXt-{args.depth} ({args.cardinality}x{args.bottleneck_width}d) on "
              f"{args.data} "
              f"({n_train} train / {n_val} val / {n_test} test), {config['parameters']:,} "
              f"parameters, device {device}, {args.world} process(es); {epochs} epochs, lr "
              f"{args.lr} / 10 at {milestones}, weight decay {args.weight_decay}")
        for d in DEPARTURES:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, args.arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")

    net = data.wrap(model, args)

    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, epochs):
            data.set_epoch(train_loader, epoch)
            loss = train_one_epoch(net, train_loader, optimizer, scaler, args, device, epoch,
                                   progress)
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"]}
            scheduler.step()
            if val_loader is not None:
                row["val_error"] = evaluate(model, val_loader, args, device,
                                           len(classes))["test_error"]
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                t = evaluate(model, test_loader, args, device, len(classes))
                row["test_error"] = t["test_error"]
                if "top5_error" in t:  # >= 100 classes
                    row["test_top5_error"] = t["top5_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{epochs} train_loss {loss:.4f}" + "".join(
                    f" {k} {100 * row[k]:.2f}%" for k in ("val_error", "test_error",
                                                         "test_top5_error") if k in row))
            data.save_training_state(ckpt_path, args.arch, model, optimizer, scheduler, scaler,
                                     epoch, vars(args), history, **data.test_settings(info))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device, len(classes))
    if is_main:
        print(f"test_error {100 * test['test_error']:.2f}% ({test['errors']}/{test['samples']}) "
              f"balanced_error {100 * test['balanced_error']:.2f}%" +
              (f" top5_error {100 * test['top5_error']:.2f}%" if "top5_error" in test else ""))
    keys = ["test_error", "test_accuracy", "balanced_error", "top5_error"]
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "resnext.py", args.data,
        {k: test[k] for k in keys if k in test},
        paper=paper_figures(args.depth, args.cardinality, args.bottleneck_width, args.data),
        config=config, device=str(device), seconds=time.time() - t0, history=history,
        **metrics.class_records(test, classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "resnext.py")
