"""VGG: K. Simonyan, A. Zisserman, "Very deep convolutional networks for large-scale image
recognition", ICLR 2015, arXiv:1409.1556. Every configuration of Table 1 (--config A, A-LRN, B, C,
D, E); E, VGG-19, is the default.

    python vgg19.py --data imagenet                            # E, §3.1 recipe, §3.2 dense test
    python vgg19.py --data imagenet --config D                 # VGG-16 (A-E: Table 1's columns)
    python vgg19.py --data imagenet --bn                       # torchvision's vgg19_bn layout
    python vgg19.py --data imagenet --pretrained --eval-only   # torchvision's weights, dense test
    python vgg19.py --data imagenet --config A --out runs/vgg-a          # §3.1: net A first ...
    python vgg19.py --data imagenet --config D --init-from-a runs/vgg-a/checkpoint.pt  # ... then D
    python vgg19.py --data shapes --quick                      # offline, under a minute on a CPU
    torchrun --nproc_per_node=2 vgg19.py --data imagenet       # data-parallel, same global batch

Paper (ILSVRC-2012 val, E trained with scale jittering S in [256, 512]): top-1 / top-5 error
25.5 / 8.0 % single-scale test Q = 384 (Table 3), 24.8 / 7.5 % multi-scale dense test
Q in {256, 384, 512} (Table 4), 24.4 / 7.1 % dense + multi-crop (Table 5). 144M parameters
(Table 2; torchvision's vgg19: 143,667,240). The other configurations' figures are in
PAPER_CONFIGS (A, A-LRN and B were trained at S = 256 only: Table 3's single-scale figures).
Ours: see the README's results table (the command and hardware of every figure are there).

Model (Table 1): conv 3x3 / stride 1 / pad 1 layers in five groups, a 2x2/2 max-pool after each,
then FC 4096 - 4096 - classes, ReLU everywhere, dropout 0.5 after fc6 and fc7. E: 64x2, 128x2,
256x4, 512x4, 512x4 (16 conv layers); D (VGG-16): 64x2, 128x2, 256x3, 512x3, 512x3; C: D with its
third conv of groups 3-5 a 1x1 (conv1-256, conv1-512, conv1-512); B: 64x2, 128x2, 256x2, 512x2,
512x2; A: 64, 128, 256x2, 512x2, 512x2; A-LRN: A with §2.1's LRN after conv1. Module indices are
torchvision's (features.N, avgpool = AdaptiveAvgPool2d(7), classifier.N), so torchvision's
vgg11 / vgg13 / vgg16 / vgg19 (A, B, D, E; _bn with --bn) state_dicts load strictly.

Recipe (§3.1): SGD, momentum 0.9, batch 256, weight decay 5e-4, lr 0.01 divided by 10 when the
validation accuracy stops improving (three times, 74 epochs). Scale jittering: the smallest side
of each training image is rescaled to S ~ U[256, 512], then a random 224 crop, a random mirror and
AlexNet's PCA colour shift. Net A was trained from random weights; the deeper nets took their
first four conv layers and their three FC layers from the trained A (--init-from-a), the rest
random; §3.1 adds that Glorot & Bengio's random init (--init glorot) works without A. Test
(§3.2): fc6/fc7/fc8 become 7x7/1x1/1x1 convolutions (`fully_convolutional`), applied to the
whole image rescaled to Q; the class score map is spatially averaged, soft-maxed, and the
posteriors averaged over Q and the mirror image (`dense_evaluate`).
Departures are listed in DEPARTURES and printed at start.
"""
import copy
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

PAPER = {"reference": "Simonyan & Zisserman 2014, arXiv:1409.1556, Tables 2-5", "data": "imagenet",
         "test_error": 0.248, "top5_error": 0.075,              # Table 4: E, multi-scale dense
         "single_scale_error": 0.255, "single_scale_top5_error": 0.080,   # Table 3: E, Q = 384
         "dense_multicrop_error": 0.244, "dense_multicrop_top5_error": 0.071,  # Table 5
         "parameters": 144e6}                                   # Table 2: "144" million for E
TORCHVISION_PARAMETERS = 143_667_240
# Table 1's columns: an int is a conv3-N (3x3, pad 1), (N, 1) a conv1-N (1x1, C's third layer of
# groups 3-5), "LRN" §2.1's local response normalisation (A-LRN), "M" a 2x2/2 max-pool.
CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]      # Table 1, column E
CFGS = {"A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
              512, 512, (512, 1), "M"],
        "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
        "E": CFG_E}
