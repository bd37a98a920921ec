"""OverFeat: P. Sermanet, D. Eigen, X. Zhang, M. Mathieu, R. Fergus, Y. LeCun, "OverFeat:
Integrated recognition, localization and detection using convolutional networks", ICLR 2014,
arXiv:1312.6229.

    python overfeat.py --data imagenet                          # fast net, §3.1 recipe, §3.3 test
    python overfeat.py --data imagenet --variant accurate       # Table 3's accurate model
    python overfeat.py --data imagenet --variant alexnet --pretrained --eval-only  # torchvision's
    python overfeat.py --data shapes --quick                    # offline classification, CPU
    python overfeat.py --data shapes-det --quick                # offline localisation (§4), CPU
    python overfeat.py --data imagenet --task localisation \
        --weights runs/overfeat-imagenet/checkpoint.pt          # §4: the regressor on §3's net
    python overfeat.py --data voc                               # detection (§5), background class
    python overfeat.py --data shapes-det --task detection --quick --batch-size 64 --lr 0.02
    python overfeat.py --detect street.jpg --weights runs/overfeat-voc/checkpoint.pt --out drawn
    python overfeat.py --data voc --dry-run                     # each stage 2 steps, 2 test batches
    torchrun --nproc_per_node=2 overfeat.py --data imagenet     # data-parallel, same global batch
    python bench/bench_overfeat_dense.py                        # dense vs crop-by-crop images/s

Paper (ILSVRC-2012 val, Table 2, dense evaluation at fine stride): top-1 / top-5 error 38.12 /
16.27 % for one fast model at 6 scales (Table 5's 1-6), 35.74 / 14.18 % for one accurate model
at 4 scales; each variant is tested by default at its row's scales and compared with its row
(`paper_record`: TABLE_2 also holds the fast model's 1- and 4-scale rows). ILSVRC-2013
localisation error 29.9 % (§4.6, top-5); detection 24.3 % mAP (post-competition, §5).
Parameters: "145 million" (fast, Table 1), "144 million" (accurate, Table 3).
Ours: see the README's results table (the command and hardware of every figure are there).

Models. Fast (Table 1): conv1 96 11x11/4, max 2x2/2; conv2 256 5x5, max 2x2/2; conv3 512, conv4
1024, conv5 1024 3x3 pad 1, max 2x2/2; fc6 3072, fc7 4096, fc8 classes; 231x231 input, 6x6 conv5
maps, total stride 32. Accurate (Table 3): conv1 96 7x7/2, max 3x3/3; conv2 256 7x7, max 2x2/2;
conv3 512, conv4 512, conv5 1024, conv6 1024 3x3 pad 1, max 3x3/3; fc7 4096, fc8 4096, fc9 classes;
221x221 input, 5x5 maps, total stride 36. ReLU everywhere, dropout 0.5 after the hidden FCs.
Exact counts: fast 145,920,872, accurate 144,656,488 (test_overfeat.py works them out by hand).

Recipe (§3.1): SGD, batch 128, momentum 0.6, weight decay 1e-5, lr 5e-2 halved after epochs 30,
50, 60, 70, 80; weights N(0, 1e-2); smallest side 256, random 221/231 crops and mirrors.
Test (§3.3): the FC layers become convolutions (`convolutionize`), the net runs on the whole image
at each scale of its Table 2 row; the last max-pooling is done at every offset (dx, dy) in
{0..k-1}^2 (`offset_max_pool`, 9 offsets for 3x3/3), the classifier slides over each pooled map,
the class maps are max-pooled over space and averaged over scales and mirrors (`dense_evaluate`).
Localisation (§4): on ImageNet it starts from the checkpoint of a classification run (--weights;
its own --out default, runs/overfeat-localisation-imagenet): the features (layers 1-5) and the
classifier are loaded and frozen, only the regression network trains (§4.2: hidden layers of 4096
and 1024 channels, an output of 4 box edges relative to each location, or 4 per class with
--class-specific, §4.2's 1000 versions), with an l2 loss at every location that sees at least half
of the box (`in_view`), on the boxed training images at Table 5's 6 scales (--loc-scales), read a
batch at a time (`BoxSquares`). The test: every image at 4 scales (§4.6), the boxes of all
locations and scales merged greedily (§4.3, `greedy_merge`) for each of the 5 most probable
classes, the ILSVRC top-5 localisation error compared with §4.6's 29.9 %. shapes-det (offline)
trains its classifier for --epochs, then the regressor on it, in one run. ImageNet boxes:
`data.ImageNetBoxes` (layout in its docstring).
Detection (§5): the same net with C + 1 outputs (the last is background), trained on windows cut
from the scenes, one positive and one random or "most offending" negative per scene
(`window_batches`); tested densely at 5 scales, a box per location from the regressor, per-class
NMS, VOC07 AP over all objects (`detect`, `evaluate_detection`).
Departures: DEPARTURES, printed at start.
"""
import collections
import copy
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

PAPER = {"reference": "Sermanet et al. 2013, arXiv:1312.6229, Tables 1-3, §4.6, §5",
         "data": "imagenet",
         "loc_error_top5": 0.299,  # §4.6: ILSVRC-2013 localisation, 5 guesses (class, box)
         "detection_map": 0.243,   # §5: ILSVRC-2013 detection (200 classes), post-competition
         "parameters_fast": 145e6, "parameters_accurate": 144e6}
# Table 2 (ILSVRC-2012 val, one model, dense evaluation at fine stride): the top-1 / top-5 error
# of each (variant, test scales) row, the scales numbered as Table 5's (1 = 245 ... 6 = 461). A
# run is compared with the row of its variant and scales (`paper_record`): none for others.
TABLE_2 = {("fast", (1,)): (0.3901, 0.1697),                 # "1 fast model, scale 1"
           ("fast", (1, 2, 4, 6)): (0.3857, 0.1639),         # "4 scales (1,2,4,6)"
           ("fast", (1, 2, 3, 4, 5, 6)): (0.3812, 0.1627),   # "6 scales (1-6)"
           ("accurate", (1, 2, 4, 6)): (0.3574, 0.1418)}     # "1 accurate model, 4 scales"
# Each variant's default test scales: its headline row (Table 2 does not name the accurate
# model's 4 scales; we take the fast model's 4, (1,2,4,6)); alexnet (not in the paper): all 6.
# Localisation tests at 4 scales (§4.6: "adding a third and fourth scale ... 30.0 %").
TEST_SCALES = {"fast": (1, 2, 3, 4, 5, 6), "accurate": (1, 2, 4, 6),
               "alexnet": (1, 2, 3, 4, 5, 6), "localisation": (1, 2, 4, 6)}
# (name, out channels, kernel, stride, padding, pool k = stride or 0)
FAST = [("conv1", 96, 11, 4, 0, 2), ("conv2", 256, 5, 1, 0, 2), ("conv3", 512, 3, 1, 1, 0),
        ("conv4", 1024, 3, 1, 1, 0), ("conv5", 1024, 3, 1, 1, 2)]
ACCURATE = [("conv1", 96, 7, 2, 0, 3), ("conv2", 256, 7, 1, 0, 2), ("conv3", 512, 3, 1, 1, 0),
            ("conv4", 512, 3, 1, 1, 0), ("conv5", 1024, 3, 1, 1, 0), ("conv6", 1024, 3, 1, 1, 3)]
FC = {"fast": (3072, 4096), "accurate": (4096, 4096), "alexnet": (4096, 4096)}
INPUT = {"fast": 231, "accurate": 221, "alexnet": 224}         # training crop sizes
# Small (32x32) sets: the smallest sizes giving a 2x2 (fast, accurate) or 1x1 (alexnet) map under
# the fc window, so the net keeps every layer; images are upsampled on the device to these.
SMALL_INPUT = {"fast": 103, "accurate": 113, "alexnet": 63}
SCALES = [245, 281, 317, 389, 425, 461]   # Table 5: the smaller side of the 6 test scales
# §4.2: the regressor is not trained at a location whose field of view (its training window)
# holds less than half of the box: "the object is mostly outside of these locations"
IN_VIEW = 0.5
LOC_EPOCHS = 10           # not stated in the paper
EPOCHS = 90               # not stated in the paper: after the last lr step (80) + 10
LR_STEPS = (30, 50, 60, 70, 80)           # §3.1: lr x 0.5 after each
BATCH_SIZE = 128                          # §3.1: "mini-batches of size 128"
# --quick: the first 2,000 / 500 images, an eighth-width net and a budget of steps: batch 32 gives
# 63 steps an epoch where the paper's 128 gives 15.
QUICK = {"width": 0.125, "epochs": 8, "batch_size": 32, "loc_epochs": 6}
# --quick localisation on shapes-det, a recipe of its own (the class of a scene's largest shape
# among several is harder than `shapes`' one shape): 20 classification epochs without dropout.
# Measured (2,000 / 500 images, 1 thread, ~4 min): with QUICK's 8 epochs at dropout 0.5 the
# classifier stays at chance (train loss 1.78 = ln 6; 76.8 % test error, loc_error_top5 88.0 %,
# 1.3 % mAP); 20 epochs at dropout 0.5 still at 1.79 after 16; these: 56.4 %, 75.6 %, 5.7 %.
QUICK_LOC = {**QUICK, "epochs": 20, "dropout": 0.0}
# Images per batch of the dense tests (in-memory classification sets, §4's localisation, §5's
# detection); --dry-run tests 2 such batches
TEST_BATCH, LOC_TEST_BATCH, DET_TEST_BATCH = 250, 100, 50


def paper_record(args):
    """The paper's figures a run is compared with (results.json's `paper`): Table 2's top-1 /
    top-5 error of the row of the run's variant and test scales (on ImageNet; on another set the
    variant's default row, which the summary shows beside ImageNet runs only), none where the
    table has no such row (alexnet, other scales); §4.6's localisation error in every record."""
    which = TEST_SCALES[args.variant]
    if args.data == "imagenet":
        which = tuple(SCALES.index(s) + 1 if s in SCALES else 0 for s in args.scales)
    out = dict(PAPER)
    if (args.variant, which) in TABLE_2:
        out["test_error"], out["top5_error"] = TABLE_2[args.variant, which]
        out["table_2_row"] = f"1 {args.variant} model, scales {', '.join(map(str, which))}"
    return out


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "lr x 0.5 after epochs 30, 50, 60, 70, 80 as §3.1, but the total (90) is our choice: the "
    "paper does not state it",
    "small sets (shapes, CIFAR, MNIST): images upsampled on the device to 103 (fast) / 113 "
    "(accurate) / 63 (alexnet) pixels, the smallest inputs that keep every layer; one jitter "
    "scale per batch; He init (--init kaiming): N(0, 1e-2) stays at chance on 2,000 images; "
    "lr 1e-2 and momentum 0.9 (§3.1's 5e-2 diverges with He init, 0.6 barely moves); the "
    "quick nets leave chance only after ~10 epochs (quick default: 8); --quick localisation on "
    "shapes-det trains its classifier 20 epochs without dropout (QUICK_LOC: at 8 epochs, or "
    "with dropout 0.5, it stays at chance)",
    "dense test: softmax at each location, max over locations and offsets, mean over scales and "
    "mirrors; the paper does not say whether the max is over scores or probabilities; rescaling "
    "is bilinear with antialiasing, scales are the smallest side (the paper's Table 5 gives both "
    "sides)",
    "localisation (§4.2): the regressor is a convolution over the fc window on the pooled maps "
    "of one pooling offset (the paper: 3 x 3 copies, one per (dx, dy)); each location regresses "
    "the image's largest box (the paper does not say which of several; ILSVRC's are all of the "
    "image's class); loss: half the mean squared error of the 4 edges, in units of the training "
    "window, over all locations, those seeing < 50 % of the box counting 0 (the paper: 'l2', "
    "and those not trained); one regressor for "
    "all classes by default (§4.6's single-class regression, 30.0 % on val; §4.2's 1000 "
    "per-class versions, 44.1 % there, with --class-specific); the lr, epochs (10) and "
    "initialisation of the regressor are ours (not stated)",
    "localisation on ImageNet: a training image is resized so that its smallest side is the "
    "largest training scale (461), a random square of that side is cut from it (its box kept "
    "whole, even where it leaves the square) and mirrored at random; each batch is resized on "
    "the device to one of the 6 scales (one per step): the paper's scales, seen a square at a "
    "time (a batch needs one size); the test takes each image whole at its own size, at 4 "
    "scales (§4.6's best; Table 2's 1, 2, 4, 6 taken for which 4), its §3.3 dense classification "
    "the top-5 classes; the paper's 29.9 % is ILSVRC-2013's test set (labels not public), ours "
    "is scored on ILSVRC-2012 val (the same images as 2013's), where §4.6 gives 30.0 %",
    "§4.3 match score: centre distance / image size + (1 - IoU) (the paper: 'the sum of the "
    "distance between centers and the intersection area', units unspecified); merged box = mean "
    "of the two, confidence = the sum; top classes k = 1",
    "--variant alexnet (torchvision's layout) is not in the paper: it is the only published "
    "ImageNet weight set (--pretrained); OverFeat's own Lua weights are not loaded",
    "detection (§5): per step one positive window per scene (a square of 1.3-2 x the object "
    "around it, jittered) and one background window (IoU < 0.3 with every object; with "
    "--negatives hard the most offending of 4 random ones, scored by the current net); then "
    "the regressor on the positive windows, features and classifier frozen; test: one pooling "
    "offset, 5 scales (a window covers 1 to 1/4 of the scene), score = the class posterior, "
    "per-class NMS (IoU 0.3) instead of §4.3's greedy merge (quadratic in thousands of boxes); "
    "voc scenes are held in host memory as uint8 2 x img-size squares (VOC 07+12 at 462: "
    "10.6 GB per process)",
    "imagenet localisation: normalised as its classification run (the ImageNet mean and std), "
    "the paper states no normalisation",
]


