"""GoogLeNet: C. Szegedy, W. Liu, Y. Jia, P. Sermanet, S. Reed, D. Anguelov, D. Erhan, V. Vanhoucke,
A. Rabinovich, "Going deeper with convolutions", CVPR 2015, arXiv:1409.4842. And its ancestor NIN:
M. Lin, Q. Chen, S. Yan, "Network in network", ICLR 2014, arXiv:1312.4400 (--variant nin).

    python googlenet.py --data imagenet                            # §6 recipe, §7 144-crop test
    python googlenet.py --data imagenet --variant paper            # Table 1 as printed (no BN, LRN)
    python googlenet.py --data imagenet --pretrained --eval-only   # torchvision's weights, 144 crops
    python googlenet.py --variant nin                              # NIN on CIFAR-10
    python googlenet.py --data shapes --quick                      # offline, seconds on a CPU
    torchrun --nproc_per_node=2 googlenet.py --data imagenet       # data-parallel, same global batch

Paper (Table 5, ILSVRC 2014 val, top-5 error): one model 10.07 % with 1 crop, 9.15 % with 10
crops, 7.89 % with 144 crops; 7 models x 144 crops 6.67 %. About 6.8M parameters (Table 1, without
the auxiliary classifiers). NIN (its Table 1): CIFAR-10 test error 10.41 % without augmentation,
8.81 % with. Ours: see the README's results table (the command and hardware of every figure).

Model (Table 1): 7x7/2 conv, max-pool, 1x1 and 3x3 convs, max-pool, inception 3a-3b, max-pool,
4a-4e, max-pool, 5a-5b, global average pool, dropout, linear; auxiliary classifiers on 4a and 4d
(§5). --variant torchvision (default): torchvision.models.googlenet's module names and state_dict
(BN after every conv, the known 3x3-for-5x5 quirk in the third branch). --variant paper: Table 1
as printed (biases, no BN, 5x5 convs, LocalRespNorm). --naive: the modules of Fig. 2(a).

Recipe (§6): SGD momentum 0.9, Polyak averaging for the final model (--polyak), random crops of
8-100 % of the area with aspect 3/4-4/3, photometric distortions. §6's lr "decreasing ... by 4%
every 8 epochs" hardly anneals in a run of any practical length (BVLC's released run of it,
models/bvlc_googlenet/solver.prototxt, ends 250 epochs at 28 % of its start); the default
(--lr-schedule poly) is BVLC's quick_solver.prototxt instead: lr x (1 - t/T)^0.5 per iteration,
to zero at the end of the run, 60 epochs (its 2.4M iterations of 32), which BVLC's readme reports
at 68.7 % top-1 / 88.9 % top-5 (one centre crop). --lr-schedule step keeps §6's. --variant paper
(no BN) keeps those solvers' lr 0.01 per batch of 32: 0.08 at our 256 (linear scaling, Goyal et
al. 2017, arXiv:1706.02677) after their gradual warm-up from 0.01 over 5 epochs.
Test (§7): 144 crops per image (`crops_144`), softmax averaged; the centre crop is reported too.
Departures are listed in DEPARTURES and printed at start.
"""
import argparse
import os
import time
from collections import OrderedDict, namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Szegedy et al. 2014, arXiv:1409.4842, Table 5", "data": "imagenet",
         "top5_error": 0.0789,                        # 1 model, 144 crops
         "single_crop_top5_error": 0.1007, "ten_crop_top5_error": 0.0915,
         "ensemble_7_models_144_crops_top5_error": 0.0667, "parameters": 6.8e6}
NIN_PAPER = {"reference": "Lin et al. 2013, arXiv:1312.4400, Table 1", "data": "cifar10",
             "test_error": 0.0881, "test_error_no_augmentation": 0.1041}
TORCHVISION_PARAMETERS = {True: 13_004_888, False: 6_624_904}  # with / without aux
# Table 1 rows: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj ("in" follows from the sum).
INCEPTION = OrderedDict([
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)),
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)), ("5a", (256, 160, 320, 32, 128, 128)),
    ("5b", (384, 192, 384, 48, 128, 128))])