CONFIGS = tuple(CFGS)
# weight layers: the convs and the three FC layers (Table 1's "11 weight layers" ... "19")
DEPTH = {c: sum(not isinstance(v, str) for v in cfg) + 3 for c, cfg in CFGS.items()}
# torchvision's builders of the same layouts (features.N, classifier.N), with ImageNet weights
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
# §2.1: "the parameters for the LRN layer are those of (Krizhevsky et al., 2012)": n = 5,
# alpha = 1e-4, beta = 0.75, k = 2, in PyTorch's alpha / n convention (see DEPARTURES).
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# The layers of net A that §3.1 copies into the deeper nets, by the paper's layer names (convG_L:
# group G, layer L; Caffe copies by name): "the first four convolutional layers and the last three
# fully-connected layers"; A's conv1_1, conv2_1, conv3_1, conv3_2 have the same shapes there.
FROM_A = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
# The other configurations' figures, ILSVRC-2012 val: C and D trained with S in [256, 512] as E
# (Table 4: multi-scale dense Q in {256, 384, 512}; Table 3: single scale Q = 384; Table 5:
# dense + multi-crop). A, A-LRN and B were trained at S = 256 only: Table 3's single-scale
# Q = 256 figures, and no multi-scale one (a run of ours with the default jitter has no
# paper figure to meet; --scale-min 256 --scale-max 256 is their protocol).
_TABLE_3 = {"reference": "Simonyan & Zisserman 2014, arXiv:1409.1556, Tables 2-3 (S = Q = 256)",
            "data": "imagenet"}
_TABLE_4 = {"reference": "Simonyan & Zisserman 2014, arXiv:1409.1556, Tables 2-5",
            "data": "imagenet"}
PAPER_CONFIGS = {
    "A": {**_TABLE_3, "single_scale_error": 0.296, "single_scale_top5_error": 0.104,
          "parameters": 133e6},
    "A-LRN": {**_TABLE_3, "single_scale_error": 0.297, "single_scale_top5_error": 0.105,
              "parameters": 133e6},
    "B": {**_TABLE_3, "single_scale_error": 0.287, "single_scale_top5_error": 0.099,
          "parameters": 133e6},
    "C": {**_TABLE_4, "test_error": 0.263, "top5_error": 0.082, "single_scale_error": 0.273,
          "single_scale_top5_error": 0.088, "parameters": 134e6},
    "D": {**_TABLE_4, "test_error": 0.248, "top5_error": 0.075, "single_scale_error": 0.256,
          "single_scale_top5_error": 0.081, "dense_multicrop_error": 0.244,
          "dense_multicrop_top5_error": 0.072, "parameters": 138e6},
    "E": PAPER}
EPOCHS = 74               # §3.1: "stopped after 370K iterations (74 epochs)"
BATCH_SIZE, LR = 256, 0.01  # §3.1: "batch size was set to 256 ... learning rate ... 10^-2"
# --quick: the first 2,000 / 500 images, an eighth-width net, and a budget of steps: batch 32
# gives 63 steps an epoch where the paper's 256 gives 8.
QUICK = {"width": 0.125, "epochs": 30, "batch_size": 32}
LR_STEPS = (30, 50, 65)   # fixed-step fallback for ImageNet (no held-out val): see DEPARTURES
POOL = 7                  # 224 / 2^5: the size of the last feature map, fc6's window
EVAL_BATCH_SIZE = 250     # val and dense-test batch of the in-memory sets (ImageNet: 16 images)


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "initialisation: §3.1 trained net A from N(0, 10^-2) weights and started the deeper nets from "
    "it (--init-from-a: its first four conv layers and three FC layers, the rest random); by "
    "default every configuration trains from scratch with torchvision's He (Kaiming) init "
    "(--init kaiming) or Glorot's (--init glorot), which §3.1 notes works without pre-training; "
    "A itself and the layers --init-from-a leaves take --init, not N(0, 10^-2); without BN at "
    "--width w < 1 the FC layers' N(0, 0.01) becomes N(0, 0.01 / sqrt(w)) so that each keeps its "
    "full-width gain",
    "lr schedule: ReduceLROnPlateau (factor 0.1, --patience 3, at most 3 times) on the held-out "
    "val error for sets with a val split; on ImageNet (whose official val set is our test set) "
    "fixed steps at epochs 30, 50, 65 of 74",
    "AdaptiveAvgPool2d(7) before fc6 (identity at 224, torchvision's layout) so that 32x32 inputs "
    "run; the dense net pools maps smaller than 7x7 up to 7 in the same way",
    "--bn (torchvision's vgg11_bn ... vgg19_bn) adds BatchNorm, which the 2014 paper does not "
    "have (not with A-LRN); with --init-from-a the BatchNorm after each copied conv is copied too",
    "A-LRN: LRN in PyTorch's convention b = a / (k + alpha/n sum a^2)^beta with alpha = 1e-4, "
    "n = 5, k = 2, beta = 0.75 (cuda-convnet's and Caffe's, as alexnet.py); Krizhevsky's formula "
    "read literally is alpha = 5e-4 here; after conv1's ReLU, as in AlexNet",
    "dense test: rescaling is bilinear with antialiasing (the paper does not say which filter); "
    "the multi-crop test of §3.2 / Table 5 is not implemented",
    "32x32 sets (shapes, CIFAR, MNIST): S ~ U{32..48}, 32 crops, test Q in {32, 40, 48}, one S "
    "per batch (rescaled on the device) instead of per image; PCA colour from the training set's "
    "own RGB covariance; --width < 1 narrows every layer (CPU tests only)",
]


# ---------------------------------------------------------------------------------------------
# Model