# ---------------------------------------------------------------------------------------------
# Model

def _scale(c, width):
    """Channel count c times the --width multiplier (a CPU-test convenience; 1 = the paper)."""
    return max(1, round(c * width))


def layer_size(m, h, w):
    """The (h, w) of the map after layer m (Conv2d / MaxPool2d / AvgPool2d), floor mode."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
    d = pair(getattr(m, "dilation", 1))
    if getattr(m, "ceil_mode", False):
        raise ValueError(f"convolutionize: {m} uses ceil_mode, which it does not trace")
    return tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((h, w)))


def trace(layers, input_size, in_channels):
    """(C, H, W) of the map leaving a stack of conv/pool/pointwise layers for an input size."""
    c, (h, w) = in_channels, input_size
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            h, w = layer_size(m, h, w)
            c = m.out_channels if isinstance(m, nn.Conv2d) else c
            if h < 1 or w < 1:
                raise ValueError(f"input {tuple(input_size)} is too small: no map left after {m}")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            h, w = (m.output_size, m.output_size) if isinstance(m.output_size, int) \
                else m.output_size
    return c, h, w


def overfeat_features(spec, in_channels, width):
    layers, c_in = [], in_channels
    for i, (name, c, k, s, p, pool) in enumerate(spec):
        c = _scale(c, width)
        layers += [(name, nn.Conv2d(c_in, c, k, stride=s, padding=p)),
                   (f"relu{i + 1}", nn.ReLU(inplace=True))]
        if pool:  # non-overlapping max-pooling (Tables 1, 3: "pooling size = stride")
            layers.append((f"pool{i + 1}", nn.MaxPool2d(pool, stride=pool)))
        c_in = c
    return nn.Sequential(OrderedDict(layers)), c_in


class OverFeat(nn.Module):
    """The fast (Table 1) or accurate (Table 3) network, or torchvision's AlexNet layout
    ('alexnet': features.N / avgpool / classifier.N, so torchvision.models.alexnet's state_dict
    loads strictly). fc6's window is the conv map for `input_size`; `regressor` is §4's
    localisation head, a convolution over the same window (4 outputs, or 4 per class with
    `box_classes` = C: --class-specific)."""

    def __init__(self, variant="fast", num_classes=1000, in_channels=3, width=1.0,
                 input_size=None, dropout=0.5, regressor=False, box_classes=1):
        super().__init__()
        self.variant = variant
        self.input_size = input_size or INPUT[variant]
        h1, h2 = (_scale(n, width) for n in FC[variant])
        if variant == "alexnet":
            c = [_scale(n, width) for n in (64, 192, 384, 256, 256)]
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, c[0], 11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2),
                nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
            _, h, w = trace(self.features, (self.input_size,) * 2, in_channels)
            # torchvision's (6, 6) at 224; data's: torch's kernel has no deterministic CUDA
            # backward (--deterministic), even where, as here, it is the identity
            self.avgpool = data.AdaptiveAvgPool2d((h, w))
            self.classifier = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(c[4] * h * w, h1), nn.ReLU(inplace=True),
                nn.Dropout(dropout), nn.Linear(h1, h2), nn.ReLU(inplace=True),
                nn.Linear(h2, num_classes))
            c_out = c[4]
        else:
            spec = FAST if variant == "fast" else ACCURATE
            self.features, c_out = overfeat_features(spec, in_channels, width)
            _, h, w = trace(self.features, (self.input_size,) * 2, in_channels)
            self.avgpool = nn.Identity()
            n = len(spec) + 1  # fc6 (fast) or fc7 (accurate)
            self.classifier = nn.Sequential(OrderedDict([
                (f"fc{n}", nn.Linear(c_out * h * w, h1)), (f"relu{n}", nn.ReLU(inplace=True)),
                (f"drop{n}", nn.Dropout(dropout)),
                (f"fc{n + 1}", nn.Linear(h1, h2)), (f"relu{n + 1}", nn.ReLU(inplace=True)),
                (f"drop{n + 1}", nn.Dropout(dropout)),
                (f"fc{n + 2}", nn.Linear(h2, num_classes))]))
        self.window = (h, w)
        # §4.2: "2 fully-connected hidden layers of size 4096 and 1024", then 4 outputs
        r1, r2 = _scale(4096, width), _scale(1024, width)
        self.regressor = None if not regressor else nn.Sequential(
            nn.Conv2d(c_out, r1, (h, w)), nn.ReLU(inplace=True),
            nn.Conv2d(r1, r2, 1), nn.ReLU(inplace=True), nn.Conv2d(r2, 4 * box_classes, 1))

    def layers(self):
        """The classification net as one flat nn.Sequential (for `convolutionize`)."""
        return nn.Sequential(*self.features, self.avgpool, nn.Flatten(), *self.classifier)

    def forward(self, x, regress=False):
        if regress:  # §4.2: the regressor on frozen features (a forward, so DDP syncs it)
            with torch.no_grad():
                f = self.features(x)
            return self.regressor(f)
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def overfeat(variant="fast", num_classes=1000, in_channels=3, width=1.0, input_size=None,
             regressor=False, dropout=0.5, box_classes=1):
    """The model factory: 'fast' (Table 1), 'accurate' (Table 3) or 'alexnet' (torchvision's);
    with `regressor`, §4's localisation head (absent otherwise: torchvision's state_dict)."""
    if variant not in INPUT:
        raise ValueError(f"unknown variant '{variant}'; use fast, accurate or alexnet")
    return OverFeat(variant, num_classes, in_channels, width, input_size, dropout, regressor,
                    box_classes)


def init_weights(model, scheme):
    """'paper': §3.1's N(0, 1e-2) weights, zero biases. 'kaiming': He normal, zero biases, the
    last layer N(0, 0.01): the small-set default (as alexnet.py: N(0, 0.01) stays at chance for
    many epochs on 2,000 images)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in convs:
        if scheme == "paper":
            nn.init.normal_(m.weight, 0.0, 0.01)
        else:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)
    for head in (model.classifier, model.regressor):
        if head is not None:
            nn.init.normal_(head[-1].weight, 0.0, 0.01)


def count_parameters(model, regressor=False):
    """Parameters of the classification net (the tables' figure); with the regressor if asked."""
    return sum(p.numel() for n, p in model.named_parameters()
               if regressor or not n.startswith("regressor."))


def total_stride(model):
    """The product of the strides of the feature layers (32 fast / alexnet, 36 accurate)."""
    s = 1
    for m in model.features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            s *= m.stride[0] if isinstance(m.stride, tuple) else m.stride
    return s


def unwrap(model):
    """The plain OverFeat inside torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def convolutionize(layers, input_size, in_channels=None):
    """§3.3: the same net, applicable to any larger image. Traces the map size of `input_size`
    (H, W), or (C, H, W) as the lecture writes it, through a sequence (nn.Sequential or a list) of
    Conv2d / MaxPool2d / AvgPool2d / ReLU / Dropout / Flatten /
    Linear; the first Linear after a C x h x w map becomes an h x w convolution (its (out, C*h*w)
    weight viewed as (out, C, h, w): flatten is channel-major), later Linears 1x1 convolutions;
    Flatten is dropped. AdaptiveAvgPool2d is dropped where it is the identity (the traced map
    already has its size), and folded into the next Linear when it replicates a 1x1 map.
    Weights are copied. On input_size the result gives the logits as a (N, K, 1, 1) map."""
    layers, size = list(layers), tuple(input_size)
    if len(size) == 3:                                    # (C, H, W)
        if in_channels not in (None, size[0]):
            raise ValueError(f"convolutionize: input_size {size} has {size[0]} channels, "
                             f"in_channels is {in_channels}")
        in_channels, size = size[0], size[1:]
    if len(size) != 2:
        raise ValueError(f"convolutionize: input_size {tuple(input_size)} is not (H, W) or "
                         f"(C, H, W)")
    if in_channels is None:
        in_channels = next(m.in_channels for m in layers if isinstance(m, nn.Conv2d))
    c, (h, w) = in_channels, size
    out, spatial, replicate = [], True, None
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            c, h, w = trace([m], (h, w), c)
            out.append(copy.deepcopy(m))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            size = (m.output_size,) * 2 if isinstance(m.output_size, int) else m.output_size
            if tuple(size) != (h, w):
                if (h, w) != (1, 1):
                    raise ValueError(f"convolutionize: {m} on a {h}x{w} map is not a fixed "
                                     f"convolution; use an input size giving {size} or 1x1")
                replicate = tuple(size)
        elif isinstance(m, nn.Flatten):
            continue
        elif isinstance(m, nn.Linear):
            weight = m.weight.detach()
            expect = c * (1 if replicate else h * w) if spatial else c
            if m.in_features != expect * (replicate[0] * replicate[1] if replicate else 1):
                raise ValueError(f"convolutionize: {m} expects {m.in_features} inputs, the map "
                                 f"has {c} x {h} x {w}")
            if spatial and replicate:  # a 1x1 map copied to a x b: the weights add up
                weight = weight.view(m.out_features, c, *replicate).sum((2, 3), keepdim=True)
                kh, kw = 1, 1
            elif spatial:
                kh, kw = h, w
                weight = weight.view(m.out_features, c, h, w)
            else:
                kh, kw = 1, 1
                weight = weight.view(m.out_features, m.in_features, 1, 1)
            conv = nn.Conv2d(c, m.out_features, (kh, kw)).to(weight.device, weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(m.bias)
            out.append(conv)
            c, h, w, spatial, replicate = m.out_features, 1, 1, False, None
        elif isinstance(m, (nn.ReLU, nn.Dropout, nn.Identity)):
            out.append(copy.deepcopy(m))
        else:
            raise ValueError(f"convolutionize: cannot convert {type(m).__name__}")
    return nn.Sequential(*out)


def offset_max_pool(x, kernel, stride):
    """§3.3 (Fig. 3): the max-pooling of a (N, C, H, W) map done at every offset (dy, dx) in
    {0..stride-1}^2: {(dy, dx): max_pool2d(x[..., dy:, dx:], kernel, stride)}. Offsets that leave
    no window are skipped."""
    H, W = x.shape[-2:]
    return {(dy, dx): F.max_pool2d(x[..., dy:, dx:], kernel, stride)
            for dy in range(stride) for dx in range(stride)
            if H - dy >= kernel and W - dx >= kernel}


def interleave(maps, stride):
    """The per-offset maps of `offset_max_pool` (all stride^2 of them) reshaped into one map:
    out[..., i * stride + dy, j * stride + dx] = maps[dy, dx][..., i, j], each cropped to the
    smallest map. With kernel == stride this is max_pool2d at stride 1 (cropped)."""
    h = min(m.shape[-2] for m in maps.values())
    w = min(m.shape[-1] for m in maps.values())
    first = next(iter(maps.values()))
    out = first.new_empty(*first.shape[:-2], h * stride, w * stride)
    for (dy, dx), m in maps.items():
        out[..., dy::stride, dx::stride] = m[..., :h, :w]
    return out


def _window(head):
    """The (h, w) kernel of the head's first convolution (the former fc6)."""
    k = next(m for m in head if isinstance(m, nn.Conv2d)).kernel_size
    return k


