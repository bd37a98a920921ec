"""FCN: E. Shelhamer, J. Long, T. Darrell, "Fully Convolutional Networks for Semantic
Segmentation", IEEE PAMI 2016, arXiv:1605.06211 (J. Long, E. Shelhamer, T. Darrell, CVPR 2015,
arXiv:1411.4038), and its released code, fcn.berkeleyvision.org (the recipe followed here).

    python fcn.py --data voc-seg --pretrained --cuda              # FCN-8s from VGG-16, at once
    python fcn.py --data voc-seg --arch 32s --pretrained --out runs/fcn32s        # staged: 32s,
    python fcn.py --data voc-seg --arch 16s --init-from runs/fcn32s/checkpoint.pt \\
        --out runs/fcn16s                                           # then 16s at lr 1e-12,
    python fcn.py --data voc-seg --arch 8s --init-from runs/fcn16s/checkpoint.pt \\
        --out runs/fcn8s                                            # then 8s at lr 1e-14
    python fcn.py --data voc-seg --voc-sets voc2012 --arch 32s --pretrained  # without SBD
    python fcn.py --data cityscapes --pretrained                  # 19 classes, same code
    python fcn.py --data shapes-seg --quick                       # offline, 10-16 min, 1 thread
    python fcn.py --segment image.jpg --weights runs/fcn8s/checkpoint.pt --out seg/
    torchrun --nproc_per_node=2 fcn.py --data voc-seg --pretrained --batch-size 2

Paper (PAMI; the release's nets, this script's recipe): mean IU on seg11valid FCN-32s 63.6 %,
FCN-16s 65.0 %, FCN-8s 65.5 % (staged) and 65.4 % (at once); FCN-8s 67.2 % on VOC2012 test.
CVPR's 59.4 / 62.4 / 62.7 % (same images) and 62.2 % (test) came from its earlier recipe (20-image
batches, momentum 0.9, lr 1e-4), not run here. FCN-VGG16 has 134M parameters (CVPR Table 1).
Ours: see the README's results table.

Data (PAMI §4.3, the release's data/pascal): trained on SBD train (8,498 images, torchvision's
SBDataset in DIR/SBD), tested on seg11valid (736 images of VOC2011 seg val not in SBD train;
the list is SEG11VALID below) read from VOC2012's tree. Without SBD, `--voc-sets voc2012` trains
on VOC2012 train (1,464) and tests on val (1,449): a fallback, said at start and in results.json,
compared with no paper figure.
Model (§3-4): VGG-16 in torchvision's layout (its state_dict loads as is) with conv1_1 padded
by 100 and ceil-mode pooling as in the reference Caffe nets; fc6/fc7 convolutionized (7x7 conv
4096, 1x1 conv 4096, weights reshaped from the classifier's Linear layers); score_fr, a 1x1 conv
to the classes, zero-initialised (§4.3); up-sampling by ConvTranspose2d initialised to bilinear
interpolation and fixed (the reference nets' lr_mult 0; --learn-upsampling learns them).
Skips (§4.2): FCN-16s adds a zero-initialised 1x1 score on pool4 to the 2x up-sampled score_fr,
then up-samples by 16; FCN-8s adds pool3 likewise and up-samples by 8. Crops align every map
with the input; their offsets (19 for 32s; 5 and 27 for 16s; 5, 9 and 31 for 8s, as in the
reference prototxts) are computed here from the layer geometry (`coord_map`), not typed in.
Training (the release's voc-fcn32s/16s/8s and voc-fcn8s-atonce solve.py and solver.prototxt,
PAMI's "heavy" training): whole images, batch 1, per-pixel cross-entropy summed over the pixels
(void = 255 ignored), SGD momentum 0.99, fixed lr 1e-10 (staged: 1e-12 for 16s, 1e-14 for 8s),
weight decay 5e-4, biases 2x lr and no decay; 100,000 iterations per net (300,000 at once).
Evaluation: whole images, pixel acc., mean acc., mean IU, fw IU (§5), and the lecture's
segmentation accuracy (SA = IoU) per class. Departures: DEPARTURES, printed at start.
"""
import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import tv_tensors

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Shelhamer, Long, Darrell, PAMI 2016 (arXiv:1605.06211) and the release, "
                      "fcn.berkeleyvision.org; Long et al., CVPR 2015 (arXiv:1411.4038)",
         "data": "voc-seg", "protocol": "SBD train (8,498 images) -> seg11valid (736 images)",
         # The release's nets (its README; PAMI's comparison of skip nets), this script's recipe:
         # mean IU on seg11valid of FCN-32s, the staged FCN-16s and FCN-8s, FCN-8s at once.
         "mean_iou_fcn32s_seg11valid": 0.636, "mean_iou_fcn16s_seg11valid": 0.650,
         "mean_iou_fcn8s_seg11valid": 0.655, "mean_iou_fcn8s_atonce_seg11valid": 0.654,
         # CVPR Table 2, the same 736 images (its footnote 7), CVPR's recipe (20-image batches,
         # momentum 0.9, lr 1e-4; not implemented here): the paper's earlier figures, listed
         # and never compared with.
         "mean_iou_fcn32s_seg11valid_cvpr": 0.594, "mean_iou_fcn16s_seg11valid_cvpr": 0.624,
         "mean_iou_fcn8s_seg11valid_cvpr": 0.627,
         "mean_iou_voc2012_test_fcn8s_cvpr": 0.622, "mean_iou_voc2012_test_fcn8s_pami": 0.672,
         "parameters": 134e6}