def _scale(c, width):
    """Channel count c times the --width multiplier (a CPU-test convenience; 1 = the paper)."""
    return max(1, round(c * width))


class VGG(nn.Module):
    """A configuration of Table 1 (`config`: A, A-LRN, B, C, D, E) with torchvision's module
    indices; `width` scales channels and FC sizes."""

    def __init__(self, num_classes=1000, batch_norm=False, in_channels=3, width=1.0, dropout=0.5,
                 config="E"):
        super().__init__()
        if config not in CFGS:
            raise ValueError(f"unknown VGG configuration '{config}'; use one of "
                             f"{', '.join(CONFIGS)}")
        if batch_norm and config == "A-LRN":
            raise ValueError("configuration A-LRN has no BatchNorm variant (its LRN is the point)")
        self.config = config
        layers, c_in = [], in_channels
        for v in CFGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))       # §2.1: 2x2, stride 2
                continue
            if v == "LRN":  # §2.1, A-LRN: after conv1's ReLU (AlexNet's order), before the pool.
                # data.LocalResponseNorm: nn.LocalResponseNorm's numbers, deterministic on CUDA,
                # float32 under --amp (fp16 squares overflow above 255).
                layers.append(data.LocalResponseNorm(**LRN))
                continue
            c, k = v if isinstance(v, tuple) else (v, 3)  # conv1-N (C) or conv3-N
            c = _scale(c, width)
            layers.append(nn.Conv2d(c_in, c, kernel_size=k, padding=k // 2))  # §2.1: pad 1 (3x3)
            if batch_norm:  # not in the paper (2014 predates BN): torchvision's vgg*_bn
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            c_in = c
        self.features = nn.Sequential(*layers)
        # Identity on 224 inputs (7x7 maps); on 32x32 images it replicates the 1x1 map.
        # data.AdaptiveAvgPool2d: torch's kernel, but under --deterministic on CUDA (whose
        # adaptive-pool backward has none) two small matmuls; torchvision's state_dict unchanged.
        self.avgpool = data.AdaptiveAvgPool2d((POOL, POOL))
        h = _scale(4096, width)
        self.classifier = nn.Sequential(                                   # fc6, fc7, fc8
            nn.Linear(c_in * POOL * POOL, h), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(h, h), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(h, num_classes))
        init_weights(self, "kaiming", width)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg(config="E", num_classes=1000, batch_norm=False, in_channels=3, width=1.0):
    """The model factory: configuration `config` of Table 1, with BatchNorm for torchvision's
    vgg*_bn."""
    return VGG(num_classes, batch_norm, in_channels, width, config=config)


def vgg19(num_classes=1000, batch_norm=False, in_channels=3, width=1.0):
    """VGG-19 (configuration E), with BatchNorm for torchvision's vgg19_bn."""
    return VGG(num_classes, batch_norm, in_channels, width)


def layer_keys(config, batch_norm=False):
    """The paper's layer names -> their state_dict prefixes in torchvision's layout: convG_L (the
    L-th conv of group G) -> ["features.N"] (and its BatchNorm's "features.N+1" with --bn), fc6,
    fc7, fc8 -> ["classifier.0"], ["classifier.3"], ["classifier.6"]."""
    keys, n, group, layer = {}, 0, 1, 0
    for v in CFGS[config]:
        if v == "M":
            group, layer = group + 1, 0
        elif v != "LRN":
            layer += 1
            keys[f"conv{group}_{layer}"] = [f"features.{n}"] + (
                [f"features.{n + 1}"] if batch_norm else [])
            n += 2 if batch_norm else 1  # the conv (and its BatchNorm); the ReLU is added below
        n += 1
    return {**keys, "fc6": ["classifier.0"], "fc7": ["classifier.3"], "fc8": ["classifier.6"]}


def init_from_a(model, path, a_arch, batch_norm=False):
    """§3.1: "when training deeper architectures, we initialised the first four convolutional
    layers and the last three fully-connected layers with the layers of net A (the intermediate
    layers were initialised randomly)". Copies A's conv1_1, conv2_1, conv3_1, conv3_2 (with --bn,
    each one's BatchNorm too), fc6, fc7 and fc8 from the checkpoint at `path` (a vgg19.py
    checkpoint named `a_arch`, or a bare state_dict of A's layout, e.g. torchvision's vgg11)
    into the same-named layers of `model`; every other layer keeps its initialisation. Returns
    the state_dict keys copied."""
    state = data.load_checkpoint(path)
    if state.get("arch", a_arch) != a_arch:
        raise data.DataError(f"--init-from-a {path} is a checkpoint of '{state['arch']}', not of "
                             f"configuration A ('{a_arch}'); pass a vgg19.py --config A "
                             f"checkpoint trained with the same --bn and --width")
    src, dst = layer_keys("A", batch_norm), layer_keys(model.config, batch_norm)
    a_state, own = state.get("model", state), model.state_dict()
    copied = []
    for name in FROM_A:
        for s, d in zip(src[name], dst[name]):
            for key in [k for k in own if k.startswith(d + ".")]:
                theirs = s + key[len(d):]
                if theirs not in a_state or a_state[theirs].shape != own[key].shape:
                    got = tuple(a_state[theirs].shape) if theirs in a_state else "missing"
                    raise data.DataError(
                        f"--init-from-a {path} does not fit: {name}'s {theirs} is {got} there "
                        f"and {tuple(own[key].shape)} here (another --width, --bn or number of "
                        f"classes?)")
                own[key] = a_state[theirs]
                copied.append(key)
    model.load_state_dict(own)
    return copied


def init_weights(model, scheme="kaiming", width=1.0):
    """§3.1 started the deeper nets from the trained net A (`init_from_a`) and adds that Glorot &
    Bengio's init works without pre-training. 'glorot': uniform Xavier, zero biases. 'kaiming'
    (default): torchvision's (He normal, fan_out, for conv; N(0, 0.01) for FC; zero biases),
    which lets the deep nets train from scratch without the A stage. Without BN at --width
    w < 1 every FC layer has w times the fan-in, so its std becomes 0.01 / sqrt(w) (each FC layer
    scales its input as at full width): with the fixed 0.01, conv1's relative gradient at w = 1/8
    was 0.0025 against 0.034 at full width and the net did not learn; scaled, 0.052. With BN the
    fixed 0.01 is kept: there the scaled std made the fixed-batch loss rise (3.1 after 40 steps
    at lr 0.01, against 0.75 at 0.01), since BN already gives the features their full-width
    scale."""
    bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fc_std = 0.01 if bn else 0.01 / width ** 0.5
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0, fc_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MinSize(nn.Module):
    """Maps smaller than fc6's 7x7 window are brought to 7 in that dimension by adaptive average
    pooling, as the original network's AdaptiveAvgPool2d(7) does; larger maps pass unchanged (the
    window then slides over them). So the converted net equals the original whenever the last
    feature map is at most 7x7, and is the paper's dense net on large images. Pooled by
    data.adaptive_avg_pool2d, as the original's data.AdaptiveAvgPool2d (the same numbers)."""

    def __init__(self, size=POOL):
        super().__init__()
        self.size = size

    def forward(self, x):
        h, w = x.shape[-2:]
        if h >= self.size and w >= self.size:
            return x
        return data.adaptive_avg_pool2d(x, (max(h, self.size), max(w, self.size)))


class WindowConv(nn.Conv2d):
    """fc6 as its 7x7 convolution. On a map of exactly one window it is computed as the Linear it
    was (the same products and sums: the kernel flattens channel-major, as `fully_convolutional`
    reshapes it): on a CPU, oneDNN re-lays out fc6's 411 MB kernel on every convolution call,
    ~6x the time of the matrix product (measured on the 2-core EPYC of the README)."""

    def forward(self, x):
        if tuple(x.shape[-2:]) == tuple(self.kernel_size):
            return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[..., None, None]
        return super().forward(x)


class FullyConvVGG(nn.Module):
    """§3.2: the net with its FC layers as convolutions; forward returns the class score map
    (N, classes, (H - 224) / 32 + 1, (W - 224) / 32 + 1) for H, W >= 224 multiples of 32."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):
        return self.classifier(self.features(x))


def fully_convolutional(model):
    """Convert a VGG into a FullyConvVGG: fc6 -> 7x7 conv (its weight (out, C*49) reshaped to
    (out, C, 7, 7): flatten(1) of the (C, 7, 7) map is channel-major, as the conv's kernel), fc7,
    fc8 -> 1x1 convs. Weights are copied: the result does not change when `model` trains."""
    head, c = [MinSize(POOL)], None
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            if c is None:  # fc6 sees the C x 7 x 7 map
                c, k = m.in_features // (POOL * POOL), POOL
            else:
                c, k = m.in_features, 1
            conv = (WindowConv if k > 1 else nn.Conv2d)(c, m.out_features, kernel_size=k).to(
                m.weight.device, m.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(m.weight.view(m.out_features, c, k, k))
                conv.bias.copy_(m.bias)
            head.append(conv)
        else:
            head.append(copy.deepcopy(m))
    fc = FullyConvVGG(copy.deepcopy(model.features), nn.Sequential(*head))
    return fc.train(model.training)


@torch.no_grad()
def dense_evaluate(model, images, scales, flip=True):
    """§3.2 dense test. For each Q in `scales` the images are rescaled (bilinear, antialiased) so
    that their smallest side is Q; the fully convolutional net gives a score map S (N, K, h, w);
    the image's posterior is softmax_k(1/(h w) sum_ij S[:, k, i, j]) (spatial average of the
    scores, then the soft-max). The returned (N, K) posteriors are the mean over every Q and, with
    `flip`, over the image and its mirror image. `images`: a (N, C, H, W) tensor, or a list of
    (C, H, W) images of different sizes (ImageNet's whole images, done one at a time).

    Every image and scale is a new input shape: cuDNN's autotuning (on under CUDA without
    --deterministic) would benchmark each once and never reuse it, so it is off in here."""
    fc = model if isinstance(model, FullyConvVGG) else fully_convolutional(model).eval()
    with data.no_autotune():
        if isinstance(images, (list, tuple)):
            return torch.cat([dense_evaluate(fc, im[None], scales, flip) for im in images])
        posteriors = []
        for q in scales:
            x = v2.functional.resize(images, [q], antialias=True)
            for view in ([x, x.flip(-1)] if flip else [x]):
                scores = fc(view).float().mean(dim=(2, 3))  # float32 before the softmax (--amp)
                posteriors.append(scores.softmax(1))
        return torch.stack(posteriors).mean(0)


def pretrained_weights(config, batch_norm):
    """torchvision's ImageNet weights enum member for a configuration: IMAGENET1K_V1 of vgg11,
    vgg13, vgg16, vgg19 (A, B, D, E) or their _bn; A-LRN and C have none (a one-line error)."""
    if config not in TORCHVISION:
        raise data.DataError(f"--pretrained with --config {config}: torchvision has no ImageNet "
                             f"weights for configuration {config} (only for A, B, D, E: vgg11, "
                             f"vgg13, vgg16, vgg19); drop --pretrained or pick one of those")
    name = TORCHVISION[config].upper() + ("_BN" if batch_norm else "") + "_Weights"
    return getattr(torchvision.models, name).IMAGENET1K_V1


def load_pretrained(model, batch_norm, width):
    """torchvision's ImageNet weights (IMAGENET1K_V1 of vgg11/13/16/19 or their _bn, as
    `model.config`); with another number of classes, every layer but fc8 (fine-tuning)."""
    if width != 1.0:
        raise data.DataError("--pretrained needs --width 1 (the published weights are full size)")
    state = data.torchvision_weights(pretrained_weights(model.config, batch_norm))
    if model.classifier[6].out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.6.")})
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Recipe: scale jittering (§3.1), learning-rate schedule

def imagenet_train_transform(scale_min, scale_max, crop):
    """§3.1 for ImageNet: smallest side S ~ U{scale_min..scale_max}, random crop, mirror, PCA
    colour shift (AlexNet's), ImageNet mean/std."""
    return v2.Compose([v2.ToImage(),
                       v2.RandomShortestSize(min_size=list(range(scale_min, scale_max + 1)),
                                             antialias=True),
                       v2.RandomCrop(crop), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), data.PCAColour(),
                       data.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def scale_jitter_batch(x, scale_min, scale_max, crop, colour=None):
    """§3.1 on in-memory device batches of square images: the batch is rescaled to S x S with
    S ~ U{scale_min..scale_max} (one S per batch: see DEPARTURES), then a random `crop` window, a
    random mirror and the PCA colour shift per image. x is already normalised: bilinear resizing
    commutes with the per-channel affine normalisation; the colour shift is divided by std."""
    n = x.shape[0]
    # S from the CPU generator (seeded, checkpointed): reading it is no device sync.
    s = int(torch.randint(scale_min, scale_max + 1, ()).item())
    if s != x.shape[-1]:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    oy = torch.randint(0, s - crop + 1, (n,), device=x.device)
    ox = torch.randint(0, s - crop + 1, (n,), device=x.device)
    r = torch.arange(crop, device=x.device)
    rows, cols = (oy[:, None] + r)[:, :, None], (ox[:, None] + r)[:, None, :]
    x = x.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    x = x.permute(0, 3, 1, 2)
    mirror = torch.rand(n, device=x.device) < 0.5
    x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if colour is not None:
        eigval, eigvec, std = colour
        alpha = torch.randn(n, 3, device=x.device) * 0.1
        x = data.pca_colour(x * std, eigval, eigvec, alpha) / std
    return x.contiguous()


def lr_factor(epoch, steps=LR_STEPS):
    return 0.1 ** sum(epoch >= s for s in steps)


def make_scheduler(optimizer, args):
    """§3.1: lr / 10 when the validation accuracy stops improving, three times at most
    ('plateau': ReduceLROnPlateau on the val error, min_lr = lr / 1000); 'steps': fixed epochs."""
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=args.patience, min_lr=args.lr * 1e-3)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, args.lr_steps))