AUX_WEIGHT = 0.3                  # §5: "their loss is added to the total loss with weight 0.3"
# The lr schedule. §6: "decreasing the learning rate by 4% every 8 epochs" (--lr-schedule step),
# of a run whose length the paper does not give. BVLC's models/bvlc_googlenet/solver.prototxt
# (step, gamma 0.96, stepsize 320k iterations of 32 = 8 epochs, max_iter 10M = 250 epochs) ends
# at 0.96^31 = 28 %: no annealing. Default (--lr-schedule poly): its quick_solver.prototxt,
# lr_policy "poly" with power 0.5, lr x (1 - iter/max_iter)^0.5 to zero at max_iter 2.4M x 32 =
# 60 epochs (68.7 % top-1 / 88.9 % top-5 on one centre crop in BVLC's readme); --epochs rescales
# it. Both solvers: base_lr 0.01 at batch 32 (train_val.prototxt), momentum 0.9, decay 2e-4.
LR_GAMMA, LR_EVERY = 0.96, 8
POLY_POWER = 0.5
BVLC_LR, BVLC_BATCH = 0.01, 32
# --variant paper (no BN) at batch B > 32 keeps the solvers' lr per image, 0.01 x B/32 (Goyal et
# al. 2017, arXiv:1706.02677, §2.1 linear scaling: 0.08 at 256), and their §2.2 gradual warm-up
# over 5 epochs from the released 0.01: the BN-free net is the fragile one at a high lr.
WARMUP_EPOCHS = 5
POLYAK = 0.9999                   # §6: Polyak averaging for the final model (EMA decay here)
TEST_SCALES = (256, 288, 320, 352)  # §7: shorter side of the four scales
EPOCHS = {"poly": 60, "step": 250, "nin": 300}  # quick_solver's and solver's lengths; NIN
NIN_LR_STEPS = (150, 225)         # NIN §4.1: lr / 10 twice, ending at 1 % of the initial value
NIN_INIT_STD, NIN_LAST_LR = 0.05, 0.1
# --quick: the first 2,000 / 500 images, quarter-width nets and a budget of steps. NIN at the
# released init sits near ln 10 for its first ~150 steps (the signal leaves the 9 layers at ~1 %
# of its input's scale), then learns: 40 epochs at batch 64 give it 1,240 steps.
# GoogLeNet on Fashion-MNIST's first 2,000 (README): lr 0.1 for 6 epochs 33.0 % test error; lr
# 0.05 for 8 epochs at batch 64 27.4 % / 36.6 % (seeds 0 / 1), at batch 32 (twice the steps)
# 24.8 % / 28.4 %.
QUICK = {"width": 0.25, "epochs": 8, "batch_size": 32, "lr": 0.05}
QUICK_NIN = {"width": 0.25, "epochs": 40, "batch_size": 64, "lr": 0.05, "lr_steps": [30, 36]}  # the authors' released CIFAR-10 model (Caffe model zoo)

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "--variant torchvision (default): BatchNorm after every conv instead of LocalRespNorm, a 3x3 "
    "kernel in the third inception branch where Table 1 has 5x5 (torchvision's known quirk, "
    "pytorch/vision#906), a 2x2/2 last max-pool, adaptive 4x4 aux pooling, main dropout 0.2 (the "
    "paper: 40 %); --variant paper follows Table 1 (with Glorot init, which the paper does not "
    "state)",
    "--variant torchvision from scratch: He (fan-out) init of the convolutions instead of "
    "torchvision's trunc_normal(0.01), under which BN's running statistics go stale (eval-mode "
    "loss at chance while the training loss falls); torchvision's layout is unchanged",
    "lr schedule: BVLC's quick_solver.prototxt (models/bvlc_googlenet), poly with power 0.5, "
    "lr x (1 - t/T)^0.5 per iteration, to zero at the end of 60 epochs (its 2.4M iterations of "
    "32), instead of §6's x 0.96 every 8 epochs (--lr-schedule step; the paper gives no length, "
    "and BVLC's solver.prototxt with that step ends its 250 epochs at 28 % of the start lr: no "
    "annealing); batch 256 (not stated; the paper used asynchronous SGD on a CPU cluster)",
    "lr 0.1 for --variant torchvision (BN: the usual 0.1 per 256 of BN networks); --variant "
    "paper (no BN): BVLC's lr 0.01 per batch of 32 scaled linearly to 0.01 x batch/32 (0.08 at "
    "256; Goyal et al. 2017), with their gradual warm-up from 0.01 over the first 5 epochs; "
    "weight decay 2e-4 (BVLC's solvers; the paper states none), biases at 2x lr without decay "
    "(BVLC's train_val.prototxt), BN's scale and shift at 1x lr without decay (no Caffe model "
    "to follow; torchvision's references' --norm-weight-decay 0)",
    "Polyak averaging as an exponential moving average of weights and BN buffers, decay 0.9999, "
    "on by default on ImageNet (the paper does not give its averaging); off on the small sets, "
    "whose short runs an average of this length would lag",
    "photometric distortions as ColorJitter(0.5, 0.5, 0.5) plus AlexNet's PCA lighting noise (the "
    "paper cites Howard's distortions without their parameters); per-channel normalisation",
    "single-crop figure: the centre 224 crop of the image resized to 256 (Table 5's crop is not "
    "stated); the 10-crop test (--test-crops 10) is AlexNet's on the image resized to 256",
    "small sets (shapes, CIFAR, MNIST): conv1 at stride 1 and no maxpool1/maxpool2, so 32x32 "
    "images give 32/16/8 maps (224 gives 28/14/7); --variant paper's aux heads pool 5x5/3 and, "
    "where that gives no 4x4 (16x16 images), adaptively to 4x4; data.py's pad-and-crop + flip "
    "augmentation, single-view test; --width < 1 narrows every layer (CPU tests only)",
]
DEPARTURES_NIN = [
    "lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr / 10 at epochs 150 and 225 of 300 "
    "(fixed steps; NIN §4.1 lowers the lr when the training accuracy stops improving, twice; the "
    "decay is that of public reproductions, the paper states none)",
    "init and per-layer rates of the authors' released Caffe model (the paper gives none): "
    "N(0, 0.05) weights (std rescaled by sqrt(fan-in ratio) at --width < 1 or on grey images), "
    "zero biases at 2x the lr without weight decay, cccp6 at 0.1x the lr; ReLU kept after the "
    "last 1x1 conv before global average pooling, as there",
    "augmentation: data.py's 4-pixel pad-and-crop + flip (the paper's 8.81 % used translation and "
    "flipping; its 10.41 % none); per-channel normalisation instead of global contrast "
    "normalisation and ZCA whitening",
]


# ---------------------------------------------------------------------------------------------
# Model

def _scale(c, width):
    """Channel count c times the --width multiplier (a CPU-test convenience; 1 = the paper)."""
    return max(1, round(c * width))


class BasicConv2d(nn.Module):
    """conv + ReLU (Table 1: "all convolutions use rectified linear activation"); with bn, a
    bias-free conv + BatchNorm2d(eps=0.001) + ReLU, torchvision's BasicConv2d."""

    def __init__(self, cin, cout, bn=True, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=not bn, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if bn else None

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x if self.bn is None else self.bn(x), inplace=True)


