"""SSD: W. Liu, D. Anguelov, D. Erhan, C. Szegedy, S. Reed, C.-Y. Fu, A. C. Berg, "SSD: Single
Shot MultiBox Detector", ECCV 2016, arXiv:1512.02325.

    python ssd.py --data voc --pretrained --cuda            # SSD300, VOC07+12 -> VOC07 test
    python ssd.py --data voc --pretrained --img-size 512 --cuda  # SSD512
    python ssd.py --data shapes-det --quick                 # offline: a 96-pixel SSD, CPU minutes
    python ssd.py --detect photo.jpg --weights runs/ssd-voc/checkpoint.pt --out runs/ssd-detect
    torchrun --nproc_per_node=2 ssd.py --data voc --pretrained   # data-parallel, same global batch

Paper (Table 1, VOC2007 test, trained on 07+12): SSD300 74.3 % mAP, SSD512 76.8 % mAP (VOC07
11-point AP, the devkit's protocol; --voc12-ap for the area under the curve).
Ours: see the README's results table (the command and hardware of every figure are there);
`--data shapes-det --quick` (12 epochs): 55.6 / 60.9 / 47.9 % mAP (VOC07 11-point) over seeds 0,
1, 2, 12-15 min each on one thread of a 2-core CPU (bench/README.md, "Quick runs").

Model (§2.1, Fig. 2): VGG-16 (torchvision's `features` layout, so --pretrained loads its ImageNet
weights) with pool3 in ceil mode (75 -> 38), pool5 3x3/1 pad 1, fc6/fc7 as a dilated 3x3
convolution (1024, dilation 6) and a 1x1 convolution (1024), conv4_3 L2-normalised with a learned
per-channel scale initialised to 20 (ParseNet), then the extra layers conv8_2 ... conv11_2 (and
conv12_2 for SSD512). Each of the 6 (7) source maps gets a 3x3 convolution predicting, for each of
its 4 or 6 default boxes per cell, C+1 class scores and 4 offsets: 8,732 boxes for SSD300,
24,564 for SSD512. Default boxes (§2.2), matching, the MultiBox loss with 3:1 hard negative mining,
the augmentation (§2.2 "Data augmentation") and the inference (§3, NMS 0.45, top 200) follow.
SSD512's extra layers are the released Caffe model's (conv8_2..conv11_2 3x3/2, conv12_2 4x4);
torchvision has SSD300 only, whose layers and parameter count (26,285,486 for VOC) ours equal.
Departures: DEPARTURES, printed at start.
"""
import argparse
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_convert, box_iou
from torchvision.transforms import v2

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Liu et al. 2016, arXiv:1512.02325, Table 1", "data": "voc",
         "map": 0.743, "map_ssd512": 0.768, "boxes_ssd300": 8732, "boxes_ssd512": 24564}


def paper_for(img_size):
    """The figures a run is compared with: Table 1's mAP of the network it trained (SSD300 74.3,
    SSD512 76.8 on VOC2007 test); at another --img-size the paper has none."""
    return {**PAPER, "map": {300: PAPER["map"], 512: PAPER["map_ssd512"]}.get(img_size)}

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
# Extra layers (§2.1, Fig. 2): (1x1 channels, 3x3 channels, kernel, stride, padding).
EXTRAS = {300: [(256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0)],
          512: [(256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1),
                (128, 256, 3, 2, 1), (128, 256, 4, 1, 1)]}