def list_collate(batch):
    """Whole test images of different sizes: a list of images and a label tensor."""
    return [im for im, _ in batch], torch.tensor([y for _, y in batch])


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model, loader, optimizer, scaler, args, device, epoch, progress, colour=None):
    """One pass; the step's loss stays on the device (Progress reads the losses once per
    --log-every line and at the epoch's end: no host sync per step)."""
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.data != "imagenet":  # in-memory sets: the jitter on the device (ImageNet: v2)
            x = scale_jitter_batch(x, args.scale_min, args.scale_max, args.crop_size, colour)
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
def evaluate(model, loader, args, device, num_classes, dense=True):
    """dense=False: the plain network on the loader's images (the val error that drives the lr).
    dense=True: §3.2, test_error = multi-scale dense (Q in --test-scales, with mirror images),
    single_scale_error = dense at Q = (S_min + S_max) / 2 without mirror (Table 3's protocol).
    `model` is the unwrapped one; under torchrun each rank evaluates its share of the set and the
    posteriors are gathered, so every rank gets the whole set's figures (the same val error for
    the plateau schedule)."""
    model.eval()
    fc = fully_convolutional(model).eval() if dense else None
    # The posteriors stay where they were computed until the loop ends (a .cpu() per batch
    # would be a host sync per batch); the metrics take them on the CPU.
    multi, single, targets = [], [], []
    for x, y in loader:
        x = [im.to(device) for im in x] if isinstance(x, list) else x.to(device)
        with data.autocast(device, args.amp):
            if dense:  # dense_evaluate turns cuDNN's autotuning off: a new shape per scale
                multi.append(dense_evaluate(fc, x, args.test_scales, flip=True))
                single.append(dense_evaluate(fc, x, [args.single_scale], flip=False))
            else:  # 28x28 digits: brought to the crop size (5 pools need >= 32)
                if x.shape[-1] != args.crop_size:
                    x = v2.functional.resize(x, [args.crop_size], antialias=True)
                multi.append(model(x).float().softmax(1))
        targets.append(y)
    multi, targets = torch.cat(multi).cpu(), torch.cat(targets).cpu()
    if not dense:
        out, y = data.gather_shards(multi, targets)
        return metrics.classification_report(out, y, num_classes)
    out, p1, y = data.gather_shards(multi, torch.cat(single).cpu(), targets)
    return metrics.classification_report(out, y, num_classes, views={"single_scale": p1})