# seg11valid (the release's data/pascal/seg11valid.txt, also in BVLC/caffe's data/pascal): the
# 736 images of VOC2011 seg val that are not in SBD train, the only ones the papers and the
# release validate on. Per year the numbers of the ids "<year>_<number in 6 digits>".
SEG11VALID = {
    "2007": "33 42 61 123 129 175 187 323 332 346 452 464 491 529 559 572 629 636 661 663 676 727 "
            "762 783 799 804 830 837 847 862 925 999 1154 1175 1239 1284 1288 1289 1299 1311 1321 "
            "1377 1408 1423 1430 1457 1458 1526 1568 1585 1586 1587 1594 1630 1677 1678 1717 1733 "
            "1761 1763 1774 1884 1955 2046 2094 2119 2132 2260 2266 2268 2284 2376 2378 2387 2400 "
            "2412 2426 2427 2445 2470 2539 2565 2597 2618 2619 2624 2643 2648 2719 2728 2823 2824 "
            "2852 2903 3011 3020 3022 3051 3088 3101 3106 3110 3131 3134 3137 3143 3169 3188 3194 "
            "3195 3201 3349 3367 3373 3499 3503 3506 3530 3571 3587 3611 3621 3682 3711 3714 3742 "
            "3786 3841 3848 3861 3872 3917 3957 3991 4033 4052 4112 4121 4143 4189 4190 4193 4241 "
            "4275 4281 4380 4392 4405 4468 4483 4510 4538 4558 4644 4649 4712 4722 4856 4866 4902 "
            "4969 5058 5074 5107 5114 5149 5173 5281 5294 5296 5304 5331 5354 5358 5428 5460 5469 "
            "5509 5547 5600 5608 5626 5689 5696 5705 5759 5803 5813 5828 5844 5845 5857 5911 5915 "
            "5978 6028 6035 6046 6076 6086 6117 6171 6241 6260 6277 6348 6364 6373 6444 6449 6549 "
            "6553 6560 6647 6678 6680 6698 6761 6802 6837 6841 6864 6866 6946 7007 7084 7109 7130 "
            "7165 7168 7195 7196 7203 7211 7235 7341 7414 7417 7470 7477 7493 7498 7524 7534 7624 "
            "7651 7688 7748 7795 7810 7815 7818 7836 7849 7881 7996 8051 8084 8106 8110 8204 8222 "
            "8256 8260 8339 8374 8415 8430 8543 8547 8596 8645 8670 8708 8722 8747 8802 8815 8897 "
            "8944 8964 8973 8980 9015 9068 9084 9088 9096 9221 9245 9251 9252 9258 9320 9323 9331 "
            "9346 9392 9413 9419 9446 9458 9521 9562 9592 9654 9655 9684 9687 9691 9706 9750 9756 "
            "9764 9794 9817 9841 9897 9911 9923 9938",
    "2008": "73 75 107 123 149 213 215 223 233 239 271 345 391 401 501 533 573 589 657 661 725 "
            "731 763 765 811 853 911 919 943 1135 1231 1249 1379 1433 1439 1513 1531 1547 1715 "
            "1821 1885 1971 2043 2205 2239 2269 2273 2379 2383 2467 2521 2623 2681 2775 2835 2859 "
            "3105 3135 3155 3369 3709 3777 3821 3885 4069 4172 4175 4279 4339 4345 4363 4453 4562 "
            "4575 4621 4659 4705 4995 5049 5097 5105 5145 5217 5262 5439 5525 5633 5637 5691 6055 "
            "6229 6327 6553 6835 7025 7031 7123 7497 7677 7797 7811 8051 8103 8301",
    "2009": "13 22 32 37 39 87 121 149 201 205 219 335 351 387 391 446 455 457 469 487 523 619 "
            "641 675 705 723 727 771 845 879 919 931 935 989 991 1255 1299 1333 1363 1391 1411 "
            "1433 1505 1535 1565 1607 1663 1683 1687 1731 1775 1851 1941 2035 2165 2171 2221 2291 "
            "2295 2317 2445 2487 2521 2527 2535 2539 2549 2571 2573 2591 2635 2649 2651 2727 2749 "
            "2753 2771 2887 2975 3003 3005 3059 3063 3065 3071 3105 3123 3193 3269 3273 3311 3323 "
            "3343 3387 3481 3517 3523 3549 3551 3589 3607 3703 3707 3771 3849 3857 3895 4021 4033 "
            "4043 4099 4125 4217 4255 4455 4507 4509 4579 4581 4687 4801 4859 4867 4895 4969 4993 "
            "5087 5089 5137 5189 5217 5219",
    "2010": "3 65 83 159 163 309 427 559 573 639 683 907 961 1017 1061 1069 1149 1151 1251 1313 "
            "1327 1331 1553 1557 1563 1577 1579 1767 1773 1851 1995 2017 2025 2137 2147 2161 2271 "
            "2305 2361 2531 2623 2693 2701 2763 2921 2929 2939 3123 3187 3207 3239 3275 3325 3365 "
            "3381 3409 3453 3473 3495 3531 3547 3675 3781 3813 3915 3971 4041 4063 4149 4165 4219 "
            "4355 4419 4479 4529 4543 4551 4559 4697 4763 4783 4795 4815 4825 5013 5021 5063 5159 "
            "5187 5245 5305 5421 5531 5705 5709 5719 5727 5871 5877 5899 5991",
    "2011": "45 51 173 185 291 419 435 455 479 503 521 536 598 607 661 669 747 789 809 843 969 "
            "1069 1071 1161 1263 1281 1287 1313 1341 1421 1447 1529 1567 1589 1597 1601 1607 1613 "
            "1619 1665 1669 1713 1745 1775 1793 1812 1868 1984 2041 2121 2223 2279 2295 2317 2327 "
            "2343 2371 2379 2391 2509 2535 2575 2589 2623 2641 2675 2685 2713 2863 2929 2993 2997 "
            "3011 3055 3085 3145 3197 3271",
}
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
FC = 4096                      # fc6 / fc7 width
PAD = 100                      # conv1_1 padding of the reference nets: fc6's 7x7 fits any input
# The release's solve.py: 25 x 4,000 steps of batch 1 for FCN-32s and for each staged net
# (solver.prototxt max_iter 100,000), 75 x 4,000 for voc-fcn8s-atonce (max_iter 300,000).
ITERATIONS = 100_000
ITERATIONS_AT_ONCE = 300_000
CAFFE_OFFSETS = {"32s": {"score": 19}, "16s": {"score_pool4": 5, "score": 27},
                 "8s": {"score_pool4": 5, "score_pool3": 9, "score": 31}}