# Aspect ratios beyond 1 per source map (each r adds r and 1/r): 4 boxes with [2], 6 with [2, 3].
RATIOS = {300: [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
          512: [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]}
# Scales of the released Caffe models (ssd_pascal.py): min_ratio, max_ratio (percent of the
# image) spread over the maps after conv4_3, and conv4_3's own scale.
CAFFE_SCALES = {300: (20, 90, 10), 512: (15, 90, 7)}
VARIANCES = (0.1, 0.2)     # the Caffe code's "variances": offsets are divided by them
MATCH_IOU = 0.5            # §2.2: a default box is positive when its IoU with a box exceeds 0.5
NEG_POS = 3                # §2.2 "Hard negative mining": at most 3 negatives per positive
NMS_IOU, SCORE_MIN, TOP_K, PRE_NMS = 0.45, 0.01, 200, 400   # §3 and the Caffe test settings
# The released VOC07+12 solver (ssd_pascal.py: max_iter 120k, lr / 10 at 80k and 100k, batch
# 32), which produced the paper's 74.3 % (§3.1 gives 40k + 10k + 10k for VOC2007 alone, §3.6
# "doubled" with the zoom-out augmentation: the release is that recipe, for 07+12).
ITERATIONS, LR_STEPS = 120_000, (80_000 / 120_000, 100_000 / 120_000)
# --quick on shapes-det, a schedule of its own: lr / 10 at 3/4 and 5/6 of --epochs (epochs 9 and
# 10 of 12; the release's 2/3 cuts at epoch 8, before the short run has learnt). Measured on 1
# thread: at 9b1b37b, seed 0, the release's fractions 58.90 % mAP, these 65.14 %; at 3a08afe over
# seeds 0, 1, 2 55.64 / 60.92 / 47.89 % against 49.12 / 59.05 / 40.57 (bench/README.md).
QUICK_LR_STEPS = (3 / 4, 5 / 6)
TRAIN_DIFFICULT = True     # the release trains on VOC's difficult objects (use_difficult_gt)
VOC_TRAINVAL = 16_551      # VOC2007 trainval + VOC2012 trainval images
EPOCHS = round(ITERATIONS * 32 / VOC_TRAINVAL)  # 120k iterations at batch 32 = 232 epochs


# ---------------------------------------------------------------------------------------------
# Default boxes (§2.2 "Choosing scales and aspect ratios for default boxes")

def box_scales(num_maps, size, rule="caffe"):
    """The num_maps + 1 scales s_1..s_{m+1}; s_{m+1} only gives the last map's extra box
    sqrt(s_m s_{m+1}). 'paper': eq. (4), s_k = 0.2 + 0.7 (k - 1) / (m - 1) over the maps after
    conv4_3, 0.1 on conv4_3 (§3.1), continued linearly past the last. 'caffe': the released
    models' integer-percent rule (SSD300: 0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05)."""
    m = num_maps - 1  # maps after conv4_3
    if rule == "paper":
        step = 0.7 / (m - 1)
        return [0.1] + [0.2 + step * k for k in range(m + 1)]
    lo, hi, first = CAFFE_SCALES.get(size, (20, 90, 10))
    step = (hi - lo) // (m - 1)
    return [first / 100] + [(lo + step * k) / 100 for k in range(m + 1)]


def default_boxes(map_sizes, ratios, scales):
    """(D, 4) default boxes (cx, cy, w, h) in [0, 1], in the order of the heads' outputs: map by
    map, cell by cell (row-major), then per cell: s_k x s_k, s'_k x s'_k (s'_k = sqrt(s_k
    s_{k+1})), then s_k sqrt(r) x s_k / sqrt(r) and its transpose for each r. Centres
    ((j + 0.5) / f_k, (i + 0.5) / f_k); widths and heights clipped to [0, 1] (the centres are
    inside already; torchvision's DefaultBoxGenerator clips the same way)."""
    out = []
    for k, (f, rs) in enumerate(zip(map_sizes, ratios)):
        s, s_next = scales[k], scales[k + 1]
        wh = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in rs:
            wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        wh = torch.tensor(wh).clamp(0, 1)
        c = (torch.arange(f, dtype=torch.float32) + 0.5) / f
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        centres = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
        out.append(torch.cat([centres, wh[None].expand(f * f, -1, -1)], -1).reshape(-1, 4))
    return torch.cat(out)


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "default-box scales of the released Caffe models (0.1, 0.2, 0.37, 0.54, 0.71, 0.88; 1.05 "
    "for the last extra box) rather than eq. (4)'s 0.2..0.9 (--box-scales paper); widths and "
    "heights clipped to [0, 1]; centres (i + 0.5) / f_k as §2.2 (Caffe uses its step sizes)",
    "inputs normalised with torchvision's ImageNet mean/std in RGB (Caffe: BGR mean subtraction), "
    "for torchvision's VGG-16 weights",
    "the release's schedule (ssd_pascal.py, not §3.1's 40k + 10k + 10k for VOC2007), counted "
    "in epochs: lr / 10 at 2/3 and 5/6 of --epochs (120k iterations at batch 32 = 232 epochs "
    "of VOC07+12); one lr and weight decay for every parameter (Caffe doubles the bias lr and "
    "does not decay biases)",
    "trains on the difficult objects too, as the release (use_difficult_gt); they are ignored "
    "in the evaluation, as VOC's",
    "augmentation via torchvision.transforms.v2 (the release's photometric distortion as "
    "CaffeDistort, RandomZoomOut, RandomIoUCrop, flip); CaffeDistort's saturation step blends "
    "with the grey image (torchvision's adjust_saturation) where Caffe scales HSV's S channel; "
    "the IoU crop is skipped on images without a box; each (epoch, image) draws its "
    "augmentation from its own seed (exact --resume and torchrun)",
    "a default box is positive when its IoU exceeds 0.5 (the paper's words; Caffe: >= 0.5)",
    "without --pretrained the VGG-16 base starts from He init (the paper always starts from "
    "ImageNet weights); --bn (vgg16_bn layout, BN after every convolution) is a CPU option",
    "--quick on shapes-det: a 96-pixel SSD on the 64-pixel images upsampled (maps 12, 6, 3, 2, "
    "1, 866 default boxes; the extra layers halve the map; at 64 pixels only 43 % of the "
    "objects have a default box of IoU > 0.5, at 96 67 %), width 0.25, BatchNorm after every "
    "convolution, from scratch with Adam (lr 1e-3) for 12 epochs (SGD at lr 1e-2 diverges, at "
    "1e-3 learns too slowly for minutes on a CPU), lr / 10 at 3/4 and 5/6 of the epochs (9 "
    "and 10 of 12; the release's 2/3 cut at epoch 8 measured 58.90 vs 65.14 % mAP), the light "
    "augmentation (photometric distortion and flip: the zoom-out and IoU crop need far longer "
    "training; measured 3.5 % mAP with them vs 9.7 % without at 64 pixels after 6 epochs)",
]


# ---------------------------------------------------------------------------------------------
# Model

def _c(c, width):
    """Channel count c times the --width multiplier (1 = the paper)."""
    return max(1, round(c * width))


def conv_out(n, conv):
    """The output side of a Conv2d / MaxPool2d on an n x n input (floor or ceil mode)."""
    pair = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    k, s, p = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
    d = pair(getattr(conv, "dilation", 1))
    x = (n + 2 * p - d * (k - 1) - 1) / s
    return (math.ceil(x) if getattr(conv, "ceil_mode", False) else math.floor(x)) + 1


class L2Norm(nn.Module):
    """§3.1 (after ParseNet): each position's channel vector scaled to unit L2 norm, then by a
    learned per-channel scale initialised to 20."""

    def __init__(self, channels, scale=20.0, eps=1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x):
        return x / (x.norm(dim=1, keepdim=True) + self.eps) * self.weight[None, :, None, None]


def conv_block(c_in, c_out, bn, **kw):
    """conv (+ BatchNorm, the CPU option) + ReLU."""
    layers = [nn.Conv2d(c_in, c_out, **kw)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.ReLU(inplace=True)]