def classify(args, state, device):
    """--classify PATH (an image or a folder): the likeliest classes of each image through the
    checkpoint's network (its classes, normalisation and input) or torchvision's ImageNet
    weights (--pretrained: short side 256, centre 224 crop); the single view of the val test
    (`evaluate(dense=False)`: the plain network at the training crop size), not the dense one."""
    if args.weights:
        data.load_checkpoint(args.weights, arch_name(args))  # a checkpoint of another network
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
        size, imagenet = args.crop_size, args.data == "imagenet"
    else:
        classes, (mean, std) = data.imagenet_class_names(), (data.IMAGENET_MEAN, data.IMAGENET_STD)
        shape, size, imagenet = (3, 224), 224, True
    model = vgg(args.config, len(classes), args.bn, shape[0], args.width)
    if args.weights:
        data.load_weights(model, state, args.weights)
    else:
        load_pretrained(model, args.bn, args.width)
    model.to(device).eval()

    def forward(x):
        x = x.to(device)
        return model(x if x.shape[-1] == size else v2.functional.resize(x, [size], antialias=True))
    return data.classify_images(args.classify, args.out, forward, classes, mean, std, shape,
                                imagenet=imagenet)


# ---------------------------------------------------------------------------------------------
# Command line

def arch_name(args, config=None):
    """The checkpoint's network name: torchvision's builder name (vgg11 ... vgg19, _bn), the
    configuration unless it is E (whose name stays "vgg19"), the width: "vgg16_bn-D-w0.125"."""
    config = config or args.config
    return f"vgg{DEPTH[config]}" + ("_bn" if args.bn else "") + \
        ("" if config == "E" else f"-{config}") + ("" if args.width == 1.0 else f"-w{args.width:g}")