def head_over_windows(head, maps):
    """The convolutionized FC layers (`head`) on every window of every map in `maps` (the
    per-offset pooled maps), computed as the original network computes them: every window
    unfolded into a row, all rows of all maps in one matrix, each former Linear one GEMM on it.
    Equal to head(map) for each map (a kh x kw convolution, then 1x1 ones), without running a
    large-kernel convolution once per offset. Returns the (N, K, h', w') score maps."""
    first = next(i for i, m in enumerate(head) if isinstance(m, nn.Conv2d))
    for m in head[:first]:                                       # dropout / ReLU before fc6
        maps = [m(x) for x in maps]
    kh, kw = head[first].kernel_size
    shapes = [(x.shape[0], x.shape[-2] - kh + 1, x.shape[-1] - kw + 1) for x in maps]
    rows = torch.cat([F.unfold(x, (kh, kw)).transpose(1, 2).reshape(-1, x.shape[1] * kh * kw)
                      for x in maps])                            # (sum N h' w', C kh kw)
    for m in head[first:]:
        if isinstance(m, nn.Conv2d):
            rows = F.linear(rows, m.weight.flatten(1), m.bias)   # the original fc layer
        else:                                                    # ReLU, Dropout: elementwise
            rows = m(rows)
    out, start = [], 0
    for n, h, w in shapes:
        block = rows[start:start + n * h * w]
        out.append(block.view(n, h, w, -1).permute(0, 3, 1, 2))
        start += n * h * w
    return out


class DenseNet(nn.Module):
    """The convolutionized net split at its last max-pooling: body (up to it), the pooling
    (kernel k, stride k) and head (the FC layers as convolutions). forward(x) is the plain
    score map (total stride as in training); forward(x, offsets=True) the list of the k^2
    per-offset score maps of §3.3 (an effective stride of total stride / k)."""

    def __init__(self, model):
        super().__init__()
        size = (model.input_size,) * 2
        seq = convolutionize(model.layers(), size)
        last = max(i for i, m in enumerate(seq) if isinstance(m, nn.MaxPool2d))
        self.body, self.head = seq[:last], seq[last + 1:]
        pool = seq[last]
        self.kernel, self.stride = pool.kernel_size, pool.stride
        self.total_stride = total_stride(model)
        self.input_size = model.input_size
        self.train(model.training)

    def forward(self, x, offsets=False):
        f = self.body(x)
        if not offsets:
            return head_over_windows(self.head, [F.max_pool2d(f, self.kernel, self.stride)])[0]
        kh, kw = _window(self.head)
        return head_over_windows(self.head, [
            p for p in offset_max_pool(f, self.kernel, self.stride).values()
            if p.shape[-2] >= kh and p.shape[-1] >= kw])


@torch.no_grad()
def dense_evaluate(dense, images, scales, flip=True, offsets=True):
    """§3.3: for each scale (smallest side, bilinear antialiased resize) and mirror, the per-offset
    class maps; softmax over classes at each location, the maximum over locations (and offsets)
    per class; the (N, K) mean over scales and mirrors. cuDNN autotuning is off inside: every
    scale of every image size is a new shape, benchmarked once and never met again."""
    if isinstance(images, (list, tuple)):  # whole ImageNet images of different sizes
        return torch.cat([dense_evaluate(dense, im[None], scales, flip, offsets) for im in images])
    outs = []
    with data.no_autotune():
        for s in scales:
            x = v2.functional.resize(images, [s], antialias=True)
            for view in ([x, x.flip(-1)] if flip else [x]):
                maps = dense(view, offsets=True) if offsets else [dense(view)]
                best = torch.stack([m.float().softmax(1).amax(dim=(2, 3)) for m in maps]).amax(0)
                outs.append(best)
    return torch.stack(outs).mean(0)


def load_pretrained(model, width):
    """torchvision's AlexNet IMAGENET1K_V1 (OverFeat's own weights were never published for
    PyTorch); with another number of classes, every layer but the last."""
    if model.variant != "alexnet" or width != 1.0 or model.input_size != 224:
        raise data.DataError("--pretrained needs --variant alexnet --width 1 --img-size 224 "
                             "(torchvision's AlexNet is the only published layout)")
    state = data.torchvision_weights(torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
    own = model.state_dict()
    if model.classifier[6].out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
    state.update({k: v for k, v in own.items() if k not in state})  # the regressor, fc8
    model.load_state_dict(state)


def localisation_start(state, path, arch):
    """What --weights is to a localisation run (§4.2: the regressor trains on the frozen network
    of a §3 classification run): 'classification' (this script's classification checkpoint of
    the same network: `arch` without the regressor's -cs), 'localisation' (a localisation run's,
    to train on), or 'bare state_dict' (no settings: its keys will tell). Anything
    else is a one-line error naming the checkpoint and what it is."""
    saved = state.get("args") if isinstance(state.get("args"), dict) else None
    if saved is None and "arch" not in state:
        return "bare state_dict"
    task, own = (saved or {}).get("task"), state.get("arch")
    if task in ("classification", "localisation") and \
            own in (arch, arch.removesuffix("-cs"), None):
        return task
    raise data.DataError(f"{path} is the checkpoint of a --task {task} run of '{own}', not of a "
                         f"classification run of '{arch.removesuffix('-cs')}'; localisation "
                         f"trains its regressor on a classification checkpoint of the same "
                         f"--variant, --width and --img-size (overfeat.py --data imagenet)")


def load_classifier(model, state, path, what):
    """§4.2's start: the features (layers 1-5) and classifier of a classification checkpoint
    (`state`; `what` it is, `localisation_start`) into the localisation network, non-strict
    for the regressor alone, whose keys are not there and keep their fresh initialisation (a
    localisation checkpoint brings them: then every key loads). A key missing or unexpected
    otherwise, or of another shape, is a one-line error naming the checkpoint. Returns the
    regressor's keys left fresh."""
    weights, own = state.get("model", state), model.state_dict()
    head = [k for k in own if k.startswith("regressor.")]
    fresh = head if not any(k in weights for k in head) else []
    missing = [k for k in own if k not in weights and k not in fresh]
    unexpected = [k for k in weights if k not in own]
    shape = [f"{k} {tuple(weights[k].shape)} here {tuple(v.shape)}" for k, v in own.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shape:
        raise data.DataError(f"{path} (a {what} checkpoint) does not fit the localisation "
                             f"network: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"other shapes {shape[:2]}; pass the checkpoint of an overfeat.py "
                             f"classification run of this --variant, --width, --img-size and "
                             f"classes")
    model.load_state_dict(weights, strict=not fresh)
    return fresh


# ---------------------------------------------------------------------------------------------
# Localisation (§4): box regression per location, greedy merge

def location_centres(h, w, stride, window, device=None):
    """(h*w, 2) centres (x, y), in the input's pixels, of the windows of a h x w output map."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    return torch.stack([xs.flatten() * stride + window / 2, ys.flatten() * stride + window / 2], 1)


def regression_targets(boxes, h, w, stride, window):
    """§4.2: every location predicts the box edges relative to its own centre, in units of the
    training window: (boxes (N, 4) - (cx, cy, cx, cy)) / window -> (N, 4, h, w)."""
    c = location_centres(h, w, stride, window, boxes.device).float()  # (hw, 2)
    t = (boxes[:, None, :] - c.repeat(1, 2)[None]) / window            # (N, hw, 4)
    return t.permute(0, 2, 1).reshape(len(boxes), 4, h, w)


def in_view(boxes, h, w, stride, window):
    """§4.2's field-of-view rule: the fraction of each box (N, 4) that lies inside the window
    (window x window pixels, centred as `location_centres`) of each location of a h x w map:
    (N, h, w). The regressor trains where it is >= IN_VIEW."""
    c = location_centres(h, w, stride, window, boxes.device).float()   # (hw, 2)
    lo, hi = c - window / 2, c + window / 2                             # the windows' corners
    b = boxes[:, None].float()                                          # (N, 1, 4)
    side = (torch.min(b[..., 2:], hi[None]) - torch.max(b[..., :2], lo[None])).clamp(min=0)
    area = ((b[..., 2:] - b[..., :2]).prod(-1)).clamp(min=1e-6)         # (N, 1)
    return (side.prod(-1) / area).view(len(boxes), h, w)


def paired_iou(a, b):
    """The IoU of a[i] with b[i] for (N, 4) boxes (torchvision.ops.box_iou's arithmetic, without
    its N x N matrix)."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (torchvision.ops.box_area(a) + torchvision.ops.box_area(b) - inter)


def match_scores(a, b, size):
    """§4.3's match_score of every box in a (N, 4) against every box in b (M, 4): the distance
    between the centres (in units of the image size) plus (1 - IoU) (the paper's 'intersection
    area' term, made scale-free; see DEPARTURES). (N, M)."""
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    dist = (ca[:, None] - cb[None]).pow(2).sum(-1).sqrt()
    return dist / size + 1 - torchvision.ops.box_iou(a, b)


def greedy_merge(boxes, scores, threshold, size):
    """§4.3: repeatedly merge the pair of boxes with the smallest match score (the mean of their
    coordinates, the sum of their confidences) until the smallest score exceeds `threshold`.
    Returns (boxes (M, 4), scores (M,)) sorted by decreasing confidence. `scores` may be (N, K),
    a confidence per box for each of K classes: the merges depend on the boxes alone, so one
    pass gives every class's sums (sorted by the first column's).

    The pairwise scores are computed once and updated per merge: a merged box takes a new slot
    after the others (the list order of the paper's loop: the two merged boxes leave it, their
    merge joins at its end), so ties go to the same pair as in a loop over that list.

    It runs on the CPU, and returns CPU tensors: every merge reads the smallest score to choose
    the next one, a host sync per merge on a GPU (callers move a batch's boxes at once)."""
    boxes, scores = boxes.cpu(), scores.cpu()
    n = len(boxes)
    if n == 0:
        return boxes.float().reshape(0, 4), scores.float()
    cap = 2 * n - 1                                   # n boxes + at most n - 1 merges
    b = torch.zeros(cap, 4)
    b[:n] = boxes.float()
    conf = torch.zeros(cap, *scores.shape[1:], dtype=torch.float64)
    conf[:n] = scores.double()
    alive = torch.zeros(cap, dtype=torch.bool)
    alive[:n] = True
    m = torch.full((cap, cap), float("inf"))          # m[i, j], i < j: the score
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    m[:n, :n][upper] = match_scores(b[:n], b[:n], size)[upper]
    for k in range(n, cap):                           # slot k holds the next merge
        flat = int(m.argmin())                        # row-major: the first minimal pair
        i, j = divmod(flat, cap)
        if not float(m[i, j]) <= threshold:           # also stops at inf: one box left
            break
        b[k], conf[k] = (b[i] + b[j]) / 2, conf[i] + conf[j]
        alive[i] = alive[j] = False
        m[[i, j], :] = float("inf")
        m[:, [i, j]] = float("inf")
        live = alive[:k].nonzero()[:, 0]
        m[live, k] = match_scores(b[live], b[k:k + 1], size)[:, 0]
        alive[k] = True
    keep = alive.nonzero()[:, 0]
    first = conf[keep] if conf.dim() == 1 else conf[keep][:, 0]
    order = first.argsort(descending=True, stable=True)
    return b[keep][order], conf[keep][order].float()


@torch.no_grad()
def localise(model, dense, x, scales, threshold, k=1):
    """§4: per image of x (N, 3, H, W), the k most probable classes of the averaged dense
    classification, then for every scale and location the regressed box (in x's pixels) with
    the probability of each of those classes as its confidences, greedily merged (§4.3; with 4
    outputs per class, --class-specific, each guessed class's own boxes, merged apart, and the
    "boxes" those of the top class). Returns per image a dict of
    CPU tensors: the merged "boxes" and their "scores" for the top class (its "label"), the k
    guesses ("guess_labels" (k,), "guess_boxes" (k, 4)): each class with its most confident box,
    and "probs" (K,), the dense classification itself (the test's dense figures)."""
    model.eval()
    n, (H, W) = x.shape[0], x.shape[-2:]
    probs = dense_evaluate(dense, x, scales, flip=True)
    top = probs.topk(min(k, probs.shape[1]), 1).indices                 # (N, k)
    boxes, confs = [], []
    with data.no_autotune():  # a new shape per scale (see dense_evaluate)
        for s in scales:
            xs = v2.functional.resize(x, [s], antialias=True)
            f = F.max_pool2d(dense.body(xs), dense.kernel, dense.stride)
            p = head_over_windows(dense.head, [f])[0].float().softmax(1)  # (N, K, h, w)
            h, w = p.shape[-2:]
            t = model.regressor(f).float().view(n, -1, 4, h, w)       # (N, 1 or K, 4, h, w)
            if t.shape[1] > 1:  # one regressor per class: those of the k guessed classes
                t = t.gather(1, top[:, :, None, None, None].expand(-1, -1, 4, h, w))
            c = location_centres(h, w, dense.total_stride, model.input_size, x.device).float()
            b = t.flatten(3).transpose(2, 3) * model.input_size + c.repeat(1, 2)  # (N, ., hw, 4)
            fx, fy = W / xs.shape[-1], H / xs.shape[-2]  # back to x's pixels (Python floats)
            boxes.append(torch.stack([(b[..., 0] * fx).clamp(0, W), (b[..., 1] * fy).clamp(0, H),
                                      (b[..., 2] * fx).clamp(0, W), (b[..., 3] * fy).clamp(0, H)],
                                     -1))
            confs.append(p.flatten(2).gather(1, top[:, :, None].expand(-1, -1, h * w)))
    # The merge runs on the CPU (greedy_merge): the batch's boxes go there at once, one copy each
    boxes, confs = torch.cat(boxes, 2).cpu(), torch.cat(confs, 2).cpu()
    probs, top = probs.float().cpu(), top.cpu()
    out = []
    for i in range(n):
        if boxes.shape[1] == 1:  # one box per location for every class: one merge for all
            merged, scores = greedy_merge(boxes[i, 0], confs[i].T, threshold, max(H, W))
            best = merged[scores.argmax(0)]
        else:  # per class: its own boxes, merged with its own confidences
            per = [greedy_merge(boxes[i, j], confs[i, j], threshold, max(H, W))
                   for j in range(len(top[i]))]
            best = torch.stack([m[0] for m, _ in per])  # each sorted by its confidence
            merged, scores = per[0][0], per[0][1][:, None]
        # copies, not views: a view would carry the batch's storage through gather_shards
        out.append({"boxes": merged, "scores": scores[:, 0].clone(), "label": int(top[i, 0]),
                    "guess_labels": top[i].clone(), "guess_boxes": best.clone(),
                    "probs": probs[i].clone()})
    return out


# ---------------------------------------------------------------------------------------------
# Detection (§5): a background class, windows of the scenes, hard negatives, dense boxes

# Test scales as multiples of the training window: the scene's side / img-size, so a window
# covers the whole scene down to a quarter of it (§5 runs the net at 6 scales of the image).
DET_SCALES = (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0)
NEG_IOU = 0.3       # a window is background when its IoU with every object is below this
CANDIDATES = 4      # negative windows drawn per scene; "hard" keeps the most offending one


class Scenes(torch.utils.data.Dataset):
    """Scenes `indices` of a detection set, each resized to S x S (boxes following through
    tv_tensors): (uint8 image, its boxes and labels in the S-pixels, its ground truth in its own
    pixels (difficult kept), its (W, H)). Read by `scene_arrays`' DataLoader workers."""

    def __init__(self, ds, indices, S):
        self.ds, self.indices, self.resize = ds, indices, v2.Resize((S, S), antialias=True)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, target = self.ds[self.indices[i]]
        gt = {"boxes": target["boxes"].as_subclass(torch.Tensor).float(),
              "labels": target["labels"], "difficult": target["difficult"]}
        size = (image.shape[-1], image.shape[-2])
        image, target = self.resize(image, target)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"]}, gt, size


def scene_arrays(split, args, share=False, objects_only=False, first=None):
    """The detection scenes in host memory, never whole on the device: uint8 images (N, 3, S, S)
    (shapes-det: S = 64, as rendered; voc: resized to S = 2 x img-size), their boxes and labels
    in those S-pixels, the ground truths in the original pixels (difficult kept) with each
    image's (W, H), to map detections back before metrics.detection_map, and the data set.
    `share`: under torchrun only this rank's scenes (r, r + W, ...; the test, whose detections
    and ground truths are gathered), at most `first` of them (--dry-run). `objects_only`: the
    scenes with an object (training). The files are decoded by DataLoader workers straight into
    one array (no list of images then a stack: a second copy of the set)."""
    ds = data.detection_dataset(args.data, split, args.data_dir, not args.no_download,
                                quick=args.quick, seed=0)
    S = 64 if args.data == "shapes-det" else 2 * args.img_size
    rank, world = data.distributed_info() if share else (0, 1)
    indices = list(range(rank, len(ds), world))[:first]
    check_host_memory(len(indices) * 3 * S * S, f"the {args.data} {split} scenes ({len(indices)} "
                      f"of {S}x{S} pixels)", "use a smaller --img-size (the scenes are 2 x "
                      "img-size squares)")
    x = torch.empty((len(indices), 3, S, S), dtype=torch.uint8)
    # workers for the files (shapes-det renders fast and keeps its images in this process); a
    # generator of its own: the global one, which initialises the network, is left untouched
    loader = torch.utils.data.DataLoader(Scenes(ds, indices, S), batch_size=32,
                                         num_workers=args.workers if args.data == "voc" else 0,
                                         collate_fn=list, generator=torch.Generator())
    scene, gts, sizes = [], [], []
    for batch in loader:
        for image, target, gt, size in batch:
            if objects_only and not len(target["labels"]):
                continue
            x[len(scene)] = image
            scene.append(target), gts.append(gt), sizes.append(size)
    if not len(ds) or (objects_only and not scene):
        raise data.DataError(f"the {args.data} {split} split has no images"
                             f"{' with objects' if len(ds) else ''}; check --data-dir")
    return x[:len(scene)], scene, gts, sizes, ds


def square_windows(cx, cy, side):
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], -1)