class SSD(nn.Module):
    """SSD on a size x size input. `features` has torchvision's vgg16 (vgg16_bn with `bn`)
    layout up to conv5_3's ReLU; fc6/fc7 are `conv6`/`conv7`; `extras[i]` is conv(8+i)_1/_2.
    forward(x) -> (scores (N, D, C+1), offsets (N, D, 4)), D default boxes in `default_boxes`."""

    def __init__(self, num_classes=20, size=300, width=1.0, bn=False, scale_rule="caffe"):
        super().__init__()
        self.size, self.num_classes = size, num_classes
        layers, c = [], 3
        for v in VGG16:
            if v in ("M", "C"):
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=v == "C"))  # pool3: 75 -> 38
            else:
                layers += conv_block(c, _c(v, width), bn, kernel_size=3, padding=1)
                c = _c(v, width)
                if len(layers) == (33 if bn else 23):  # conv4_3's ReLU: the first source
                    self.conv4_3_index = len(layers) - 1
        self.features = nn.Sequential(*layers)
        self.l2norm = L2Norm(_c(512, width))
        self.pool5 = nn.MaxPool2d(3, stride=1, padding=1)
        fc = _c(1024, width)
        self.conv6 = nn.Sequential(*conv_block(c, fc, bn, kernel_size=3, padding=6, dilation=6))
        self.conv7 = nn.Sequential(*conv_block(fc, fc, bn, kernel_size=1))
        # Source map sides, traced through the layers: 38, 19 for SSD300.
        n = size
        for m in self.features:
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                n = conv_out(n, m)
                if m is self.features[self.conv4_3_index - (2 if bn else 1)]:
                    sides = [n]
        sides.append(conv_out(conv_out(n, self.pool5), self.conv6[0]))
        # The extra layers: the paper's for 300 and 512; other sizes (the CPU option) halve the
        # map (3x3/2 pad 1) until it is 1x1.
        spec = EXTRAS.get(size)
        if spec is None:
            spec, s = [], sides[-1]
            while s > 1:
                spec.append((256 if not spec else 128, 512 if not spec else 256, 3, 2, 1))
                s = (s - 1) // 2 + 1
        extras, c_in, channels = [], fc, [_c(512, width), fc]
        for i, (c1, c2, k, s, p) in enumerate(spec):
            c1, c2 = _c(c1, width), _c(c2, width)
            extras.append(nn.Sequential(OrderedDict([
                (f"conv{8 + i}_1", nn.Sequential(*conv_block(c_in, c1, bn, kernel_size=1))),
                (f"conv{8 + i}_2", nn.Sequential(*conv_block(c1, c2, bn, kernel_size=k, stride=s,
                                                             padding=p)))])))
            sides.append(conv_out(sides[-1], extras[-1][1][0]))
            c_in = c2
            channels.append(c2)
        if min(sides) < 1:
            raise ValueError(f"--img-size {size} is too small for SSD's layers (maps {sides})")
        self.extras = nn.ModuleList(extras)
        self.map_sizes = sides
        m = len(sides)
        self.ratios = RATIOS.get(size) or ([[2]] + [[2, 3]] * max(0, m - 3) + [[2]] * 2)[:m]
        self.scales = box_scales(m, size, scale_rule)
        self.num_anchors = [2 + 2 * len(r) for r in self.ratios]
        # §2.1 "Convolutional predictors": one 3x3 convolution per map for the class scores and
        # one for the offsets of all its default boxes.
        self.loc = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1)
                                 for c, a in zip(channels, self.num_anchors))
        self.conf = nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1)
                                  for c, a in zip(channels, self.num_anchors))
        self.register_buffer("anchors", default_boxes(sides, self.ratios, self.scales),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """He init for the VGG base (torchvision's VGG; --pretrained overwrites it), Xavier for
        the rest (the Caffe models' and torchvision's SSD init), zero biases."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("features."):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def sources(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.conv4_3_index:
                out.append(self.l2norm(x))
        x = self.conv7(self.conv6(self.pool5(x)))
        out.append(x)
        for block in self.extras:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x):
        n = x.shape[0]
        locs, confs = [], []
        for f, loc, conf in zip(self.sources(x), self.loc, self.conf):
            # (N, A*K, H, W) -> (N, H*W*A, K): cell by cell, then the cell's default boxes
            locs.append(loc(f).permute(0, 2, 3, 1).reshape(n, -1, 4))
            confs.append(conf(f).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes + 1))
        return torch.cat(confs, 1), torch.cat(locs, 1)


def load_pretrained(model):
    """torchvision's VGG16_Weights.IMAGENET1K_V1: the conv layers as they are, and fc6/fc7
    subsampled into conv6/conv7 as the paper does (§3 "we convert fc6 and fc7 to convolutional
    layers, subsample parameters from fc6 and fc7"; the DeepLab/Caffe 'decimation': every 4th
    output unit, fc6's 7x7 kernel taken at every 3rd tap -> 3x3 with dilation 6, fc7's inputs
    every 4th)."""
    if model.features[0].out_channels != 64 or isinstance(model.features[1], nn.BatchNorm2d):
        raise data.DataError("--pretrained needs --width 1 without --bn (torchvision's VGG-16 "
                             "layout); drop one of the flags")
    state = data.torchvision_weights(torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    model.features.load_state_dict({k[9:]: v for k, v in state.items()
                                    if k.startswith("features.")})
    conv6, conv7 = decimate_fc(state)
    with torch.no_grad():
        for layer, (w, b) in ((model.conv6[0], conv6), (model.conv7[0], conv7)):
            layer.weight.copy_(w), layer.bias.copy_(b)


def decimate_fc(state):
    """((conv6 weight, bias), (conv7 weight, bias)) subsampled from torchvision's fc6/fc7."""
    fc6 = state["classifier.0.weight"]
    w6 = fc6.view(fc6.shape[0], -1, 7, 7)[::4, :, ::3, ::3]
    b6 = state["classifier.0.bias"][::4]
    w7 = state["classifier.3.weight"][::4, ::4, None, None]
    b7 = state["classifier.3.bias"][::4]
    return (w6.contiguous(), b6), (w7.contiguous(), b7)


# ---------------------------------------------------------------------------------------------
# Matching, encoding and the MultiBox loss (§2.2 "Training")

def encode(boxes, anchors, variances=VARIANCES):
    """Ground-truth boxes (..., D, 4) XYXY in [0, 1] -> offsets from the matched default boxes
    (cx, cy, w, h): ((g_cx - d_cx) / (v0 d_w), (g_cy - d_cy) / (v0 d_h), log(g_w / d_w) / v1,
    log(g_h / d_h) / v1) (eq. 2, divided by the Caffe code's variances)."""
    g = box_convert(boxes, "xyxy", "cxcywh")
    return torch.cat([(g[..., :2] - anchors[:, :2]) / (variances[0] * anchors[:, 2:]),
                      torch.log(g[..., 2:] / anchors[:, 2:]) / variances[1]], -1)


def decode(offsets, anchors, variances=VARIANCES):
    """The inverse of `encode`: offsets (..., D, 4) -> boxes (..., D, 4) XYXY in [0, 1] units."""
    cxcy = anchors[:, :2] + offsets[..., :2] * variances[0] * anchors[:, 2:]
    wh = anchors[:, 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return box_convert(torch.cat([cxcy, wh], -1), "cxcywh", "xyxy")


def match(boxes, labels, anchors, threshold=MATCH_IOU):
    """§2.2 "Matching strategy", for a whole batch at once: each ground truth to the default box
    of best IoU (so every object has one, whatever its IoU), then every default box to the
    ground truth of best IoU when that IoU exceeds `threshold`. boxes (N, G, 4) XYXY in [0, 1],
    labels (N, G) in 0..C-1 and -1 past an image's own boxes (the batch padded to its most).
    Returns (classes (N, D) with 0 = background and 1 + label, matched boxes (N, D, 4)); an
    image without boxes gets background and zero boxes. Nothing is read back to the host (a
    per-image loop over the forced matches took ~3 host syncs an image on CUDA)."""
    n, g = labels.shape
    real = labels >= 0
    iou = box_iou(boxes.reshape(-1, 4), box_convert(anchors, "cxcywh", "xyxy")).view(n, g, -1)
    iou = iou.masked_fill(~real[..., None], -1.0)             # padding: below every real IoU
    best_iou, best_gt = iou.max(1)                            # per default box (N, D)
    forced = iou.argmax(2)                                    # per ground truth (N, G)
    # The forced matches win over the threshold rule; a later object wins a contested box: the
    # highest object index forced onto each box (amax: one answer in any order, unlike scatter_
    # with repeated indices), -1 where none is.
    order = torch.arange(g, device=labels.device).expand(n, g).masked_fill(~real, -1)
    forced_gt = torch.full_like(best_gt, -1).scatter_reduce_(1, forced, order, "amax")
    best_gt = torch.where(forced_gt >= 0, forced_gt, best_gt)
    best_iou = best_iou.masked_fill(forced_gt >= 0, 2.0)
    classes = torch.where(best_iou > threshold, labels.gather(1, best_gt) + 1, 0)
    return classes, boxes.gather(1, best_gt[..., None].expand(-1, -1, 4))


def hard_negatives(background_loss, positive, ratio=NEG_POS):
    """§2.2 "Hard negative mining": per image, the negatives of highest background loss
    (-log p_0), at most `ratio` x the image's positives. (N, D) -> a (N, D) bool mask. The sort
    is stable: equal losses are taken in the same order on every device."""
    loss = background_loss.detach().masked_fill(positive, -math.inf)
    rank = loss.argsort(dim=1, descending=True, stable=True).argsort(1)  # 0 = the hardest
    n_neg = (ratio * positive.sum(1, keepdim=True)).clamp(max=positive.shape[1] - 1)
    return (rank < n_neg) & ~positive


def multibox_loss(scores, offsets, classes, targets, num_positive=None):
    """eq. (1): L = (L_conf + alpha L_loc) / N with alpha = 1: softmax cross-entropy over the C+1
    classes on the positives and the mined negatives, smooth L1 (beta 1) on the positives'
    offsets; N = the number of positives (`num_positive` overrides it: the global count under
    torchrun), and L = 0 when N = 0. Returns (loss, (L_conf / N, L_loc / N)).
    Written without a host sync: the terms are sums over masks (indexing by a boolean mask sizes
    its result from the mask's count, read back to the host), N = 0 is handled by the division
    (then no box is positive or mined and both sums are 0), and the cross-entropy is taken on
    (N * D, C + 1) rows, unreduced: on a (N, C + 1, D) input it would run nll_loss2d, which has
    no deterministic CUDA kernel."""
    positive = classes > 0
    ce = F.cross_entropy(scores.flatten(0, 1).float(), classes.flatten(),
                         reduction="none").view_as(classes)
    negative = hard_negatives(torch.where(positive, 0.0, ce), positive)
    n = positive.sum() if num_positive is None else torch.as_tensor(num_positive)
    conf = torch.where(positive | negative, ce, 0.0).sum()
    loc = torch.where(positive[..., None], F.smooth_l1_loss(offsets.float(), targets, beta=1.0,
                                                            reduction="none"), 0.0).sum()
    n = torch.where(n > 0, n, 1)  # N = 0: L = 0, and a graph (DDP needs every parameter in it)
    return (conf + loc) / n, ((conf / n).detach(), (loc / n).detach())


def build_targets(boxes, labels, anchors):
    """Match and encode a batch (padded as `match` takes it): (classes (N, D), offsets (N, D,
    4)); offsets 0 for an image without boxes."""
    classes, matched = match(boxes, labels, anchors)
    has_boxes = (labels >= 0).any(1)[:, None, None]
    return classes, torch.where(has_boxes, encode(matched, anchors), 0.0)


# ---------------------------------------------------------------------------------------------
# Inference (§3: NMS 0.45 per class, score >= 0.01, 200 detections per image)

@torch.no_grad()
def postprocess(scores, offsets, anchors, score_min=SCORE_MIN, nms_iou=NMS_IOU, top_k=TOP_K,
                pre_nms=PRE_NMS):
    """Per image: softmax, decode, then for each class its `pre_nms` best boxes (the Caffe test
    setting) scoring >= score_min, per-class NMS, and the top_k best. Boxes XYXY in [0, 1]."""
    probs = scores.float().softmax(-1)[..., 1:]                     # (N, D, C)
    boxes = decode(offsets.float(), anchors).clamp(0, 1)
    out = []
    for p, b in zip(probs, boxes):
        k = min(pre_nms, p.shape[0])
        s, idx = p.topk(k, dim=0)                                   # (k, C)
        labels = torch.arange(p.shape[1], device=p.device).expand(k, -1)
        keep = s >= score_min
        s, idx, labels = s[keep], idx[keep], labels[keep]
        bb = b[idx]
        kept = batched_nms(bb, s, labels, nms_iou)[:top_k]
        out.append({"boxes": bb[kept], "scores": s[kept], "labels": labels[kept]})
    return out


# ---------------------------------------------------------------------------------------------
# Data glue: the paper's augmentation with transforms.v2 (boxes follow the image)

class IoUCropIfBoxes(v2.RandomIoUCrop):
    """v2.RandomIoUCrop, left out on an image without boxes (a VOC image whose objects are all
    'difficult'), where it has no IoU to constrain. Its crop search draws what torchvision's
    does, in the same order, and decides with the same float32 arithmetic, but checks each trial
    on a few numpy numbers instead of ~15 torch calls: a high minimum IoU can take hundreds of
    trials per image (13.6-27 ms an image in torchvision's loop, 2.8-3.3 here: `python
    bench/bench_input.py --steps`). Written out, not torchvision.ops.box_iou, for that reason
    only; tests hold its crops equal to torchvision's."""

    def forward(self, *inputs):
        target = inputs[1] if len(inputs) > 1 else None
        if isinstance(target, dict) and len(target["boxes"]) == 0:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)

    def make_params(self, flat_inputs):
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        h, w = boxes.canvas_size
        b = v2.functional.convert_bounding_box_format(
            boxes.as_subclass(torch.Tensor), boxes.format, tv_tensors.BoundingBoxFormat.XYXY)
        b = b.to(torch.float32).numpy()
        f32 = np.float32
        cx, cy = f32(0.5) * (b[:, 0] + b[:, 2]), f32(0.5) * (b[:, 1] + b[:, 3])
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        low, span = f32(self.min_scale), f32(self.max_scale - self.min_scale)
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:  # the whole image
                return {}
            for _ in range(self.trials):
                r = low + span * torch.rand(2).numpy()
                new_w, new_h = int(f32(w) * r[0]), int(f32(h) * r[1])
                if not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                r = torch.rand(2).numpy()
                left, top = int(f32(w - new_w) * r[0]), int(f32(h - new_h) * r[1])
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                within = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not within.any():  # no box centre in the crop
                    continue
                x0, y0, x1, y1 = b[within].T  # torchvision.ops.box_iou's steps, in float32
                wh_x = (np.minimum(x1, f32(right)) - np.maximum(x0, f32(left))).clip(min=0)
                wh_y = (np.minimum(y1, f32(bottom)) - np.maximum(y0, f32(top))).clip(min=0)
                inter = wh_x * wh_y
                iou = inter / (area[within] + f32(new_w) * f32(new_h) - inter)
                if iou.max() < f32(min_iou):
                    continue
                return dict(top=top, left=left, height=new_h, width=new_w,
                            is_within_crop_area=torch.from_numpy(within))


class CaffeDistort(v2.Transform):
    """The released SSD's photometric distortion (ssd_pascal.py `distort_param`, Caffe's
    ApplyDistort in im_transforms.cpp), each step with probability 0.5: brightness + U(-32, 32)
    (of 255), contrast x U(0.5, 1.5) (Caffe scales the pixel values), saturation x U(0.5, 1.5),
    hue + U(-18, 18) on OpenCV's 0-180 scale (a tenth of the circle); in the order brightness,
    contrast, saturation, hue, or (half the time) brightness, saturation, hue, contrast. The
    channels are never permuted (`random_order_prob: 0`). Values are clipped to [0, 255] after
    each step, as Caffe's 8-bit images are."""
    _transformed_types = (tv_tensors.Image,)
    BRIGHTNESS, CONTRAST, SATURATION, HUE = 32 / 255, (0.5, 1.5), (0.5, 1.5), 18 / 180

    def make_params(self, flat_inputs):
        u = torch.rand(9).tolist()  # u[1:5]: whether each step happens, u[5:]: its amount
        (c0, c1), (s0, s1) = self.CONTRAST, self.SATURATION
        return {"contrast_last": u[0] < 0.5,
                "brightness": (2 * u[5] - 1) * self.BRIGHTNESS if u[1] < 0.5 else None,
                "contrast": c0 + u[6] * (c1 - c0) if u[2] < 0.5 else None,
                "saturation": s0 + u[7] * (s1 - s0) if u[3] < 0.5 else None,
                "hue": (2 * u[8] - 1) * self.HUE if u[4] < 0.5 else None}

    def transform(self, inpt, params):
        dtype = inpt.dtype
        x = v2.functional.to_dtype(inpt, torch.float32, scale=True)
        if params["brightness"] is not None:
            x = (x + params["brightness"]).clamp(0, 1)

        def contrast(x):
            return x if params["contrast"] is None else (x * params["contrast"]).clamp(0, 1)
        if not params["contrast_last"]:
            x = contrast(x)
        if params["saturation"] is not None:
            x = v2.functional.adjust_saturation(x, params["saturation"])
        if params["hue"] is not None:
            x = v2.functional.adjust_hue(x, params["hue"])
        if params["contrast_last"]:
            x = contrast(x)
        return tv_tensors.wrap(v2.functional.to_dtype(x, dtype, scale=True), like=inpt)


def train_transforms(size, mean, std, zoom=4.0, kind="paper"):
    """§2.2 "Data augmentation": the released photometric distortion (`CaffeDistort`), the zoom-out
    'expansion' (§3.6: up to 4x, filled with the mean), the IoU-constrained crop (min IoU in
    {0.1, 0.3, 0.5, 0.7, 0.9}, the whole image, or any; per-side scale in [0.3, 1], i.e. the
    paper's [0.1, 1] of the area; boxes kept when their centre is inside), a horizontal flip
    with probability 0.5, the resize to size x size. kind 'light': only the distortions and the
    flip; 'none': only the resize."""
    fill = {tv_tensors.Image: [round(255 * m) for m in mean], "others": 0}
    ops = [CaffeDistort()] if kind != "none" else []
    if kind == "paper":
        if zoom > 1:
            ops.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, zoom), p=0.5))
        ops.append(IoUCropIfBoxes())
    if kind != "none":
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.Resize((size, size), antialias=True),
            v2.SanitizeBoundingBoxes(labels_getter=data.box_fields),
            v2.ToDtype(torch.float32, scale=True), data.Normalize(mean, std)]
    return v2.Compose(ops)