def get_args_parser():
    p = data.ArgumentParser(description="VGG (Simonyan & Zisserman 2014; configuration E, VGG-19, "
                                "by default) on ImageNet, CIFAR, MNIST, the synthetic shapes set "
                                "or your own images, with the paper's scale jittering and dense "
                                "multi-scale test.")
    data.add_data_args(p, "imagenet", "imagenet | cifar10 | cifar100 | cifar10-jpg | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32)")
    data.add_holdout_arg(p, default=None, why="on for the small sets, whose default lr schedule, §3.1's plateau, needs it")
    data.add_limit_arg(p)
    p.add_argument("--config", default="E", choices=CONFIGS,
                   help="Table 1's configuration: A (11 weight layers), A-LRN (A with §2.1's LRN "
                   "after conv1), B (13), C (16, 1x1 convs as the third layer of groups 3-5), D "
                   "(16, VGG-16), E (19, VGG-19) (default: E)")
    p.add_argument("--bn", action="store_true",
                   help="BatchNorm after every conv (torchvision's vgg11_bn ... vgg19_bn; not in "
                   "the paper; not with A-LRN)")
    p.add_argument("--width", type=float, default=None,
                   help="channel and FC-size multiplier, a CPU-test convenience (default: 1 = the "
                   "paper)")
    p.add_argument("--init", default="kaiming", choices=["kaiming", "glorot"],
                   help="weight init (default: kaiming, torchvision's; glorot: §3.1's note that "
                   "Glorot & Bengio's random init trains the deep nets without net A)")
    p.add_argument("--init-from-a", default=None, metavar="CKPT",
                   help="§3.1: start B, C, D or E from a trained net A, a vgg19.py --config A "
                   "checkpoint (same --bn and --width): its first four conv layers (conv1_1, "
                   "conv2_1, conv3_1, conv3_2) and fc6, fc7, fc8 are copied, the other layers "
                   "keep --init (default: off, every layer from --init, which §3.1 notes works)")
    p.add_argument("--scale-min", type=int, default=None,
                   help="S_min of the training scale jitter (default: 256; 32 on 32x32 sets)")
    p.add_argument("--scale-max", type=int, default=None,
                   help="S_max of the training scale jitter (default: 512; 48 on 32x32 sets)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="training crop (default: 224; 32 on 32x32 sets)")
    p.add_argument("--test-scales", type=int, nargs="+", default=None,
                   help="dense-test scales Q (default: S_min, (S_min+S_max)/2, S_max: 256 384 512)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set (default: the paper's {EPOCHS})")
    p.add_argument("--lr-schedule", default=None, choices=["plateau", "steps"],
                   help="lr / 10 on a val-error plateau or at --lr-steps (default: plateau where "
                   "there is a val split, steps on ImageNet)")
    p.add_argument("--patience", type=int, default=3,
                   help="epochs without val improvement before lr / 10 (default: 3)")
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(LR_STEPS),
                   help="epochs at which the lr is divided by 10 with --lr-schedule steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: {BATCH_SIZE}, §3.1)")
    p.add_argument("--lr", type=float, default=None, help=f"base learning rate (default: {LR}, §3.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4, §3.1)")
    data.add_classify_arg(p)
    data.add_runtime_args(p, data.quick_help(QUICK), workers=data.MACHINE,
                          pretrained_help="start from torchvision's ImageNet weights "
                          "(IMAGENET1K_V1 of vgg11, vgg13, vgg16, vgg19 for --config A, B, D, E; "
                          "their _bn with --bn; A-LRN and C have none)")
    return p