# §4.2's staged training divides the lr by 100 at each stage: the reference solvers' 1e-10,
# 1e-12 and 1e-14 for FCN-32s, -16s and -8s (the default with --init-from; 1e-10 otherwise).
STAGED_LR = {"32s": 1e-10, "16s": 1e-12, "8s": 1e-14}
# Caffe's VGG-16 sees 0-255 pixels minus the mean, torchvision's (x / 255 - mean) / std: the
# same function when conv1_1's weights are 255 std larger here, per input channel, but then SGD
# moves conv1_1 (255 std)^2 ~ 3,300x less on the same loss. Its gradient is scaled by that
# factor in the paper's SGD recipe, so lr 1e-10 takes the reference's steps on every layer
# (tests/test_fcn.py checks the two nets step for step; bench/fcn_update_size.py measured it at
# full width on a real VOC image: every layer's relative update equal to Caffe's arithmetic to 3
# digits over 10 steps, conv1_1 ~3,300x behind without the scaling).
CAFFE_CONV1_GRAD_SCALE = tuple((255 * s) ** 2 for s in data.IMAGENET_STD)
QUICK = {"width": 0.125, "epochs": 4, "batch_size": 16, "lr": 1e-3, "momentum": 0.9,
         "optimizer": "adam", "weight_decay": 0.0}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "default --arch 8s trains FCN-8s from VGG-16 at once (as the release's voc-fcn8s-atonce, "
    "300,000 iterations) with unscaled skips: that net scales pool4/pool3 by 0.01/0.0001, not "
    "done here; the paper's staged 32s -> 16s -> 8s training is --init-from",
    "seg11valid's images and masks are read from VOC2012's tree (the release reads VOC2011's; "
    "VOC2012 holds the same 736 images)",
    "all up-samplings fixed bilinear by default (the reference nets' lr_mult 0; CVPR learned "
    "the 2x ones): --learn-upsampling learns them",
    "without --pretrained, He-initialised convolutions (the paper always starts from VGG-16)",
    "--quick (shapes-seg, from scratch): width 1/8, batch norm (--bn), batch 16, pixel-mean "
    "loss, Adam lr 1e-3, no weight decay, 4 epochs (the paper's batch 1, summed loss, SGD lr "
    "1e-10, momentum 0.99 assume ImageNet weights and 500x500 images; without batch norm the "
    "narrow net stayed at the all-background prediction, with Adam or SGD)",
    "images are normalised by ImageNet mean/std (torchvision's VGG-16), not Caffe's BGR means; "
    "in the SGD recipe conv1_1's gradient is scaled by (255 std)^2 so that each layer takes "
    "the reference's steps at its lr (CAFFE_CONV1_GRAD_SCALE)",
]
# Said at start and stored with the others when --voc-sets voc2012 replaces the paper's sets.
VOC2012_DEPARTURE = ("--voc-sets voc2012: trained on VOC2012 train (1,464 images), tested on "
                     "VOC2012 val (1,449), the fallback without SBD; the paper and the release "
                     "train on SBD train (8,498) and test on seg11valid (736): no paper figure")


def seg11valid():
    """The 736 ids of seg11valid ("2007_000033", ...), sorted as the release's file."""
    return sorted(f"{year}_{int(n):06d}" for year, numbers in SEG11VALID.items()
                  for n in numbers.split())


def at_once(args):
    """A skip net (16s, 8s) trained from VGG-16 in one go rather than staged from a coarser one."""
    return args.arch != "32s" and not args.init_from


def iterations(args):
    """The release's training length of the net: 300,000 steps at once, 100,000 otherwise."""
    return ITERATIONS_AT_ONCE if at_once(args) else ITERATIONS


def paper_figures(args, staged=False):
    """The figures a run is compared with: the release's mean IU on seg11valid of the net it
    trained (FCN-32s; FCN-16s and FCN-8s staged, `staged` or --init-from; FCN-8s at once), only
    when it trained on SBD train and tested on seg11valid (args.train_set, args.test_set); none
    for the VOC2012 fallback, another data set or a net the release has not (FCN-16s at once)."""
    key = f"mean_iou_fcn{args.arch}" + \
        ("_atonce" if at_once(args) and not staged else "") + "_seg11valid"
    ours = (getattr(args, "train_set", None), getattr(args, "test_set", None))
    return {**PAPER, "mean_iou": PAPER.get(key) if ours == ("sbd-train", "seg11valid") else None}


# ---------------------------------------------------------------------------------------------
# Model

def _scale(c, width):
    """Channel count c times the --width multiplier (a CPU convenience; 1 = the paper)."""
    return max(1, round(c * width))


def bilinear_kernel(channels, k):
    """(channels, channels, k, k) ConvTranspose2d weight that up-samples each channel alone by
    bilinear interpolation (the reference surgery.py's upsample_filt): the tent 1 - |x - c| / f,
    f = ceil(k / 2), centred at c = f - 1 (odd k) or f - 0.5 (even k)."""
    f = (k + 1) // 2
    c = f - 1 if k % 2 == 1 else f - 0.5
    tent = 1 - (torch.arange(k, dtype=torch.float32) - c).abs() / f
    w = torch.zeros(channels, channels, k, k)
    w[range(channels), range(channels)] = tent[:, None] * tent[None, :]
    return w


