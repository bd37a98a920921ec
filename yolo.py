"""YOLO v1: J. Redmon, S. Divvala, R. Girshick, A. Farhadi, "You Only Look Once: Unified,
Real-Time Object Detection", CVPR 2016, arXiv:1506.02640.

    python yolo.py --data voc --pretrain imagenet --out runs/yolo-pre   # §2.2: 20 convs at 224
    python yolo.py --data voc --backbone-weights runs/yolo-pre/backbone.pt --cuda  # detection
    python yolo.py --data voc --variant fast --cuda                     # Fast YOLO (9 convs)
    python yolo.py --data shapes-det --quick   # offline: shapes pretraining, then detection, CPU
    python yolo.py --detect IMAGE --weights runs/yolo-voc/checkpoint.pt --out runs/yolo-detect
    torchrun --nproc_per_node=2 yolo.py --data voc                      # data-parallel

Paper (Table 1, VOC 2007 test, trained on VOC2007+2012): YOLO 63.4 mAP at 45 fps, Fast YOLO
52.7 mAP at 155 fps. Ours: see the README's results table (command and hardware of each figure).
Known weakness: from scratch (any width, input, lr, Adam or clipping tried) the --quick network
learns the boxes but not the shape classes in CPU minutes (mAP < 1 %); --quick therefore pretrains
the backbone on shapes first (§2.2's recipe): mAP@0.5 31.5 % (ring 48.7 ... semicircle 14.8) in
146 s on 1 thread of a shared 2-core CPU, still far from SSD's 69 % on the same set.

Network (Fig. 3): 24 convolutions with 1x1 reductions, leaky ReLU 0.1, then fc 4096, dropout 0.5,
fc S*S*(5B+C) with a linear output; 448x448 input, S=7, B=2, C=20 (1470 outputs). Each cell
predicts B boxes (x, y: centre offset in the cell, w, h: relative to the image, confidence) and C
class probabilities. Loss (§2.2, the lecture's form): lambda_coord=5 on x, y, sqrt(w), sqrt(h) of the
responsible predictor (highest IoU with the truth in the cell holding the object's centre;
darknet's smallest (x, y, w, h) RMSE when every IoU is 0), the
confidence target is that IoU, lambda_noobj=0.5 on the confidence of every other predictor,
squared class-probability error in the cells holding an object; summed, divided by the batch size.
Test: class score = P(class | object) x confidence (each clamped at 0: the outputs are linear),
threshold, per-class NMS at IoU 0.5.
Where the paper is silent, darknet as released (pjreddie/darknet) is followed: its detection
layer's sqrt w, h and responsible predictor; data.c load_data_region's left-right flip of half
the training images, boxes with them; weight decay on the convolution and fc weights only
(update_convolutional_layer); extraction.cfg's ImageNet pretraining of the 20 convolutions
(EXTRACTION: batch 128, poly decay); §2.2's detection schedule is yolo.cfg's (2015) in epochs.
Departures: DEPARTURES, printed at start and stored in results.json.
"""
import argparse
import math
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Redmon et al. 2016, arXiv:1506.02640, Table 1", "data": "voc",
         "map": 0.634, "fast_map": 0.527, "fps": 45, "fast_fps": 155}