class EvalTransform:
    """The test view: resized to size x size and normalised; the original boxes, difficult flags
    and image size are kept in the target for the evaluation in original pixels."""

    def __init__(self, size, mean, std):
        self.ops = v2.Compose([v2.Resize((size, size), antialias=True),
                               v2.ToDtype(torch.float32, scale=True), data.Normalize(mean, std)])

    def __call__(self, image, target):
        gt = {"boxes": target["boxes"].as_subclass(torch.Tensor).clone(),
              "labels": target["labels"], "difficult": target["difficult"],
              "orig_size": tuple(image.shape[-2:])}
        return self.ops(image, target)[0], gt


def train_collate(batch):
    """(images (N, 3, size, size), boxes (N, G, 4) in pixels of the training view, labels (N,
    G), -1 past an image's own boxes): the ground truths padded to the batch's most (at least
    1), built in the loader's workers and pinned with the images. The step then moves two small
    tensors to the device, where `match` takes the whole batch at once (not a list of per-image
    tensors, each a blocking copy)."""
    images, targets = data.detection_collate(batch)
    g = max([1] + [len(t["labels"]) for t in targets])
    # where the images are: the workers' CPU, or the GPU under --gpu-decode (no copy back)
    boxes = torch.zeros(len(targets), g, 4, device=images.device)
    labels = torch.full((len(targets), g), -1, dtype=torch.int64, device=images.device)
    for i, t in enumerate(targets):
        boxes[i, :len(t["labels"])] = t["boxes"].as_subclass(torch.Tensor)
        labels[i, :len(t["labels"])] = t["labels"]
    return images, boxes, labels


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def lr_factor(epoch, epochs, steps=LR_STEPS):
    """The release: lr / 10 at 80k and 100k of 120k iterations, as fractions of --epochs
    (`steps`; --quick on shapes-det: QUICK_LR_STEPS)."""
    return 0.1 ** sum(epoch >= round(f * epochs) for f in steps)