def upsampler(channels, factor, learn=False):
    """A ConvTranspose2d of kernel 2 x factor, stride factor, no bias, bilinear, fixed unless
    `learn` (§3.3: 'upsampling is backwards strided convolution')."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, factor, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    up.weight.requires_grad_(learn)
    return up


def coord_map(layers):
    """(a, b) with input coordinate = a * output coordinate + b through `layers` in order, the
    coordinate of a unit being the centre of its window (as Caffe's coord_map.py): a conv or
    pool of kernel k, stride s, padding p maps out -> s * out + (k - 1) / 2 - p; a transposed
    convolution is the inverse map."""
    a, b = 1.0, 0.0
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
            pair = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
            k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
            sa, sb = s, (k - 1) / 2 - p
            if isinstance(m, nn.ConvTranspose2d):
                sa, sb = 1 / s, -sb / s
            a, b = a * sa, a * sb + b
    return a, b


def crop_offset(big, small):
    """Offset at which to crop map `big` so that it aligns with map `small`, both given by their
    coord_map to the input; it must be a whole number of cells, else the net is misbuilt."""
    (a1, b1), (a2, b2) = big, small
    off = (b2 - b1) / a1
    if a1 != a2 or off < 0 or off != int(off):
        raise ValueError(f"maps do not align: {big} vs {small}")
    return int(off)


def crop(x, offset, like):
    """x[..., offset:offset + H, offset:offset + W] with (H, W) = like's spatial size."""
    h, w = like.shape[-2:] if isinstance(like, torch.Tensor) else like
    return x[..., offset:offset + h, offset:offset + w]


class FCN(nn.Module):
    """FCN-32s, -16s or -8s on VGG-16. `features` is torchvision's vgg16.features layout
    (conv1_1 padded by 100, ceil-mode pooling: no parameters change), fc6/fc7 are convolutions,
    the Caffe names are kept for the heads (score_fr, upscore2, score_pool4, ...)."""

    def __init__(self, arch="8s", num_classes=21, width=1.0, learn_upsampling=False, bn=False,
                 dropout=0.5):
        super().__init__()
        if arch not in ("32s", "16s", "8s"):
            raise ValueError(f"unknown FCN architecture '{arch}'; use 32s, 16s or 8s")
        self.arch = arch
        layers, c, pools = [], 3, []
        for v in VGG16:
            if v == "M":  # ceil mode, as Caffe: the up-sampled map then always covers the input
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                pools.append((len(layers) - 1, c))
            else:  # with bn, torchvision's vgg16_bn layout: conv, BatchNorm, ReLU
                layers += [nn.Conv2d(c, _scale(v, width), 3, padding=1)] + \
                    ([nn.BatchNorm2d(_scale(v, width))] if bn else []) + [nn.ReLU(inplace=True)]
                c = _scale(v, width)
        layers[0].padding = (PAD, PAD)
        (self.pool3, c3), (self.pool4, c4) = pools[2], pools[3]  # indices in features, channels
        self.features = nn.Sequential(*layers)
        fc = _scale(FC, width)
        self.fc6 = nn.Conv2d(c, fc, 7)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout(dropout)  # drop6 / drop7 of the reference nets: 0.5
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        n, learn = num_classes, learn_upsampling
        if arch == "32s":
            self.upscore = upsampler(n, 32, learn)
        else:
            self.upscore2 = upsampler(n, 2, learn)
            self.score_pool4 = nn.Conv2d(c4, n, 1)
            if arch == "16s":
                self.upscore16 = upsampler(n, 16, learn)
            else:
                self.upscore_pool4 = upsampler(n, 2, learn)
                self.score_pool3 = nn.Conv2d(c3, n, 1)
                self.upscore8 = upsampler(n, 8, learn)
        self.reset_parameters()
        self.offsets = self.crop_offsets()

    def reset_parameters(self):
        """He init of the convolutions (torchvision's VGG init for its convs), zero biases; the
        score layers at zero (§4.3: random init gave neither better results nor faster
        convergence; the new skip scores start at zero so a finer net starts where its coarser
        parent ended)."""
        for m in [*self.features, self.fc6, self.fc7]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)
                nn.init.zeros_(getattr(self, name).bias)

    def crop_offsets(self):
        """The crops of the reference prototxts, derived from the geometry (see coord_map)."""
        f = list(self.features)
        fc7 = f + [self.fc6, self.fc7, self.score_fr]
        data_map = (1.0, 0.0)
        if self.arch == "32s":
            return {"score": crop_offset(coord_map(fc7 + [self.upscore]), data_map)}
        up2 = fc7 + [self.upscore2]
        off = {"score_pool4": crop_offset(coord_map(f[:self.pool4 + 1]), coord_map(up2))}
        if self.arch == "16s":
            off["score"] = crop_offset(coord_map(up2 + [self.upscore16]), data_map)
            return off
        up4 = up2 + [self.upscore_pool4]
        off["score_pool3"] = crop_offset(coord_map(f[:self.pool3 + 1]), coord_map(up4))
        off["score"] = crop_offset(coord_map(up4 + [self.upscore8]), data_map)
        return off

    def forward_fc7(self, x):
        """fc7's map (after ReLU and dropout) and the pool3/pool4 maps."""
        pools = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (self.pool3, self.pool4):
                pools[i] = x
        x = self.drop(F.relu(self.fc6(x)))
        return self.drop(F.relu(self.fc7(x))), pools

    def forward(self, x):
        size, off = x.shape[-2:], self.offsets
        h, pools = self.forward_fc7(x)
        score = self.score_fr(h)
        if self.arch == "32s":
            return crop(self.upscore(score), off["score"], size)
        # §4.2: fuse by sum with the finer layer's score, cropped to the up-sampled map.
        score = self.upscore2(score)
        score = score + crop(self.score_pool4(pools[self.pool4]), off["score_pool4"], score)
        if self.arch == "16s":
            return crop(self.upscore16(score), off["score"], size)
        score = self.upscore_pool4(score)
        score = score + crop(self.score_pool3(pools[self.pool3]), off["score_pool3"], score)
        return crop(self.upscore8(score), off["score"], size)