# Fig. 3, (out channels, kernel, stride) of each convolution, "M" = 2x2/2 max-pooling. The first
# 20 convolutions are the ImageNet-pretrained part (§2.2); the last 4 are added for detection.
FULL = [(64, 7, 2), "M", (192, 3, 1), "M", (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
        *[(256, 1, 1), (512, 3, 1)] * 4, (512, 1, 1), (1024, 3, 1), "M",
        *[(512, 1, 1), (1024, 3, 1)] * 2,
        "|", (1024, 3, 1), (1024, 3, 2), (1024, 3, 1), (1024, 3, 1)]
# Fast YOLO: "9 convolutional layers instead of 24, fewer filters" (§2.4); the layout is darknet's
# original v1 yolo-tiny.cfg (16 ... 1024, six max-pools, three 1024 convs; not in the paper). The
# split into pretrained / added layers is our choice, as in the full net: the last 2 are added.
FAST = [(16, 3, 1), "M", (32, 3, 1), "M", (64, 3, 1), "M", (128, 3, 1), "M", (256, 3, 1), "M",
        (512, 3, 1), "M", (1024, 3, 1), "|", (1024, 3, 1), (1024, 3, 1)]
EPOCHS = 135                     # §2.2
# §2.2: "for the first epochs" lr rises from 1e-3 to 1e-2, then 1e-2 for 75 epochs, 1e-3 for 30,
# 1e-4 for 30 (75 + 30 + 30 = 135: the warm-up is counted in the 75). Warm-up length: our choice.
# darknet's yolo.cfg released with v1 (pjreddie/darknet 6103ecc, 2015-11-09, batch 64, decay
# 5e-4, momentum 0.9) has the same shape in iterations: 1e-3, x2.5, x2, x2 at 200, 400, 600
# (1e-2 after ~2.3 epochs of VOC07+12's 16,551 images), /10 at 20k and 30k, end at 40k (~77, 116,
# 155 epochs); its later yolov1.cfg (batch norm) peaks at 5e-3.
WARMUP, STEP1, STEP2 = 5 / 135, 75 / 135, 105 / 135   # fractions of --epochs
# §2.2's ImageNet pretraining of the first 20 convolutions (the paper gives no recipe) as darknet's
# extraction.cfg trains them, the "Extraction" classifier whose first 20 layers YOLO v1 uses. Two
# releases: the one committed with YOLO v1 (42ba5d4, 2015-11-09; no batch norm, as the paper's
# network) and its rewrite with batch norm after every convolution (845ab75, 2016-08-05; YOLOv2's
# BN: ours with --bn). Both: batch 128, momentum 0.9, decay 5e-4 (weights only, see
# param_groups), lr0 * (1 - n / max_batches)^power at the n-th update ("poly", no warm-up: burn_in
# unset), a softmax whose SSE cost passes back p - y (cross-entropy's gradient).
#   2015: lr 0.5, power 6, 500,000 batches = 50 epochs of ImageNet's 1.28M images (at Fig. 3's
#         4.2 G multiply-adds an image, ~2.7 TFLOPS for a week: §2.2's "approximately a week");
#         images squashed to 256 x 256, random 224 crops, flips, no colour change. Its weights
#         start at darknet's init (darknet_init), which the lr needs: a third of He's variance,
#         so the signal shrinks ~0.58x a layer and the net starts almost silent (measured, 64 px
#         shapes: the 20th convolution's output at rms 8e-6 for inputs at rms 1, 0.6 with our He
#         init); 0.5 then moves the top layers first. With our He init lr 0.5 diverged at step 2,
#         lr 0.1 at step 22 (a probe: full width, no BN, 64 px shapes, batch 32, 40 steps; 0.05
#         and 0.02 held); with darknet's init lr 0.5 held.
#   2016: lr 0.1, power 4, 1,600,000 batches = 160 epochs; 224 crops of images up to 320; batch
#         norm makes the init's scale irrelevant (ours kept).
EXTRACTION = {"lr": 0.5, "power": 6, "epochs": 50, "batch_size": 128, "init": "darknet"}  # 2015
EXTRACTION_BN = {"lr": 0.1, "power": 4, "epochs": 160, "batch_size": 128, "init": None}  # 2016
# --quick (offline shapes-det on a CPU), every choice measured against the old quick run (full net,
# width 1/8, 64 px, from scratch: mAP 0.4 %, the class term at its prior): Fast YOLO at width 1/4
# with its last two stride-2 steps dropped, so that 64 px gives a 4 x 4 = S x S last map (the
# paper's 448 gives 7 x 7; the full stride-64 net leaves 1 x 1 here); batch norm; §2.2's two stages
# in one command: 30 epochs of shapes classification (the offline ImageNet) at lr 2e-2, then 15 of
# detection at lr 2e-3 (5e-3 diverged without augmentation) without dropout (0.5 cost ~2 points).
# mAP 23 % with 15 pretraining epochs, 31 % with 30, 35 % with 30 + 30 detection epochs (twice the
# time). From scratch, even with the 4 x 4 map, Adam or gradient clipping, the classes stayed at
# chance (mAP < 1 %); without pretraining Fast YOLO only memorised (no augmentation: 6.7 %).
QUICK = {"img_size": 64, "width": 0.25, "grid": 4, "epochs": 15, "batch_size": 32, "lr": 2e-3,
         "bn": True, "drop_strides": 2, "clip_grad": None, "variant": "fast", "dropout": 0.0,
         "pretrain_epochs": 30}
# The offline shapes' pretraining (--quick's first stage; --pretrain shapes): ours, tuned with
# --quick on shapes-det as above, not darknet's: lr 2e-2, a cosine over the epochs, --batch-size.
SHAPES_PRETRAIN = {"lr": 2e-2, "power": None, "epochs": QUICK["pretrain_epochs"],
                   "batch_size": None, "init": None}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "w and h are predicted as their square roots (darknet's sqrt=1): the loss's sqrt(w_hat) of "
    "a linear output that can be negative is undefined otherwise; boxes decode to w = output^2",
    "one object per cell: when several centres fall in one cell the largest box is kept (the "
    "paper does not say which)",
    "lr warm-up 1e-3 -> 1e-2 over the first 5/135 of training, per iteration (the paper: 'the "
    "first epochs'); the steps at 75/135 and 105/135 of --epochs",
    "augmentation: v2.RandomAffine(translate 0.2, scale 0.8-1.2) + v2.ColorJitter(brightness and "
    "saturation x 1/1.5..1.5) for the paper's HSV exposure/saturation; images resized to "
    "img-size x img-size first; inputs normalised with ImageNet mean/std; half the images "
    "flipped left-right with their boxes (not in the paper: darknet's data.c load_data_region)",
    "weight decay on the convolution and fc weights only, not on biases or batch-norm "
    "parameters (darknet's update_convolutional_layer / update_connected_layer; the paper says "
    "only 'weight decay of 0.0005')",
    "Fast YOLO's layout is darknet's v1 yolo-tiny.cfg (9 convs 16..1024) with the two FCs of "
    "the full net; the paper gives only '9 layers, fewer filters'",
    "ImageNet pretraining (the paper: 'approximately a week', 88% top-5, no recipe): darknet's "
    "extraction.cfg released with v1 (no batch norm): batch 128, momentum 0.9, lr 0.5 decayed "
    "per iteration as (1 - n/N)^6 over 50 epochs, from darknet's init of those layers "
    "(uniform +-sqrt(2/fan-in); with our He init lr 0.5 diverges); with --bn its 2016 rewrite "
    "with batch norm (lr 0.1, power 4, 160 epochs, our init); augmentation data.py's (short "
    "side 256, random 224 crop, flip, AlexNet's PCA lighting; darknet: squashed to 256 x 256, "
    "crop, flip); cross-entropy on a linear fc (darknet: softmax + SSE, the same gradient, on a "
    "leaky fc). The offline shapes' pretraining is ours (lr 2e-2, cosine); --bn (not the "
    "default) is YOLOv2's batch norm",
    "--quick (offline shapes-det): Fast YOLO at width 0.25 on 64 px with its last two stride-2 "
    "steps dropped (--drop-strides 2: a 4 x 4 last map = S, as 448 px gives 7 x 7 in the paper), "
    "S=4, batch norm, batch 32; the backbone first pretrained 30 epochs on shapes "
    "classification at lr 2e-2 (cosine), then 15 detection epochs at lr 2e-3 without dropout; "
    "§2.2's schedule shape and augmentation kept (from scratch the classes stay at chance)",
    "--drop-strides N and --clip-grad are ours (both off by default; --clip-grad is off in "
    "--quick too)",
]


# ---------------------------------------------------------------------------------------------
# Model