def train_one_epoch(net, model, loader, optimizer, scaler, args, device, epoch, progress):
    """One pass; returns the epoch's mean (loss, L_conf / N, L_loc / N) over every rank's
    images. No host sync per step: the terms are summed on the device and read at the end."""
    net.train()
    terms, n = torch.zeros(2, dtype=torch.float64, device=device), 0
    for x, boxes, labels in loader:
        x = x.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        boxes = boxes.to(device, non_blocking=True) / model.size  # XYXY in [0, 1]
        classes, offsets = build_targets(boxes, labels.to(device, non_blocking=True),
                                         model.anchors)
        # Under torchrun, N is the positives of the global batch (DDP averages the gradients
        # of the world's processes, hence the factor world): the same loss as one process.
        n_pos = (classes > 0).sum()
        if args.world > 1:
            torch.distributed.all_reduce(n_pos)
            n_pos = n_pos / args.world
        with data.autocast(device, args.amp):
            scores, locs = net(x)
        loss, (l_conf, l_loc) = multibox_loss(scores, locs, classes, offsets, n_pos)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        terms += torch.stack([l_conf, l_loc]) * len(x)
        n += len(x)
        progress.step(len(x) * args.world, loss, optimizer.param_groups[0]["lr"], epoch,
                      n=len(x))
    loss = progress.epoch_loss()  # the losses read here, over every rank's images
    return [loss] + [metrics.global_mean(t, n, device) for t in terms]