def count_parameters(model, trainable=True):
    """Parameters (by default only those trained: the fixed up-sampling is not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def convolutionize_vgg16(model, state):
    """Load a torchvision vgg16 state_dict: features as they are; classifier.0 (25088 -> 4096)
    reshaped to fc6's (4096, 512, 7, 7) (the flattened order is channel, row, column) and
    classifier.3 to fc7's (4096, 4096, 1, 1); classifier.6 (fc8, 1000 ImageNet classes) is
    dropped (§3.1: the final classifier layer is discarded)."""
    own = {k: v for k, v in state.items() if k.startswith("features.")}
    try:
        own["fc6.weight"] = state["classifier.0.weight"].reshape(model.fc6.weight.shape)
        own["fc7.weight"] = state["classifier.3.weight"].reshape(model.fc7.weight.shape)
        own["fc6.bias"], own["fc7.bias"] = state["classifier.0.bias"], state["classifier.3.bias"]
    except (KeyError, RuntimeError) as e:
        raise data.DataError(f"not a VGG-16 state_dict of this width ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:80]}); use --width 1")
    missing = [k for k in model.state_dict() if k.startswith("features.") and k not in own]
    if missing:
        raise data.DataError(f"not a VGG-16 state_dict: {missing[0]} is missing")
    target = model.state_dict()  # parameters and BN buffers, sharing the model's storage
    with torch.no_grad():
        for k, v in own.items():
            target[k].copy_(v)


def load_pretrained(model, width, bn=False):
    """torchvision's VGG16_Weights.IMAGENET1K_V1 (VGG16_BN_Weights with --bn), downloaded once
    into the torch hub cache."""
    if width != 1.0:
        raise data.DataError("--pretrained needs --width 1 (the published VGG-16 size)")
    weights = (torchvision.models.VGG16_BN_Weights if bn else torchvision.models.VGG16_Weights
               ).IMAGENET1K_V1
    state = data.torchvision_weights(weights)
    convolutionize_vgg16(model, state)


def caffe_conv1_steps(model):
    """Scale conv1_1's weight gradient by CAFFE_CONV1_GRAD_SCALE (per input channel): SGD on the
    mean/std-normalised input then moves every layer as Caffe's SGD on 0-255 mean-subtracted
    pixels does (weight decay is unchanged by the rescaling)."""
    w = model.features[0].weight
    scale = torch.tensor(CAFFE_CONV1_GRAD_SCALE, dtype=w.dtype, device=w.device)
    return w.register_hook(lambda g: g * scale[None, :, None, None])


def init_from(model, path):
    """§4.2's staged training: copy every layer of a (coarser) FCN checkpoint whose name and
    shape match (features, fc6, fc7, score_fr, and score_pool4 from a 16s); the rest keeps its
    initialisation (zero skip scores, bilinear up-sampling). Returns the copied names."""
    state = data.load_checkpoint(path)
    state = state.get("model", state)
    if "score_fr.weight" not in state:
        raise data.DataError(f"{path} is not an FCN checkpoint (no score_fr); --init-from takes "
                             f"a checkpoint written by fcn.py, --pretrained loads VGG-16")
    own, copied = model.state_dict(), []
    for k, v in state.items():
        if k in own:
            if own[k].shape != v.shape:
                raise data.DataError(f"{path} does not fit this model: {k} is {tuple(v.shape)} "
                                     f"there and {tuple(own[k].shape)} here (another --width "
                                     f"or number of classes?)")
            own[k] = v
            copied.append(k)
    model.load_state_dict(own)
    return copied


# ---------------------------------------------------------------------------------------------
# Loss

def fcn_loss(scores, target, normalize=False):
    """Per-pixel multinomial logistic loss, void (255) ignored. The paper's (Caffe's
    `normalize: false`): summed over the pixels of each image, averaged over the batch; with
    `normalize`, averaged over the counted pixels instead. The per-pixel losses are summed here:
    cross_entropy on (N, C, H, W) reducing by itself runs nll_loss2d's CUDA kernel, which sums
    with atomics and has no deterministic version (--deterministic refuses it); unreduced it is
    elementwise (void pixels give 0)."""
    loss = F.cross_entropy(scores, target, ignore_index=255, reduction="none").sum()
    if normalize:
        return loss / (target != 255).sum().clamp(min=1)
    return loss / len(target)


# ---------------------------------------------------------------------------------------------
# Data glue

def pad_collate(batch):
    """Stack (image, mask) pairs; images of different sizes (VOC with --batch-size > 1) are
    padded at the bottom/right with 0 (the mean after normalisation) and void in the mask. The
    buffers are made where the images are: the CPU in the loader's workers, the GPU under
    --gpu-decode (a CPU buffer there would copy every image back and forth)."""
    images, masks = zip(*batch)
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    x = torch.zeros(len(images), images[0].shape[0], h, w, dtype=images[0].dtype,
                    device=images[0].device)
    y = torch.full((len(images), h, w), 255, dtype=torch.int64, device=masks[0].device)
    for i, (im, m) in enumerate(zip(images, masks)):
        x[i, :, :im.shape[-2], :im.shape[-1]] = im.as_subclass(torch.Tensor)
        y[i, :m.shape[-2], :m.shape[-1]] = m.as_subclass(torch.Tensor)
    return x, y


def class_names(name):
    return {"voc-seg": data.VOC_SEG_CLASSES, "cityscapes": data.CITYSCAPES_CLASSES,
            "shapes-seg": ("background",) + data.SHAPES_CLASSES}[name]


def segmentation_sets(args):
    """(train, test) sets with the paper's pipeline: no augmentation (PAMI §4.3: mirroring and
    jittering gave no noticeable improvement), whole images, ImageNet mean/std normalisation.
    voc-seg: SBD train -> seg11valid, or VOC2012 train -> val (--voc-sets voc2012). Sets
    args.train_set and args.test_set (results.json's config names them). --eval-only: train is
    None (its images and masks are not read: nothing is taken from them)."""
    kw = dict(data_dir=args.data_dir, download=not args.no_download, quick=args.quick,
              transforms=data.segmentation_transforms(False))
    if args.data == "shapes-seg":
        kw["size"] = args.data_size
    if args.data == "voc-seg" and args.voc_sets == "sbd":
        train, test = sbd_seg11valid_sets(args, kw["transforms"])
        args.train_set, args.test_set = "sbd-train", "seg11valid"
    else:
        train = None if args.eval_only else data.segmentation_dataset(args.data, "train", **kw)
        test = data.segmentation_dataset(args.data, "test", **kw)
        name = "voc2012" if args.data == "voc-seg" else args.data
        args.train_set = f"{name}-train"
        args.test_set = f"{name}-{'test' if args.data == 'shapes-seg' else 'val'}"
        if args.limit:
            train, test = (None if d is None else torch.utils.data.Subset(
                d, range(min(args.limit, len(d)))) for d in (train, test))
    if train is None:
        args.train_set = None
    if (train is not None and len(train) == 0) or len(test) == 0:
        raise data.DataError(f"'{args.data}' has an empty train or test split; check --data-dir")
    return train, test


# Where SBD's files (img/, cls/, train.txt) may be under --data-dir: torchvision's SBDataset
# download puts them in SBD/; the archive benchmark.tgz unpacks to benchmark_RELEASE/dataset/.
SBD_DIRS = ("SBD", os.path.join("SBD", "benchmark_RELEASE", "dataset"),
            os.path.join("benchmark_RELEASE", "dataset"))


def sbd_seg11valid_sets(args, transforms):
    """The release's sets: SBD train (8,498 images, listed by torchvision's SBDataset) and
    seg11valid (736 images) from VOC2012's tree; the first --limit N (64 with --quick) of each."""
    n = args.limit or (64 if args.quick else None)
    train = None
    if not args.eval_only:
        images, masks = sbd_files(args.data_dir, not args.no_download)
        train = SBDSegmentation(images[:n], masks[:n], data.VOC_SEG_CLASSES, transforms)
        train.validate()
    test = data.SegmentationSet(*seg11valid_files(args.data_dir, not args.no_download,
                                                  seg11valid()[:n]),
                                data.VOC_SEG_CLASSES, transforms)
    test.validate()  # every file the run will read, before its first step
    return train, test