def conv_stack(spec, in_channels, width, bn, first=1):
    """Convolutions of a spec ((c, k, s) or "M") with padding k // 2 and leaky ReLU 0.1, named
    conv1.. as in Fig. 3; `bn` adds batch norm after each (YOLOv2's, not the paper's)."""
    layers, c_in, n = [], in_channels, first - 1
    for item in spec:
        if item == "M":
            layers.append((f"pool{n}", nn.MaxPool2d(2, 2)))
            continue
        c, k, s = item
        c, n = max(1, round(c * width)), n + 1
        layers.append((f"conv{n}", nn.Conv2d(c_in, c, k, s, k // 2, bias=not bn)))
        if bn:
            layers.append((f"bn{n}", nn.BatchNorm2d(c)))
        layers.append((f"leaky{n}", nn.LeakyReLU(0.1, inplace=True)))
        c_in = c
    return nn.Sequential(OrderedDict(layers)), c_in


def drop_strides(spec, k):
    """`spec` with its last k stride-2 steps removed, last first (the full net: conv22's stride 2,
    then pool16, pool6; Fast YOLO: its pools from the last). Pools and strides have no weights, so
    the layer names and shapes stay; only the maps grow: a small input keeps an S x S last map
    (our departure for --quick; the paper's 448 input gives 7 x 7 with none dropped)."""
    spec = list(spec)
    for i in reversed(range(len(spec))):
        if k == 0:
            break
        if spec[i] == "M":
            spec[i], k = None, k - 1
        elif isinstance(spec[i], tuple) and spec[i][2] == 2:
            spec[i], k = (*spec[i][:2], 1), k - 1
    if k:
        raise ValueError("--drop-strides is larger than the network's number of stride-2 steps")
    return [item for item in spec if item is not None]


def map_size(spec, n):
    """The side of the last map for an n x n input: convolutions pad k // 2, pools floor."""
    for item in spec:
        if item == "M":
            n //= 2
        elif item != "|":
            _, k, st = item
            n = (n + 2 * (k // 2) - k) // st + 1
    return n


class YOLO(nn.Module):
    """`backbone` (the ImageNet-pretrained convolutions), `head` (the convolutions added for
    detection) and the two FC layers; forward gives (N, S, S, 5B + C): per cell B x (x, y,
    sqrt w, sqrt h, confidence), then C class probabilities. The FC input follows the map size."""

    def __init__(self, variant="full", num_classes=20, grid=7, boxes=2, width=1.0, img_size=448,
                 bn=False, dropout=0.5, dropped=0):
        super().__init__()
        if variant not in ("full", "fast"):
            raise ValueError(f"unknown variant '{variant}'; use full or fast")
        spec = drop_strides(FULL if variant == "full" else FAST, dropped)
        cut = spec.index("|")
        self.S, self.B, self.C = grid, boxes, num_classes
        self.backbone, c = conv_stack(spec[:cut], 3, width, bn)
        self.backbone_channels = c
        n = sum(isinstance(item, tuple) for item in spec[:cut])  # conv21.. / conv8..
        self.head, c = conv_stack(spec[cut + 1:], c, width, bn, first=n + 1)
        h = w = map_size(spec, img_size)
        if h < 1:
            raise ValueError(f"--img-size {img_size} is too small for the {variant} network: "
                             f"no map left after its {sum(i == 'M' for i in spec)} poolings")
        self.map_size, hidden = (h, w), max(1, round(4096 * width))
        self.fc = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(c * h * w, hidden)), ("leaky", nn.LeakyReLU(0.1, inplace=True)),
            ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, grid * grid * (5 * boxes + num_classes)))]))  # linear
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.fc2.weight, 0.0, 0.01)  # start near "no object, no box"

    def forward(self, x):
        y = self.fc(self.head(self.backbone(x)).flatten(1))
        return y.view(-1, self.S, self.S, 5 * self.B + self.C)


class Classifier(nn.Module):
    """§2.2's pretraining net: the backbone, average-pooling and a fully connected layer."""

    def __init__(self, backbone, channels, num_classes):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(channels, num_classes)

    def forward(self, x):
        # Global average pooling as a mean: deterministic on CUDA (torch's adaptive pooling
        # kernel to larger maps is not; to 1 x 1 it is this same mean)
        return self.fc(self.backbone(x).mean((2, 3)))


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Target encoding, loss and decoding (§2, §2.2)

def encode_targets(boxes, labels, size, S, C):
    """Boxes (K, 4) XYXY in pixels of an image of `size` (h, w) -> (S, S, 5 + C): per cell x, y
    (the centre's offset in the cell, [0, 1)), w, h (relative to the image), 1 = object, one-hot
    class. One object per cell (§2.1): when several centres fall in one cell, the LARGEST box
    (by area) is kept, the others are dropped from the target."""
    h_img, w_img = size
    t = torch.zeros(S, S, 5 + C)
    b = boxes.as_subclass(torch.Tensor).float().reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    for k in torch.argsort(area, descending=True, stable=True).tolist():
        cx = (b[k, 0] + b[k, 2]) / 2 / w_img * S
        cy = (b[k, 1] + b[k, 3]) / 2 / h_img * S
        col, row = min(int(cx), S - 1), min(int(cy), S - 1)
        if t[row, col, 4] > 0:  # a larger object holds this cell already
            continue
        t[row, col, :5] = torch.stack([cx - col, cy - row, (b[k, 2] - b[k, 0]) / w_img,
                                       (b[k, 3] - b[k, 1]) / h_img, torch.tensor(1.0)])
        t[row, col, 5 + int(labels[k])] = 1.0
    return t


def cell_boxes_to_xyxy(xy, wh, S):
    """(..., S, S, B, 2) cell offsets and image-relative sizes -> (..., S, S, B, 4) XYXY in
    [0, 1] image units."""
    rows, cols = torch.meshgrid(torch.arange(S, device=xy.device), torch.arange(S, device=xy.device),
                                indexing="ij")
    grid = torch.stack([cols, rows], -1).to(xy.dtype)[:, :, None, :]  # (S, S, 1, 2): (col, row)
    centre = (xy + grid) / S
    return torch.cat([centre - wh / 2, centre + wh / 2], -1)