def cut_windows(images, windows, size, owner=None):
    """A size x size crop of the (K, 4) XYXY windows (continuous pixels, zero = the mean colour
    outside the image), window k from image owner[k] (default: k), bilinear, by
    torchvision.ops.roi_align. All on the images' device."""
    owner = torch.arange(len(windows), device=windows.device) if owner is None else owner
    rois = torch.cat([owner[:, None].to(windows.dtype), windows], 1)
    return torchvision.ops.roi_align(images, rois.to(images.dtype), size, sampling_ratio=2,
                                     aligned=True)


def window_batches(x, scene, batch_size, seed, epoch, mean, std, args, scorer, rank=0, world=1,
                   positives_only=False):
    """§5's training windows, drawn for the whole global batch from a (seed, epoch) generator
    (each rank then keeps its 1/world slice of the scenes: the same windows as one process).
    Per scene: one positive, a square around one of its objects (side 1.3-2 x the object's
    longer side, centre moved by up to 0.2 x the side) labelled with the object's class; one
    negative among CANDIDATES random squares in the scene (side S/4..S, log-uniform) overlapping
    every object by IoU < NEG_IOU, labelled background (index C): the first ('random') or the one
    the current net scores highest on any object class ('hard', §5's "most offending ones"),
    all candidates scored in one batch. Windows are cut and resized to img-size with roi_align,
    mirrored at random with their boxes. `x` is the host's uint8 scenes: only this rank's
    scenes of each batch move to the device (mean's), where everything after the draws runs,
    without a host sync (the hard negatives are chosen there). Yields (windows, labels, object
    boxes in window pixels)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    S, n, B, C = x.shape[-1], len(scene), batch_size // 2, args.num_classes
    device, size = mean.device, args.img_size
    idx = torch.randperm(n, generator=g)
    for b in range(n // B):
        scenes = idx[b * B:(b + 1) * B].tolist()
        u = torch.rand(B, 8 + 3 * CANDIDATES, generator=g)  # every draw for the global batch
        flip = torch.rand(2 * B, generator=g) < 0.5  # mirrors (positives, then negatives)
        mine = list(range(rank, B, world))
        wins, labels, obj, cands, allowed = [], [], [], [], []
        for k in mine:  # the windows, drawn on the host (scene boxes, CPU generator)
            gt = scene[scenes[k]]
            j = min(int(u[k, 0] * len(gt["labels"])), len(gt["labels"]) - 1)
            box = gt["boxes"][j]
            side = (box[2:] - box[:2]).max() * (1.3 + 0.7 * u[k, 1])
            c = (box[:2] + box[2:]) / 2 + (u[k, 2:4] - 0.5) * 0.4 * side
            wins.append(square_windows(c[0], c[1], side))
            labels.append(int(gt["labels"][j]))
            obj.append(box)
            r = u[k, 8:].view(3, CANDIDATES)
            side = S / 4 * 4 ** r[2]  # inside the scene: no black border to give it away
            cands.append(square_windows(side / 2 + r[0] * (S - side),
                                        side / 2 + r[1] * (S - side), side))
            iou = torchvision.ops.box_iou(cands[-1], gt["boxes"]).amax(1) if len(gt["boxes"]) \
                else torch.zeros(CANDIDATES)
            # no candidate clear of the objects: the least overlapping one (rare on shapes-det)
            ok = iou < NEG_IOU
            allowed.append(ok if ok.any() else torch.arange(CANDIDATES) == iou.argmin())
        # To the device: this rank's scenes and draws. Nothing comes back (no host sync).
        xb = normalise(host_batch(x, [scenes[k] for k in mine], device), mean, std)
        wins, obj = to_device(torch.stack(wins), device), to_device(torch.stack(obj), device)
        windows, y, w_all, boxes, m = cut_windows(xb, wins, size), labels, wins, obj, flip[mine]
        if not positives_only:
            allowed = torch.stack(allowed)                          # (n, CANDIDATES)
            cand = to_device(torch.stack(cands), device)            # (n, CANDIDATES, 4)
            pick = to_device(allowed.int().argmax(1), device)       # the first allowed: 'random'
            if args.negatives == "hard":  # every allowed candidate through the net at once
                owner, slot = (to_device(t, device) for t in allowed.nonzero(as_tuple=True))
                crops = cut_windows(xb, cand[owner, slot], size, owner)
                with torch.no_grad():
                    was = scorer.training
                    p = scorer.eval()(crops).float().softmax(1)[:, :C].amax(1)
                    scorer.train(was)
                # each scene's highest (the first of equals, as argmax), chosen on the device
                score = torch.full(allowed.shape, -torch.inf, device=device)
                pick = score.index_put_((owner, slot), p).argmax(1)
            negs = cand[torch.arange(len(mine), device=device), pick]
            windows = torch.cat([windows, cut_windows(xb, negs, size)])
            y, w_all = labels + [C] * len(mine), torch.cat([wins, negs])
            boxes = torch.cat([obj, negs])  # negatives: unused
            m = torch.cat([m, flip[[B + k for k in mine]]])
        # the object's box in the window's pixels (img-size x img-size)
        wb = (boxes - w_all[:, :2].repeat(1, 2)) * (size / (w_all[:, 2:3] - w_all[:, 0:1]))
        m = to_device(m, device)
        windows = torch.where(m[:, None, None, None], windows.flip(3), windows)
        wb = torch.where(m[:, None], torch.stack([size - wb[:, 2], wb[:, 1], size - wb[:, 0],
                                                  wb[:, 3]], 1), wb)
        yield windows, to_device(torch.tensor(y), device), wb


@torch.no_grad()
def detect(model, dense, x, scales, num_classes, score_threshold=0.01, nms_iou=0.3,
           max_dets=100):
    """§5 at test time: the convolutionized net over the whole (N, 3, S, S) scenes at each scale;
    every location gives C + 1 posteriors (softmax) and, from the regressor, a box (one for all
    classes, or one per class with --class-specific) mapped to the scene's pixels. Per image and
    class, the boxes scoring above `score_threshold` over all scales are merged by NMS (IoU
    `nms_iou`; see DEPARTURES). Returns [{"boxes" (S-pixels), "scores", "labels"}] per image,
    on the scenes' device. cuDNN autotuning is off (a new shape per scale: see dense_evaluate)."""
    model.eval()
    n, S, C, size = x.shape[0], x.shape[-1], num_classes, model.input_size
    boxes, scores = [], []
    with data.no_autotune():
        for s in scales:
            xs = v2.functional.resize(x, [s], antialias=True)
            f = F.max_pool2d(dense.body(xs), dense.kernel, dense.stride)
            p = head_over_windows(dense.head, [f])[0].float().softmax(1)[:, :C]  # (N, C, h, w)
            t = model.regressor(f).float()                                # (N, 4 or 4C, h, w)
            h, w = t.shape[-2:]
            c = location_centres(h, w, dense.total_stride, size, x.device).float()
            t = t.view(n, -1, 4, h * w).transpose(2, 3)                   # (N, 1 or C, hw, 4)
            b = ((t * size + c.repeat(1, 2)) * (S / s)).clamp(0, S).expand(n, C, h * w, 4)
            boxes.append(b), scores.append(p.flatten(2))
    boxes, scores = torch.cat(boxes, 2), torch.cat(scores, 2)           # (N, C, L, 4), (N, C, L)
    labels = torch.arange(C, device=x.device)[:, None].expand(C, scores.shape[-1])
    out = []
    for i in range(n):  # per image: the one host sync of the boolean selection, then NMS's own
        keep = (scores[i] > score_threshold) & (boxes[i, ..., 2] > boxes[i, ..., 0]) & \
            (boxes[i, ..., 3] > boxes[i, ..., 1])
        j = keep.flatten().nonzero()[:, 0]
        bi, si, li = boxes[i].reshape(-1, 4)[j], scores[i].flatten()[j], labels.flatten()[j]
        top = si.argsort(descending=True)[:2000]
        bi, si, li = bi[top], si[top], li[top]
        k = torchvision.ops.batched_nms(bi, si, li, nms_iou)[:max_dets]
        out.append({"boxes": bi[k], "scores": si[k], "labels": li[k]})
    return out