class Inception(nn.Module):
    """Fig. 2(b): 1x1 | 1x1 reduce -> 3x3 | 1x1 reduce -> 5x5 | 3x3/1 max-pool -> 1x1 projection,
    concatenated along channels. k5 is the third branch's kernel: 5 in the paper, 3 in torchvision
    (pytorch/vision#906). naive: Fig. 2(a), 1x1 | 3x3 | 5x5 | 3x3 max-pool on the input itself, so
    the output has c1 + c3 + c5 + cin channels (why §4 adds the 1x1 reductions)."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp, bn=True, k5=5, naive=False):
        super().__init__()
        self.naive = naive
        pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.branch1 = BasicConv2d(cin, c1, bn, kernel_size=1)
        if naive:
            self.branch2 = BasicConv2d(cin, c3, bn, kernel_size=3, padding=1)
            self.branch3 = BasicConv2d(cin, c5, bn, kernel_size=5, padding=2)
            self.branch4 = pool
            self.out_channels = c1 + c3 + c5 + cin
            return
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, bn, kernel_size=1),
                                     BasicConv2d(c3r, c3, bn, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, bn, kernel_size=1),
                                     BasicConv2d(c5r, c5, bn, kernel_size=k5, padding=k5 // 2))
        self.branch4 = nn.Sequential(pool, BasicConv2d(cin, pp, bn, kernel_size=1))
        self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """§5: average pool 5x5/3 (14x14 -> 4x4 on 4a / 4d), 1x1 conv with 128 filters + ReLU, fc 1024
    + ReLU, dropout 0.7, linear to the classes.

    paper_pool (--variant paper): §5's 5x5/3 average pool, then, only where it does not give 4x4
    (inputs other than 224: the small sets' 16x16 or 8x8 maps), adaptive pooling to the 4x4 fc1
    needs (a departure). Otherwise (--variant torchvision): torchvision's adaptive 4x4 pool, whose
    windows at 14x14 are 4 wide at offsets 0, 3, 7, 10 where §5's are 5 wide at 0, 3, 6, 9: the
    same 4x4 output size, not the same numbers (its ported weights expect it). Both adaptive pools
    go through data.adaptive_avg_pool2d: the input itself when already 4x4, torch's kernel, or
    under --deterministic on CUDA (where torch's backward has no deterministic kernel) matmuls."""

    def __init__(self, cin, num_classes, bn=True, paper_pool=False, width=1.0, dropout=0.7):
        super().__init__()
        self.paper_pool = paper_pool
        self.conv = BasicConv2d(cin, _scale(128, width), bn, kernel_size=1)
        self.fc1 = nn.Linear(_scale(128, width) * 16, _scale(1024, width))
        self.fc2 = nn.Linear(_scale(1024, width), num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.paper_pool and min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, 5, stride=3)
        x = self.conv(data.adaptive_avg_pool2d(x, (4, 4)))  # identity when already 4x4
        x = F.relu(self.fc1(x.flatten(1)), inplace=True)
        return self.fc2(self.dropout(x))


class GoogLeNet(nn.Module):
    """Table 1 with torchvision's module names. Training mode with aux returns GoogLeNetOutputs
    (logits, aux_logits2, aux_logits1), as torchvision; eval mode the main logits only (§5: "at
    inference time, these auxiliary networks are discarded"). small_input: conv1 at stride 1 and
    no maxpool1/maxpool2 (32x32 images give 32/16/8 maps where 224 gives 28/14/7); the state_dict
    is unchanged."""

    def __init__(self, num_classes=1000, aux_logits=True, variant="torchvision", in_channels=3,
                 naive=False, width=1.0, small_input=False, transform_input=False):
        super().__init__()
        if variant not in ("torchvision", "paper"):
            raise ValueError(f"unknown GoogLeNet variant '{variant}'; use torchvision or paper")
        paper, bn = variant == "paper", variant == "torchvision"
        self.aux_logits, self.transform_input = aux_logits, transform_input
        w = lambda c: _scale(c, width)  # noqa: E731
        pool = lambda k: nn.MaxPool2d(k, stride=2, ceil_mode=True)  # noqa: E731  (Caffe: ceil)
        # Table 1 / Fig. 3: LocalRespNorm after the first pool and after conv 3x3 (size 5,
        # alpha 1e-4, beta 0.75 as BVLC's Caffe model); torchvision has BN instead.
        # data.LocalResponseNorm: nn.LocalResponseNorm's numbers through avg_pool2d (torch's
        # avg_pool3d has no deterministic CUDA backward), in float32 under --amp.
        lrn = lambda: data.LocalResponseNorm(5, 1e-4, 0.75, 1.0) if paper else nn.Identity()  # noqa
        self.conv1 = BasicConv2d(in_channels, w(64), bn, kernel_size=7,
                                 stride=1 if small_input else 2, padding=3)
        self.maxpool1 = nn.Identity() if small_input else pool(3)
        self.norm1 = lrn()
        self.conv2 = BasicConv2d(w(64), w(64), bn, kernel_size=1)  # Table 1's "3x3 reduce" 64
        self.conv3 = BasicConv2d(w(64), w(192), bn, kernel_size=3, padding=1)
        self.norm2 = lrn()
        self.maxpool2 = nn.Identity() if small_input else pool(3)
        c = w(192)
        for name, widths in INCEPTION.items():
            block = Inception(c, *map(w, widths), bn=bn, k5=5 if paper else 3, naive=naive)
            setattr(self, f"inception{name}", block)
            c = block.out_channels
            if name == "4a":
                c_aux1 = c
            if name == "4d":
                c_aux2 = c
        self.maxpool3 = pool(3)
        self.maxpool4 = pool(3 if paper else 2)  # Table 1: 3x3/2; torchvision: 2x2/2 (same 7x7)
        self.aux1 = InceptionAux(c_aux1, num_classes, bn, paper, width) if aux_logits else None
        self.aux2 = InceptionAux(c_aux2, num_classes, bn, paper, width) if aux_logits else None
        self.avgpool = data.AdaptiveAvgPool2d((1, 1))  # a mean at 1x1, as torch's; no weights
        self.dropout = nn.Dropout(0.4 if paper else 0.2)  # Table 1 / §5: 40 %; torchvision 20 %
        self.fc = nn.Linear(c, num_classes)
        self.out_channels = c
        # torchvision initialises every conv with trunc_normal(std=0.01), but it never trained
        # this net from scratch (its weights are ported). Under BN the tiny weights take ~30x
        # relative gradient steps on conv1, inflate within a few steps, and the running BN
        # statistics go stale: on a fixed batch the training-mode loss fell to 0.19 while the
        # eval-mode loss stayed at chance. He init (fan-out), as torchvision's ResNets, does not.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if paper:  # Glorot init, as BVLC's Caffe reproduction ("xavier", biases 0.2/0)
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.constant_(m.bias, 0.2 if isinstance(m, nn.Conv2d) else 0.0)
                elif isinstance(m, nn.Conv2d):  # He (fan-out) under BN: see below
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:      # torchvision's init_weights=True for the classifiers
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _transform_input(self, x):
        """torchvision's transform_input: inputs normalised with the ImageNet mean/std become
        (x - 0.5) / 0.5, the normalisation the ported IMAGENET1K_V1 weights expect. Written as
        torchvision writes it, per channel with Python scalars: a torch.tensor(..., device=cuda)
        here would be a host-to-device copy, and a host sync, at every forward."""
        if not self.transform_input:
            return x
        return torch.cat([x[:, c:c + 1] * (s / 0.5) + (m - 0.5) / 0.5 for c, (m, s) in
                          enumerate(zip(data.IMAGENET_MEAN, data.IMAGENET_STD))], 1)

    def forward(self, x):
        x = self._transform_input(x)
        x = self.maxpool2(self.norm2(self.conv3(self.conv2(self.norm1(self.maxpool1(
            self.conv1(x)))))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        train_aux = self.training and self.aux_logits
        aux1 = self.aux1(x) if train_aux else None  # §5: on the output of 4a
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if train_aux else None  # and of 4d
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(self.avgpool(x).flatten(1)))
        return GoogLeNetOutputs(x, aux2, aux1) if train_aux else x


class NIN(nn.Module):
    """NIN §3-4 for CIFAR-10 (the authors' Caffe model, names conv/cccp as there): three mlpconv
    layers, each a conv followed by two 1x1 convs ("cascaded cross channel parametric pooling"),
    max / average 3x3/2 pooling and dropout 0.5 between them, the last 1x1 giving one map per
    class, global average pooling as the classifier (§3.2: no fully connected layer). ReLU after
    every conv, the last 1x1 included, as in the original model."""

    def __init__(self, num_classes=10, in_channels=3, width=1.0):
        super().__init__()
        # (name, input channels, output channels, kernel) of the released model; None = the
        # image's channels, 0 = one map per class.
        spec = [("conv1", None, 192, 5), ("cccp1", 192, 160, 1), ("cccp2", 160, 96, 1), "pool1",
                ("conv2", 96, 192, 5), ("cccp3", 192, 192, 1), ("cccp4", 192, 192, 1), "pool2",
                ("conv3", 192, 192, 3), ("cccp5", 192, 192, 1), ("cccp6", 192, 0, 1)]
        layers = []
        for s in spec:
            if s == "pool1":
                layers += [("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("drop1", nn.Dropout(0.5))]
            elif s == "pool2":
                layers += [("pool2", nn.AvgPool2d(3, 2, ceil_mode=True)), ("drop2", nn.Dropout(0.5))]
            else:
                name, cin, cout, k = s
                conv = nn.Conv2d(in_channels if cin is None else _scale(cin, width),
                                 _scale(cout, width) if cout else num_classes, k, padding=k // 2)
                # The authors' released CIFAR-10 model: weights N(0, 0.05), biases 0. PyTorch's
                # default init instead shrinks the signal ~10^4-fold over the 9 layers, the
                # biases dominate and the output hardly depends on the input. Narrower or
                # grey-image nets scale the std by sqrt(released fan-in / fan-in), so that each
                # layer scales its input as the released one does.
                fan_in = conv.weight[0].numel()
                nn.init.normal_(conv.weight, 0.0,
                                NIN_INIT_STD * ((cin or 3) * k * k / fan_in) ** 0.5)
                nn.init.zeros_(conv.bias)
                layers += [(name, conv), (f"relu_{name}", nn.ReLU(inplace=True))]
        self.features = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        # §3.2: global average pooling (a mean: deterministic on CUDA, unlike the adaptive pool)
        return data.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def param_groups(self, lr, weight_decay):
        """The release's per-layer rates: biases at 2x the lr without weight decay, the last 1x1
        (cccp6, one map per class) at 0.1x (its biases 0.2x)."""
        groups = []
        for name, m in self.features.named_children():
            if isinstance(m, nn.Conv2d):
                f = NIN_LAST_LR if name == "cccp6" else 1.0
                groups += [{"params": [m.weight], "lr": lr * f, "weight_decay": weight_decay},
                           {"params": [m.bias], "lr": 2 * lr * f, "weight_decay": 0.0}]
        return groups


def googlenet(num_classes=1000, aux_logits=True, variant="torchvision", in_channels=3,
              naive=False, width=1.0, small_input=False):
    """The model factory: GoogLeNet (variant torchvision / paper) or NIN (variant nin)."""
    if variant == "nin":
        return NIN(num_classes, in_channels, width)
    return GoogLeNet(num_classes, aux_logits, variant, in_channels, naive, width, small_input)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_pretrained(model, args):
    """torchvision's IMAGENET1K_V1 (ported from the original Caffe weights, trained on inputs
    normalised to [-1, 1]: transform_input is switched on); its aux heads are untrained. With
    another number of classes, every layer but the classifiers (fine-tuning)."""
    if args.variant != "torchvision" or args.naive or args.width != 1.0:
        raise data.DataError("--pretrained needs --variant torchvision, no --naive and --width 1 "
                             "(the published weights are torchvision's full-size network)")
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    state = data.torchvision_weights(weights)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # drops aux1/aux2 with --no-aux
    if model.fc.out_features != 1000:
        state.update({k: v for k, v in own.items() if k.startswith(("fc.", "aux1.fc2", "aux2.fc2"))})
    data.load_weights(model, state, "torchvision's googlenet weights")


# ---------------------------------------------------------------------------------------------
# Loss and recipe

def googlenet_loss(out, y, aux_weight=AUX_WEIGHT):
    """§5: the main cross-entropy plus aux_weight x each auxiliary classifier's; a plain tensor
    (eval mode, --no-aux, NIN) is the plain cross-entropy."""
    if isinstance(out, tuple):
        main, aux2, aux1 = out
        return F.cross_entropy(main, y) + aux_weight * (F.cross_entropy(aux1, y) +
                                                        F.cross_entropy(aux2, y))
    return F.cross_entropy(out, y)


@torch.no_grad()
def polyak_update(ema, model, decay):
    """§6's Polyak averaging as an exponential moving average, one step: every floating-point
    parameter and buffer (BN statistics: use_buffers) of `ema.module` (a swa_utils.AveragedModel
    of `model`) becomes decay x itself + (1 - decay) x the model's, one fused kernel for all;
    the first update copies the model. AveragedModel.update_parameters with
    get_ema_multi_avg_fn(decay) gives the same floats, but moves its CPU step count to the
    device at every step (a blocking copy: a host sync per step). `ema.n_averaged` stays on the
    CPU (AveragedModel made without device=): reading it here is no device sync. Integer buffers
    (BN's batch count, unused at BN's fixed momentum) take the model's, where AveragedModel
    truncates decay x its own + (1 - decay) x the model's back to an integer."""
    averaged = list(ema.module.parameters()) + list(ema.module.buffers())
    current = list(model.parameters()) + list(model.buffers())
    if int(ema.n_averaged) == 0:
        torch._foreach_copy_(averaged, current)
    else:
        floats = [(a, b) for a, b in zip(averaged, current, strict=True) if a.is_floating_point()]
        ints = [(a, b) for a, b in zip(averaged, current) if not a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)
        if ints:
            torch._foreach_copy_([a for a, _ in ints], [b for _, b in ints])
    ema.n_averaged += 1


def lr_factor(epoch, schedule="poly", epochs=EPOCHS["poly"], every=LR_EVERY, steps=None,
              warmup=0.0, warmup_from=1.0):
    """The lr multiplier at `epoch`, the epochs done with their fraction (iterations / iterations
    per epoch: the scheduler steps every iteration). NIN (steps given): / 10 at each step, at
    whole epochs. GoogLeNet: poly, (1 - epoch / epochs)^0.5, Caffe's per-iteration "poly" of
    quick_solver.prototxt, 0 at the end of the run; step, x 0.96 every `every` whole epochs
    (§6). Either times a linear warm-up from `warmup_from` to 1 over the first `warmup` epochs.
    A function of the iteration alone: --resume continues it exactly."""
    if steps is not None:
        return 0.1 ** sum(epoch >= s for s in steps)
    if schedule == "step":
        f = LR_GAMMA ** (epoch // every)
    else:
        f = max(0.0, 1 - epoch / epochs) ** POLY_POWER
    if epoch < warmup:
        f *= warmup_from + (1 - warmup_from) * epoch / warmup
    return f


def lr_lambda(args, per_epoch):
    """The scheduler's factor at iteration `it` of a run with `per_epoch` iterations an epoch;
    the warm-up starts from the lr per image of BVLC's batch of 32 (lr x 32 / batch)."""
    warmup_from = min(1.0, BVLC_BATCH / args.batch_size)
    return lambda it: lr_factor(it / per_epoch, args.lr_schedule, args.epochs, args.lr_every,
                                args.lr_steps, args.warmup_epochs or 0.0, warmup_from)


# ---------------------------------------------------------------------------------------------
# Data glue: ImageNet's transforms and the §7 test (the small sets come from data.py)

def imagenet_train_transform(size=224):
    """§6: "sampling of various sized patches of the image whose size is distributed evenly
    between 8% and 100% of the image area with aspect ratio constrained to [3/4, 4/3]", mirror,
    and Howard's photometric distortions (contrast, brightness, colour in [0.5, 1.5], then
    AlexNet's lighting noise)."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0),
                                                          ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip(), data.ColorJitterU8(0.5, 0.5, 0.5),
                       v2.ToDtype(torch.float32, scale=True), data.PCAColour(),
                       data.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def list_collate(batch):
    """Whole test images of different sizes: a list of images and a label tensor."""
    return [im for im, _ in batch], torch.tensor([y for _, y in batch])


def crops_144(image, size=224, scales=TEST_SCALES):
    """§7: the image (C, H, W) resized to 4 scales (shorter side 256, 288, 320, 352); from each,
    the left, centre and right squares (top, centre, bottom for portrait images); from each
    square the 4 corner and the centre size x size crops and the square resized to size; plus the
    mirror images: 4 x 3 x 6 x 2 = 144 crops, returned as (144, C, size, size), the 72 mirror
    images last (crop i + 72 is crop i mirrored)."""
    views = []
    for s in scales:
        x = v2.functional.resize(image, [s], antialias=True)
        h, w = x.shape[-2:]
        long = max(h, w)
        for o in (0, (long - s) // 2, long - s):
            sq = x[..., :, o:o + s] if w >= h else x[..., o:o + s, :]
            views += list(v2.functional.five_crop(sq, [size, size]))  # tl, tr, bl, br, centre
            views.append(v2.functional.resize(sq, [size, size], antialias=True))
    views = torch.stack(views)
    return torch.cat([views, views.flip(-1)])


def centre_crop(image, size=224, resize=256):
    """The single-crop view: shorter side to 256, the centre 224 square (torchvision's protocol;
    Table 5 does not say which crop its "1 crop" is)."""
    return v2.functional.center_crop(v2.functional.resize(image, [resize], antialias=True),
                                     [size, size])


def imagenet_loaders(args, device):
    """(train, None, test, info); --eval-only reads only the val folder (train is None)."""
    kw = dict(data_dir=args.data_dir, download=False, quick=args.quick)
    test_set = data.classification_dataset(  # whole images, normalised: §7 crops them itself
        "imagenet", "test", **kw, transform=data.normalised())
    test = data.make_loader(test_set, 8, False, args.workers, device, collate_fn=list_collate,
                            gpu_decode=args.gpu_decode)
    train_set, train = [], None
    if not args.eval_only:
        train_set = data.classification_dataset("imagenet", "train", **kw,
                                                transform=imagenet_train_transform(args.img_size))
        train = data.make_loader(train_set, args.batch_size // args.world, True, args.workers,
                                 device, seed=args.seed, gpu_decode=args.gpu_decode)
    classes = getattr(test_set, "names", None) or test_set.dataset.names
    info = {"classes": classes, "mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD,
            "in_channels": 3, "image_size": args.img_size,
            "sizes": (len(train_set), 0, len(test_set))}
    return train, None, test, info


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(net, loader, optimizer, scaler, args, device, epoch, progress, ema=None,
                    model=None, scheduler=None):
    """One pass; the step's loss (main + aux, §5) stays on the device (Progress reads the
    losses once per --log-every line and at the epoch's end: no host sync per step). The
    scheduler steps after every iteration (poly and the warm-up are per iteration, as Caffe's)."""
    net.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            loss = googlenet_loss(net(x), y, args.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:  # §6: Polyak averaging, an exponential moving average here
            polyak_update(ema, model, args.polyak)
        lr = optimizer.param_groups[0]["lr"]  # this step's (a Python float: no sync)
        if scheduler is not None:
            scheduler.step()
        progress.step(len(y) * args.world, loss, lr, epoch, n=len(y))
    return progress.epoch_loss()  # the losses read here, over every rank's samples


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes, crops=1):
    """Small sets: the single view. ImageNet (whole images): the centre crop, and with crops=10 /
    144 the ten-crop (AlexNet's, on the image resized to 256) or the §7 144-crop test, whose
    averaged softmax gives test_error / top5_error; single_crop_* are the centre crop's. `model`
    is the unwrapped one: under torchrun each rank tests its share and the outputs are gathered."""
    model.eval()
    multi, single, targets = [], [], []
    for x, y in loader:
        with data.autocast(device, args.amp):
            if isinstance(x, list):  # ImageNet: whole images, each of its own size
                x = [im.to(device) for im in x]
                centre = torch.stack([centre_crop(im, args.img_size) for im in x])
                single.append(model(centre).float().softmax(1))  # the batch's centre crops
                for im in x:  # the crops of one image at a time: 144 (or 10) of one shape
                    if crops == 144:
                        multi.append(model(crops_144(im, args.img_size)).float().softmax(1)
                                     .mean(0, keepdim=True))
                    elif crops == 10:
                        big = v2.functional.resize(im, [256], antialias=True)[None]
                        multi.append(data.ten_crop_predict(model, big, args.img_size).float())
            else:
                single.append(model(x.to(device)).float().softmax(1))
        targets.append(y)  # on the device with the outputs: moved once, after the loop
    y, p1 = torch.cat(targets).cpu(), torch.cat(single).cpu()
    out = torch.cat(multi).cpu() if multi else p1
    out, p1, y = data.gather_shards(out, p1, y)
    return metrics.classification_report(out, y, num_classes, views={"single_crop": p1})


# ---------------------------------------------------------------------------------------------
# Command line

def arch_name(args):
    if args.variant == "nin":
        name = "nin"
    else:
        name = "googlenet" + ("-paper" if args.variant == "paper" else "") + \
            ("-naive" if args.naive else "") + ("-noaux" if args.no_aux else "")
    return name + ("" if args.width == 1.0 else f"-w{args.width:g}")


def get_args_parser():
    p = data.ArgumentParser(description="GoogLeNet (Szegedy et al. 2014) and NIN (Lin et al. "
                                "2013) on ImageNet, CIFAR, MNIST or the synthetic shapes set.")
    data.add_data_args(p, None, "imagenet | cifar10 | cifar100 | cifar10-jpg | mnist | "
                       "fashion-mnist | shapes | folder:DIR (your own DIR/train/<class>/*, "
                       "DIR/val/<class>/* images, held at 32x32); imagenet for GoogLeNet, "
                       "cifar10 for --variant nin")
    data.add_holdout_arg(p)
    data.add_limit_arg(p)
    p.add_argument("--variant", default="torchvision", choices=["torchvision", "paper", "nin"],
                   help="torchvision: torchvision's googlenet (BN; default); paper: Table 1 as "
                   "printed (no BN, LRN, 5x5); nin: Network in Network for CIFAR")
    p.add_argument("--naive", action="store_true", help="the naive inception modules of Fig. 2(a)")
    p.add_argument("--no-aux", action="store_true", help="no auxiliary classifiers (§5)")
    p.add_argument("--aux-weight", type=float, default=AUX_WEIGHT,
                   help=f"weight of each auxiliary loss (default: {AUX_WEIGHT}, §5)")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier, a CPU-test convenience (default: 1 = the paper)")
    p.add_argument("--img-size", type=int, default=None,
                   help="ImageNet crop size (default: 224); shapes: the size the images are drawn "
                   "at (default: 32, 16 with --quick); the other sets keep their own size")
    p.add_argument("--test-crops", type=int, default=None, choices=[1, 10, 144],
                   help="ImageNet test views per image (default: 144, §7); small sets: 1")
    p.add_argument("--transform-input", action=argparse.BooleanOptionalAction, default=None,
                   help="torchvision's re-normalisation to [-1, 1] (default: on with --pretrained)")
    p.add_argument("--polyak", type=float, default=None, metavar="DECAY",
                   help=f"evaluate an exponential moving average of the weights with this decay "
                   f"(§6: the final model is Polyak-averaged; default: {POLYAK} on ImageNet, "
                   f"off (0) on the small sets' short runs)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set; the poly schedule reaches 0 at the last "
                   f"(default: {EPOCHS['poly']}, BVLC's quick_solver; {EPOCHS['step']} with "
                   f"--lr-schedule step, BVLC's solver; NIN {EPOCHS['nin']})")
    data.add_classify_arg(p, needs="--weights, or --pretrained for torchvision's ImageNet "
                          "network")
    p.add_argument("--lr-schedule", default=None, choices=["poly", "step"],
                   help="GoogLeNet: poly: lr x (1 - t/T)^0.5 per iteration, to 0 at the end of "
                   "--epochs (BVLC's quick_solver.prototxt; default); step: x 0.96 every "
                   "--lr-every epochs (§6; BVLC's solver.prototxt)")
    p.add_argument("--lr-every", type=int, default=LR_EVERY,
                   help="GoogLeNet, --lr-schedule step: epochs between the x 0.96 lr decays "
                   "(default: 8, §6)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"GoogLeNet: a linear lr warm-up over the first N epochs from lr x "
                   f"{BVLC_BATCH}/batch (BVLC's batch) to lr (Goyal et al. 2017; default: "
                   f"{WARMUP_EPOCHS} for --variant paper above batch {BVLC_BATCH}, else 0)")
    p.add_argument("--lr-steps", type=int, nargs="*", default=None,
                   help=f"NIN: epochs at which the lr is divided by 10 (default: {NIN_LR_STEPS})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default: 256; NIN 128)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate (default: 0.1; --variant paper {BVLC_LR} x "
                   f"batch/{BVLC_BATCH}, BVLC's lr per image: 0.08 at 256)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9, §6)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="(default: 2e-4 for GoogLeNet, 1e-4 for NIN: neither paper states one)")
    data.add_runtime_args(p, data.quick_help(QUICK) + "; --variant nin: " +
                          data.quick_help(QUICK_NIN, "the same images"), workers=data.MACHINE,
                          pretrained_help="start from torchvision's ImageNet weights "
                          "(IMAGENET1K_V1)")
    return p


def resolve_defaults(args):
    nin = args.variant == "nin"
    args.data = args.data or ("cifar10" if nin else "imagenet")
    data.check_task(args.data, "classification")
    imagenet = args.data == "imagenet"
    if nin and (args.naive or args.pretrained):
        raise data.DataError("--naive and --pretrained are GoogLeNet options; drop them with "
                             "--variant nin")
    if nin and (args.lr_schedule or args.warmup_epochs is not None):
        raise data.DataError("--lr-schedule and --warmup-epochs are GoogLeNet's; NIN's lr "
                             "steps are --lr-steps")
    args.no_aux = args.no_aux or nin
    data.apply_quick(args, QUICK_NIN if nin else QUICK)
    args.width = args.width or 1.0
    args.lr_schedule = None if nin else args.lr_schedule or "poly"
    args.epochs = args.epochs or EPOCHS["nin" if nin else args.lr_schedule]
    args.batch_size = args.batch_size or (128 if nin else 256)
    # --variant paper: BVLC's lr per image (0.01 at 32); the BN variant the usual 0.1 at 256
    args.lr = args.lr or (BVLC_LR * args.batch_size / BVLC_BATCH if args.variant == "paper"
                          else 0.1)
    if args.warmup_epochs is None and not nin:
        args.warmup_epochs = WARMUP_EPOCHS if args.variant == "paper" and \
            args.batch_size > BVLC_BATCH else 0.0
    args.weight_decay = 1e-4 if nin and args.weight_decay is None else args.weight_decay
    args.weight_decay = 2e-4 if args.weight_decay is None else args.weight_decay
    args.lr_steps = (list(NIN_LR_STEPS) if args.lr_steps is None else args.lr_steps) if nin \
        else None
    if args.img_size is not None and args.data not in ("imagenet", "shapes"):
        raise data.DataError(f"--img-size applies to imagenet and shapes; {args.data} is used at "
                             f"its own size")
    if args.img_size is None and args.data in ("imagenet", "shapes"):
        args.img_size = 224 if imagenet else (16 if args.quick else 32)
    args.test_crops = args.test_crops or (144 if imagenet else 1)
    if args.test_crops != 1 and not imagenet:
        raise data.DataError("--test-crops 10/144 is the ImageNet test; the small sets are tested "
                             "on their single view")
    if args.transform_input is None:
        args.transform_input = args.pretrained
    if args.polyak is None:  # ~10k steps (2 epochs at batch 256) in the average
        args.polyak = POLYAK if imagenet and not nin else 0.0
    if not 0 <= args.polyak < 1:
        raise data.DataError(f"--polyak {args.polyak}: the decay must be in [0, 1) (0: off)")


def classify(args, state, device):
    """--classify PATH: the user's images through the checkpoint's network (its Polyak average
    when it holds one, the weights §6 tests) or torchvision's ImageNet one (--pretrained), the
    single centre view of the test (ImageNet: resize 256, centre crop); no data set read."""
    if args.weights:
        classes, (mean, std), shape = data.prediction_settings(state, args.weights)
    else:  # --pretrained: the whole ImageNet network, ImageNet's classes and input
        classes, (mean, std), shape = (data.imagenet_class_names(),
                                       (data.IMAGENET_MEAN, data.IMAGENET_STD), (3, 224))
    imagenet = args.data == "imagenet"
    model = googlenet(len(classes), not args.no_aux, args.variant, shape[0], args.naive,
                      args.width, small_input=not imagenet)
    model.transform_input = args.transform_input
    if args.pretrained:
        load_pretrained(model, args)
    else:
        data.load_weights(model, state, args.weights)
    if "ema" in (state or {}):
        ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
        ema.load_state_dict(state["ema"])
        model = ema.module
    model.to(device).eval()
    return data.classify_images(args.classify, args.out, lambda x: model(x.to(device)),
                                classes, mean, std, shape, imagenet=imagenet)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "googlenet.py", ("variant", "naive", "no_aux", "width",
                                                         "img_size", "transform_input", "polyak"),
                                  may_differ=("test_crops",),
                                  name="nin" if args.variant == "nin" else None)
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size")
    t0 = time.time()
    resolve_defaults(args)  # --quick included
    imagenet, nin = args.data == "imagenet", args.variant == "nin"
    # --out by default runs/googlenet-DATA or runs/nin-DATA: the two families' runs apart
    device, rank, world, is_main = data.setup(args, "googlenet.py",
                                              name="nin" if nin else None)
    if args.classify:
        return classify(args, state, device)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. ImageNet: §6 crops and distortions, whole test images for §7. Small sets: the whole
    # set on the device with data.py's padding + random crop + flip.
    split = data.train_split(args)  # the whole training set unless --holdout
    if imagenet:
        train_loader, val_loader, test_loader, info = imagenet_loaders(args, device)
    else:
        train_loader, val_loader, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir,
            not args.no_download, args.quick, args.seed, augment=True, eval_batch_size=250,
            size=args.img_size, train_split=split, limit=args.limit, test_only=args.eval_only,
            stats=(state or {}).get("normalisation"),  # --eval-only: the test split alone
            gpu_decode=args.gpu_decode)
    train_loader, val_loader, test_loader = data.dry_run_batches(args, train_loader, val_loader,
                                                                 test_loader)
    classes, (n_train, n_val, n_test) = info["classes"], info["sizes"]

    model = googlenet(len(classes), not args.no_aux, args.variant, info["in_channels"],
                      args.naive, args.width, small_input=not imagenet)
    model.transform_input = args.transform_input
    model.to(device)
    arch = arch_name(args)
    if args.pretrained:
        load_pretrained(model, args)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The Caffe references' rates (biases 2x lr, no weight decay); NIN's also sets cccp6's.
    # GoogLeNet's BN (--variant torchvision): scale and shift both at 1x lr without weight
    # decay, in data.caffe_param_groups (BVLC's net has no BN to follow).
    params = model.param_groups(args.lr, args.weight_decay) if nin else \
        data.caffe_param_groups(model, args.lr, args.weight_decay)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    per_epoch = max(1, 0 if train_loader is None else len(train_loader))  # --eval-only: any
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped after every iteration
        optimizer, lr_lambda(args, per_epoch))
    scaler = data.grad_scaler(device, args.amp)
    ema = None
    if args.polyak:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.polyak),
            use_buffers=True)
    departures = DEPARTURES_NIN if nin else DEPARTURES
    config = {**vars(args), "sizes": {"train": n_train, "val": n_val, "test": n_test},
              "arch": arch, "parameters": count_parameters(model),
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": departures}
    if is_main:
        schedule = f"/ 10 at epochs {args.lr_steps}" if nin else f"{args.lr_schedule} schedule" \
            + (f", {args.warmup_epochs:g}-epoch warm-up" if args.warmup_epochs else "")
        print(f"googlenet.py: {arch} on {args.data} ({n_train} train / {n_val} val / {n_test} "
              f"test), {config['parameters']:,} parameters, device {device}, {args.world} "
              f"process(es), {args.epochs} epochs, lr {args.lr:g} ({schedule}), test crops "
              f"{args.test_crops}")
        for d in departures:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if ema is not None:
            ema.load_state_dict(data.load_checkpoint(ckpt_path, arch)["ema"])
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    elif args.weights and ema is not None and "ema" in data.load_checkpoint(args.weights, arch):
        ema.load_state_dict(data.load_checkpoint(args.weights, arch)["ema"])
    elif args.eval_only:
        ema = None  # nothing averaged to test: the weights themselves

    net = data.wrap(model, args)
    final = ema.module if ema is not None else model  # §6: the averaged weights are tested

    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), args.epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, args.epochs):
            data.set_epoch(train_loader, epoch)
            loss = train_one_epoch(net, train_loader, optimizer, scaler, args, device, epoch,
                                   progress, ema, model, scheduler)
            # the lr of the epoch's last step (the optimizer's is the next one's: 0 after poly's
            # last epoch)
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": progress.lr}
            if val_loader is not None:  # ImageNet has none: its official val set is the test set
                row["val_error"] = evaluate(final, val_loader, args, device,
                                           len(classes))["test_error"]
            if data.eval_due(args, epoch):  # --eval-every: as the final test (its network, crops)
                t = evaluate(final, test_loader, args, device, len(classes), crops=args.test_crops)
                row["test_error"] = t["test_error"]
                if "top5_error" in t:  # >= 100 classes
                    row["test_top5_error"] = t["top5_error"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f}" + "".join(
                    f" {k} {100 * row[k]:.2f}%" for k in ("val_error", "test_error",
                                                         "test_top5_error") if k in row) +
                      f" lr {row['lr']:.3g}")
            extra = {"ema": ema.state_dict()} if ema is not None else {}
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, **data.test_settings(info), **extra)
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(final, test_loader, args, device, len(classes), crops=args.test_crops)
    keys = ["test_error", "test_accuracy", "balanced_error", "single_crop_error", "top5_error",
            "single_crop_top5_error"]
    if is_main:
        print(f"test_error {100 * test['test_error']:.2f}% ({test['errors']}/{test['samples']}, "
              f"{args.test_crops} crop(s)) single_crop_error {100 * test['single_crop_error']:.2f}%"
              f" balanced_error {100 * test['balanced_error']:.2f}%" +
              (f" top5_error {100 * test['top5_error']:.2f}%" if "top5_error" in test else ""))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "googlenet.py", args.data,
        {k: test[k] for k in keys if k in test}, paper=NIN_PAPER if nin else PAPER,
        config=config, device=str(device), seconds=time.time() - t0,
        history=history, **metrics.class_records(test, classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "googlenet.py")