def paired_iou(a, b):
    """IoU of boxes a[i] and b[i] (elementwise, XYXY); torchvision's box_iou is all-pairs."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


def yolo_loss(pred, target, B, lambda_coord=5.0, lambda_noobj=0.5):
    """§2.2 / the lecture's loss. pred (N, S, S, 5B + C) (w, h predicted as their square roots,
    see DEPARTURES), target (N, S, S, 5 + C) from encode_targets. Returns a dict of the four terms
    and their sum ("loss"), each summed over cells, predictors and the batch, divided by N."""
    N, S = pred.shape[0], pred.shape[1]
    p = pred[..., :5 * B].reshape(N, S, S, B, 5)
    obj = target[..., 4]                                             # 1_i^obj (N, S, S)
    # The responsible predictor: the highest IoU with the truth (the first of equal IoUs); when
    # every IoU is 0, darknet's detection layer takes the smallest RMSE between the (x, y, w, h)
    # of the box and of the truth, in image units.
    with torch.no_grad():
        pbox = cell_boxes_to_xyxy(p[..., :2], p[..., 2:4] ** 2, S)
        tbox = cell_boxes_to_xyxy(target[..., None, :2], target[..., None, 2:4], S)
        iou = paired_iou(pbox, tbox.expand_as(pbox))                  # (N, S, S, B)
        cxcywh = lambda b: torchvision.ops.box_convert(b, "xyxy", "cxcywh")  # noqa: E731
        rmse = (cxcywh(pbox) - cxcywh(tbox.expand_as(pbox))).pow(2).sum(-1)  # squared: same order
        best = torch.where(iou.amax(-1) > 0, iou.argmax(-1), rmse.argmin(-1))
        resp = F.one_hot(best, B).float() * obj[..., None]           # 1_ij^obj
    t = target[..., None, :4]
    coord = ((p[..., 0:2] - t[..., 0:2]) ** 2).sum(-1) + \
        ((p[..., 2:4] - t[..., 2:4].sqrt()) ** 2).sum(-1)
    terms = {"coord": lambda_coord * (resp * coord).sum(),
             "conf_obj": (resp * (p[..., 4] - iou) ** 2).sum(),     # target: the (detached) IoU
             "conf_noobj": lambda_noobj * ((1 - resp) * p[..., 4] ** 2).sum(),
             "class": (obj[..., None] * (pred[..., 5 * B:] - target[..., 5:]) ** 2).sum()}
    terms = {k: v / N for k, v in terms.items()}
    terms["loss"] = sum(terms.values())
    return terms


@torch.no_grad()
def decode(pred, B, img_size, conf_threshold=0.005, nms_iou=0.5, top_k=100):
    """§2 test time: per image, every predictor x class gets the score P(class | object) x
    confidence (each clamped at 0); scores below the threshold are dropped, per-class NMS (torchvision batched_nms),
    the top_k best kept. Returns [{"boxes" (K, 4) XYXY in pixels of the img_size x img_size
    input, "scores", "labels"}]."""
    N, S = pred.shape[0], pred.shape[1]
    pred = pred.float()
    p = pred[..., :5 * B].reshape(N, S, S, B, 5)
    boxes = cell_boxes_to_xyxy(p[..., :2], p[..., 2:4] ** 2, S) * img_size    # (N, S, S, B, 4)
    # negative outputs (the layers are linear) count as 0: a negative confidence times a
    # negative class output is no detection
    scores = p[..., 4, None].clamp(min=0) * pred[..., None, 5 * B:].clamp(min=0)  # (N,S,S,B,C)
    C = scores.shape[-1]
    out = []
    for n in range(N):
        b = torchvision.ops.clip_boxes_to_image(boxes[n].reshape(-1, 4), (img_size, img_size))
        s = scores[n].reshape(-1, C)
        idx, cls = (s > conf_threshold).nonzero(as_tuple=True)
        bb, ss = b[idx], s[idx, cls]
        ok = (bb[:, 2] > bb[:, 0]) & (bb[:, 3] > bb[:, 1])                   # not empty
        bb, ss, cls = bb[ok], ss[ok], cls[ok]
        keep = torchvision.ops.batched_nms(bb, ss, cls, nms_iou)[:top_k]
        out.append({"boxes": bb[keep], "scores": ss[keep], "labels": cls[keep]})
    return out


# ---------------------------------------------------------------------------------------------
# Data glue: augmentation (§2.2) and batches of encoded targets

class ScaleTranslate(v2.RandomAffine):
    """v2.RandomAffine(degrees=0, translate, scale): the same random draws, the same output, a
    faster image kernel. Without rotation or shear the nearest-neighbour warp is separable:
    output pixel (y, x) is input pixel (ys[y], xs[x]), zero outside the image: a gather of rows
    and one of columns instead of torchvision's sampling grid over every pixel (21.7 -> 4.4 ms
    per 448 x 448 image, `python bench/bench_input.py --steps`). ys and xs are computed with
    torchvision's own float32 steps (its inverse matrix, normalised grid, grid_sample's
    unnormalisation, round half to even); tests hold the output equal to torchvision's over
    random draws and sizes. Boxes use torchvision's kernel."""

    def __init__(self, translate, scale):
        super().__init__(degrees=0, translate=translate, scale=scale)

    @staticmethod
    def source(n, shift, scale):
        """The source index of each of the n output rows (or columns), on the CPU: under
        --gpu-decode the image is on the GPU, and counting these indices there would read 4
        numbers back to the host per image."""
        inverse = torch.tensor([1.0 / scale, (1.0 / scale) * -shift]) / (0.5 * n)
        grid = torch.linspace(-n * 0.5 + 0.5, n * 0.5 + 0.5 - 1, steps=n)
        grid = grid * inverse[0] + inverse[1]
        return torch.round(((grid + 1) * n - 1) / 2).long()

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image) or params["angle"] != 0 or \
                any(params["shear"]):
            return super().transform(inpt, params)
        h, w = inpt.shape[-2:]
        (tx, ty), scale = params["translate"], params["scale"]
        ys, xs = self.source(h, ty, scale), self.source(w, tx, scale)
        to = dict(device=inpt.device, non_blocking=True)
        out = inpt.as_subclass(torch.Tensor).index_select(-2, ys.clamp(0, h - 1).to(**to))
        out = out.index_select(-1, xs.clamp(0, w - 1).to(**to))
        # ys and xs increase: the rows and columns outside the image are a run at each end
        top, bottom = int((ys < 0).sum()), h - int((ys >= h).sum())
        left, right = int((xs < 0).sum()), w - int((xs >= w).sum())
        out[..., :top, :], out[..., bottom:, :] = 0, 0
        out[..., :left], out[..., right:] = 0, 0
        return tv_tensors.wrap(out, like=inpt)


def train_transforms(img_size, augment=True):
    """§2.2: "random scaling and translations of up to 20% of the original image size", "randomly
    adjust the exposure and saturation of the image by up to a factor of 1.5 in the HSV colour
    space". Exposure = HSV value: ColorJitter's brightness multiplies R, G, B by the factor, which
    multiplies V = max(R, G, B) by it exactly (up to clipping); its saturation blends with the
    grey image, which scales HSV's S approximately. Boxes follow through tv_tensors; boxes pushed
    out of the image are clipped and dropped when degenerate (SanitizeBoundingBoxes). Not in the
    paper: half the images flipped left-right, boxes with them (x -> W - x), as darknet's data.c
    load_data_region does after its jitter crop and resize (`flip = rand()%2`: the image and
    fill_truth_region's boxes)."""
    ops = [v2.ToImage(), v2.Resize((img_size, img_size), antialias=True)]
    if augment:
        ops += [ScaleTranslate(translate=(0.2, 0.2), scale=(0.8, 1.2)),
                v2.RandomHorizontalFlip(0.5),
                data.ColorJitterU8(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(min_size=1, labels_getter=lambda s: s[1]["labels"])]
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True),
                             data.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


class YoloSet(torch.utils.data.Dataset):
    """A detection set (image, target) -> (image at img_size, encoded target (S, S, 5 + C),
    ground truth in the ORIGINAL image's pixels with difficult flags, (h, w) of the original).
    Under --gpu-decode the set's samples are still encoded files: they pass through, and
    `apply` runs on the device once they are decoded (`data.DecodeOnDevice`)."""

    def __init__(self, dataset, transforms, S, C):
        self.dataset, self.transforms, self.S, self.C = dataset, transforms, S, C

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        return sample if data.is_encoded(sample) else self.apply(*sample)

    def apply(self, image, target):
        size = tuple(image.shape[-2:])
        gt = {"boxes": target["boxes"].as_subclass(torch.Tensor).float(),
              "labels": target["labels"], "difficult": target["difficult"]}
        image, t = self.transforms(image, {"boxes": target["boxes"], "labels": target["labels"]})
        return image, encode_targets(t["boxes"], t["labels"], image.shape[-2:], self.S, self.C), \
            gt, size


def collate(batch):
    images, targets, gts, sizes = zip(*batch)
    return torch.stack(images), torch.stack(targets), list(gts), list(sizes)