@torch.no_grad()
def evaluate_detection(model, scenes, gts, sizes, classes, args, mean, std):
    """VOC07 11-point AP per class and mAP of `detect` over ALL objects of every test scene,
    the boxes mapped from the S x S scene back to each image's own pixels. `scenes` (host uint8),
    `gts` and `sizes` are this rank's share (`scene_arrays(share=True)`: rank r holds r, r + W,
    ...), moved to the device (mean's) and normalised a batch at a time; the detections and
    ground truths of every rank are gathered, so every rank scores the whole set."""
    dense, device = DenseNet(model).eval(), mean.device
    S, dets = scenes.shape[-1], []
    for i in range(0, len(scenes), DET_TEST_BATCH):
        x = normalise(host_batch(scenes, range(i, min(i + DET_TEST_BATCH, len(scenes))), device),
                      mean, std)
        found = detect(model, dense, x, args.det_scales, len(classes), nms_iou=args.nms_iou)
        # the batch's detections to the CPU in one copy per field, then split per image
        counts = [len(d["scores"]) for d in found]
        parts = {k: torch.cat([d[k] for d in found]).cpu().split(counts) for k in found[0]}
        for j, (W, H) in enumerate(sizes[i:i + DET_TEST_BATCH]):
            d = {k: v[j].clone() for k, v in parts.items()}  # not views of the batch's
            d["boxes"] = d["boxes"] * torch.tensor([W / S, H / S, W / S, H / S])
            dets.append(d)
    dets, gts = data.gather_shards(dets, gts)
    dm = metrics.detection_map(dets, gts, len(classes))
    return {"map": dm["map"], "ap": dict(zip(classes, dm["ap"])),
            "detections_per_image": sum(len(d["scores"]) for d in dets) / len(dets),
            "samples": len(dets), "records": metrics.detection_records(dm, classes)}, dets


# ---------------------------------------------------------------------------------------------
# Recipe and data glue

def lr_factor(epoch, steps=LR_STEPS):
    """§3.1: lr x 0.5 after each step epoch (a fixed schedule: resume is exact)."""
    return 0.5 ** sum(epoch >= s for s in steps)


# Host and device. The file-backed sets stay on the host (uint8) and move a batch at a time. A
# plain .to(cuda) of a host tensor waits until the GPU has run everything queued before the copy
# (a host sync): copies go through page-locked memory with non_blocking=True instead.

def to_device(t, device):
    """A tensor on `device`; from the CPU to CUDA through page-locked memory, without waiting."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_batch(x, rows, device):
    """x[rows] of a host array on `device`; for CUDA gathered straight into page-locked memory
    (one copy on the host; torch's caching host allocator keeps the buffer until the copy ran).
    The array itself is not pinned: a gathered batch is a new tensor anyway, and pinning would
    lock 10.6 GB (VOC 07+12) in each process for nothing."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return x[rows].to(device)
    out = torch.empty((len(rows), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
    return torch.index_select(x, 0, rows, out=out).to(device, non_blocking=True)


def normalise(x, mean, std):
    """uint8 images, on the device, to float32 normalised with the training set's mean and std."""
    return x.float().div_(255).sub_(mean).div_(std)


def channel_stats(x, chunk=2 ** 26):
    """data.channel_stats (per-channel mean and std, in [0, 1] units) of uint8 images (N, C, H,
    W), a chunk of about `chunk` values at a time instead of one float64 copy of the set (VOC
    07+12 at 462: 85 GB): exact integer sums of the values and of their squares, so the figures
    are the whole set's to float64 precision, however the set is cut."""
    n, c = len(x), x.shape[1]
    per = max(1, chunk // max(1, c * x.shape[2] * x.shape[3]))  # images per chunk
    s1 = s2 = torch.zeros(c, dtype=torch.int64)
    for i in range(0, n, per):
        part = x[i:i + per].to(torch.int32)  # 255^2 fits; the sums are int64
        s1 = s1 + part.sum((0, 2, 3), dtype=torch.int64)
        s2 = s2 + part.square().sum((0, 2, 3), dtype=torch.int64)
    s1, s2 = s1.tolist(), s2.tolist()  # Python integers: s1^2 below is exact
    m = n * x.shape[2] * x.shape[3]  # values per channel
    mean = tuple(a / (255 * m) for a in s1)
    # unbiased variance (m - 1), as torch.std, from integers: (m s2 - s1^2) / (m (m - 1))
    std = tuple(((m * b - a * a) / (m * (m - 1))) ** 0.5 / 255 for a, b in zip(s1, s2))
    return mean, std


def available_host_memory():
    """Bytes of memory the host can still give (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_host_memory(nbytes, what, fix):
    """A one-line DataError, before reading, when `what` (`nbytes` in every process torchrun
    starts on this machine) would not fit in the host's available memory."""
    free, procs = available_host_memory(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if free is not None and nbytes * procs > free:
        raise data.DataError(f"{what} need {nbytes / 1e9:.1f} GB of host memory in each of "
                             f"{procs} process(es), {free / 1e9:.1f} GB is available; {fix}")


def jitter_batch(x, crop, scale_max):
    """§3.1 on in-memory device batches: the batch resized to S ~ U{crop..scale_max} (one S per
    batch), a random crop x crop window per image and a random mirror. The draws are the CPU
    generator's (the host reads them without a sync)."""
    n = x.shape[0]
    s = int(torch.randint(crop, scale_max + 1, ()).item())
    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    oy = torch.randint(0, s - crop + 1, (n,)).tolist()
    ox = torch.randint(0, s - crop + 1, (n,)).tolist()
    x = torch.stack([x[k, :, oy[k]:oy[k] + crop, ox[k]:ox[k] + crop] for k in range(n)])
    mirror = to_device(torch.rand(n) < 0.5, x.device)
    return torch.where(mirror[:, None, None, None], x.flip(3), x).contiguous()


def centre_crop(x, crop, scale):
    """The single-crop test: resized so the smallest side is `scale`, the centre crop x crop."""
    x = v2.functional.resize(x, [scale], antialias=True)
    return v2.functional.center_crop(x, [crop, crop])


def list_collate(batch):
    return [im for im, _ in batch], torch.tensor([y for _, y in batch])


def square_crop(image, boxes, side, u, flip):
    """§4.2's view of a training image at the largest training scale: resized (bilinear,
    antialiased) so that its smallest side is `side`, the side x side square at fraction u in
    [0, 1) of the free length of its longer side, mirrored if `flip`. The boxes (M, 4) follow,
    kept whole: a box that leaves the square is still the object's (the locations that see less
    than half of it are not trained, `in_view`). Returns (uint8 (3, side, side), (M, 4))."""
    H, W = image.shape[-2:]
    h, w = max(side, round(H * side / min(H, W))), max(side, round(W * side / min(H, W)))
    oy, ox = int(u * (h - side + 1)), int(u * (w - side + 1))
    image = v2.functional.resize(image, [h, w], antialias=True)[:, oy:oy + side, ox:ox + side]
    boxes = boxes * torch.tensor([w / W, h / H, w / W, h / H]) - torch.tensor([ox, oy, ox, oy])
    if flip:
        image, boxes = image.flip(-1), torch.stack([side - boxes[:, 2], boxes[:, 1],
                                                    side - boxes[:, 0], boxes[:, 3]], 1)
    return image.contiguous(), boxes


class BoxSquares(torch.utils.data.Dataset):
    """§4.2's ImageNet training set: sample i is read from its files when asked for (the image
    and box XML of `boxes`, a data.ImageNetBoxes without transforms: nothing decoded is kept)
    and cut by `square_crop` at `side`, with a random position and mirror from torch's
    generator (which data.Seeded seeds per sample and epoch: the same view with any worker)."""

    def __init__(self, boxes, side):
        self.boxes, self.side, self.classes = boxes, side, boxes.classes

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        image, target = self.boxes[i]
        u, flip = torch.rand(2).tolist()
        image, boxes = square_crop(image.as_subclass(torch.Tensor),
                                   target["boxes"].as_subclass(torch.Tensor).float(), self.side,
                                   u, flip < 0.5)
        return image, {"boxes": boxes, "labels": target["labels"]}


def localisation_set(split, args, train=False):
    """§4's images with their boxes, read a file at a time (never held whole). ImageNet:
    training, `BoxSquares` at the largest --loc-scales; test, every image at its own size.
    shapes-det: as rendered (64 x 64), training images mirrored at random with their boxes."""
    if args.data == "imagenet":
        ds = data.ImageNetBoxes(split, args.data_dir)
        if args.quick:  # a fixed small subset, as data.classification_dataset's
            keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:2000]
            ds.samples = [ds.samples[i] for i in keep.sort().values.tolist()]
        return BoxSquares(ds, max(args.loc_scales)) if train else ds
    flip = v2.RandomHorizontalFlip() if train else None
    return data.detection_dataset(args.data, split, args.data_dir, not args.no_download,
                                  transforms=flip, quick=args.quick, seed=0)


def largest(boxes):
    """The index of the largest of (M, 4) boxes: the localisation target (ILSVRC's one object)."""
    return int(torchvision.ops.box_area(boxes).argmax())


def localisation_collate(batch, stack=True):
    """(uint8 images: (N, 3, S, S), or with stack=False a list (ImageNet's test images, each of
    its own size); each image's target: its largest object's class (N,) and box (N, 4); and all
    its ground truths) of a localisation set's samples."""
    gts = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"]}
           for _, t in batch]
    big = [largest(g["boxes"]) for g in gts]
    images = [im.as_subclass(torch.Tensor) for im, _ in batch]
    return (torch.stack(images) if stack else images,
            torch.stack([g["labels"][j] for g, j in zip(gts, big)]),
            torch.stack([g["boxes"][j] for g, j in zip(gts, big)]), gts)


def images_collate(batch):
    """localisation_collate of images of different sizes: a list (ImageNet's test)."""
    return localisation_collate(batch, stack=False)


def localisation_statistics(train_set, args):
    """The training set's normalisation and its mean target box as a fraction of the image's
    width and height (evaluate_localisation's baseline, (4,)). shapes-det: read once into host
    memory (110 MB, rendered); ImageNet: its mean and std (a pass over 544,546 images would cost
    an epoch; see DEPARTURES) and the boxes from the XML files alone (no image decoded), each
    rank reading 1/world of them."""
    if args.data != "imagenet":
        x, scene, _, _, _ = scene_arrays("train", args)
        return channel_stats(x), torch.stack([t["boxes"][largest(t["boxes"])] for t in scene]
                                              ).mean(0) / x.shape[-1]
    rank, world = data.distributed_info()
    boxes = []
    for _, xml in getattr(train_set, "boxes", train_set).samples[rank::world]:
        a = data.parse_voc_xml(xml, train_set.classes)
        (w, h), b = a["size"], a["boxes"]
        if not len(b):
            raise data.DataError(f"{xml} holds no object box; fix or remove the file")
        boxes.append(b[largest(b)] / torch.tensor([w, h, w, h]))
    boxes = data.gather_shards(torch.stack(boxes) if boxes else torch.zeros(0, 4))
    return (data.IMAGENET_MEAN, data.IMAGENET_STD), boxes.mean(0)


def localisation_batch(x, y, box, scale, mean, std):
    """A training batch of S x S images (uint8, pinned by the loader) on the device (mean's),
    normalised there and resized to the batch's scale (§4.2: the regressor trains at "the same
    set of scales as described in Section 3"), the boxes following."""
    device, S = mean.device, x.shape[-1]
    x = normalise(x.to(device, non_blocking=True), mean, std)
    if scale != S:
        x = F.interpolate(x, size=(scale, scale), mode="bilinear", antialias=True)
    return x, y.to(device, non_blocking=True), box.to(device, non_blocking=True) * (scale / S)


# ---------------------------------------------------------------------------------------------
# Losses, training and evaluation

def regression_loss(model, x, y, boxes, args):
    """§4.2: the l2 loss between the regressor's box and the true one (`regression_targets`, in
    units of the training window) at every location of x's map whose field of view holds at
    least half of the box (`in_view`), features and classifier frozen (`regress=True`): half
    the mean squared error of the 4 edges over all the batch's locations, those not trained
    counting 0 (a mean over a fixed count, so that a batch split over ranks, whose gradients
    DDP averages, gives the same step as the whole; no host sync). x is at its scale already:
    localisation's batches at one of --loc-scales (`localisation_batch`), detection's windows
    at img-size."""
    stride = total_stride(unwrap(model))
    # through forward: under DDP the regressor's gradients are all-reduced
    t = model(x, regress=True).float()
    if t.shape[1] > 4:  # --class-specific: the 4 outputs of the object's class
        t = t.view(len(y), -1, 4, *t.shape[-2:])[torch.arange(len(y), device=y.device), y]
    h, w = t.shape[-2:]
    want = regression_targets(boxes, h, w, stride, args.img_size)
    keep = (in_view(boxes, h, w, stride, args.img_size) >= IN_VIEW).float()[:, None]
    return ((t - want).square() * keep).mean() / 2


def train_one_epoch(model, batches, optimizer, scaler, args, device, epoch, progress, phase):
    """phase 'classify': cross-entropy of the whole net. phase 'regress': `regression_loss`.
    `batches` yields (x, y, boxes) on the device: images, labels and the objects' boxes (None:
    classification). The loss stays there (Progress reads it once per line): no host sync."""
    model.train()
    for x, y, boxes in batches:
        with data.autocast(device, args.amp):
            if phase == "classify":
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), y)
            else:
                loss = regression_loss(model, x, y, boxes, args)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        progress.step(len(y) * args.world, loss, optimizer.param_groups[0]["lr"], epoch, n=len(y))
    return progress.epoch_loss()  # the losses read here, over every rank's samples


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes):
    """Single centre crop (single_crop_error) and §3.3's dense evaluation (dense_error, the
    test_error), both from the same (unwrapped) network; under torchrun each rank evaluates
    its share of the set and the outputs are gathered. The outputs stay on the device until the
    end (one copy to the CPU, not one per batch)."""
    model.eval()
    dense = DenseNet(model).eval()
    single, multi, targets = [], [], []
    for x, y in loader:  # the loader's batches: pinned on the host, or already on the device
        x = [im.to(device, non_blocking=True) for im in x] if isinstance(x, list) else \
            x.to(device, non_blocking=True)
        with data.autocast(device, args.amp):
            if isinstance(x, list):
                crops = torch.stack([centre_crop(im, args.img_size, args.crop_scale) for im in x])
            else:
                crops = centre_crop(x, args.img_size, args.crop_scale)
            single.append(model(crops).float().softmax(1))
            multi.append(dense_evaluate(dense, x, args.scales, flip=True))
        targets.append(y)  # where the loader left them
    y, p1, pd = (torch.cat(t).cpu() for t in (targets, single, multi))
    y, p1, pd = data.gather_shards(y, p1, pd)
    r = metrics.classification_report(pd, y, num_classes, views={"single_crop": p1})
    return {**r, "dense_error": r["test_error"]}