@torch.no_grad()
def detect(model, x, sizes, args):
    """Detections of a batch in the original pixels: [{"boxes", "scores", "labels"}]."""
    with data.autocast(x.device, args.amp):
        scores, offsets = model(x)
    out = []
    # Per image: postprocess's score threshold and NMS, and these copies, read back to the host
    # (a few syncs an image; the test's cost, not the training's).
    for d, (h, w) in zip(postprocess(scores, offsets, model.anchors, nms_iou=args.nms_iou),
                         sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)  # on the CPU: no copy to make
        out.append({"boxes": d["boxes"].cpu() * scale, "scores": d["scores"].cpu(),
                    "labels": d["labels"].cpu()})
    return out


@torch.no_grad()
def evaluate(model, loader, args, device):
    """VOC AP per class and mAP (07 11-point unless --voc12-ap) of the (unwrapped) model's
    detections in the original pixels, difficult objects ignored (metrics.detection_map): under
    torchrun each rank evaluates its share and the detections and ground truths are gathered."""
    model.eval()
    dets, gts = [], []
    for x, targets in loader:
        dets += detect(model, x.to(device, non_blocking=True), [t["orig_size"] for t in targets],
                       args)
        gts += [{k: t[k] for k in ("boxes", "labels", "difficult")} for t in targets]
    dets, gts = data.gather_shards(dets, gts)
    r = metrics.detection_map(dets, gts, model.num_classes, use_07_metric=not args.voc12_ap)
    return {"map": r["map"], "ap": r["ap"], "num_gt": r["num_gt"], "samples": len(dets),
            "result": r,
            "detections_per_image": sum(len(d["scores"]) for d in dets) / max(len(dets), 1)}