@data.local_rank_zero_first
def sbd_files(root, download):
    """(images, .mat masks) of SBD train, downloaded by torchvision into DIR/SBD when absent."""
    found = [d for d in SBD_DIRS if os.path.isfile(os.path.join(root, d, "train.txt"))]
    where, SBD = os.path.join(root, "SBD"), torchvision.datasets.SBDataset
    fallback = "or run with --voc-sets voc2012 (VOC2012 train -> val: not the paper's sets)"
    if not found:
        if not download:
            raise data.DataError(f"SBD train not found ({os.path.join(where, 'train.txt')} is "
                                 f"missing): put {SBD.filename} ({SBD.url}) in {where} and run "
                                 f"with downloads on, or unpack its benchmark_RELEASE/dataset "
                                 f"there; {fallback}")
        try:  # only when absent: torchvision would unpack the archive again otherwise
            SBD(where, image_set="train", mode="segmentation", download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise data.DataError(f"{data._download_error(SBD.filename, SBD.url, where, reason)}"
                                 f"; {fallback}")
        found = ["SBD"]
    ds = SBD(os.path.join(root, found[0]), image_set="train", mode="segmentation")
    return ds.images, ds.masks


def seg11valid_files(root, download, ids):
    """(images, masks) of the seg11valid `ids` in VOC2012's tree (downloaded when absent)."""
    data._voc_files(root, "2012", "val", "segmentation", download)  # the tree, or its error
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    images = [os.path.join(base, "JPEGImages", f"{i}.jpg") for i in ids]
    masks = [os.path.join(base, "SegmentationClass", f"{i}.png") for i in ids]
    missing = [i for i, image, mask in zip(ids, images, masks)
               if not (os.path.isfile(image) and os.path.isfile(mask))]
    if missing:
        raise data.DataError(f"{len(missing)} of the {len(ids)} seg11valid images are not in "
                             f"{base} (first: JPEGImages/{missing[0]}.jpg or SegmentationClass/"
                             f"{missing[0]}.png); seg11valid needs VOC2012's whole segmentation "
                             f"tree (VOCtrainval_11-May-2012.tar)")
    return images, masks


def sbd_mask(path):
    """SBD's class mask: cls/<id>.mat holds the MATLAB struct GTcls, its field Segmentation the
    class indices 0-20 (no void), read with scipy as torchvision's SBDataset reads it."""
    import scipy.io  # (0.3 s; only SBD needs it, as in torchvision)
    try:
        mask = scipy.io.loadmat(path)["GTcls"][0]["Segmentation"][0]
    except FileNotFoundError:
        raise data.DataError(f"SBD mask {path} not found; the data set is incomplete, fetch it "
                             f"again")
    except (OSError, ValueError, KeyError, IndexError, TypeError,
            scipy.io.matlab.MatReadError) as e:
        raise data.DataError(f"cannot read SBD mask {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:80] if str(e) else ''}); is it SBD's "
                             f"cls/*.mat (a struct GTcls with Segmentation)?")
    return torch.from_numpy(np.asarray(mask, dtype=np.int64))


class SBDSegmentation(data.SegmentationSet):
    """SBD (image, mask) pairs: the images are JPEGs as VOC's, the masks MATLAB files
    (`sbd_mask`); otherwise data.SegmentationSet (its transforms, --gpu-decode's bytes)."""

    def validate(self, n=None):
        """Every file there (8,498 x 2 stats); their contents are checked as they are read."""
        for path in (self.images + self.masks)[:n]:
            if not os.path.isfile(path):
                raise data.DataError(f"SBD file {path} is missing; the data set is incomplete: "
                                     f"unpack {torchvision.datasets.SBDataset.filename} again")

    def __getitem__(self, i):
        image = self.read(self.images[i])
        mask = sbd_mask(self.masks[i])
        if mask.ndim != 2 or tuple(mask.shape) != self.canvas(image, self.images[i]):
            raise data.DataError(f"SBD mask {self.masks[i]} is {tuple(mask.shape)}, its image "
                                 f"{self.canvas(image, self.images[i])}; the files do not match")
        bad = (mask >= len(self.classes)) & (mask != 255)
        if bad.any():
            raise data.DataError(f"SBD mask {self.masks[i]} holds value {mask[bad][0].item()}, "
                                 f"not a class index (0..{len(self.classes) - 1})")
        return self.finish(image, tv_tensors.Mask(mask))


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def autotuning(args):
    """cuDNN autotuning (data.set_kernels turns it on for CUDA) benchmarks the convolutions of
    every new input shape once and pays only when the shapes repeat. VOC's whole images (§4.3:
    batch 1; with a larger batch, padded to each batch's largest) come in hundreds of sizes,
    each tuned once and never reused: off. Cityscapes' and shapes-seg's images share one size:
    left on."""
    return data.no_autotune() if args.data == "voc-seg" else contextlib.nullcontext()


def train_one_epoch(net, loader, optimizer, scaler, args, device, epoch, progress):
    net.train()
    with autotuning(args):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with data.autocast(device, args.amp):
                loss = fcn_loss(net(x).float(), y, args.normalize)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            progress.step(len(y) * args.world, loss, optimizer.param_groups[0]["lr"], epoch,
                          n=len(y))
    return progress.epoch_loss()  # the losses read here, over every rank's images


def confusion_counts(pred, target, num_classes, ignore_index=255):
    """A batch's pixels counted on the target's device without reading anything back: (C * C +
    2,) int64, bin t * C + p for a pixel of true class t predicted p, then void pixels
    (ignore_index), then any other target value (a corrupt mask: `evaluate` raises on it, once,
    after the loop). Summed by scatter_add_ of ones: torch.bincount on CUDA reads its input's
    min and max back to the host (2 host syncs an image; metrics.confusion_matrix adds 4 more
    and a copy to the CPU); integer sums are exact in any order, and under --deterministic
    scatter_add_ takes its deterministic kernel."""
    C = num_classes
    t, p = target.reshape(-1), pred.reshape(-1)
    index = torch.where((t >= 0) & (t < C), t * C + p,
                        torch.where(t == ignore_index, C * C, C * C + 1))
    counts = torch.zeros(C * C + 2, dtype=torch.int64, device=t.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


@torch.no_grad()
def evaluate(model, loader, num_classes, args, device):
    """§5's measures over whole images from the summed confusion matrix, and the all-background
    baseline (every pixel labelled 0) on the same pixels. `model` is the unwrapped one. Under
    torchrun each rank tests its share of the images (the loader's) and the counts are summed
    over the ranks: every rank then holds the figures of one process on the whole set. The
    counts stay on the device until the end (one copy to the CPU)."""
    model.eval()
    C = num_classes
    counts = torch.zeros(C * C + 2, dtype=torch.int64, device=device)
    images = torch.zeros(1, dtype=torch.int64, device=device)
    with autotuning(args):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with data.autocast(device, args.amp):
                pred = model(x).float().argmax(1)
            counts += confusion_counts(pred, y, C)
            images += len(y)
    if args.world > 1:  # on the device: NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(images)
    counts = counts.cpu()
    if counts[-1] > 0:
        raise ValueError(f"{int(counts[-1])} test pixels have a label that is neither a class "
                         f"in 0..{C - 1} nor void (255): check the masks")
    cm = counts[:C * C].reshape(C, C)
    base = torch.zeros_like(cm)  # every pixel predicted background: column 0 holds each row
    base[:, 0] = cm.sum(1)
    scores = metrics.segmentation_scores(cm)
    scores["samples"] = int(images)  # test images counted
    scores["baseline_mean_iou"] = metrics.segmentation_scores(base)["mean_iou"]
    scores["baseline_pixel_acc"] = metrics.segmentation_scores(base)["pixel_acc"]
    return scores, cm


def print_scores(s, classes):
    print(f"pixel_acc {100 * s['pixel_acc']:.2f}%  mean_acc {100 * s['mean_acc']:.2f}%  "
          f"mean_iou {100 * s['mean_iou']:.2f}%  fw_iou {100 * s['fw_iou']:.2f}%  "
          f"(all-background baseline: mean_iou {100 * s['baseline_mean_iou']:.2f}%, "
          f"pixel_acc {100 * s['baseline_pixel_acc']:.2f}%) on {s['samples']} images")
    print(f"  {'class':<16} SA = IoU")
    for name, v in zip(classes, s["sa"]):
        print(f"  {name:<16} " + ("   -" if v is None or v != v else f"{100 * v:6.2f}%"))


def segment(model, path, out, classes, device):
    """--segment PATH (an image or a folder): per image the label map as a palette PNG of class
    indices (VOC colours, OUT/<stem>_labels.png) and drawn over the image with a legend
    (OUT/<stem>_overlay.png); the classes found with their pixels and fractions printed and in
    OUT/predictions.json/.csv. Returns the rows."""
    model.eval()

    @torch.no_grad()
    def one(p, picture):
        image = data.load_image(p, mine=True)
        x = data.segmentation_transforms(False)(image).as_subclass(torch.Tensor)[None]
        pred = model(x.to(device)).argmax(1)[0].cpu()
        png = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
        png.putpalette(data.voc_palette())
        png.save(picture[:-len("_overlay.png")] + "_labels.png")
        metrics.draw_segmentation(image, pred, classes, picture)
        counts = torch.bincount(pred.flatten(), minlength=len(classes))
        found = [{"class": classes[k], "pixels": int(n), "fraction": int(n) / pred.numel()}
                 for k, n in sorted(enumerate(counts.tolist()), key=lambda kn: -kn[1]) if n]
        print(f"{p}:")
        for f in found:
            print(f"  {f['class']:<16} {100 * f['fraction']:6.2f}% of the pixels")
        return found
    os.makedirs(out, exist_ok=True)
    rows = data.predict_images(path, one, out, "overlay")
    metrics.write_predictions(out, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line

def get_args_parser():
    p = data.ArgumentParser(description="FCN-32s/16s/8s (Shelhamer, Long, Darrell 2016) on "
                                "PASCAL VOC (SBD, seg11valid), Cityscapes or the synthetic "
                                "shapes-seg set.")
    g = data.add_data_args(p, "voc-seg", "voc-seg (SBD train -> seg11valid, see --voc-sets) | "
                           "cityscapes | shapes-seg")
    g.add_argument("--voc-sets", default=None, choices=["sbd", "voc2012"],
                   help="voc-seg's sets: sbd (default), the paper's and the release's: SBD train "
                   "(8,498 images, in DIR/SBD) -> seg11valid (736 images of VOC2011 seg val, "
                   "from DIR/VOCdevkit/VOC2012); voc2012: VOC2012 train (1,464) -> val (1,449), "
                   "the fallback without SBD, compared with no paper figure (its val holds SBD "
                   "train images: no test for a net trained on SBD)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N training and N test images (smoke runs, tests)")
    p.add_argument("--data-size", type=int, default=64,
                   help="the size shapes-seg is rendered at (default: 64; real data keeps its "
                   "own sizes)")
    p.add_argument("--arch", default="8s", choices=["32s", "16s", "8s"],
                   help="output stride: 32s, 16s (pool4 skip) or 8s (pool3 too) (default: 8s)")
    p.add_argument("--init-from", default=None,
                   help="staged training (§4.2): start from a coarser FCN checkpoint's layers, "
                   "at the reference's lr for the stage (16s 1e-12, 8s 1e-14)")
    p.add_argument("--bn", action="store_true",
                   help="batch norm after every VGG convolution (torchvision's vgg16_bn layout; "
                   "not the paper's; on with --quick, where a narrow net is trained from scratch)")
    p.add_argument("--dropout", type=float, default=0.5,
                   help="dropout after fc6 and fc7 (default: 0.5, the reference nets')")
    p.add_argument("--learn-upsampling", action="store_true",
                   help="learn the bilinear-initialised up-sampling (default: fixed)")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier (default: 1 = VGG-16)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set (default: the release's solvers' "
                   f"{ITERATIONS:,} iterations' worth, {ITERATIONS_AT_ONCE:,} for a skip net "
                   f"trained at once; {QUICK['epochs']} with --quick)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (default: 1, the paper; {QUICK['batch_size']} with "
                   "--quick)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-10 on the summed loss, the paper; with "
                   "--init-from the stage's: 1e-12 for 16s, 1e-14 for 8s)")
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SGD momentum (default: 0.99, PAMI; {QUICK['momentum']} with --quick)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam"],
                   help="sgd (the paper) or adam (default: sgd; --quick: adam)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on weights, none on biases (default: 5e-4; 0 with --quick)")
    p.add_argument("--normalize", action="store_true",
                   help="average the loss over pixels instead of summing (on with --quick)")
    p.add_argument("--segment", default=None, metavar="PATH",
                   help="an image or a folder of them, segmented with --weights: label and "
                   "overlay PNGs (OUT/<stem>_labels.png, _overlay.png) and predictions.json/.csv "
                   "in --out")
    data.add_runtime_args(p, data.quick_help(QUICK, "shapes-seg's small split"), workers=None,
                          workers_help="DataLoader processes (default: the cores per process, "
                          f"{data.machine_workers()} here; 0 for shapes-seg, cached in memory)",
                          weights_help="an fcn.py checkpoint (its architecture, width and classes "
                          "are taken too) or state_dict to load",
                          pretrained_help="start from torchvision's ImageNet VGG-16 (fc6/fc7 "
                          "convolutionized)", pretrained_is_the_model=False)
    return p


def resolve_defaults(args):
    paper = {"width": 1.0, "batch_size": 1, "lr": 1e-10, "momentum": 0.99, "optimizer": "sgd",
             "weight_decay": 5e-4}
    if args.init_from:
        paper["lr"] = STAGED_LR[args.arch]
    if args.voc_sets and args.data != "voc-seg":
        raise data.DataError(f"--voc-sets chooses voc-seg's sets; drop it with --data {args.data}")
    if args.data == "voc-seg" and args.voc_sets is None:
        args.voc_sets = "sbd"
    for k in paper:
        if getattr(args, k) is None:
            setattr(args, k, QUICK[k] if args.quick else paper[k])
    args.normalize = args.normalize or args.quick
    args.bn = args.bn or args.quick
    if args.workers is None:
        args.workers = 0 if args.data == "shapes-seg" else data.machine_workers()


def arch_name(args):
    return f"fcn{args.arch}" + ("-bn" if args.bn else "") + \
        ("" if args.width == 1.0 else f"-w{args.width:g}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = data.adopt_checkpoint(args, "fcn.py", ("arch", "bn", "width", "learn_upsampling",
                                                   "normalize"),
                                  may_differ=("data_size",))
    data.check_positive(args, "batch_size", "epochs", "lr", "width", "data_size")
    t0 = time.time()
    data.check_task(args.data, "segmentation")
    if args.segment and not args.weights:  # (--eval-only without them: data.setup says so)
        raise data.DataError("--segment needs --weights PATH (a checkpoint written by fcn.py)")
    resolve_defaults(args)
    # --pretrained loads a base network (VGG-16), not the model: --eval-only needs --weights.
    # Rank r is seeded with seed + r: dropout differs per rank, as on separate GPUs.
    device, rank, world, is_main = data.setup(args, "fcn.py", pretrained_is_the_model=False)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")
    classes = state.get("classes") if args.weights else None

    # --segment: the user's images, no data set.
    if args.segment:
        classes = classes or class_names(args.data)
        model = FCN(args.arch, len(classes), args.width, bn=args.bn).to(device)
        data.load_weights(model, state, args.weights)
        with data.no_autotune():  # the user's images: a new size each (see `autotuning`)
            return segment(model, args.segment, args.out, classes, device)

    train_set, test_set = segmentation_sets(args)  # --eval-only: train_set None
    saved = (state or {}).get("args") or {}  # --eval-only: trained as its checkpoint says
    if args.eval_only:
        args.train_set = saved.get("train_set")
    staged = bool(args.init_from or saved.get("init_from"))
    departures = DEPARTURES + ([VOC2012_DEPARTURE] if args.data == "voc-seg" and
                               args.voc_sets == "voc2012" else [])
    classes = test_set.classes if hasattr(test_set, "classes") else test_set.dataset.classes
    train_loader, n_train = None, 0
    if train_set is not None:
        train_loader = data.make_loader(train_set, args.batch_size // args.world, True,
                                        args.workers, device, pad_collate, seed=args.seed,
                                        gpu_decode=args.gpu_decode)
        n_train = len(train_set)
    # The paper evaluates whole images one by one; shapes-seg images share a size: batched.
    # Under torchrun rank r tests images r, r + W, ... (evaluate sums the confusion matrices).
    test_loader = data.make_loader(test_set, 50 if args.data == "shapes-seg" else 1, False,
                                   args.workers, device, pad_collate, gpu_decode=args.gpu_decode)
    train_loader, test_loader = data.dry_run_batches(args, train_loader, test_loader)
    if args.epochs is None:  # --eval-only: no schedule to size; the checkpoint's epochs
        args.epochs = QUICK["epochs"] if args.quick else \
            math.ceil(iterations(args) * args.batch_size / n_train) if n_train else \
            saved.get("epochs")

    model = FCN(args.arch, len(classes), args.width, args.learn_upsampling, args.bn, args.dropout)
    arch = arch_name(args)
    if args.pretrained:
        load_pretrained(model, args.width, args.bn)
    if args.init_from:
        copied = init_from(model, args.init_from)
        if is_main:
            print(f"initialised {len(copied)} tensors from {args.init_from}")
    if args.weights:
        if state.get("arch") not in (None, arch):
            raise data.DataError(f"checkpoint {args.weights} is of '{state['arch']}', not '{arch}'")
        data.load_weights(model, state, args.weights)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.optimizer == "sgd" and not args.bn:
        caffe_conv1_steps(model)  # lr 1e-10 moves conv1_1 as Caffe's 0-255 input does
    # Caffe's lr_mult 2 / decay_mult 0 on biases; the fixed up-sampling is not optimised.
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [{"params": weights, "lr": args.lr},
              {"params": biases, "lr": 2 * args.lr, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:  # --quick from scratch: a plain 16-layer net trains in minutes only with Adam
        optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)  # fixed lr (§4.3)
    scaler = data.grad_scaler(device, args.amp)
    config = {**vars(args), "arch": arch, "parameters": count_parameters(model),
              "crop_offsets": model.offsets,
              "sizes": {"train": n_train, "val": 0, "test": len(test_set)},
              "departures": departures}
    if is_main:
        trained = f"trained on {args.train_set}" if args.eval_only else \
            f"{n_train} train: {args.train_set}"
        print(f"fcn.py: {arch} on {args.data} ({trained}, {len(test_set)} test: "
              f"{args.test_set}, {len(classes)} classes), "
              f"{config['parameters']:,} trained parameters, crops {model.offsets}, device "
              f"{device}, {args.world} process(es)")
        for d in departures:
            print(f"  departure from the paper: {d}")
        if (args.train_set, args.test_set) == ("sbd-train", "voc2012-val"):
            print("  note: VOC2012 val holds images of SBD train, this net's training set")

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
                                   progress)
            scheduler.step()
            row = {"epoch": epoch + 1, "lr": progress.lr, "train_loss": loss}
            if data.eval_due(args, epoch):  # --eval-every: as the final test; curves only
                t = evaluate(model, test_loader, len(classes), args, device)[0]
                row["test_mean_iou"], row["test_pixel_acc"] = t["mean_iou"], t["pixel_acc"]
            history.append(row)
            if is_main:
                print(f"epoch {epoch + 1}/{args.epochs} train_loss {loss:.4f}" + "".join(
                    f" {k} {100 * row[k]:.2f}%" for k in ("test_mean_iou", "test_pixel_acc")
                    if k in row))
            data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler, epoch,
                                     vars(args), history, classes=list(classes))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    scores, cm = evaluate(model, test_loader, len(classes), args, device)
    if is_main:
        print_scores(scores, classes)
    keys = ("mean_iou", "pixel_acc", "mean_acc", "fw_iou", "baseline_mean_iou",
            "baseline_pixel_acc", "samples")
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "fcn.py", args.data,
        {**{k: scores[k] for k in keys}, "sa": dict(zip(classes, scores["sa"]))},
        paper=paper_figures(args, staged), config=config,
        device=str(device), seconds=time.time() - t0,
        history=history, confusion=cm) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "fcn.py")