def check_config(args):
    """The flags that do not go with --config: one-line errors naming both, before any data."""
    if args.config == "A-LRN" and args.bn:
        raise data.DataError("--config A-LRN with --bn: A-LRN is A with §2.1's LRN, without "
                             "BatchNorm (torchvision has no such layout); drop --bn or pick "
                             "another --config")
    if args.pretrained:
        pretrained_weights(args.config, args.bn)
    if args.init_from_a and not args.resume:  # a resumed run takes its weights from its checkpoint
        if args.config in ("A", "A-LRN"):
            raise data.DataError(f"--init-from-a with --config {args.config}: §3.1 starts the "
                                 f"deeper nets (B, C, D, E) from a trained A, and A-sized nets "
                                 f"from random weights; drop --init-from-a or pick --config B, "
                                 f"C, D or E")
        for flag in ("weights", "pretrained"):
            if getattr(args, flag):
                raise data.DataError(f"--init-from-a with --{flag}: both set the starting "
                                     f"weights; drop one")


def resolve_defaults(args):
    imagenet = args.data == "imagenet"
    check_config(args)
    data.apply_quick(args, QUICK)
    args.width = args.width or 1.0
    args.epochs = EPOCHS if args.epochs is None else args.epochs
    args.batch_size = args.batch_size or BATCH_SIZE
    args.lr = args.lr or LR
    args.scale_min = args.scale_min or (256 if imagenet else 32)
    args.scale_max = args.scale_max or (512 if imagenet else 48)
    args.crop_size = args.crop_size or (224 if imagenet else 32)
    if not args.crop_size <= args.scale_min <= args.scale_max:
        raise data.DataError(f"need --crop-size <= --scale-min <= --scale-max, got "
                             f"{args.crop_size}, {args.scale_min}, {args.scale_max}")
    # §4.2: with jittered training, Q = {S_min, 0.5 (S_min + S_max), S_max}; §4.1: Q = the middle.
    args.single_scale = (args.scale_min + args.scale_max) // 2
    args.test_scales = args.test_scales or [args.scale_min, args.single_scale, args.scale_max]
    if args.holdout is None:  # §3.1's plateau schedule needs the held-out split
        args.holdout = not imagenet and args.lr_schedule in (None, "plateau")
    args.lr_schedule = args.lr_schedule or ("plateau" if args.holdout else "steps")
    data.train_split(args)  # ImageNet has no held-out split here


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "vgg19.py", ("config", "bn", "width", "crop_size",
                                                     "scale_min", "scale_max"),
                                  may_differ=("test_scales",))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size")
    t0 = time.time()
    data.check_task(args.data, "classification")
    resolve_defaults(args)
    imagenet = args.data == "imagenet"
    device, rank, world, is_main = data.setup(args, "vgg19.py")  # --dry-run: 1 epoch
    if args.classify:  # the user's images through the network: no data set read
        return classify(args, state, device)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. ImageNet: §3.1's jitter as v2 transforms; the test set as whole images (normalised,
    # not resized: dense_evaluate rescales each to every Q). In-memory sets: the whole set on the
    # device, no loader augmentation: scale_jitter_batch does §3.1 there. --eval-only reads the
    # test split alone (train_loader None; in-memory sets take the checkpoint's normalisation).
    colour = None
    if imagenet:
        test_set = data.classification_dataset(
            "imagenet", "test", args.data_dir, quick=args.quick,
            transform=data.normalised())
        test_loader = data.make_loader(test_set, 16, False, args.workers, device,
                                       collate_fn=list_collate, gpu_decode=args.gpu_decode)
        train_set, train_loader, val_loader = [], None, None
        if not args.eval_only:
            train_set = data.classification_dataset(
                "imagenet", "train", args.data_dir, quick=args.quick,
                transform=imagenet_train_transform(args.scale_min, args.scale_max,
                                                   args.crop_size))
            train_loader = data.make_loader(train_set, args.batch_size // args.world, True,
                                            args.workers, device, seed=args.seed,
                                            gpu_decode=args.gpu_decode)
        classes = getattr(test_set, "names", None) or test_set.dataset.names
        info = {"classes": classes, "in_channels": 3, "mean": data.IMAGENET_MEAN,
                "std": data.IMAGENET_STD, "image_size": args.crop_size,
                "sizes": (len(train_set), 0, len(test_set))}
    else:
        train_loader, val_loader, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir, not args.no_download,
            args.quick, args.seed, augment=False, eval_batch_size=EVAL_BATCH_SIZE,
            train_split=data.train_split(args), limit=args.limit, test_only=args.eval_only,
            stats=(state or {}).get("normalisation"), gpu_decode=args.gpu_decode)
        classes = info["classes"]
        # PCA colour from the training set's own RGB covariance (training only)
        if train_loader is not None and info["in_channels"] == 3:
            eigval, eigvec = data.colour_pca(train_loader.images.cpu())
            colour = (eigval.to(device), eigvec.to(device),
                      torch.tensor(info["std"], device=device).view(1, 3, 1, 1))
    # --dry-run: 2 training steps, and 2 batches of the val split and of the dense test
    train_loader, val_loader, test_loader = data.dry_run_batches(args, train_loader, val_loader,
                                                                 test_loader)
    if args.lr_schedule == "plateau" and val_loader is None and not args.eval_only:
        raise data.DataError(f"--lr-schedule plateau needs a val split, which {args.data} lacks; "
                             f"use --lr-schedule steps")
    n_train, n_val, n_test = info["sizes"]

    model = vgg(args.config, len(classes), args.bn, info["in_channels"], args.width)
    init_weights(model, args.init, args.width)
    arch = arch_name(args)
    if args.init_from_a and not args.resume:  # every rank reads it; DDP then broadcasts rank 0's
        init_from_a(model, args.init_from_a, arch_name(args, "A"), args.bn)
    model.to(device)
    if args.pretrained:
        load_pretrained(model, args.bn, args.width)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # §3.1: the L2 penalty 5e-4 on every weight (PyTorch's weight_decay), momentum 0.9.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args)
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "arch": arch, "parameters": count_parameters(model),
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": DEPARTURES}
    if is_main:
        print(f"vgg19.py: {arch} (configuration {args.config}, {DEPTH[args.config]} weight "
              f"layers) on {args.data} ({n_train} train / {n_val} val / {n_test} test), "
              f"S in [{args.scale_min}, {args.scale_max}], crop {args.crop_size}, test Q "
              f"{args.test_scales}, {config['parameters']:,} parameters, device {device}, "
              f"{args.world} process(es)")
        if args.init_from_a and not args.resume:
            print(f"  §3.1: {', '.join(FROM_A)} from net A ({args.init_from_a}), the other layers "
                  f"from --init {args.init}")
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
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": progress.lr}
            if val_loader is not None:  # ImageNet has none: its official val set is the test set
                row["val_error"] = evaluate(model, val_loader, args, device, len(classes),
                                           dense=False)["test_error"]
            if args.lr_schedule == "plateau":
                scheduler.step(row["val_error"])
            else:
                scheduler.step()
            row["lr"] = optimizer.param_groups[0]["lr"]
            if data.eval_due(args, epoch):  # --eval-every: as the final (dense) test; curves only
                t = evaluate(model, test_loader, args, device, len(classes), dense=True)
                row["test_error"] = t["test_error"]
                if "top5_error" in t:  # >= 100 classes
                    row["test_top5_error"] = t["top5_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f}" + "".join(
                    f" {k} {100 * row[k]:.2f}%" for k in ("val_error", "test_error",
                                                         "test_top5_error") if k in row) +
                      f" lr {row['lr']:.2g}")
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, **data.test_settings(info))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device, len(classes), dense=True)
    keys = ["test_error", "test_accuracy", "balanced_error", "single_scale_error", "top5_error",
            "single_scale_top5_error"]
    if is_main:
        print(f"test_error {100 * test['test_error']:.2f}% ({test['errors']}/{test['samples']}, "
              f"dense, Q {args.test_scales} + mirror) single_scale_error (Q {args.single_scale}) "
              f"{100 * test['single_scale_error']:.2f}% balanced_error "
              f"{100 * test['balanced_error']:.2f}%" +
              (f" top5_error {100 * test['top5_error']:.2f}%" if "top5_error" in test else ""))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "vgg19.py", args.data,
        {k: test[k] for k in keys if k in test}, paper=PAPER_CONFIGS[args.config], config=config,
        device=str(device), seconds=time.time() - t0, history=history,
        **metrics.class_records(test, classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "vgg19.py")