@torch.no_grad()
def evaluate_localisation(model, loader, args, mean, std, mean_box, num_classes):
    """§4, scored as ILSVRC scores it (metrics.localisation_error): the image's class is that of
    its target object (the largest shape on shapes-det, ILSVRC's one labelled class), its ground
    truth every box of that class; loc_error: the top class and its top merged box (top-1),
    loc_error_top5: five (class, box) guesses (the challenge's measure, Sermanet et al.'s 29.9 %).
    Also iou50_rate / mean_iou (the top box against the target box, class-agnostic), the VOC07
    mAP of all merged boxes over all objects, two baselines: the whole image, the mean training
    box (`mean_box`, fractions of the width and height); and the classification figures: the
    single centre crop and §3.3's dense evaluation (localise's own). `loader` yields this rank's
    share (rank r: r, r + W, ...) as host uint8 images (localisation_collate): a batch of
    squares (shapes-det), or a list of images of their own sizes (ImageNet), each then localised
    alone; each moved to the device (mean's) and normalised there. The outputs are gathered, so
    every rank scores the whole set, in each image's own pixels."""
    model.eval()
    dense, device, k = DenseNet(model).eval(), mean.device, min(5, num_classes)
    single, out, labels, targets, gts, sizes = [], [], [], [], [], []
    for x, y, box, gt in loader:
        for xb in ([im[None] for im in x] if isinstance(x, list) else [x]):
            xb = normalise(xb.to(device, non_blocking=True), mean, std)
            with data.autocast(device, args.amp):
                single.append(model(centre_crop(xb, args.img_size, args.crop_scale)).float()
                              .softmax(1))
                out += localise(model, dense, xb, args.scales, args.merge_threshold, k)
            sizes += [(xb.shape[-1], xb.shape[-2])] * len(xb)  # (W, H)
        labels.append(y), targets.append(box), gts.extend(gt)
    label0, box0, p1, out, gts, sizes = data.gather_shards(
        torch.cat(labels), torch.cat(targets), torch.cat(single).cpu(), out, gts,
        torch.tensor(sizes, dtype=torch.float32))
    test = metrics.classification_report(torch.stack([o["probs"] for o in out]), label0,
                                         num_classes, views={"single_crop": p1})
    dets = [{"boxes": o["boxes"], "scores": o["scores"],
             "labels": torch.full((len(o["boxes"]),), o["label"])} for o in out]
    guess_labels = torch.stack([o["guess_labels"] for o in out])
    guess_boxes = torch.stack([o["guess_boxes"] for o in out])
    gt_labels = [lab[None] for lab in label0]
    gt_boxes = [g["boxes"][g["labels"] == lab] for g, lab in zip(gts, label0)]
    box0, edges = box0.float(), sizes.repeat(1, 2)                     # (N, 4): W, H, W, H
    ious = paired_iou(guess_boxes[:, 0].float(), box0)
    whole = paired_iou(torch.cat([torch.zeros_like(sizes), sizes], 1), box0)
    mean_iou = paired_iou(mean_box[None].float() * edges, box0)
    dm = metrics.detection_map(dets, gts, num_classes)
    return {**test, "dense_error": test["test_error"],
            "iou50_rate": float((ious >= 0.5).float().mean()), "mean_iou": float(ious.mean()),
            "loc_error": metrics.localisation_error(guess_labels, guess_boxes, gt_labels,
                                                    gt_boxes, k=1),
            "loc_error_top5": metrics.localisation_error(guess_labels, guess_boxes, gt_labels,
                                                         gt_boxes, k=k),
            "map": dm["map"],
            "baseline_whole_image_iou50": float((whole >= 0.5).float().mean()),
            "baseline_mean_box_iou50": float((mean_iou >= 0.5).float().mean())}


# ---------------------------------------------------------------------------------------------
# The three tasks: each reads its data and gives main() its training batches and its test

# What main() needs of a task: the data set's `classes` and `info` (in_channels, the
# normalisation's mean and std, sizes (train, val, test), and in "saved" any other training-set
# figure the test needs, kept in the checkpoint); the network's head: `outputs` (C, or
# C + 1 with detection's background class) and `regressor` (§4's box head, trained after the
# --epochs of classification for --loc-epochs); `steps` per epoch; `batches(epoch, model)`, the
# epoch's training batches (x, y, boxes) (the model scores detection's hard negatives); and
# `evaluate(model)`, the test's figures, of which results.json keeps `keys`. Under --eval-only
# a task reads its test split alone: the training set's statistics come from `saved`, the
# checkpoint's state (None without one: then the training images are read for them only).
Task = collections.namedtuple("Task", "classes info outputs regressor steps batches evaluate keys")


def saved_normalisation(saved):
    """The (mean, std) a checkpoint's training set was normalised with, or None (no checkpoint,
    a bare state_dict, one written before the checkpoints held it)."""
    norm = (saved or {}).get("normalisation")  # (mean, std); a dict in older checkpoints
    return (norm["mean"], norm["std"]) if isinstance(norm, dict) else \
        tuple(norm) if norm is not None else None


class EpochBatches:
    """An epoch's batches from a generator, with their number: a loader as far as
    data.dry_run_batches (which cuts it to 2 batches under --dry-run) and the training loop go."""

    def __init__(self, steps, batches):
        self.steps, self.batches = steps, batches

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter(self.batches)


def imagenet_train_transform(size):
    """§3.1: the image downsampled so that its smallest side is 256, random size x size crops
    (221 or 231) and their horizontal flips, ImageNet mean/std."""
    return v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.RandomCrop(size),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       data.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def classification_task(args, device, rank, saved=None):
    """§3 on ImageNet: DataLoaders with §3.1's 256 resize, random crops and mirrors; whole
    normalised images for the dense test. In-memory sets: on the device, jittered by
    jitter_batch. The test: the single centre crop and §3.3's dense evaluation. --eval-only:
    no training loader (None)."""
    if args.data == "imagenet":
        bs = args.batch_size // args.world
        test_set = data.classification_dataset("imagenet", "test", args.data_dir, quick=args.quick,
                                               transform=data.normalised())
        test_loader = data.make_loader(test_set, 16, False, args.workers, device,
                                       collate_fn=list_collate, gpu_decode=args.gpu_decode)
        train_set, train_loader = [], None  # --eval-only: DIR/imagenet/train need not exist
        if not args.eval_only:
            train_set = data.classification_dataset(
                "imagenet", "train", args.data_dir, quick=args.quick,
                transform=imagenet_train_transform(args.img_size))
            train_loader = data.make_loader(train_set, bs, True, args.workers, device,
                                            seed=args.seed, gpu_decode=args.gpu_decode)
        classes = getattr(test_set, "names", None) or test_set.dataset.names
        info = {"in_channels": 3, "mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD,
                "image_size": args.img_size, "sizes": (len(train_set), 0, len(test_set))}
    else:
        train_loader, _, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir, not args.no_download,
            args.quick, args.seed, augment=False, eval_batch_size=TEST_BATCH,
            train_split=data.train_split(args), limit=args.limit, test_only=args.eval_only,
            stats=saved_normalisation(saved), gpu_decode=args.gpu_decode)
        classes = info["classes"]
    train, test_loader = data.dry_run_batches(args, train_loader, test_loader)

    def batches(epoch, model):  # ImageNet's: pinned by the loader; the others: on the device
        data.set_epoch(train_loader, epoch)  # the loader itself: `train` may be dry_run's wrapper
        return EpochBatches(len(train), (
            (jitter_batch(x, args.img_size, args.crop_scale) if args.data != "imagenet" else
             x.to(device, non_blocking=True), y.to(device, non_blocking=True), None)
            for x, y in train))

    return Task(classes, info, len(classes), False, 0 if train is None else len(train), batches,
                lambda model: evaluate(model, test_loader, args, device, len(classes)),
                ["test_error", "test_accuracy", "balanced_error", "single_crop_error",
                 "dense_error", "top5_error", "single_crop_top5_error"])


