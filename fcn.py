"""FCN: E. Shelhamer, J. Long, T. Darrell, "Fully Convolutional Networks for Semantic
Segmentation", IEEE PAMI 2016, arXiv:1605.06211 (J. Long, E. Shelhamer, T. Darrell, CVPR 2015,
arXiv:1411.4038).

    python fcn.py --data voc-seg --pretrained --cuda              # FCN-8s from VGG-16, at once
    python fcn.py --data voc-seg --arch 32s --pretrained --out runs/fcn32s        # staged: 32s,
    python fcn.py --data voc-seg --arch 16s --init-from runs/fcn32s/checkpoint.pt \\
        --out runs/fcn16s                                           # then 16s at lr 1e-12,
    python fcn.py --data voc-seg --arch 8s --init-from runs/fcn16s/checkpoint.pt \\
        --out runs/fcn8s                                            # then 8s at lr 1e-14
    python fcn.py --data cityscapes --pretrained                  # 19 classes, same code
    python fcn.py --data shapes-seg --quick                       # offline, 1-3 min on a CPU
    python fcn.py --segment image.jpg --weights runs/fcn8s/checkpoint.pt --out seg/
    torchrun --nproc_per_node=2 fcn.py --data voc-seg --pretrained --batch-size 2

Paper: FCN-8s 62.2 % mean IU on VOC2012 test (CVPR), 67.2 % with the PAMI "heavy" training;
FCN-VGG16 has 134M parameters (CVPR Table 1). Ours: see the README's results table.

Model (§3-4): VGG-16 in torchvision's layout (its state_dict loads as is) with conv1_1 padded
by 100 and ceil-mode pooling as in the reference Caffe nets; fc6/fc7 convolutionized (7x7 conv
4096, 1x1 conv 4096, weights reshaped from the classifier's Linear layers); score_fr, a 1x1 conv
to the classes, zero-initialised (§4.3); up-sampling by ConvTranspose2d initialised to bilinear
interpolation and fixed (the reference nets' lr_mult 0; --learn-upsampling learns them).
Skips (§4.2): FCN-16s adds a zero-initialised 1x1 score on pool4 to the 2x up-sampled score_fr,
then up-samples by 16; FCN-8s adds pool3 likewise and up-samples by 8. Crops align every map
with the input; their offsets (19 for 32s; 5 and 27 for 16s; 5, 9 and 31 for 8s, as in the
reference prototxts) are computed here from the layer geometry (`coord_map`), not typed in.
Training (§4.3, PAMI "heavy"): whole images, batch 1, per-pixel cross-entropy summed over the
pixels (void = 255 ignored), SGD momentum 0.99, fixed lr 1e-10, weight decay 5e-4, biases 2x
lr and no decay. Evaluation: whole images, pixel acc., mean acc., mean IU, fw IU (§5), and the
lecture's segmentation accuracy (SA = IoU) per class. Departures: DEPARTURES, printed at start.
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

import data
import metrics

# ---------------------------------------------------------------------------------------------
# Paper facts and defaults

PAPER = {"reference": "Shelhamer, Long, Darrell, PAMI 2016 (arXiv:1605.06211); Long et al., "
                      "CVPR 2015", "data": "voc-seg",
         # CVPR Table 2, a subset of VOC2011 val: FCN-32s / 16s / 8s
         "mean_iou_fcn32s_voc2011_val": 0.594, "mean_iou_fcn16s_voc2011_val": 0.624,
         "mean_iou_fcn8s_voc2011_val": 0.627,
         "mean_iou_voc2012_test_fcn8s_cvpr": 0.622, "mean_iou_voc2012_test_fcn8s_pami": 0.672,
         "parameters": 134e6}
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
FC = 4096                      # fc6 / fc7 width
PAD = 100                      # conv1_1 padding of the reference nets: fc6's 7x7 fits any input
ITERATIONS = 100_000           # the reference solve.py: 25 x 4,000 steps of batch 1
CAFFE_OFFSETS = {"32s": {"score": 19}, "16s": {"score_pool4": 5, "score": 27},
                 "8s": {"score_pool4": 5, "score_pool3": 9, "score": 31}}
# §4.2's staged training divides the lr by 100 at each stage: the reference solvers' 1e-10,
# 1e-12 and 1e-14 for FCN-32s, -16s and -8s (the default with --init-from; 1e-10 otherwise).
STAGED_LR = {"32s": 1e-10, "16s": 1e-12, "8s": 1e-14}
# Caffe's VGG-16 sees 0-255 pixels minus the mean, torchvision's (x / 255 - mean) / std: the
# same function when conv1_1's weights are 255 std larger here, per input channel, but then SGD
# moves conv1_1 (255 std)^2 ~ 3,300x less on the same loss. Its gradient is scaled by that
# factor in the paper's SGD recipe, so lr 1e-10 takes the reference's steps on every layer
# (tests/test_fcn.py checks the two nets step for step).
CAFFE_CONV1_GRAD_SCALE = tuple((255 * s) ** 2 for s in data.IMAGENET_STD)
QUICK = {"width": 0.125, "epochs": 4, "batch_size": 16, "lr": 1e-3, "momentum": 0.9,
         "optimizer": "adam", "weight_decay": 0.0}


# What this script does otherwise than the paper (printed at start, stored in results.json)
DEPARTURES = [
    "default --arch 8s trains FCN-8s from VGG-16 at once with unscaled skips; the paper's staged "
    "32s -> 16s -> 8s training is --init-from (the reference at-once net scales pool4/pool3 by "
    "0.01/0.0001, not done here)",
    "VOC2012 train (1,464 images) -> val: the paper trains on SBD's 8,498 (+ VOC) and reports "
    "on a VOC2011 val subset; epochs default to the reference's 100,000 iterations",
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
    --eval-only: train is None (its images and masks are not read: nothing is taken from them)."""
    kw = dict(data_dir=args.data_dir, download=not args.no_download, quick=args.quick,
              transforms=data.segmentation_transforms(False))
    if args.data == "shapes-seg":
        kw["size"] = args.data_size
    train = None if args.eval_only else data.segmentation_dataset(args.data, "train", **kw)
    test = data.segmentation_dataset(args.data, "test", **kw)
    if args.limit:
        train, test = (None if d is None else torch.utils.data.Subset(
            d, range(min(args.limit, len(d)))) for d in (train, test))
    if (train is not None and len(train) == 0) or len(test) == 0:
        raise data.DataError(f"'{args.data}' has an empty train or test split; check --data-dir")
    return train, test


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
                                "VOC2012, Cityscapes or the synthetic shapes-seg set.")
    data.add_data_args(p, "voc-seg", "voc-seg (VOC2012 train -> val) | cityscapes | shapes-seg")
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
                   help=f"passes over the training set (default: {ITERATIONS:,} iterations' worth, "
                   f"the reference solver's; {QUICK['epochs']} with --quick)")
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
            math.ceil(ITERATIONS * args.batch_size / n_train) if n_train else \
            ((state or {}).get("args") or {}).get("epochs")

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
              "departures": DEPARTURES}
    if is_main:
        print(f"fcn.py: {arch} on {args.data} ({n_train} train / {len(test_set)} test, "
              f"{len(classes)} classes), {config['parameters']:,} trained parameters, crops "
              f"{model.offsets}, device {device}, {args.world} process(es)")
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
        paper={**PAPER, "mean_iou": PAPER[f"mean_iou_fcn{args.arch}_voc2011_val"]}, config=config,
        device=str(device), seconds=time.time() - t0,
        history=history, confusion=cm) if is_main else None
    return results


if __name__ == "__main__":
    data.run_main(main, "fcn.py")