def detection_sets(args, S):
    """(train, test) YoloSets: voc = VOC2007+2012 trainval -> VOC2007 test (difficult kept for
    evaluation); shapes-det at --data-size pixels. --eval-only: train is None (the training
    annotations and images are not read; the normalisation is ImageNet's, not the set's)."""
    kw = dict(data_dir=args.data_dir, download=not args.no_download, quick=args.quick,
              size=args.data_size)
    train = None if args.eval_only else data.detection_dataset(args.data, "train", **kw)
    test = data.detection_dataset(args.data, "test", **kw)
    classes = tuple(test.classes)
    if args.limit:  # the first N images of each split (smoke runs and tests)
        train, test = (None if d is None else torch.utils.data.Subset(
            d, range(min(args.limit, len(d)))) for d in (train, test))
    if train is not None:
        train = YoloSet(train, train_transforms(args.img_size, args.augment), S, len(classes))
    return train, YoloSet(test, train_transforms(args.img_size, False), S, len(classes)), classes


# ---------------------------------------------------------------------------------------------
# Recipe, training, evaluation

def lr_factor(progress, warmup=WARMUP, steps=(STEP1, STEP2)):
    """§2.2's schedule as a factor of the base lr (1e-2) at `progress` = epochs done / --epochs:
    a linear warm-up from 0.1 (1e-3) to 1, then 1, 0.1, 0.01 (1e-4)."""
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    return 1.0 if progress < steps[0] else (0.1 if progress < steps[1] else 0.01)


