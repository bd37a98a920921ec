"""AlexNet: A. Krizhevsky, I. Sutskever, G. E. Hinton, "ImageNet classification with deep
convolutional neural networks", NIPS 2012 (no arXiv version; proceedings paper 4824).

    python alexnet.py --data imagenet                        # torchvision's layout, paper recipe
    python alexnet.py --data imagenet --variant paper        # 96-256-384-384-256, LRN, two towers
    python alexnet.py --data imagenet --variant paper --no-lrn   # §3.3's ablation (see below)
    python alexnet.py --data shapes --quick                  # offline, under a minute on a CPU
    python alexnet.py --classify dog.jpg --pretrained        # the lecture's top-15 printout
    torchrun --nproc_per_node=2 alexnet.py --data imagenet   # data-parallel, same global batch

Paper: ILSVRC-2012 validation top-1 / top-5 error 40.7 % / 18.2 % (one CNN, Table 2), ILSVRC-2010
test 37.5 % / 17.0 % (Table 1), both with the ten-crop test of §4.1.
Ours: see the README's results table (the command and hardware of every figure are there).

Two variants. "torchvision" (default) is the lecture's and torchvision's network: 64-192-384-256-256
channels, no LRN, AdaptiveAvgPool2d(6), dropout before fc6/fc7; its state_dict is
torchvision.models.alexnet's. "paper" is §3's: 96-256-384-384-256 channels, LRN after conv1/conv2
(§3.3), overlapping 3x3/2 max-pooling (§3.4), conv2/conv4/conv5 split in two towers (groups=2,
§3.5, Fig. 2), 4096-4096 FC with dropout 0.5 (§4.2), N(0, 0.01) weights and biases of 1 in conv2,
conv4, conv5, fc6, fc7 (§5): 60,965,224 parameters ("60 million", §1).

The paper variant's ablations, each a switch named after its section (on by default; none has
parameters, so the count stays 60,965,224; the checkpoint's name carries each one that is off):
--no-lrn (§3.3: "Response normalization reduces our top-1 and top-5 error rates by 1.4% and
1.2%, respectively"), --no-overlap-pool (§3.4: 2x2 pools at stride 2 instead of 3x3; overlapping
pooling "reduces the top-1 and top-5 error rates by 0.4% and 0.3%, respectively, as compared
with the non-overlapping scheme s = 2, z = 2, which produces output of equivalent dimensions"),
--no-dropout (§4.2: "Without dropout, our network exhibits substantial overfitting").

224 vs 227: §3.5 says 224x224x3 inputs and 55x55 conv1 maps, but (224 - 11) / 4 + 1 = 54.25;
the arithmetic needs 227 (the size Caffe's reference uses). We keep the 224 crops of the paper and
pad conv1 by 2 pixels as torchvision does: (224 + 4 - 11) // 4 + 1 = 55, then 27, 13, 6 as in Fig. 2.

Recipe (§5): SGD, momentum 0.9, weight decay 5e-4, batch 128, lr 0.01 divided by 10 three times
over ~90 epochs. Augmentation (§4.1): random 224 crops of the 256x256 image, mirror images, PCA
colour noise (alpha std 0.1). Test (§4.1): the softmax averaged over the 4 corner and centre 224
crops and their mirror images (--ten-crop, default for ImageNet); the single centre crop is
reported as well. Departures are listed in DEPARTURES and printed at start.
"""
import argparse
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Krizhevsky et al. 2012, NIPS, Tables 1-2", "data": "imagenet",
         "test_error": 0.407, "top5_error": 0.182,  # ILSVRC-2012 val, one CNN, ten-crop
         "ilsvrc2010_test_error": 0.375, "ilsvrc2010_top5_error": 0.170,
         "parameters": 60965224,
         # what each ablation cost the paper, top-1 / top-5 error (§3.3, §3.4; §4.2 gives no
         # figure: "substantial overfitting")
         "ablation_error_increase": {"lrn": [0.014, 0.012], "overlap_pool": [0.004, 0.003]}}