def localisation_task(args, device, rank, saved=None):
    """§4 on shapes-det or the ImageNet boxes: images read a batch at a time by DataLoaders
    (uint8, pinned on CUDA; each rank its share of every global batch, as data.make_loader
    shards it), moved and normalised on the device, each training batch resized there to one of
    --loc-scales (a draw per step from a (seed, epoch) generator: every rank and a resumed run
    draw the same). ImageNet trains on `BoxSquares`, tests on every image at its own size. The
    test: the classification figures and §4's localisation ones (with the baseline of the mean
    training box, kept in the checkpoint for --eval-only). Nothing is held whole, on the host or
    the device: ImageNet's 544,546 boxed training images are 347 GB as 461 x 461 uint8."""
    imagenet = args.data == "imagenet"
    test_set = localisation_set("test", args)
    classes = tuple(test_set.classes)
    test_loader = data.make_loader(test_set, LOC_TEST_BATCH, False, args.workers, device,
                                   collate_fn=images_collate if imagenet else
                                   localisation_collate)
    norm, mean_box = saved_normalisation(saved), (saved or {}).get("mean_box_fraction")
    train_set, train_loader = [], None
    if not (args.eval_only and norm is not None and mean_box is not None):
        train_set = localisation_set("train", args, train=True)
        (mean, std), mean_box = localisation_statistics(train_set, args)
    else:  # the test split alone
        mean, std = norm
    if not args.eval_only:
        train_loader = data.make_loader(train_set, args.batch_size // args.world, True,
                                        args.workers, device, collate_fn=localisation_collate,
                                        seed=args.seed)
    train, test_loader = data.dry_run_batches(args, train_loader, test_loader)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    info = {"in_channels": 3, "mean": mean, "std": std,
            "image_size": max(args.loc_scales) if imagenet else 64,
            "sizes": (0 if args.eval_only else len(train_set), 0, len(test_set)),
            "saved": {"mean_box_fraction": mean_box.cpu()}}

    def batches(epoch, model):
        data.set_epoch(train_loader, epoch)
        g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        pick = torch.randint(len(args.loc_scales), (len(train),), generator=g).tolist()
        # the classification epochs (shapes-det) at the classifier's own input, --img-size
        scales = [args.loc_scales[i] if epoch >= args.epochs else args.img_size for i in pick]
        return EpochBatches(len(train), (
            localisation_batch(x, y, box, s, mean_t, std_t)
            for s, (x, y, box, _) in zip(scales, train)))

    return Task(classes, info, len(classes), True,
                0 if train is None else len(train), batches,
                lambda model: evaluate_localisation(model, test_loader, args, mean_t, std_t,
                                                    mean_box.cpu(), len(classes)),
                ["test_error", "test_accuracy", "single_crop_error", "dense_error", "map",
                 "iou50_rate", "mean_iou", "loc_error", "loc_error_top5",
                 "baseline_whole_image_iou50", "baseline_mean_box_iou50"])


def detection_task(args, device, rank, saved=None):
    """§5 on shapes-det or VOC: the scenes in host memory as uint8 (for training, those with
    objects, whole on every rank: each step draws the global batch's windows from any scene;
    for the test, this rank's share alone), a batch at a time to the device. The training
    windows are cut from them by window_batches: a positive and a random or hard negative per
    scene in the classification epochs, the positives alone for the regressor. The test: VOC07
    AP of `detect` over every object of every test scene."""
    first = data.DRY_RUN_STEPS * DET_TEST_BATCH if args.dry_run else None  # per rank
    x_te, _, gts_te, sizes_te, test_set = scene_arrays("test", args, share=True, first=first)
    classes = tuple(test_set.classes)
    norm = saved_normalisation(saved)
    if args.eval_only and norm is not None:  # the test split alone
        (mean, std), x_tr, scene_tr = norm, None, []
    else:
        x_tr, scene_tr, _, _, _ = scene_arrays("train", args, objects_only=True)
        mean, std = channel_stats(x_tr)
        if args.eval_only:  # read for the statistics alone: not kept
            x_tr, scene_tr = None, []
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    args.num_classes = len(classes)
    info = {"in_channels": 3, "mean": mean, "std": std, "image_size": x_te.shape[-1],
            "sizes": (len(scene_tr), 0, len(test_set))}
    steps = len(scene_tr) // (args.batch_size // 2)

    def batches(epoch, model):  # the regressor learns from the positive windows only
        return data.dry_run_batches(args, EpochBatches(steps, window_batches(
            x_tr, scene_tr, args.batch_size, args.seed, epoch, mean_t, std_t, args, model, rank,
            args.world, positives_only=epoch >= args.epochs)))

    return Task(classes, info, len(classes) + 1, True, len(batches(0, None)) if steps else 0,
                batches, lambda model: evaluate_detection(model, x_te, gts_te, sizes_te, classes,
                                                          args, mean_t, std_t)[0],
                ["map", "detections_per_image", "ap"])


TASKS = {"classification": classification_task, "localisation": localisation_task,
         "detection": detection_task}
# --eval-every: the figures of each task's test kept in the history (as test_*) for the curves
CURVES = {"classification": ("test_error", "top5_error"),
          "localisation": ("test_error", "loc_error", "loc_error_top5"), "detection": ("map",)}


# ---------------------------------------------------------------------------------------------
# Command line

def run_name(args):
    """--out's default name: ImageNet localisation's runs/overfeat-localisation-imagenet, beside
    (not over) the classification run whose checkpoint it starts from; else the script's."""
    return "overfeat-localisation" if args.data == "imagenet" and \
        args.task == "localisation" else None


def arch_name(args):
    return f"overfeat-{args.variant}" + ("" if args.width == 1.0 else f"-w{args.width:g}") + \
        ("" if args.img_size == INPUT[args.variant] else f"-{args.img_size}") + \
        ("-det" if args.task == "detection" else "") + \
        ("-cs" if getattr(args, "class_specific", False) else "")


def get_args_parser():
    p = data.ArgumentParser(description="OverFeat (Sermanet et al. 2013): classification with "
                                "dense multi-scale evaluation, localisation by box regression "
                                "with greedy merging and detection with a background class, on "
                                "ImageNet, VOC, CIFAR, MNIST or the shapes sets.")
    data.add_data_args(p, "imagenet", "imagenet | cifar10 | cifar100 | cifar10-jpg | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32) (classification) | shapes-det "
                       "(localisation or detection) | voc (detection)")
    data.add_holdout_arg(p)
    data.add_limit_arg(p)
    p.add_argument("--variant", default="fast", choices=["fast", "accurate", "alexnet"],
                   help="Table 1's fast or Table 3's accurate net, or torchvision's AlexNet")
    p.add_argument("--width", type=float, default=None,
                   help="channel and FC-size multiplier (default: 1 = the paper; 0.125 with "
                   "--quick)")
    p.add_argument("--img-size", type=int, default=None,
                   help="training crop / fc window input (default: 231 fast, 221 accurate, 224 "
                   "alexnet; small sets: 103, 113, 63, upsampled on the device)")
    p.add_argument("--scales", type=int, nargs="+", default=None,
                   help="dense-evaluation scales, smallest side (default on ImageNet: the "
                   "variant's Table 2 row, fast 245 281 317 389 425 461 (Table 5's 1-6), "
                   "accurate and localisation 245 281 389 461 (1, 2, 4, 6); small sets: "
                   "img-size x 1, 1.25, 1.5)")
    p.add_argument("--init", default=None, choices=["paper", "kaiming"],
                   help="N(0, 1e-2) (§3.1) or He init (default: paper on ImageNet, else kaiming)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"classification epochs (default: {EPOCHS})")
    p.add_argument("--loc-epochs", type=int, default=None,
                   help=f"§4.2's regressor epochs: after --epochs of classification on "
                   f"shapes-det; on ImageNet alone, on the frozen network of --weights (a "
                   f"classification checkpoint) (default: {LOC_EPOCHS})")
    p.add_argument("--loc-scales", type=int, nargs="+", default=None,
                   help="§4.2: the scales the regressor trains at, smallest side, one per "
                   "step (default on ImageNet: Table 5's 6, 245 ... 461; elsewhere --scales)")
    p.add_argument("--task", default=None,
                   choices=["classification", "localisation", "detection"],
                   help="default: classification on classification sets, localisation (§4) on "
                   "shapes-det, detection (§5) on voc; --task detection on shapes-det")
    p.add_argument("--negatives", default="hard", choices=["random", "hard"],
                   help="detection's background windows: random, or the most offending of "
                   f"{CANDIDATES} random ones per scene (§5; default: hard)")
    p.add_argument("--class-specific", action="store_true",
                   help="one box regressor per class (§4.2's 1000 versions; default: one for "
                   "all, §4.6's single-class regression, which did better)")
    p.add_argument("--det-scales", type=int, nargs="+", default=None,
                   help="detection test scales, the scene's side in pixels (default: img-size x "
                   "1, 1.41, 2, 2.83, 4)")
    p.add_argument("--nms-iou", type=float, default=0.3,
                   help="detection: per-class NMS IoU threshold (default 0.3)")
    data.add_classify_arg(p, needs="--weights of a classification run, or --pretrained for "
                          "torchvision's AlexNet")
    p.add_argument("--detect", default=None, metavar="PATH",
                   help="an image or a folder of them: the detections of --weights (a --task "
                   "detection checkpoint), printed and drawn into --out (OUT/<stem>_detections"
                   ".png) with predictions.json/.csv")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="the score threshold for drawing detections (--detect): the smallest "
                   "class posterior drawn (default 0.5)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout after the hidden FC layers (default: 0.5, §3.1; 0 with --quick "
                   "localisation on shapes-det)")
    p.add_argument("--merge-threshold", type=float, default=0.5,
                   help="§4.3: stop merging when the best match score exceeds this (default 0.5)")
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(LR_STEPS),
                   help="epochs after which the lr is halved (default: 30 50 60 70 80)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: {BATCH_SIZE}, §3.1)")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default: 5e-2, §3.1; 1e-2 on the small sets)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default: 0.6, §3.1; 0.9 on the small sets)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="(default: 1e-5, §3.1)")
    data.add_runtime_args(p, data.quick_help(QUICK) + "; localisation on shapes-det: "
                          "--epochs 20 --dropout 0", workers=data.MACHINE,
                          pretrained_help="torchvision's AlexNet ImageNet weights (needs "
                          "--variant alexnet)")
    return p


def choose_task(args):
    """--task: its default for --data (classification on classification sets, localisation on
    shapes-det, detection on voc), and the checks that it fits the data set."""
    task = data.task_of(args.data)
    if task == "segmentation":
        raise data.DataError(f"'{args.data}' is a {task} data set; overfeat.py needs "
                             f"classification data, shapes-det or voc")
    if args.task is None:
        args.task = "classification" if task == "classification" else \
            ("localisation" if args.data == "shapes-det" else "detection")
    if not ((args.task == "classification" and task == "classification") or
            (args.task == "localisation" and args.data in ("shapes-det", "imagenet")) or
            (args.task == "detection" and task == "detection")):
        raise data.DataError(f"--task {args.task} does not fit --data {args.data}: "
                             f"classification on classification sets, localisation on "
                             f"shapes-det or imagenet, detection on shapes-det or voc")
    if (args.holdout or args.limit) and args.task != "classification":
        raise data.DataError(f"--holdout and --limit apply to classification; {args.task} "
                             f"trains on the training split and tests on the test split")
    if args.gpu_decode and args.task != "classification":
        raise data.DataError(f"--gpu-decode applies to classification; {args.task} decodes its "
                             f"images once, into memory, on the CPU")
    data.train_split(args)  # ImageNet has no held-out split here
    if args.task == "localisation" and args.data == "imagenet" and not args.eval_only and \
            not (args.weights or args.resume or args.pretrained):
        raise data.DataError("ImageNet localisation (§4.2) trains the regressor on the frozen "
                             "network of a classification run: run `overfeat.py --data "
                             "imagenet` (§3) first and pass its checkpoint with --weights "
                             "(e.g. runs/overfeat-imagenet/checkpoint.pt)")