def detect_image(model, path, classes, args, device, mean, std):
    """--detect PATH (an image or a folder): each image's boxes scoring >= --score-threshold,
    in its own pixels, printed one line per box and drawn into OUT/<stem>_detections.png; all of
    them in OUT/predictions.json/.csv. Returns the rows."""
    model.eval()

    def one(p, picture):
        image = data.load_image(p, mine=True)
        x = EvalTransform(model.size, mean, std)(image, {"boxes": torch.zeros(0, 4),
                                                         "labels": None, "difficult": None})[0]
        d = detect(model, x[None].to(device), [tuple(image.shape[-2:])], args)[0]
        keep = d["scores"] >= args.score_threshold
        boxes, scores, labels = d["boxes"][keep], d["scores"][keep], d["labels"][keep]
        print(f"{p}: {len(scores)} detection(s) >= {args.score_threshold}")
        found = [{"class": classes[c], "score": s, "xmin": b[0], "ymin": b[1], "xmax": b[2],
                  "ymax": b[3]} for c, s, b in zip(labels.tolist(), scores.tolist(),
                                                   boxes.tolist())]
        for f in found:
            print(f"  {f['class']} {f['score']:.2f} box {f['xmin']:.1f} {f['ymin']:.1f} "
                  f"{f['xmax']:.1f} {f['ymax']:.1f}")
        metrics.draw_detections(image, boxes, labels, scores, classes, picture)
        return found
    rows = data.predict_images(path, one, args.out, "detections")
    metrics.write_predictions(args.out, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="SSD (Liu et al. 2016): single-shot multibox "
                                "detection on Pascal VOC or the synthetic shapes-det set.")
    g = data.add_data_args(p, "voc", "voc (07+12 trainval -> 07 test) | shapes-det")
    g.add_argument("--data-size", type=int, default=64,
                   help="shapes-det: side at which the synthetic images are rendered (default: 64)")
    g.add_argument("--limit", type=int, default=None,
                   help="only the first N images of each split (smoke tests)")
    p.add_argument("--img-size", type=int, default=None,
                   help="network input side: 300 (SSD300, default) or 512 (SSD512); other sizes "
                   "build a reduced SSD whose extra layers halve the map down to 1x1 (--quick: 96)")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier of every layer (default: 1 = the paper; --quick 0.25)")
    p.add_argument("--bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm after every convolution (a CPU option for training from "
                   "scratch; on with --quick)")
    p.add_argument("--box-scales", default=None, choices=["caffe", "paper"],
                   help="default-box scales: the released Caffe models' (default) or eq. (4)'s")
    p.add_argument("--zoom-out", type=float, default=None,
                   help="largest zoom-out expansion factor (default: the paper's 4; --quick 2)")
    p.add_argument("--augment", default=None, choices=["paper", "light", "none"],
                   help="paper: §2.2's photometric distortion, zoom-out, IoU crop, flip "
                   "(default); light: photometric distortion and flip (--quick); none: resize")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set (default: {EPOCHS} = the release's 120k iterations of 32 "
                   f"on VOC07+12; --quick: 12 on shapes-det, 2 on VOC)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (default: 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default: 1e-3, §3.1)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"],
                   help="SGD as the paper (default) or Adam (--quick: SGD learns too slowly from "
                   "scratch in a few minutes)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    p.add_argument("--voc12-ap", action="store_true",
                   help="area-under-curve AP (VOC2010+) instead of VOC07's 11-point AP")
    p.add_argument("--detect", default=None, metavar="PATH",
                   help="an image or a folder of them: the detections of --weights, printed and "
                   "drawn into --out (OUT/<stem>_detections.png) with predictions.json/.csv")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="lowest class score drawn by --detect (default: 0.5)")
    p.add_argument("--nms-iou", type=float, default=NMS_IOU,
                   help="per-class NMS drops a box overlapping a higher-scored one by more than "
                   f"this IoU, at test and --detect (default: {NMS_IOU}, §3)")
    data.add_runtime_args(
        p, "shapes-det: a 96-pixel SSD at width 0.25 with BN, Adam and the light augmentation, "
        "12 epochs on 2,000 images (minutes on a CPU); VOC: 256 images, 2 epochs", workers=None,
        workers_help="DataLoader processes (default on VOC: the cores per process, "
        f"{data.machine_workers()} here; 1 on shapes-det)", log_every=50,
        weights_help="a checkpoint of this script to start from or evaluate; its model settings "
        "(--img-size --width --bn --box-scales) apply unless given",
        pretrained_help="torchvision's VGG-16 ImageNet weights for the base (fc6/fc7 subsampled "
        "into conv6/conv7)")
    return p


def resolve_defaults(args):
    """Explicit flags (and a checkpoint's own model settings: data.adopt_checkpoint) first, then
    the defaults: the paper's SSD300 on VOC, a small BN SSD on shapes-det with --quick."""
    small = args.quick and args.data == "shapes-det"
    for key, default in (("img_size", 96 if small else 300), ("width", 0.25 if small else 1.0),
                         ("bn", small), ("box_scales", "caffe")):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.epochs is None:
        args.epochs = (12 if small else 2) if args.quick else EPOCHS
    args.lr_steps = QUICK_LR_STEPS if small else LR_STEPS
    if args.optimizer is None:
        args.optimizer = "adam" if small else "sgd"
    if args.lr is None:
        args.lr = 1e-3
    if args.augment is None:
        args.augment = "light" if small else "paper"
    if args.zoom_out is None:
        args.zoom_out = 2.0 if small else 4.0
    if args.workers is None:
        args.workers = data.machine_workers() if args.data == "voc" else 1
    if args.batch_size < 1 or args.epochs < 0 or (args.limit is not None and args.limit < 1):
        raise data.DataError(f"--batch-size and --limit must be >= 1 and --epochs >= 0 (got "
                             f"{args.batch_size}, {args.limit}, {args.epochs})")