EPOCHS = 90               # "roughly 90 cycles through the training set" (§5)
LR_STEPS = (30, 60, 80)   # lr / 10 three times (§5), at fixed epochs: see DEPARTURES
BATCH_SIZE, LR = 128, 0.01  # §5: "batch size of 128 examples", lr 0.01
# --quick: the first 2,000 / 500 images, a quarter-width net on 64x64 upsampled inputs, and a
# budget of steps (not the paper's epochs): at batch 128 and lr 0.01, 2,000 images give 15 steps
# an epoch and the net has not left chance after 2 epochs; batch 32 gives 63.
QUICK = {"width": 0.25, "img_size": 64, "epochs": 30, "batch_size": 32}
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)  # §3.3: n = 5, alpha = 1e-4, beta = 0.75, k = 2
# The paper variant's ablation switches (flag -> section), all on by default
ABLATIONS = {"lrn": "§3.3", "overlap_pool": "§3.4", "dropout": "§4.2"}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "biases at 2x the lr without weight decay, as the released nets train them (cuda-convnet's "
    "epsB, Caffe's bvlc_alexnet); §5's update rule is written for every weight",
    "one device: the two GPUs of §3.2 become groups=2 in conv2/conv4/conv5 (paper variant); "
    "LRN runs over all 96/256 maps of both towers (as Caffe's reference), not within each tower",
    "conv1 padding 2 on 224 crops (the paper's 224 gives 54x54 maps without it; 227 is needed)",
    "LRN in PyTorch's convention b = a / (k + alpha/n sum a^2)^beta with alpha = 1e-4, n = 5 "
    "(cuda-convnet's and Caffe's); the paper's formula read literally is alpha = 5e-4 here",
    "AdaptiveAvgPool2d(6) before fc6 (identity at 224) so that small inputs run",
    "lr / 10 at fixed epochs 30, 60, 80 of 90 instead of 'when the validation error stopped "
    "improving': the ILSVRC val set is our test set, and fixed steps make resume exact",
    "torchvision variant: torchvision's layout and PyTorch's default init (64-192-384-256-256, "
    "no LRN, dropout before fc6/fc7); the paper's N(0, 0.01)/bias-1 init is the paper variant's",
    "small sets (shapes, CIFAR, MNIST): 32x32 images upsampled bilinearly on the device to "
    "--img-size (96; 64 with --quick), pad-4 random crops + flips before upsampling instead of "
    "224-of-256 crops, PCA colour from the training set's own RGB covariance",
]


# ---------------------------------------------------------------------------------------------
# Model

def _scale(c, width, even=False):
    """Channel count c times the --width multiplier; even for the two-tower layers (groups=2)."""
    return max(2, 2 * round(c * width / 2)) if even else max(1, round(c * width))