def resolve_defaults(args):
    imagenet = args.data == "imagenet"
    big = args.data in ("imagenet", "voc")  # the paper's input sizes
    localisation = getattr(args, "task", None) == "localisation"
    if imagenet and localisation:  # §4.2: the regressor alone, on --weights' frozen network
        if args.epochs and not args.eval_only:
            raise data.DataError(f"--epochs {args.epochs}: ImageNet localisation trains no "
                                 f"classifier (§4.2: the --weights classification run's "
                                 f"features and classifier stay frozen); drop --epochs, the "
                                 f"regressor trains for --loc-epochs")
        args.epochs = 0
    data.apply_quick(args, QUICK_LOC if localisation and not imagenet else QUICK)
    args.dropout = 0.5 if args.dropout is None else args.dropout
    if not 0 <= args.dropout < 1:
        raise data.DataError(f"--dropout {args.dropout:g} is a probability: give one in [0, 1)")
    args.width = args.width or 1.0
    args.epochs = EPOCHS if args.epochs is None else args.epochs  # 0: regression only
    args.batch_size = args.batch_size or BATCH_SIZE
    args.loc_epochs = args.loc_epochs if args.loc_epochs is not None else LOC_EPOCHS
    args.img_size = args.img_size or (INPUT if big else SMALL_INPUT)[args.variant]
    args.init = args.init or ("paper" if imagenet else "kaiming")
    # §3.1's lr 5e-2 diverges with He init on the small sets; momentum 0.6 barely moves them
    args.lr = args.lr if args.lr is not None else (5e-2 if imagenet else 1e-2)
    args.momentum = args.momentum if args.momentum is not None else (0.6 if imagenet else 0.9)
    if imagenet:  # Table 2's row of the variant (localisation: §4.6's 4 scales)
        which = TEST_SCALES["localisation" if args.task == "localisation" else args.variant]
        args.scales = args.scales or [SCALES[i - 1] for i in which]
        args.crop_scale = 256
    else:
        args.scales = args.scales or [args.img_size, round(1.25 * args.img_size),
                                      round(1.5 * args.img_size)]
        args.crop_scale = round(args.img_size * 256 / INPUT[args.variant])
    if getattr(args, "task", None) == "detection" and not args.det_scales:
        args.det_scales = [round(args.img_size * f) for f in DET_SCALES]
    if localisation and not args.loc_scales:  # §4.2: "the same set of scales as ... §3"
        args.loc_scales = list(SCALES) if imagenet else list(args.scales)
    for flag, scales in (("--scales", args.scales), ("--loc-scales", args.loc_scales)):
        if scales and min(scales) < args.img_size:
            raise data.DataError(f"{flag} must be >= --img-size {args.img_size} (the fc window "
                                 f"needs a whole training window), got {min(scales)}")


def detect_command(args, state):
    """--detect PATH (an image or a folder): the detection net of a --task detection checkpoint
    (--weights) over each image, as at test time (the image resized to the training scenes'
    square, the checkpoint's scales, NMS); the boxes scoring >= --score-threshold printed one
    per line in the image's pixels and drawn into OUT/<stem>_detections.png, all of them in
    OUT/predictions.json/.csv. Returns the rows."""
    if not args.weights:
        raise data.DataError("--detect needs --weights, a checkpoint of a --task detection run")
    train = state.get("args", {})
    if train.get("task") != "detection" or "normalisation" not in state:
        raise data.DataError(f"{args.weights} is not a checkpoint of overfeat.py --task "
                             f"detection; train one first (--data shapes-det --task detection)")
    classes = state["classes"]
    device = data.setup(args, "overfeat.py", pretrained_is_the_model=False)[0]
    model = overfeat(train["variant"], len(classes) + 1, 3, train["width"], train["img_size"],
                     regressor=True, box_classes=len(classes) if train["class_specific"] else 1)
    data.load_weights(model, state, args.weights)
    model.to(device).eval()
    dense = DenseNet(model).eval()
    S = 64 if train["data"] == "shapes-det" else 2 * train["img_size"]
    mean, std = (torch.tensor(v, device=device)[:, None, None]
                 for v in saved_normalisation(state))

    @torch.no_grad()
    def one(path, picture):
        image = data.load_image(path, mine=True)
        H, W = image.shape[-2:]
        x = v2.functional.resize(image.as_subclass(torch.Tensor), [S, S], antialias=True)
        x = (x.float()[None].to(device) / 255 - mean) / std
        d = detect(model, dense, x, train["det_scales"], len(classes),
                   nms_iou=train["nms_iou"])[0]
        keep = d["scores"] >= args.score_threshold
        boxes = d["boxes"][keep].cpu() * torch.tensor([W / S, H / S, W / S, H / S])
        scores, labels = d["scores"][keep].cpu(), d["labels"][keep].cpu()
        print(f"{path}: {len(scores)} detection(s)")
        for c, p, b in zip(labels.tolist(), scores.tolist(), boxes.tolist()):
            print(f"  {classes[c]} {p:.2f} box {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}")
        metrics.draw_detections(image, boxes, labels, scores, classes, picture)
        return [{"class": classes[c], "score": p, "xmin": b[0], "ymin": b[1], "xmax": b[2],
                 "ymax": b[3]} for c, p, b in zip(labels.tolist(), scores.tolist(),
                                                  boxes.tolist())]
    rows = data.predict_images(args.detect, one, args.out, "detections")
    metrics.write_predictions(args.out, rows)
    return rows


def classify_command(args, state, device):
    """--classify PATH: the user's images through a classification checkpoint's network
    (--weights) or torchvision's AlexNet (--pretrained), as the single centre crop of the test
    (`centre_crop`; small sets' images upsampled to --img-size as in training); no data set
    read."""
    if args.task != "classification":
        raise data.DataError(f"--classify needs a classification network; {args.weights} is "
                             f"a --task {args.task} checkpoint (use --detect for detection)")
    if args.weights:
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
    else:  # --pretrained: torchvision's whole ImageNet AlexNet, its classes and input
        classes, (mean, std), shape = (data.imagenet_class_names(),
                                       (data.IMAGENET_MEAN, data.IMAGENET_STD), (3, 224))
    imagenet = args.data == "imagenet"
    model = overfeat(args.variant, len(classes), shape[0], args.width, args.img_size)
    if args.pretrained:
        load_pretrained(model, args.width)
    else:
        data.load_weights(model, state, args.weights)
    model.to(device).eval()

    def forward(x):  # ImageNet: test_input made the centre crop already (resize 256, crop)
        x = x.to(device)
        return model(x if imagenet else centre_crop(x, args.img_size, args.crop_scale))
    return data.classify_images(args.classify, args.out, forward, classes, mean, std, shape,
                                imagenet=imagenet)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # a localisation run takes the network of a classification checkpoint (--weights), so its
    # --task and --class-specific differ from that checkpoint's
    loc = args.task == "localisation"
    state = data.adopt_checkpoint(args, "overfeat.py", ("variant", "width", "img_size", "task",
                                                        "class_specific"),
                                  may_differ=("scales", "det_scales", "merge_threshold") +
                                  (("task", "class_specific") if loc else ()),
                                  name=run_name(args))
    data.check_positive(args, "batch_size", "lr", "width", "img_size")
    if min(args.epochs or 0, args.loc_epochs or 0) < 0:  # 0 is allowed: regressor on fixed features
        raise data.DataError("--epochs and --loc-epochs must be >= 0")
    t0 = time.time()
    if args.detect:
        return detect_command(args, state)
    choose_task(args)
    resolve_defaults(args)
    stages = args.epochs, args.loc_epochs
    arch, start, wstate = arch_name(args), None, None
    if args.weights and args.task == "localisation":  # what --weights is, before data is read
        wstate = data.load_checkpoint(args.weights) if args.resume else state
        start = localisation_start(wstate, args.weights, arch)
        if args.eval_only and start == "classification":
            raise data.DataError(f"{args.weights} is a classification checkpoint: its regressor "
                                 f"is untrained; train it first (--task localisation --weights "
                                 f"{args.weights}), then --eval-only with that run's checkpoint")
    device, rank, world, is_main = data.setup(args, "overfeat.py", name=run_name(args))
    if args.classify:
        return classify_command(args, state, device)
    if args.dry_run:  # one epoch per stage; a stage that is off (0 epochs) stays off
        args.epochs, args.loc_epochs = (min(e, 1) for e in stages)
    detection = args.task == "detection"
    if args.batch_size <= 0 or args.batch_size % (args.world * (2 if detection else 1)):
        raise data.DataError(f"--batch-size {args.batch_size} must be a positive multiple of "
                             f"the {args.world} processes" + (" x 2 (a positive and a negative "
                             "window per scene)" if detection else ""))

    # Data: the task's training batches and its test (classification_task, localisation_task,
    # detection_task); --eval-only: the test alone, the training set's statistics from --weights
    task = TASKS[args.task](args, device, rank, state if args.eval_only else None)
    classes, info = task.classes, task.info
    n_train, n_val, n_test = info["sizes"]

    model = overfeat(args.variant, task.outputs, info["in_channels"], args.width, args.img_size,
                     regressor=task.regressor, dropout=args.dropout,
                     box_classes=len(classes) if args.class_specific else 1)
    init_weights(model, args.init)
    model.to(device)
    if args.pretrained:
        load_pretrained(model, args.width)
    fresh = []
    if start is not None and not args.eval_only:  # §4.2: the classification run's network
        fresh = load_classifier(model, wstate, args.weights, start)
    elif args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    # §4.2: "we fix the feature extraction layers (1-5) from the classification network" (and
    # its classifier): without classification epochs in this run, the regressor alone trains
    frozen = task.regressor and args.epochs == 0
    for p in (list(model.features.parameters()) + list(model.classifier.parameters())
              if frozen else []):
        p.requires_grad_(False)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # §3.1: momentum 0.6, l2 weight decay 1e-5. One optimizer for both phases: the parameters
    # without a gradient in a phase (set_to_none) are skipped by SGD, so they stay frozen.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda e: lr_factor(e, args.lr_steps))
    scaler = data.grad_scaler(device, args.amp)
    normalisation = {"mean": info["mean"], "std": info["std"]}
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "arch": arch, "parameters": count_parameters(model),
              "normalisation": normalisation, "departures": DEPARTURES}
    if is_main:
        print(f"overfeat.py: {arch} on {args.data} ({n_train} train / {n_val} val / {n_test} "
              f"test) at {args.img_size}, dense scales "
              f"{args.det_scales if detection else args.scales}, "
              f"{config['parameters']:,} parameters, device {device}, {args.world} process(es)")
        for d in DEPARTURES:
            print(f"  departure from the paper: {d}")
        if frozen:
            print(f"§4.2: the regressor ({'fresh' if fresh else 'from --weights'}) trains at "
                  f"scales {args.loc_scales} on the frozen features and classifier of "
                  f"{args.weights or ('torchvision AlexNet' if args.pretrained else 'init')}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    # With a regressor trained after classification, each phase leaves the other head unused
    # on every rank: DDP must look for unused parameters (their gradients stay None, so SGD
    # leaves them frozen). The regressor alone (frozen): every trainable parameter is used.
    net = data.wrap(model, args, find_unused_parameters=task.regressor and not frozen)

    # Training: --epochs of classification, then (with a regressor) --loc-epochs of regression
    total_epochs = args.epochs + (args.loc_epochs if task.regressor else 0)
    if not args.eval_only:
        progress = metrics.Progress(task.steps, total_epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, total_epochs):
            phase = "classify" if epoch < args.epochs else "regress"
            loss = train_one_epoch(net, task.batches(epoch, model), optimizer, scaler, args,
                                   device, epoch, progress, phase)
            scheduler.step()
            row = {"epoch": epoch + 1, "phase": phase, "train_loss": loss,
                   "lr": optimizer.param_groups[0]["lr"]}
            # --eval-every: the task's final test after a due epoch of either phase (so the
            # classify epochs' box figures are those of the regressor not yet trained)
            if data.eval_due(args, epoch):
                t = task.evaluate(model)
                row.update({"test_" + k.removeprefix("test_"): t[k] for k in CURVES[args.task]
                            if k in t})
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{total_epochs} ({phase}) train_loss {loss:.4f}" +
                      "".join(f" {k} {100 * v:.2f}%" for k, v in row.items()
                              if k.startswith("test_")))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history,
                                     **data.test_settings({**info, "classes": classes}),
                                     **info.get("saved", {}))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    # Test, with the unwrapped model
    test = task.evaluate(model)
    if is_main:
        if "ap" in test:
            print("AP per class: " + ", ".join(f"{c} {100 * a:.1f}%"
                                               for c, a in test["ap"].items()))
        print(" ".join(f"{k} {100 * test[k]:.2f}%" for k in task.keys
                       if k in test and k not in ("ap", "detections_per_image")) +
              f" on {test['samples']} test images")
    # the per-class records: errors and confusion (classification), PR curves (detection)
    records = metrics.class_records(test, classes) if args.task == "classification" else \
        test.get("records", {})
    return metrics.write_results(
        os.path.join(args.out, "results.json"), "overfeat.py", args.data,
        {k: test[k] for k in task.keys if k in test}, paper=paper_record(args), config=config,
        device=str(device), seconds=time.time() - t0, history=history,
        **records) if is_main else None


if __name__ == "__main__":
    data.run_main(main, "overfeat.py")