def arch_name(args):
    return f"ssd{args.img_size}" + ("" if args.width == 1.0 else f"-w{args.width:g}") + \
        ("-bn" if args.bn else "")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data.adopt_checkpoint(args, "ssd.py", ("img_size", "width", "bn", "box_scales"),
                          may_differ=("data_size",))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size", "data_size")
    t0 = time.time()
    if args.detect is None:
        data.check_task(args.data, "detection")
    elif not args.weights:
        raise data.DataError("--detect needs --weights CHECKPOINT (a model trained by this "
                             "script, e.g. OUT/checkpoint.pt)")
    saved_state = data.load_checkpoint(args.weights) if args.weights else None
    resolve_defaults(args)
    device, rank, world, is_main = data.setup(args, "ssd.py", pretrained_is_the_model=False)
    if args.batch_size % world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{world} processes")
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD  # torchvision's VGG-16 normalisation
    classes = (saved_state or {}).get("classes") or \
        (data.VOC_CLASSES if args.data == "voc" else data.SHAPES_CLASSES)

    model = SSD(len(classes), args.img_size, args.width, args.bn, args.box_scales)
    arch = arch_name(args)
    if args.pretrained:
        load_pretrained(model)
    if saved_state is not None:
        data.load_checkpoint(args.weights, arch)  # a one-line error for another architecture
        data.load_weights(model, saved_state, args.weights)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.detect:
        return detect_image(model, args.detect, classes, args, device, mean, std)

    # Data: the paper's augmentation on every training image, the plain resize for the test.
    # --eval-only reads the test split alone (the normalisation is VGG's, not the set's).
    kw = dict(data_dir=args.data_dir, download=not args.no_download, quick=args.quick,
              size=args.data_size)
    augment = train_transforms(args.img_size, mean, std, args.zoom_out, args.augment)
    train_set = None if args.eval_only else \
        data.detection_dataset(args.data, "train", transforms=augment,
                               train_difficult=TRAIN_DIFFICULT, **kw)
    test_set = data.detection_dataset(args.data, "test",
                                      transforms=EvalTransform(args.img_size, mean, std), **kw)
    if args.limit:
        train_set, test_set = (s if s is None else
                               torch.utils.data.Subset(s, range(min(len(s), args.limit)))
                               for s in (train_set, test_set))
    n_train = 0 if train_set is None else len(train_set)
    # One loader: its order and every image's augmentation are drawn from (seed, epoch, image)
    # alone (data.make_loader), so a resumed or torchrun run sees an uninterrupted run's batches.
    train_loader = None if train_set is None else data.dry_run_batches(args, data.make_loader(
        train_set, args.batch_size // world, True, args.workers, device,
        collate_fn=train_collate, seed=args.seed, gpu_decode=args.gpu_decode))
    test_loader = data.dry_run_batches(args, data.make_loader(
        test_set, 32, False, args.workers, device, collate_fn=data.detection_collate,
        gpu_decode=args.gpu_decode))

    # §3.1: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3; / 10 at 2/3 and 5/6 of training (the
    # release's 80k and 100k of 120k iterations).
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, args.epochs, args.lr_steps))
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
              "default_boxes": len(model.anchors), "maps": model.map_sizes,
              "scales": model.scales, "train_difficult": TRAIN_DIFFICULT,
              "sizes": {"train": n_train, "val": 0, "test": len(test_set)},
              "departures": DEPARTURES}
    if is_main:
        print(f"ssd.py: {arch} on {args.data} ({n_train} train / {len(test_set)} test), "
              f"maps {model.map_sizes}, {len(model.anchors):,} default boxes, "
              f"{config['parameters']:,} parameters, device {device}, {world} process(es)")
        for d in DEPARTURES:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    # BatchNorm (--bn) normalises with each process's own batch statistics (no SyncBN): under
    # torchrun the BN runs differ slightly from one process on the global batch.
    net = data.wrap(model, args)

    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), args.epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, args.epochs):
            data.set_epoch(train_loader, epoch)
            loss, l_conf, l_loc = train_one_epoch(net, model, train_loader, optimizer, scaler,
                                                  args, device, epoch, progress)
            scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": loss, "conf_loss": l_conf, "loc_loss": l_loc,
                   "lr": optimizer.param_groups[0]["lr"]}
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                row["test_map"] = evaluate(model, test_loader, args, device)["map"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f} (conf {l_conf:.4f}"
                      f" loc {l_loc:.4f})" +
                      (f" test_map {100 * row['test_map']:.2f}%" if "test_map" in row else ""))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, classes=list(classes))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    test = evaluate(model, test_loader, args, device)
    if is_main:
        print(f"map {100 * test['map']:.2f}% ({'area' if args.voc12_ap else 'VOC07 11-point'} "
              f"AP, {test['samples']} images, {test['detections_per_image']:.1f} "
              f"detections/image)")
        print("  " + " ".join(f"{c} {100 * a:.1f}" for c, a in zip(classes, test["ap"])))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "ssd.py", args.data,
        {"map": test["map"], "ap": dict(zip(classes, test["ap"])), "samples": test["samples"]},
        paper=paper_for(args.img_size), config=config, device=str(device),
        seconds=time.time() - t0, history=history, **metrics.detection_records(test["result"], classes)) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "ssd.py")