class AlexNet(nn.Module):
    """torchvision's AlexNet (the lecture's printout), same module names and indices, so that
    torchvision.models.alexnet's state_dict loads strictly. `width` scales channels and FC sizes."""

    def __init__(self, num_classes=1000, in_channels=3, width=1.0, dropout=0.5):
        super().__init__()
        c = [_scale(n, width) for n in (64, 192, 384, 256, 256)]
        h = _scale(4096, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c[0], c[1], kernel_size=5, padding=2),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2))
        # 6x6 on 224 inputs (identity there); on small inputs it replicates the last map.
        # data.AdaptiveAvgPool2d: torch's kernel, but under --deterministic on CUDA (whose
        # adaptive-pool backward has none) two small matmuls; torchvision's state_dict unchanged.
        self.avgpool = data.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(c[4] * 36, h), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(h, h), nn.ReLU(inplace=True),
            nn.Linear(h, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class AlexNetPaper(nn.Module):
    """The network of §3 and Fig. 2 on one device. The two GPUs become groups=2 convolutions:
    conv2, conv4, conv5 see only the maps of their own tower (channels [0, C/2) or [C/2, C)),
    conv3 and the FC layers see both towers, as in Fig. 2. The ablations: lrn=False drops norm1
    and norm2 (§3.3), overlap_pool=False makes pool1/2/5 2x2 at stride 2 (§3.4), dropout=0 drops
    drop6 and drop7 (§4.2); no other layer moves (the modules are named), no parameter changes."""

    def __init__(self, num_classes=1000, in_channels=3, width=1.0, dropout=0.5, lrn=True,
                 overlap_pool=True):
        super().__init__()
        c = [_scale(n, width, even=True) for n in (96, 256, 384, 384, 256)]
        h = _scale(4096, width)
        # data.LocalResponseNorm: nn.LocalResponseNorm's numbers, through avg_pool2d (torch's
        # avg_pool3d has no deterministic CUDA backward) and in float32 under --amp (fp16 squares
        # overflow above 255).
        norm = lambda i: [(f"norm{i}", data.LocalResponseNorm(**LRN))] if lrn else []  # noqa: E731
        # §3.4: z = 3, s = 2; the non-overlapping s = z = 2 gives the same map sizes on the odd
        # maps of a 224 input (55 -> 27, 27 -> 13, 13 -> 6: floor((n - z) / 2) + 1 = (n - 1) / 2
        # for both z when n is odd); on an even map z = 2 would give one row and column more.
        z = 3 if overlap_pool else 2
        pool = lambda i: (f"pool{i}", nn.MaxPool2d(z, stride=2))  # noqa: E731
        self.features = nn.Sequential(OrderedDict([
            # padding 2 turns the 224 crop into 55x55 maps (the 224 vs 227 note above)
            ("conv1", nn.Conv2d(in_channels, c[0], 11, stride=4, padding=2)),
            ("relu1", nn.ReLU(inplace=True)), *norm(1),                   # §3.3: LRN after ReLU
            pool(1),
            ("conv2", nn.Conv2d(c[0], c[1], 5, padding=2, groups=2)),     # §3.5: own tower only
            ("relu2", nn.ReLU(inplace=True)), *norm(2),
            pool(2),
            ("conv3", nn.Conv2d(c[1], c[2], 3, padding=1)),               # both towers
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(c[2], c[3], 3, padding=1, groups=2)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(c[3], c[4], 3, padding=1, groups=2)),
            ("relu5", nn.ReLU(inplace=True)),
            pool(5)]))
        self.avgpool = data.AdaptiveAvgPool2d((6, 6))  # identity at 224; lets small inputs run
        # §4.2: dropout on the outputs of the first two FC layers (Caffe's fc6-relu6-drop6 order).
        drop = lambda i: [(f"drop{i}", nn.Dropout(dropout))] if dropout else []  # noqa: E731
        self.classifier = nn.Sequential(OrderedDict([
            ("fc6", nn.Linear(c[4] * 36, h)), ("relu6", nn.ReLU(inplace=True)), *drop(6),
            ("fc7", nn.Linear(h, h)), ("relu7", nn.ReLU(inplace=True)), *drop(7),
            ("fc8", nn.Linear(h, num_classes))]))
        self.reset_parameters()

    def reset_parameters(self):
        """§5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
        ("accelerates the early stages of learning by providing the ReLUs with positive
        inputs"), 0 in the others."""
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
        for name, m in list(self.features.named_children()) + \
                list(self.classifier.named_children()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.constant_(m.bias, 1.0 if name in ones else 0.0)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def alexnet(num_classes=1000, variant="torchvision", in_channels=3, width=1.0, lrn=True,
            overlap_pool=True, dropout=True):
    """The model factory: "torchvision" (default, the lecture's) or "paper", the latter with its
    ablations off where asked (lrn §3.3, overlap_pool §3.4, dropout §4.2: False)."""
    if variant == "torchvision":
        if not (lrn and overlap_pool and dropout):
            raise ValueError("the ablation switches are the paper variant's; torchvision's "
                             "AlexNet is its fixed layout")
        return AlexNet(num_classes, in_channels, width)
    if variant == "paper":
        return AlexNetPaper(num_classes, in_channels, width, 0.5 if dropout else 0.0, lrn,
                            overlap_pool)
    raise ValueError(f"unknown AlexNet variant '{variant}'; use 'torchvision' or 'paper'")


def kaiming_init(model):
    """He et al.'s init (normal, fan_in, ReLU gain; zero biases): the small-set recipe. With
    PyTorch's default init (var 1/(3 fan_in)) or §5's N(0, 0.01), the signal of this net without
    normalisation layers shrinks several-fold per layer and 2,000 images stay at chance for tens of
    epochs; ImageNet's 1.2M images and 90 epochs get through that phase, a quick run does not."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)
    nn.init.normal_(layers[-1].weight, 0.0, 0.01)  # small logits: a first loss of ~ln(classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_pretrained(model, variant, width):
    """torchvision's ImageNet weights (IMAGENET1K_V1) into the torchvision variant; with another
    number of classes, every layer but the last (fine-tuning)."""
    if variant != "torchvision" or width != 1.0:
        raise data.DataError("--pretrained needs --variant torchvision --width 1 (the published "
                             "weights are of torchvision's layout)")
    state = data.torchvision_weights(torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
    if model.classifier[6].out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.6.")})
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Recipe, training, evaluation

def lr_factor(epoch, steps=LR_STEPS):
    """lr / 10 at each step epoch already reached (§5: three times over ~90 epochs)."""
    return 0.1 ** sum(epoch >= s for s in steps)


def to_size(x, size):
    """Bilinear upsampling of small (32x32) images to the size the stride-4 stem needs; larger
    images are centre-cropped to `size` (the single-crop test of a 256 image)."""
    if x.shape[-1] < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[-1] > size:
        return v2.functional.center_crop(x, [size, size])
    return x


def pca_colour_batch(x, colour):
    """§4.1 on already-normalised device batches: add eigvec @ (alpha * eigval), alpha ~
    N(0, 0.1) per image, divided by the normalisation's std (the shift is in [0, 1] units)."""
    eigval, eigvec, std = colour
    alpha = torch.randn(x.shape[0], 3, device=x.device) * 0.1
    return data.pca_colour(x * std, eigval, eigvec, alpha) / std


def train_one_epoch(model, loader, optimizer, scaler, args, device, epoch, progress, colour=None):
    """One pass; the step's loss stays on the device (Progress reads the losses once per
    --log-every line and at the epoch's end: no host sync per step)."""
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if colour is not None:  # in-memory sets: PCA colour on the device (ImageNet: transforms)
            x = pca_colour_batch(x, colour)
        x = to_size(x, args.img_size)
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
def predict(model, x, size, ten_crop=False, channels_last=False):
    """Softmax probabilities: of the single (centre or upsampled) `size` image, or averaged over
    the ten crops of §4.1 (data.ten_crop_predict) taken from the image at 256/224 of `size`."""
    if ten_crop:
        big = round(size * 256 / 224)
        x = x if x.shape[-1] == big else F.interpolate(x, size=(big, big), mode="bilinear",
                                                        align_corners=False)
        return data.ten_crop_predict(model, x, size).float()
    x = to_size(x, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x).float().softmax(1)


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes, ten_crop=False):
    """Single-crop error (and ten-crop error with ten_crop, then test_error is the ten-crop one),
    accuracy, balanced error, and top-5 error when there are >= 100 classes, of the (unwrapped)
    model on the whole set: under torchrun each rank evaluates its share and the outputs are
    gathered."""
    model.eval()
    # The outputs stay where they were computed until the loop ends: a .cpu() per batch would
    # be a host sync per batch (ImageNet's 50,000 x 1000 probabilities: 200 MB per view).
    single, tens, targets = [], [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with data.autocast(device, args.amp):
            single.append(predict(model, x, args.img_size, False, args.channels_last))
            if ten_crop:
                tens.append(predict(model, x, args.img_size, True))
        targets.append(y)
    single, targets = torch.cat(single).cpu(), torch.cat(targets).cpu()  # metrics: on the CPU
    if not ten_crop:
        p1, y = data.gather_shards(single, targets)
        return metrics.classification_report(p1, y, num_classes, views={"single_crop": p1})
    out, p1, y = data.gather_shards(torch.cat(tens).cpu(), single, targets)
    r = metrics.classification_report(out, y, num_classes, views={"single_crop": p1})
    return {**r, "ten_crop_error": r["test_error"]}


def classify(args, state, device):
    """--classify PATH (an image or a folder): the lecture's demo, the 15 likeliest classes of
    each image, through the checkpoint's network (its classes, normalisation and input) or
    torchvision's ImageNet weights (--pretrained: short side 256, centre 224 crop); the single
    centre-crop (or upsampled) view of `evaluate`."""
    if args.weights:
        data.load_checkpoint(args.weights, arch_name(args))  # a checkpoint of another network
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
        size, imagenet = args.img_size, args.data == "imagenet"
    else:
        classes, (mean, std) = data.imagenet_class_names(), (data.IMAGENET_MEAN, data.IMAGENET_STD)
        shape, size, imagenet = (3, 224), 224, True
    model = alexnet(len(classes), args.variant, shape[0], args.width, **ablations(args))
    if args.weights:
        data.load_weights(model, state, args.weights)
    else:
        load_pretrained(model, args.variant, args.width)
    model.to(device).eval()
    return data.classify_images(args.classify, args.out,
                                lambda x: model(to_size(x.to(device), size)), classes, mean, std,
                                shape, imagenet=imagenet, k=15)


# ---------------------------------------------------------------------------------------------
# Command line

def ablation_flag(name, on):
    """An ablation switch as typed: --lrn / --no-lrn."""
    return ("--" if on else "--no-") + name.replace("_", "-")


def arch_name(args):
    """The checkpoint's network name: the variant, each ablation that is off, the width:
    "alexnet-paper" (as before the switches), "alexnet-paper-no-lrn-no-dropout-w0.25"."""
    return f"alexnet-{args.variant}" + "".join(
        "-" + ablation_flag(k, False)[2:] for k in ABLATIONS if getattr(args, k, None) is False) \
        + ("" if args.width == 1.0 else f"-w{args.width:g}")


def ablations(args):
    """The switches as the model factory takes them (None, the torchvision variant's: on)."""
    return {k: getattr(args, k, None) is not False for k in ABLATIONS}


def check_ablations(args):
    """§3.3, §3.4, §4.2's switches belong to the paper variant: on there unless turned off; with
    --variant torchvision (a fixed layout: no LRN, 3x3/2 pools, dropout before fc6 and fc7) any
    of them is a one-line error naming both flags, before any data is read."""
    given = [ablation_flag(k, getattr(args, k)) for k in ABLATIONS
             if getattr(args, k) is not None]
    if args.variant != "paper":
        if given:
            raise data.DataError(f"{' '.join(given)} with --variant {args.variant}: the "
                                 f"ablations of §3.3, §3.4 and §4.2 are the paper variant's "
                                 f"(torchvision's AlexNet is a fixed layout without LRN); add "
                                 f"--variant paper or drop {' '.join(given)}")
        return
    for k in ABLATIONS:
        if getattr(args, k) is None:
            setattr(args, k, True)


def get_args_parser():
    p = data.ArgumentParser(description="AlexNet (Krizhevsky et al. 2012) on ImageNet, CIFAR, "
                                "MNIST, the synthetic shapes set or your own images; --classify "
                                "PATH for the lecture's top-15 demo.")
    data.add_data_args(p, "imagenet", "imagenet | cifar10 | cifar100 | cifar10-jpg | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32)")
    data.add_holdout_arg(p)
    data.add_limit_arg(p)
    p.add_argument("--variant", default="torchvision", choices=["torchvision", "paper"],
                   help="torchvision's/the lecture's layout or the paper's, whose ablations are "
                   "--no-lrn, --no-overlap-pool, --no-dropout (default: torchvision)")
    p.add_argument("--lrn", action=argparse.BooleanOptionalAction, default=None,
                   help="§3.3: local response normalisation after conv1 and conv2 (--variant "
                   "paper; default: on). --no-lrn is the paper's ablation: \"Response "
                   "normalization reduces our top-1 and top-5 error rates by 1.4%% and 1.2%%, "
                   "respectively\"")
    p.add_argument("--overlap-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="§3.4: overlapping max-pooling, 3x3 windows at stride 2 (--variant paper; "
                   "default: on). --no-overlap-pool: 2x2 at stride 2, the same map sizes (27, 13, "
                   "6 at 224); the paper: overlapping pooling \"reduces the top-1 and top-5 error "
                   "rates by 0.4%% and 0.3%%, respectively, as compared with the non-overlapping "
                   "scheme s = 2, z = 2\"")
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="§4.2: dropout 0.5 on the outputs of fc6 and fc7 (--variant paper; "
                   "default: on). --no-dropout: the paper: \"Without dropout, our network "
                   "exhibits substantial overfitting. Dropout roughly doubles the number of "
                   "iterations required to converge.\"")
    p.add_argument("--width", type=float, default=None,
                   help="channel and FC-size multiplier, a CPU-test convenience (default: 1 = the "
                   "paper)")
    p.add_argument("--img-size", type=int, default=None,
                   help="network input size: 224 for ImageNet; small sets are upsampled on the "
                   "device to this (default: 96)")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="§4.1 ten-crop test (default: on for ImageNet, off otherwise)")
    p.add_argument("--init", default=None, choices=["variant", "kaiming"],
                   help="'variant': torchvision's default init or the paper's §5 init; 'kaiming': "
                   "He init (default: variant for ImageNet, kaiming for the small sets)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set (default: the paper's {EPOCHS})")
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(LR_STEPS),
                   help="epochs at which the lr is divided by 10 (default: 30 60 80)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: {BATCH_SIZE}, §5)")
    p.add_argument("--lr", type=float, default=None, help=f"base learning rate (default: {LR}, §5)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4, §5)")
    data.add_classify_arg(p, k=15)
    data.add_runtime_args(p, data.quick_help(QUICK), workers=data.MACHINE,
                          pretrained_help="start from torchvision's ImageNet weights "
                          "(IMAGENET1K_V1)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "alexnet.py", ("variant", *ABLATIONS, "width",
                                                       "img_size"), may_differ=("ten_crop",))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size")
    check_ablations(args)
    t0 = time.time()
    data.apply_quick(args, QUICK)
    if args.width is None:
        args.width = 1.0
    args.batch_size = args.batch_size or BATCH_SIZE
    args.lr = args.lr or LR
    data.check_task(args.data, "classification")
    imagenet = args.data == "imagenet"
    if args.img_size is None:
        args.img_size = 224 if imagenet else 96
    if args.ten_crop is None:
        args.ten_crop = imagenet
    if args.init is None:
        args.init = "variant" if imagenet else "kaiming"
    device, rank, world, is_main = data.setup(args, "alexnet.py")
    if args.classify:  # the user's images through the network: no data set read
        return classify(args, state, device)
    if args.epochs is None:
        args.epochs = EPOCHS
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. ImageNet: data.classification_transforms (§2: short side 256, the central 256x256
    # patch; random 224 crops of it, flips, PCA colour); the test loader keeps the 256x256
    # centre so that both tests can be cut from it.
    # In-memory sets: the whole set on the device, pad-4 crops and flips, upsampled on the fly.
    train_loader, val_loader, test_loader, info = data.classification_loaders(
        args.data, args.batch_size // args.world, device, args.data_dir, not args.no_download,
        args.quick, args.seed, augment=True, workers=args.workers,
        eval_batch_size=100 if imagenet else 250, size=args.img_size if imagenet else None,
        square=True, train_split=data.train_split(args), limit=args.limit,
        test_only=args.eval_only, stats=(state or {}).get("normalisation"),  # the test split alone
        gpu_decode=args.gpu_decode)
    classes, (n_train, n_val, n_test) = info["classes"], info["sizes"]
    if imagenet and args.ten_crop:
        big = round(args.img_size * 256 / 224)
        test_set = data.classification_dataset("imagenet", "test", args.data_dir, quick=args.quick,
                                               transform=v2.Compose([
                                                   v2.ToImage(), v2.Resize(big, antialias=True),
                                                   v2.CenterCrop(big),
                                                   v2.ToDtype(torch.float32, scale=True),
                                                   data.Normalize(info["mean"], info["std"])]))
        test_loader = data.make_loader(test_set, 100, False, args.workers, device,
                                       gpu_decode=args.gpu_decode)
    train_loader, val_loader, test_loader = data.dry_run_batches(args, train_loader, val_loader,
                                                                 test_loader)
    colour = None  # training only: --eval-only has no training images to take it from
    if train_loader is not None and not imagenet and info["in_channels"] == 3:
        eigval, eigvec = data.colour_pca(train_loader.images.cpu())
        colour = (eigval.to(device), eigvec.to(device),
                  torch.tensor(info["std"], device=device).view(1, 3, 1, 1))

    model = alexnet(len(classes), args.variant, info["in_channels"], args.width,
                    **ablations(args)).to(device)
    arch = arch_name(args)
    if args.init == "kaiming":
        kaiming_init(model)
    if args.pretrained:
        load_pretrained(model, args.variant, args.width)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # §5: v <- 0.9 v - 0.0005 eps w - eps grad for every weight (PyTorch's SGD puts the lr
    # outside the momentum buffer; with a constant lr between steps the two are equal); the
    # biases as the released nets train them: 2x the lr, no weight decay (cuda-convnet's epsB
    # and no bias cost; Caffe's bvlc_alexnet lr_mult 2, decay_mult 0).
    optimizer = torch.optim.SGD(data.caffe_param_groups(model, args.lr, args.weight_decay),
                                lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda e: lr_factor(e, args.lr_steps))
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "arch": arch, "parameters": count_parameters(model),
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": DEPARTURES}
    if is_main:
        print(f"alexnet.py: {arch} on {args.data} ({n_train} train / {n_val} val / {n_test} test) "
              f"at {args.img_size}x{args.img_size}, {config['parameters']:,} parameters, "
              f"device {device}, {args.world} process(es)")
        for d in DEPARTURES:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")

    net = data.wrap(model, args)

    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), args.epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, args.epochs):
            data.set_epoch(train_loader, epoch)
            loss = train_one_epoch(net, train_loader, optimizer, scaler, args, device, epoch,
                                   progress, colour)
            scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": progress.lr}
            if val_loader is not None:  # ImageNet has none: its official val set is the test set
                row["val_error"] = evaluate(model, val_loader, args, device,
                                           len(classes))["test_error"]
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                t = evaluate(model, test_loader, args, device, len(classes), ten_crop=args.ten_crop)
                row["test_error"] = t["test_error"]
                if "top5_error" in t:  # >= 100 classes
                    row["test_top5_error"] = t["top5_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f}" + "".join(
                    f" {k} {100 * row[k]:.2f}%" for k in ("val_error", "test_error",
                                                         "test_top5_error") if k in row))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, **data.test_settings(info))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device, len(classes), ten_crop=args.ten_crop)
    keys = ["test_error", "test_accuracy", "balanced_error", "single_crop_error",
            "ten_crop_error", "top5_error", "single_crop_top5_error"]
    if is_main:
        print(f"test_error {100 * test['test_error']:.2f}% ({test['errors']}/{test['samples']}, "
              f"{'ten-crop' if args.ten_crop else 'single crop'}) single_crop_error "
              f"{100 * test['single_crop_error']:.2f}% balanced_error "
              f"{100 * test['balanced_error']:.2f}%" +
              (f" top5_error {100 * test['top5_error']:.2f}%" if "top5_error" in test else ""))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "alexnet.py", args.data,
        {k: test[k] for k in keys if k in test}, paper=PAPER, config=config, device=str(device),
        seconds=time.time() - t0, history=history,
        **metrics.class_records(test, classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "alexnet.py")