def pretrain_lr_factor(it, steps, epochs, power=None):
    """The pretraining lr as a factor of its peak during iteration `it` (0-based) of `epochs` of
    `steps`: darknet's "poly" (extraction.cfg), (1 - n / max_batches)^power at its n-th update
    (n = it + 1: get_current_batch counts the images seen, this batch's included; the last update
    is at 0); without `power`, ours for the offline shapes: a cosine over the epochs, held within
    each."""
    if power is not None:
        return max(0.0, 1 - (it + 1) / (steps * epochs)) ** power
    return 0.5 * (1 + math.cos(math.pi * (it // steps) / epochs))


def param_groups(model, weight_decay):
    """darknet's weight decay: on the convolution and fully connected weights only
    (update_convolutional_layer, update_connected_layer add -decay * w to the weights' updates
    alone); biases and batch-norm scales and shifts get none. The weights' group comes first."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def train_one_epoch(model, loader, optimizer, scheduler, scaler, args, device, epoch, progress):
    """One pass; the loss is the batch's sum / its size: under DDP the gradients are averaged
    over the ranks, which is the sum over the global batch / its size, as one process does.
    Returns the epoch's mean of each term over every rank's images; the terms are summed on the
    device and read once, at the end (no host sync per step)."""
    model.train()
    sums, n = {}, 0
    for x, target, _, _ in loader:
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with data.autocast(device, args.amp):
            out = model(x)
        terms = yolo_loss(out.float(), target, args.boxes, args.lambda_coord, args.lambda_noobj)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if args.clip_grad:  # our departure (--quick): a bad early batch cannot blow fc2 up
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # per iteration: the warm-up is smooth
        for k, v in terms.items():
            if k != "loss":  # (Progress sums the loss)
                sums[k] = sums.get(k, 0.0) + v.detach() * len(x)
        n += len(x)
        progress.step(len(x) * args.world, terms["loss"], optimizer.param_groups[0]["lr"], epoch,
                      n=len(x))
    loss = progress.epoch_loss()  # the losses read here, over every rank's images
    return {**{k: metrics.global_mean(v, n, device) for k, v in sums.items()}, "loss": loss}


@torch.no_grad()
def predict(model, x, args, device, sizes, conf_threshold):
    """(raw output, detections) of a batch; boxes mapped back to each original image's pixels."""
    with data.autocast(device, args.amp):
        out = model(x.to(device, non_blocking=True)).float()
    dets = decode(out, args.boxes, args.img_size, conf_threshold, args.nms_iou, args.top_k)
    for d, (h, w) in zip(dets, sizes):  # decode's threshold, NMS and these copies: a few syncs
        scale = torch.tensor([w, h, w, h]) / args.img_size  # an image (on the CPU: no copy)
        d.update(boxes=d["boxes"].cpu() * scale, scores=d["scores"].cpu(),
                 labels=d["labels"].cpu())
    return out, dets


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes):
    """VOC AP per class and mAP (metrics.detection_map, 11-point VOC07 unless --voc12-ap) of the
    (unwrapped) model's detections above --conf-threshold on the original images: under
    torchrun each rank evaluates its share and the detections and ground truths are gathered."""
    model.eval()
    dets, gts, loss, n = [], [], 0.0, 0
    for x, target, gt, sizes in loader:
        out, d = predict(model, x, args, device, sizes, args.conf_threshold)
        loss = loss + yolo_loss(out, target.to(device, non_blocking=True), args.boxes,
                                args.lambda_coord, args.lambda_noobj)["loss"] * len(x)  # read once
        n, dets, gts = n + len(x), dets + d, gts + gt
    dets, gts = data.gather_shards(dets, gts)
    r = metrics.detection_map(dets, gts, num_classes, use_07_metric=not args.voc12_ap)
    return {"map": r["map"], "ap": r["ap"], "num_gt": r["num_gt"], "result": r,
            "test_loss": metrics.global_mean(loss, n, device), "samples": len(dets),
            "detections_per_image": sum(len(d["scores"]) for d in dets) / max(len(dets), 1)}


# ---------------------------------------------------------------------------------------------
# §2.2's ImageNet pretraining of the backbone, and --detect

def arch_name(args, backbone=False):
    return f"yolo-{args.variant}-w{args.width:g}" + ("-bn" if args.bn else "") + \
        ("-backbone" if backbone else "")


def darknet_init(model):
    """darknet's initialisation (2015: make_convolutional_layer, make_connected_layer): weights
    uniform in +-sqrt(2 / fan-in), convolution biases 0, fully connected biases sqrt(2 / fan-in)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = math.sqrt(2.0 / m.weight[0].numel())
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.constant_(m.bias, bound if isinstance(m, nn.Linear) else 0.0)


def pretrain(args, device, rank):
    """§2.2: the backbone (first 20 convolutions of the full net), average-pooling and a fully
    connected layer trained for classification at --pretrain-size (224 on ImageNet); SGD with
    momentum and weight decay on the weights; the lr per iteration, on ImageNet decayed as
    darknet's extraction.cfg does (poly), on the shapes by our cosine (the paper gives no
    pretraining recipe; see EXTRACTION). Writes OUT/backbone.pt for --backbone-weights and
    OUT/results.json (top-1 error); None after --stop-after. --eval-only: the classifier of a
    pretraining checkpoint (--weights), tested on the test split alone; nothing trained, no
    backbone.pt written."""
    t0, is_main = time.time(), rank == 0
    data.check_task(args.pretrain, "classification")
    saved = data.load_checkpoint(args.weights, arch_name(args) + "-pretrain") \
        if args.eval_only else None
    train_loader, _, test_loader, info = data.classification_loaders(
        args.pretrain, args.batch_size // args.world, device, args.data_dir, not args.no_download,
        args.quick, args.seed, workers=args.workers, size=args.pretrain_size, limit=args.limit,
        test_only=args.eval_only, stats=(saved or {}).get("normalisation"),
        gpu_decode=args.gpu_decode)
    train_loader, test_loader = data.dry_run_batches(args, train_loader, test_loader)
    yolo = YOLO(args.variant, 1, args.grid, args.boxes, args.width, args.img_size, args.bn,
                dropped=args.drop_strides)
    model = Classifier(yolo.backbone, yolo.backbone_channels, len(info["classes"])).to(device)
    recipe = pretrain_recipe(args.pretrain, args.bn)
    if recipe["init"] == "darknet":  # extraction.cfg 2015's lr 0.5 needs it (see EXTRACTION)
        darknet_init(model)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr,
                                momentum=args.momentum)
    # ImageNet: extraction.cfg's poly decay per iteration; the offline shapes: our cosine
    steps, power = max(1, len(train_loader or ())), recipe["power"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: pretrain_lr_factor(it, steps, args.epochs, power))
    scaler = data.grad_scaler(device, args.amp)  # fp16 --amp: gradients would underflow
    arch, ckpt = arch_name(args) + "-pretrain", os.path.join(args.out, "checkpoint.pt")
    start, history = 0, []
    if args.resume:
        start, history = data.resume_training_state(ckpt, arch, model, optimizer, scheduler, scaler)
    if args.eval_only:
        data.load_weights(model, saved, args.weights)
        start = args.epochs  # no epoch to train
    net = data.wrap(model, args)

    def test_split():  # each rank its share (gathered), with the unwrapped model
        model.eval()
        with torch.no_grad():
            outs = [(model(x.to(device, non_blocking=True)).float().cpu(), y.cpu())
                    for x, y in test_loader]  # a copy per batch, not per image
        out, y = data.gather_shards(torch.cat([o for o, _ in outs]),
                                    torch.cat([y for _, y in outs]))
        return metrics.classification_report(out, y, len(info["classes"]))

    progress = metrics.Progress(len(train_loader or ()), args.epochs, args.log_every, start,
                                is_main, model=model)
    for epoch in range(start, args.epochs):
        data.set_epoch(train_loader, epoch)
        net.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with data.autocast(device, args.amp):
                loss = F.cross_entropy(net(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            progress.step(len(y) * args.world, loss, optimizer.param_groups[0]["lr"], epoch,
                          n=len(y))  # the lr this step used
            scheduler.step()  # per iteration
        row = {"epoch": epoch + 1, "lr": progress.lr,
               "train_loss": progress.epoch_loss()}  # the epoch's mean, every rank's
        if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
            row["test_error"] = test_split()["test_error"]
            if is_main:
                print(f"pretraining epoch {epoch + 1}/{args.epochs} top-1 error "
                      f"{100 * row['test_error']:.2f}%")
        history.append(row)
        data.save_training_state(ckpt, arch, model, optimizer, scheduler, scaler, epoch,
                                 vars(args), history, **data.test_settings(info))
        if args.stop_after is not None and epoch + 1 >= args.stop_after:
            return None
    test = test_split()
    results = None
    if is_main:
        print(f"pretraining top-1 error {100 * test['test_error']:.2f}% "
              f"({test['errors']}/{test['samples']})")
        if not args.eval_only:
            data.save_checkpoint(os.path.join(args.out, "backbone.pt"),
                                 {"arch": arch_name(args, True),
                                  "model": yolo.backbone.state_dict()})
            print(f"backbone written to {os.path.join(args.out, 'backbone.pt')}")
        results = metrics.write_results(
            os.path.join(args.out, "results.json"), "yolo.py", args.pretrain, test, paper=PAPER,
            config={**vars(args), "arch": arch}, device=str(device), seconds=time.time() - t0,
            history=history)
    return results


def detect(args):
    """--detect PATH (an image or a folder): each image's boxes above --score-threshold, in its
    own pixels, printed one line per box and drawn with class names and scores into
    OUT/<stem>_detections.png; all of them in OUT/predictions.json/.csv. The network's shape
    (variant, width, img-size, grid, boxes, bn: data.adopt_checkpoint) and the class names come
    from the checkpoint when it holds them. Returns the rows."""
    if not args.weights:
        raise data.DataError("--detect needs --weights PATH (a checkpoint.pt written by training)")
    device = data.setup(args, "yolo.py", pretrained_is_the_model=False)[0]
    state = data.load_checkpoint(args.weights)  # its settings are args' (data.adopt_checkpoint)
    classes = state.get("classes") or \
        (data.VOC_CLASSES if args.data == "voc" else data.SHAPES_CLASSES)
    model = YOLO(args.variant, len(classes), args.grid, args.boxes, args.width, args.img_size,
                 args.bn, dropped=args.drop_strides).to(device)
    data.load_weights(model, state, args.weights)
    model.eval()

    def one(path, picture):
        image = data.load_image(path, mine=True)
        h, w = image.shape[-2:]
        x = train_transforms(args.img_size, False)(image)[None]
        _, (d,) = predict(model, x, args, device, [(h, w)], args.score_threshold)
        found = [{"class": classes[k], "score": s, "xmin": b[0], "ymin": b[1], "xmax": b[2],
                  "ymax": b[3]} for k, s, b in zip(d["labels"].tolist(), d["scores"].tolist(),
                                                   d["boxes"].tolist())]
        print(f"{path}: {len(found)} detection(s)")
        for f in found:
            print(f"  {f['class']} {f['score']:.2f} box ({f['xmin']:.1f}, {f['ymin']:.1f}, "
                  f"{f['xmax']:.1f}, {f['ymax']:.1f})")
        metrics.draw_detections(image, d["boxes"], d["labels"], d["scores"], classes, picture)
        return found
    rows = data.predict_images(args.detect, one, args.out, "detections")
    metrics.write_predictions(args.out, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="YOLO v1 (Redmon et al. 2016): one-shot detection on "
                                "Pascal VOC or the synthetic shapes-det set.")
    g = data.add_data_args(p, "voc", "voc | shapes-det")
    g.add_argument("--data-size", type=int, default=64,
                   help="shapes-det: side at which the synthetic images are rendered (default: 64)")
    g.add_argument("--limit", type=int, default=None,
                   help="use only the first N training and test images (smoke runs, tests)")
    p.add_argument("--variant", default=None, choices=["full", "fast"],
                   help=f"YOLO (24 convs, Fig. 3) or Fast YOLO (9 convs) (default: full; "
                   f"{QUICK['variant']} with --quick)")
    p.add_argument("--img-size", type=int, default=None,
                   help=f"network input size (default: 448; {QUICK['img_size']} with --quick)")
    p.add_argument("--width", type=float, default=None,
                   help=f"channel and fc1 multiplier (default: 1 = the paper; {QUICK['width']} "
                   f"with --quick)")
    p.add_argument("--bn", action=argparse.BooleanOptionalAction, default=None,
                   help="batch norm after every convolution (YOLOv2's, not the paper's; default: "
                   "off, on with --quick)")
    p.add_argument("--grid", type=int, default=None,
                   help=f"S, the grid size (default: 7; {QUICK['grid']} with --quick)")
    p.add_argument("--drop-strides", type=int, default=None,
                   help="drop the network's last N stride-2 steps so that a small input keeps an "
                   f"S x S last map (default: 0 = the paper; {QUICK['drop_strides']} with --quick)")
    p.add_argument("--boxes", type=int, default=2, help="B, boxes per cell (default: 2)")
    p.add_argument("--lambda-coord", type=float, default=5.0, help="(default: 5, §2.2)")
    p.add_argument("--lambda-noobj", type=float, default=0.5, help="(default: 0.5, §2.2)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: {EPOCHS}, §2.2; {QUICK['epochs']} with "
                   f"--quick; with --pretrain DATA its recipe's: imagenet {EXTRACTION['epochs']}, "
                   f"{EXTRACTION_BN['epochs']} with --bn (extraction.cfg), shapes "
                   f"{SHAPES_PRETRAIN['epochs']}); the lr schedule scales with it")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: 64, §2.2; {QUICK['batch_size']} with "
                   f"--quick; {EXTRACTION['batch_size']} with --pretrain imagenet, "
                   f"extraction.cfg); given, also the default of --pretrain-batch-size")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-2, §2.2; with --pretrain DATA that of "
                   "--pretrain-lr)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4, §2.2)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help=f"clip the gradient norm at this (default: off = the paper; "
                   f"{QUICK['clip_grad']} with --quick)")
    p.add_argument("--dropout", type=float, default=None,
                   help=f"after fc1 (default: 0.5, §2.2; {QUICK['dropout']} with --quick)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="§2.2's scaling/translation/HSV jitter (default: on)")
    p.add_argument("--conf-threshold", type=float, default=0.005,
                   help="class-score threshold for the mAP (default: 0.005)")
    p.add_argument("--score-threshold", type=float, default=0.2,
                   help="lowest class score drawn by --detect (default: 0.2)")
    p.add_argument("--nms-iou", type=float, default=0.5,
                   help="per-class NMS drops a box overlapping a higher-scored one by more than "
                   "this IoU, at test and --detect (default: 0.5, §2)")
    p.add_argument("--top-k", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--voc12-ap", action="store_true",
                   help="area under the PR curve (VOC2010+) instead of VOC07's 11-point AP")
    p.add_argument("--pretrain", default=None, metavar="DATA",
                   help="§2.2: pretrain the backbone on a classification set (imagenet; shapes "
                   "offline) and write OUT/backbone.pt")
    p.add_argument("--pretrain-size", type=int, default=224,
                   help="pretraining image size (default: 224, §2.2)")
    p.add_argument("--backbone-weights", default=None, help="a backbone.pt written by --pretrain")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="first pretrain the backbone for N epochs (shapes at --data-size for "
                   "shapes-det, else imagenet at --pretrain-size; --pretrain-lr, "
                   "--pretrain-batch-size) into OUT/pretrain, then detect from it (default: 0 = "
                   f"off; {QUICK['pretrain_epochs']} with --quick on shapes-det; extraction.cfg "
                   f"ran {EXTRACTION['epochs']}, {EXTRACTION_BN['epochs']} with --bn)")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help=f"peak lr of --pretrain-epochs (default: imagenet {EXTRACTION['lr']:g}, "
                   f"{EXTRACTION_BN['lr']:g} with --bn, decayed by extraction.cfg's poly, power "
                   f"{EXTRACTION['power']} ({EXTRACTION_BN['power']} with --bn); shapes "
                   f"{SHAPES_PRETRAIN['lr']:g}, cosine (ours))")
    p.add_argument("--pretrain-batch-size", type=int, default=None,
                   help=f"global batch of --pretrain-epochs (default: imagenet "
                   f"{EXTRACTION['batch_size']}, extraction.cfg, unless --batch-size is given; "
                   f"shapes --batch-size)")
    p.add_argument("--detect", default=None, metavar="PATH",
                   help="an image or a folder of them: the detections of --weights, printed and "
                   "drawn into --out (OUT/<stem>_detections.png) with predictions.json/.csv")
    data.add_runtime_args(
        p, "shapes-det on a CPU in minutes: Fast YOLO, width 1/4, 64 px, S=4, shapes pretraining "
        "then detection (see QUICK and DEPARTURES)", workers=None,
        workers_help="DataLoader processes (default for voc: the cores per process, "
        f"{data.machine_workers()} here; 0 for shapes-det)", log_every=50,
        pretrained_help="(no published PyTorch YOLO v1 weights: an error; see --backbone-weights)")
    return p


def pretrain_recipe(name, bn):
    """The pretraining on `name`: {lr, power, epochs, batch_size, init}; ImageNet's from
    extraction.cfg (EXTRACTION; EXTRACTION_BN with --bn), ours on the offline shapes
    (SHAPES_PRETRAIN; batch None: --batch-size's)."""
    if name == "imagenet":
        return EXTRACTION_BN if bn else EXTRACTION
    return SHAPES_PRETRAIN


def resolve_defaults(args):
    q = args.quick
    unset = {k for k in ("epochs", "lr", "batch_size") if getattr(args, k) is None}
    for k, full in (("img_size", 448), ("width", 1.0), ("grid", 7), ("epochs", EPOCHS),
                    ("batch_size", 64), ("lr", 1e-2), ("bn", False), ("drop_strides", 0),
                    ("clip_grad", None), ("variant", "full"), ("dropout", 0.5),
                    ("pretrain_epochs", 0)):
        if getattr(args, k) is None:  # --quick's pretraining is the offline shapes one only
            setattr(args, k, QUICK[k] if q and (k != "pretrain_epochs" or args.data == "shapes-det")
                    else full)
    recipe = pretrain_recipe(args.pretrain or ("shapes" if args.data == "shapes-det" else
                                               "imagenet"), args.bn)
    if args.pretrain_lr is None:
        args.pretrain_lr = recipe["lr"]
    if args.pretrain_batch_size is None:  # ImageNet: 128 unless --batch-size is given (run_all.sh's
        # `-- --batch-size N` sets every stage's); the shapes: --batch-size's
        args.pretrain_batch_size = recipe["batch_size"] if recipe["batch_size"] and \
            "batch_size" in unset else args.batch_size
    if args.pretrain:  # --pretrain DATA alone: --epochs, --lr, --batch-size are the pretraining's
        for k, v in (("epochs", recipe["epochs"]), ("lr", args.pretrain_lr),
                     ("batch_size", args.pretrain_batch_size)):
            setattr(args, k, v if k in unset else getattr(args, k))
    if args.workers is None:
        args.workers = data.machine_workers() if args.data == "voc" else 0
    if args.drop_strides < 0:
        raise data.DataError(f"--drop-strides must be at least 0, got {args.drop_strides}")
    for k in ("img_size", "grid", "epochs", "batch_size", "boxes", "data_size"):
        if getattr(args, k) < 1:
            raise data.DataError(f"--{k.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(args, k)}")
    if args.width <= 0 or args.lr <= 0:
        raise data.DataError("--width and --lr must be positive")
    if args.pretrained:
        raise data.DataError("there are no published PyTorch YOLO v1 weights; pretrain with "
                             "--pretrain imagenet and pass --backbone-weights, or use --weights")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data.adopt_checkpoint(args, "yolo.py", ("variant", "img_size", "width", "bn", "grid",
                                            "drop_strides", "boxes"),
                          may_differ=("data_size", "conf_threshold", "top_k", "pretrain_size"))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "img_size", "pretrain_lr",
                        "pretrain_batch_size")
    if args.pretrain_epochs is not None and args.pretrain_epochs < 0:
        raise data.DataError(f"--pretrain-epochs {args.pretrain_epochs}: must be >= 0")
    t0 = time.time()
    resolve_defaults(args)
    if args.detect:  # draws into --out (default runs/yolo-DATA-predictions)
        return detect(args)
    if not args.pretrain:
        data.check_task(args.data, "detection")
    device, rank, world, is_main = data.setup(args, "yolo.py")
    if args.dry_run and args.pretrain_epochs:  # both stages, each 1 epoch of 2 steps
        args.pretrain_epochs = 1
    for k in ("batch_size", "pretrain_batch_size") if args.pretrain_epochs else ("batch_size",):
        if getattr(args, k) % world:
            raise data.DataError(f"--{k.replace('_', '-')} {getattr(args, k)} is not divisible "
                                 f"by the {world} processes")
    if args.pretrain:
        return pretrain(args, device, rank)
    if args.pretrain_epochs and not (args.backbone_weights or args.weights or args.resume or
                                     args.eval_only):
        # §2.2's two stages in one command: classification pretraining of the backbone (shapes:
        # the largest shape's class; the offline analogue of ImageNet), then detection from it.
        pre = argparse.Namespace(**{**vars(args), "pretrain": "shapes" if args.data ==
                                    "shapes-det" else "imagenet", "epochs": args.pretrain_epochs,
                                    "lr": args.pretrain_lr, "batch_size": args.pretrain_batch_size,
                                    "out": os.path.join(args.out, "pretrain"),
                                    "pretrain_size": args.data_size if args.data == "shapes-det"
                                    else args.pretrain_size, "stop_after": None})
        pretrain(pre, device, rank)
        if world > 1:
            data.barrier()  # the main rank has written backbone.pt
        args.backbone_weights = os.path.join(pre.out, "backbone.pt")

    # Data: per-sample v2 transforms (boxes follow), targets encoded in the loader.
    train_set, test_set, classes = detection_sets(args, args.grid)  # --eval-only: train None
    train_loader, n_train = None, 0
    if train_set is not None:
        train_loader = data.make_loader(train_set, args.batch_size // world, True, args.workers,
                                        device, collate_fn=collate, seed=args.seed,
                                        gpu_decode=args.gpu_decode)
        n_train = len(train_set)
    test_loader = data.make_loader(test_set, 64, False, args.workers, device, collate_fn=collate,
                                   gpu_decode=args.gpu_decode)
    train_loader, test_loader = data.dry_run_batches(args, train_loader, test_loader)

    model = YOLO(args.variant, len(classes), args.grid, args.boxes, args.width, args.img_size,
                 args.bn, args.dropout, args.drop_strides).to(device)
    arch = arch_name(args)
    if args.backbone_weights:
        state = data.load_checkpoint(args.backbone_weights, arch_name(args, True))
        data.load_weights(model.backbone, state, args.backbone_weights)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # §2.2: SGD, momentum 0.9, weight decay 5e-4 (on the weights: darknet's); the schedule per
    # iteration (warm-up).
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr,
                                momentum=args.momentum)
    steps = max(1, 0 if train_loader is None else len(train_loader))  # --eval-only: any value
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it / (steps * args.epochs)))
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "arch": arch, "classes": list(classes),
              "sizes": {"train": n_train, "val": 0, "test": len(test_set)},
              "parameters": count_parameters(model), "map_size": list(model.map_size),
              "ap_metric": "voc12-area" if args.voc12_ap else "voc07-11point",
              "departures": DEPARTURES}
    if is_main:
        print(f"yolo.py: {arch} on {args.data} ({n_train} train / {len(test_set)} test) at "
              f"{args.img_size}, S={args.grid} B={args.boxes} C={len(classes)}, "
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
    net = data.wrap(model, args)  # BN statistics (--bn) stay per process under torchrun

    seen, t_train = 0, time.time()
    if not args.eval_only:
        progress = metrics.Progress(len(train_loader), args.epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main, model=model)
        for epoch in range(start_epoch, args.epochs):
            # Every epoch's randomness (order, augmentation, dropout) is a function of
            # (seed, rank, epoch) alone: a resumed run repeats an uninterrupted one exactly.
            torch.manual_seed((args.seed + 1) * 1000003 + epoch * 101 + rank)
            data.set_epoch(train_loader, epoch)
            terms = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, args, device,
                                    epoch, progress)
            seen += len(train_loader) * args.batch_size
            row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in terms.items()},
                   "lr": optimizer.param_groups[0]["lr"]}
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                t_eval = time.time()
                r = evaluate(model, test_loader, args, device, len(classes))
                row["test_map"], row["test_loss"] = r["map"], r["test_loss"]
                t_train += time.time() - t_eval  # t_train is the start: the test's time left out
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} " +
                      " ".join(f"{k} {v:.4f}" for k, v in terms.items()) +
                      (f" test_map {100 * row['test_map']:.2f}% test_loss {row['test_loss']:.4f}"
                       if "test_map" in row else ""))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, classes=list(classes))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    t_train = time.time() - t_train
    test = evaluate(model, test_loader, args, device, len(classes))
    test["train_images_per_s"] = seen / max(t_train, 1e-9)  # includes data loading
    if is_main:
        print(f"test mAP {100 * test['map']:.2f}% ({config['ap_metric']}, {test['samples']} "
              f"images), " + ", ".join(f"{c} {100 * a:.1f}"
                                       for c, a in zip(classes, test["ap"]) if a == a))
    pr = metrics.detection_records(test.pop("result"), classes)  # the PR curves
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "yolo.py", args.data, test,
        paper={**PAPER, "map": PAPER["fast_map" if args.variant == "fast" else "map"]},
        config=config, device=str(device), seconds=time.time() - t0,
        history=history, **pr) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "yolo.py")
