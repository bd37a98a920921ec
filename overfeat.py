"""OverFeat: P. Sermanet, D. Eigen, X. Zhang, M. Mathieu, R. Fergus, Y. LeCun, "OverFeat:
Integrated recognition, localization and detection using convolutional networks", ICLR 2014,
arXiv:1312.6229.

    python overfeat.py --data imagenet                          # fast net, §3.1 recipe, §3.3 test
    python overfeat.py --data imagenet --variant accurate       # Table 3's accurate model
    python overfeat.py --data imagenet --variant alexnet --pretrained --eval-only  # torchvision's
    python overfeat.py --data shapes --quick                    # offline classification, CPU
    python overfeat.py --data shapes-det --quick                # offline localisation (§4), CPU
    torchrun --nproc_per_node=2 overfeat.py --data imagenet     # data-parallel, same global batch

Paper (ILSVRC-2012 val, Table 2): top-1 / top-5 error 38.12 / 16.27 % for one fast model at 6
scales, 35.74 / 14.18 % for one accurate model at 6 scales (dense evaluation, fine stride);
ILSVRC-2013 localisation error 29.9 % (§4.6); detection 24.3 % mAP (post-competition, §5).
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
at 6 scales; the last max-pooling is done at every offset (dx, dy) in {0..k-1}^2 (`offset_max_pool`,
9 offsets for 3x3/3), the classifier slides over each pooled map, the class maps are max-pooled
over space and averaged over scales and mirrors (`dense_evaluate`).
Localisation (§4): features frozen, a regression head (2 hidden layers, 4 outputs: the box edges
relative to each location) trained with an l2 loss at several scales; the boxes of all locations
and scales are merged greedily (§4.3, `greedy_merge`). Departures: DEPARTURES, printed at start.
"""
import argparse
import copy
import os
import sys
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
         "test_error": 0.3574, "top5_error": 0.1418,             # Table 2: accurate, 6 scales
         "fast_test_error": 0.3812, "fast_top5_error": 0.1627,   # Table 2: fast, 6 scales
         "localisation_error": 0.299, "detection_map": 0.243,
         "parameters_fast": 145e6, "parameters_accurate": 144e6}
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
EPOCHS = 90               # not stated in the paper: after the last lr step (80) + 10
LR_STEPS = (30, 50, 60, 70, 80)           # §3.1: lr x 0.5 after each


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
    localisation head, a convolution over the same window (class-agnostic: 4 outputs)."""

    def __init__(self, variant="fast", num_classes=1000, in_channels=3, width=1.0,
                 input_size=None, dropout=0.5, regressor=False):
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
            self.avgpool = nn.AdaptiveAvgPool2d((h, w))  # torchvision's (6, 6) at 224
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
            nn.Conv2d(r1, r2, 1), nn.ReLU(inplace=True), nn.Conv2d(r2, 4, 1))

    def layers(self):
        """The classification net as one flat nn.Sequential (for `convolutionize`)."""
        return nn.Sequential(*self.features, self.avgpool, nn.Flatten(), *self.classifier)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def overfeat(variant="fast", num_classes=1000, in_channels=3, width=1.0, input_size=None,
             regressor=False):
    """The model factory: 'fast' (Table 1), 'accurate' (Table 3) or 'alexnet' (torchvision's);
    with `regressor`, §4's localisation head (absent otherwise: torchvision's state_dict)."""
    if variant not in INPUT:
        raise ValueError(f"unknown variant '{variant}'; use fast, accurate or alexnet")
    return OverFeat(variant, num_classes, in_channels, width, input_size, regressor=regressor)


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


def convolutionize(layers, input_size, in_channels=None):
    """§3.3: the same net, applicable to any larger image. Traces the map size of `input_size`
    (H, W) through an nn.Sequential of Conv2d / MaxPool2d / AvgPool2d / ReLU / Dropout / Flatten /
    Linear; the first Linear after a C x h x w map becomes an h x w convolution (its (out, C*h*w)
    weight viewed as (out, C, h, w): flatten is channel-major), later Linears 1x1 convolutions;
    Flatten is dropped. AdaptiveAvgPool2d is dropped where it is the identity (the traced map
    already has its size), and folded into the next Linear when it replicates a 1x1 map.
    Weights are copied. On input_size the result gives the logits as a (N, K, 1, 1) map."""
    if in_channels is None:
        in_channels = next(m.in_channels for m in layers if isinstance(m, nn.Conv2d))
    c, (h, w) = in_channels, tuple(input_size)
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
            return self.head(F.max_pool2d(f, self.kernel, self.stride))
        kh, kw = _window(self.head)
        return [self.head(p) for p in offset_max_pool(f, self.kernel, self.stride).values()
                if p.shape[-2] >= kh and p.shape[-1] >= kw]


def _window(head):
    """The (h, w) kernel of the head's first convolution (the former fc6)."""
    k = next(m for m in head if isinstance(m, nn.Conv2d)).kernel_size
    return k


@torch.no_grad()
def dense_evaluate(dense, images, scales, flip=True, offsets=True):
    """§3.3: for each scale (smallest side, bilinear antialiased resize) and mirror, the per-offset
    class maps; softmax over classes at each location, the maximum over locations (and offsets)
    per class; the (N, K) mean over scales and mirrors."""
    if isinstance(images, (list, tuple)):  # whole ImageNet images of different sizes
        return torch.cat([dense_evaluate(dense, im[None], scales, flip, offsets) for im in images])
    outs = []
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
    try:
        state = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:
        raise data.DataError(f"could not download torchvision's AlexNet weights "
                             f"({type(e).__name__}); put alexnet-owt-7be5be79.pth in "
                             f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} or use --weights")
    own = model.state_dict()
    if model.classifier[6].out_features != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
    state.update({k: v for k, v in own.items() if k not in state})  # the regressor, fc8
    model.load_state_dict(state)


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


def match_score(a, b, size):
    """§4.3's match_score: the distance between the centres (in units of the image size) plus
    (1 - IoU) (the paper's 'intersection area' term, made scale-free; see DEPARTURES)."""
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    iou = torchvision.ops.box_iou(a[None], b[None])[0, 0]
    return float(torch.dist(ca, cb) / size + 1 - iou)


def greedy_merge(boxes, scores, threshold, size):
    """§4.3: repeatedly merge the pair of boxes with the smallest match score (the mean of their
    coordinates, the sum of their confidences) until the smallest score exceeds `threshold`.
    Returns (boxes (M, 4), scores (M,)) sorted by decreasing confidence."""
    boxes, scores = [b for b in boxes.float()], [float(s) for s in scores]
    while len(boxes) > 1:
        best, pair = None, None
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                s = match_score(boxes[i], boxes[j], size)
                if best is None or s < best:
                    best, pair = s, (i, j)
        if best > threshold:
            break
        i, j = pair
        merged, conf = (boxes[i] + boxes[j]) / 2, scores[i] + scores[j]
        boxes = [b for k, b in enumerate(boxes) if k not in pair] + [merged]
        scores = [s for k, s in enumerate(scores) if k not in pair] + [conf]
    order = sorted(range(len(boxes)), key=lambda k: -scores[k])
    return torch.stack([boxes[k] for k in order]), torch.tensor([scores[k] for k in order])


@torch.no_grad()
def localise(model, dense, x, scales, threshold):
    """§4: per image, the class of the averaged dense classification, then for every scale and
    location the regressed box (in the original pixels) with the probability of that class as
    confidence, greedily merged. Returns a list of (boxes, scores, label) per image."""
    model.eval()
    n, size = x.shape[0], x.shape[-1]
    probs = dense_evaluate(dense, x, scales, flip=True)
    labels = probs.argmax(1)
    per_image = [([], []) for _ in range(n)]
    for s in scales:
        xs = v2.functional.resize(x, [s], antialias=True)
        f = dense.body(xs)
        f = F.max_pool2d(f, dense.kernel, dense.stride)
        p = dense.head(f).float().softmax(1)                      # (N, K, h, w)
        t = model.regressor(f).float()                            # (N, 4, h, w)
        h, w = t.shape[-2:]
        c = location_centres(h, w, dense.total_stride, model.input_size, x.device).float()
        b = (t.flatten(2).permute(0, 2, 1) * model.input_size + c.repeat(1, 2)) * (size / s)
        b = b.clamp(0, size)
        conf = p.flatten(2).gather(1, labels[:, None, None].expand(-1, 1, h * w))[:, 0]
        for i in range(n):
            per_image[i][0].append(b[i]), per_image[i][1].append(conf[i])
    out = []
    for i in range(n):
        boxes, scores = greedy_merge(torch.cat(per_image[i][0]), torch.cat(per_image[i][1]),
                                     threshold, size)
        out.append((boxes, scores, int(labels[i])))
    return out


# ---------------------------------------------------------------------------------------------
# Recipe and data glue

def lr_factor(epoch, steps=LR_STEPS):
    """§3.1: lr x 0.5 after each step epoch (a fixed schedule: resume is exact)."""
    return 0.5 ** sum(epoch >= s for s in steps)


def autocast(device, enabled):
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def jitter_batch(x, crop, scale_max):
    """§3.1 on in-memory device batches: the batch resized to S ~ U{crop..scale_max} (one S per
    batch), a random crop x crop window per image and a random mirror."""
    n = x.shape[0]
    s = int(torch.randint(crop, scale_max + 1, ()).item())
    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    oy = torch.randint(0, s - crop + 1, (n,)).tolist()
    ox = torch.randint(0, s - crop + 1, (n,)).tolist()
    x = torch.stack([x[k, :, oy[k]:oy[k] + crop, ox[k]:ox[k] + crop] for k in range(n)])
    mirror = (torch.rand(n) < 0.5).to(x.device)
    return torch.where(mirror[:, None, None, None], x.flip(3), x).contiguous()


def centre_crop(x, crop, scale):
    """The single-crop test: resized so the smallest side is `scale`, the centre crop x crop."""
    x = v2.functional.resize(x, [scale], antialias=True)
    return v2.functional.center_crop(x, [crop, crop])


def list_collate(batch):
    return [im for im, _ in batch], torch.tensor([y for _, y in batch])


def detection_arrays(split, args):
    """shapes-det in memory: images uint8 (N, 3, S, S), the largest shape's box (N, 4) and class
    (N,) (the localisation target, as ILSVRC's one object per image), and all ground truths."""
    ds = data.detection_dataset(args.data, split, args.data_dir, not args.no_download,
                                quick=args.quick, seed=0)
    rows = [ds[i] for i in range(len(ds))]
    x = torch.stack([im.as_subclass(torch.Tensor) for im, _ in rows])
    gts = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"]}
           for _, t in rows]
    return x, torch.stack([g["boxes"][0] for g in gts]), \
        torch.stack([g["labels"][0] for g in gts]), gts, tuple(ds.classes)


# ---------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model, batches, optimizer, scaler, args, device, epoch, progress, phase):
    """phase 'classify': cross-entropy of the whole net. phase 'regress' (§4.2): the features
    and classifier frozen, the l2 loss of the regressor at every location, at two scales."""
    model.train()
    total, n = 0.0, 0
    for x, y, boxes in batches:
        with autocast(device, args.amp):
            if phase == "classify":
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), y)
            else:
                loss = 0.0
                for s in (args.img_size, args.img_size + args.img_size // 2):
                    xs = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
                    with torch.no_grad():  # §4.2: the feature extractor stays fixed
                        f = model.features(xs)
                    t = model.regressor(f).float()
                    stride = total_stride(model)
                    want = regression_targets(boxes * (s / x.shape[-1]), *t.shape[-2:], stride,
                                              args.img_size)
                    loss = loss + F.mse_loss(t, want) / 2
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, n = total + loss.item() * len(y), n + len(y)
        progress.step(len(y) * args.world, loss.item(), optimizer.param_groups[0]["lr"], epoch)
    return total / max(n, 1)


def total_stride(model):
    """The product of the strides of the feature layers (32 fast / alexnet, 36 accurate)."""
    s = 1
    for m in model.features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            s *= m.stride[0] if isinstance(m.stride, tuple) else m.stride
    return s


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Single centre crop (single_crop_error) and §3.3's dense evaluation (dense_error, the
    test_error), both from the same network."""
    model.eval()
    dense = DenseNet(model).eval()
    single, multi, targets = [], [], []
    for x, y in loader:
        x = [im.to(device) for im in x] if isinstance(x, list) else x.to(device)
        with autocast(device, args.amp):
            if isinstance(x, list):
                crops = torch.stack([centre_crop(im, args.img_size, args.crop_scale) for im in x])
            else:
                crops = centre_crop(x, args.img_size, args.crop_scale)
            single.append(model(crops).float().softmax(1).cpu())
            multi.append(dense_evaluate(dense, x, args.scales, flip=True).cpu())
        targets.append(y.cpu())
    y, p1, pd = torch.cat(targets), torch.cat(single), torch.cat(multi)
    r = {"test_error": metrics.error_rate(pd, y), "test_accuracy": metrics.accuracy(pd, y),
         "dense_error": metrics.error_rate(pd, y), "single_crop_error": metrics.error_rate(p1, y),
         "balanced_error": metrics.balanced_error_rate(pd, y, pd.shape[1])}
    if pd.shape[1] >= 100:
        r["top5_error"] = metrics.topk_error(pd, y, 5)
        r["single_crop_top5_error"] = metrics.topk_error(p1, y, 5)
    return r


@torch.no_grad()
def evaluate_localisation(model, x, box0, label0, gts, args, mean_box):
    """§4 on shapes-det: the top merged box of each image against the largest shape (iou50_rate:
    IoU >= 0.5, class-agnostic; loc_error: ILSVRC's, wrong class or IoU < 0.5), and the VOC07
    mAP of all merged boxes over all shapes. Baselines: the whole image, the mean training box."""
    dense = DenseNet(model).eval()
    dets, ious, correct, probs = [], [], [], []
    for i in range(0, len(x), 100):
        for boxes, scores, label in localise(model, dense, x[i:i + 100], args.scales,
                                             args.merge_threshold):
            dets.append({"boxes": boxes, "scores": scores,
                         "labels": torch.full((len(boxes),), label)})
    for d, b, lab in zip(dets, box0, label0.tolist()):
        iou = float(torchvision.ops.box_iou(d["boxes"][:1].cpu(), b[None].cpu())[0, 0])
        ious.append(iou)
        correct.append(iou >= 0.5 and int(d["labels"][0]) == lab)
    ious = torch.tensor(ious)
    size = x.shape[-1]
    whole = torchvision.ops.box_iou(torch.tensor([[0.0, 0.0, size, size]]), box0.cpu())[0]
    mean = torchvision.ops.box_iou(mean_box[None].cpu(), box0.cpu())[0]
    dm = metrics.detection_map([{k: v.cpu() for k, v in d.items()} for d in dets], gts,
                               len(data.SHAPES_CLASSES))
    return {"iou50_rate": float((ious >= 0.5).float().mean()), "mean_iou": float(ious.mean()),
            "loc_error": 1 - sum(correct) / len(correct), "map": dm["map"],
            "baseline_whole_image_iou50": float((whole >= 0.5).float().mean()),
            "baseline_mean_box_iou50": float((mean >= 0.5).float().mean())}


def device_batches(x, y, boxes, batch_size, seed, epoch, mean, std, img_size, flip=True):
    """The in-memory shapes-det training set: seeded shuffles, the whole image resized to the
    training size, mirrors with their boxes (§4.2 trains on whole-window views of the object)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    idx = torch.randperm(len(y), generator=g)
    for b in range(len(y) // batch_size):
        j = idx[b * batch_size:(b + 1) * batch_size].to(x.device)
        xb = ((x[j].float() / 255) - mean) / std
        xb = F.interpolate(xb, size=(img_size, img_size), mode="bilinear", antialias=True)
        bb = boxes[j] * (img_size / x.shape[-1])
        if flip:
            m = (torch.rand(len(j), generator=g) < 0.5).to(x.device)
            xb = torch.where(m[:, None, None, None], xb.flip(3), xb)
            fb = torch.stack([img_size - bb[:, 2], bb[:, 1], img_size - bb[:, 0], bb[:, 3]], 1)
            bb = torch.where(m[:, None], fb, bb)
        yield xb, y[j], bb


# ---------------------------------------------------------------------------------------------
# Command line

def arch_name(args):
    return f"overfeat-{args.variant}" + ("" if args.width == 1.0 else f"-w{args.width:g}") + \
        ("" if args.img_size == INPUT[args.variant] else f"-{args.img_size}")


def get_args_parser():
    p = argparse.ArgumentParser(description="OverFeat (Sermanet et al. 2013): classification with "
                                "dense multi-scale evaluation, and localisation by box regression "
                                "with greedy merging, on ImageNet, CIFAR, MNIST or the shapes "
                                "sets.")
    p.add_argument("--data", default="imagenet", help="imagenet | cifar10 | cifar100 | mnist | "
                   "fashion-mnist | shapes (classification) | shapes-det (localisation)")
    p.add_argument("--data-dir", default=data.default_data_dir(),
                   help="data root (default: $PYTORCH_DATA_DIR or ./data)")
    p.add_argument("--no-download", action="store_true", help="never download a data set")
    p.add_argument("--variant", default="fast", choices=["fast", "accurate", "alexnet"],
                   help="Table 1's fast or Table 3's accurate net, or torchvision's AlexNet")
    p.add_argument("--width", type=float, default=None,
                   help="channel and FC-size multiplier (default: 1 = the paper; 0.125 with "
                   "--quick)")
    p.add_argument("--img-size", type=int, default=None,
                   help="training crop / fc window input (default: 231 fast, 221 accurate, 224 "
                   "alexnet; small sets: 103, 113, 63, upsampled on the device)")
    p.add_argument("--scales", type=int, nargs="+", default=None,
                   help="dense-evaluation scales, smallest side (default: Table 5's 245 281 317 "
                   "389 425 461; small sets: img-size x 1, 1.25, 1.5)")
    p.add_argument("--init", default=None, choices=["paper", "kaiming"],
                   help="N(0, 1e-2) (§3.1) or He init (default: paper on ImageNet, else kaiming)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"classification epochs (default: {EPOCHS}; 8 with --quick)")
    p.add_argument("--loc-epochs", type=int, default=None,
                   help="regression epochs after them on shapes-det (default: 10; 6 with --quick)")
    p.add_argument("--merge-threshold", type=float, default=0.5,
                   help="§4.3: stop merging when the best match score exceeds this (default 0.5)")
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(LR_STEPS),
                   help="epochs after which the lr is halved (default: 30 50 60 70 80)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (default: 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default: 5e-2, §3.1; 1e-2 on the small sets)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default: 0.6, §3.1; 0.9 on the small sets)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="(default: 1e-5, §3.1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: best available)")
    p.add_argument("--cuda", action="store_true", help="run on the GPU; an error if there is none")
    p.add_argument("--workers", type=int, default=4, help="loader processes (ImageNet only)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default="runs/overfeat", help="results.json and checkpoints go here")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights on the test set")
    p.add_argument("--weights", default=None, help="a checkpoint or state_dict to start from")
    p.add_argument("--pretrained", action="store_true",
                   help="torchvision's AlexNet ImageNet weights (needs --variant alexnet)")
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--quick", action="store_true",
                   help="a tiny subset, 8 epochs, width 0.125: a smoke run on a CPU")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs as if killed, without testing (to test "
                   "--resume)")
    return p


def resolve_defaults(args):
    imagenet = args.data == "imagenet"
    args.width = args.width or (0.125 if args.quick else 1.0)
    if args.epochs is None:
        args.epochs = 8 if args.quick else EPOCHS
    args.loc_epochs = args.loc_epochs if args.loc_epochs is not None else (6 if args.quick else 10)
    args.img_size = args.img_size or (INPUT if imagenet else SMALL_INPUT)[args.variant]
    args.init = args.init or ("paper" if imagenet else "kaiming")
    # §3.1's lr 5e-2 diverges with He init on the small sets; momentum 0.6 barely moves them
    args.lr = args.lr if args.lr is not None else (5e-2 if imagenet else 1e-2)
    args.momentum = args.momentum if args.momentum is not None else (0.6 if imagenet else 0.9)
    if imagenet:
        args.scales = args.scales or list(SCALES)
        args.crop_scale = 256
    else:
        args.scales = args.scales or [args.img_size, round(1.25 * args.img_size),
                                      round(1.5 * args.img_size)]
        args.crop_scale = round(args.img_size * 256 / INPUT[args.variant])
    if min(args.scales) < args.img_size:
        raise data.DataError(f"--scales must be >= --img-size {args.img_size} (the fc window "
                             f"needs a whole training window), got {min(args.scales)}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    t0 = time.time()
    task = data.task_of(args.data)
    if task == "segmentation" or (task == "detection" and args.data != "shapes-det"):
        raise data.DataError(f"'{args.data}' is a {task} data set; overfeat.py needs "
                             f"classification data or shapes-det (localisation)")
    localisation = task == "detection"
    resolve_defaults(args)
    device = data.select_device(args.device, args.cuda)
    rank, args.world = data.init_distributed(device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)
    if args.batch_size % args.world:
        raise data.DataError(f"--batch-size {args.batch_size} is not divisible by the "
                             f"{args.world} processes")

    # Data. ImageNet: §3.1's 256 resize, random crops and mirrors; whole normalised images for
    # the dense test. In-memory sets: on the device, jittered by jitter_batch. shapes-det: the
    # whole 64x64 images and the largest shape's box.
    if localisation:
        x_tr, box_tr, y_tr, _, classes = detection_arrays("train", args)
        x_te, box_te, y_te, gts_te, _ = detection_arrays("test", args)
        mean, std = data.channel_stats(x_tr)
        mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        x_tr, box_tr, y_tr = x_tr.to(device), box_tr.to(device), y_tr.to(device)
        info = {"in_channels": 3, "mean": mean, "std": std,
                "sizes": (len(y_tr), 0, len(y_te))}
        steps = len(y_tr) // (args.batch_size // args.world)
    elif args.data == "imagenet":
        bs = args.batch_size // args.world
        norm = [v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
        train_set = data.classification_dataset(
            "imagenet", "train", args.data_dir, quick=args.quick,
            transform=v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True),
                                  v2.RandomCrop(args.img_size), v2.RandomHorizontalFlip(), *norm]))
        test_set = data.classification_dataset("imagenet", "test", args.data_dir, quick=args.quick,
                                               transform=v2.Compose([v2.ToImage(), *norm]))
        train_loader = data.make_loader(train_set, bs, True, args.workers, device, seed=args.seed)
        test_loader = data.make_loader(test_set, 16, False, args.workers, device,
                                       collate_fn=list_collate, shard=False)
        classes = getattr(train_set, "names", None) or train_set.dataset.names
        info = {"in_channels": 3, "mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD,
                "sizes": (len(train_set), 0, len(test_set))}
        steps = len(train_loader)
    else:
        train_loader, _, test_loader, info = data.classification_loaders(
            args.data, args.batch_size // args.world, device, args.data_dir, not args.no_download,
            args.quick, args.seed, augment=False, eval_batch_size=250)
        classes, steps = info["classes"], len(train_loader)
    n_train, n_val, n_test = info["sizes"]

    model = overfeat(args.variant, len(classes), info["in_channels"], args.width, args.img_size,
                     regressor=localisation)
    init_weights(model, args.init)
    model.to(device)
    arch = arch_name(args)
    if args.pretrained:
        load_pretrained(model, args.width)
    if args.weights:
        data.load_weights(model, data.load_checkpoint(args.weights, arch), args.weights)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # §3.1: momentum 0.6, l2 weight decay 1e-5. One optimizer for both phases: the parameters
    # without a gradient in a phase (set_to_none) are skipped by SGD, so they stay frozen.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda e: lr_factor(e, args.lr_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    config = {**vars(args), "arch": arch, "parameters": count_parameters(model),
              "normalisation": {"mean": info["mean"], "std": info["std"]},
              "departures": DEPARTURES}
    if is_main:
        print(f"overfeat.py: {arch} on {args.data} ({n_train} train / {n_val} val / {n_test} "
              f"test) at {args.img_size}, dense scales {args.scales}, "
              f"{config['parameters']:,} parameters, device {device}, {args.world} process(es)")
        for d in DEPARTURES:
            print(f"  departure from the paper: {d}")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = data.resume_training_state(ckpt_path, arch, model, optimizer,
                                                          scheduler, scaler)
        if is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    net = model
    if args.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        net = torch.compile(net)

    total_epochs = args.epochs + (args.loc_epochs if localisation else 0)
    if not args.eval_only:
        progress = metrics.Progress(steps, total_epochs, args.log_every,
                                    start_epoch=start_epoch, enabled=is_main)
        for epoch in range(start_epoch, total_epochs):
            phase = "classify" if epoch < args.epochs else "regress"
            if localisation:
                batches = device_batches(x_tr, y_tr, box_tr, args.batch_size, args.seed, epoch,
                                         mean_t, std_t, args.img_size)
                loss = train_one_epoch(model, batches, optimizer, scaler, args, device, epoch,
                                       progress, phase)
            else:
                data.set_epoch(train_loader, epoch)
                batches = ((jitter_batch(x.to(device), args.img_size, args.crop_scale)
                            if args.data != "imagenet" else x.to(device), y.to(device), None)
                           for x, y in train_loader)
                loss = train_one_epoch(net, batches, optimizer, scaler, args, device, epoch,
                                       progress, phase)
            scheduler.step()
            history.append({"epoch": epoch + 1, "phase": phase, "train_loss": loss,
                            "lr": optimizer.param_groups[0]["lr"]})
            if is_main:
                print(f"epoch {epoch + 1}/{total_epochs} ({phase}) train_loss {loss:.4f}")
                data.save_training_state(ckpt_path, arch, model, optimizer, scheduler, scaler,
                                         epoch, vars(args), history, classes=list(classes))
            if args.stop_after is not None and epoch + 1 >= args.stop_after:
                return None

    if localisation:
        model.eval()
        xt = ((x_te.to(device).float() / 255) - mean_t) / std_t
        loader = [(xt[i:i + 250], y_te[i:i + 250]) for i in range(0, len(y_te), 250)]
        test = evaluate(model, loader, args, device)
        test.update(evaluate_localisation(model, xt, box_te.to(device), y_te, gts_te, args,
                                          box_tr.float().mean(0)))
        keys = ["test_error", "test_accuracy", "single_crop_error", "dense_error", "map",
                "iou50_rate", "mean_iou", "loc_error", "baseline_whole_image_iou50",
                "baseline_mean_box_iou50"]
    else:
        test = evaluate(model, test_loader, args, device)
        keys = ["test_error", "test_accuracy", "balanced_error", "single_crop_error",
                "dense_error", "top5_error", "single_crop_top5_error"]
    if is_main:
        print(" ".join(f"{k} {100 * test[k]:.2f}%" for k in keys if k in test))
    results = metrics.write_results(
        os.path.join(args.out, "results.json"), "overfeat.py", args.data,
        {k: test[k] for k in keys if k in test}, paper=PAPER, config=config, device=str(device),
        seconds=time.time() - t0, history=history) if is_main else None
    if args.world > 1:
        torch.distributed.destroy_process_group()
    return results


DEPARTURES = [
    "lr x 0.5 after epochs 30, 50, 60, 70, 80 as §3.1, but the total (90) is our choice: the "
    "paper does not state it",
    "small sets (shapes, CIFAR, MNIST): images upsampled on the device to 103 (fast) / 113 "
    "(accurate) / 63 (alexnet) pixels, the smallest inputs that keep every layer; one jitter "
    "scale per batch; He init (--init kaiming): N(0, 1e-2) stays at chance on 2,000 images; "
    "lr 1e-2 and momentum 0.9 (§3.1's 5e-2 diverges with He init, 0.6 barely moves); the "
    "quick nets leave chance only after ~10 epochs (quick default: 8)",
    "dense test: softmax at each location, max over locations and offsets, mean over scales and "
    "mirrors; the paper does not say whether the max is over scores or probabilities; rescaling "
    "is bilinear with antialiasing, scales are the smallest side (the paper's Table 5 gives both "
    "sides)",
    "localisation: the regressor is a convolution over the fc window on the (non-offset) pooled "
    "maps, trained at 2 scales (img-size and 1.5 x) on every location of the whole training "
    "image (the paper drops locations whose window overlaps the box by < 50 % and trains at 6 "
    "scales); class-agnostic only",
    "§4.3 match score: centre distance / image size + (1 - IoU) (the paper: 'the sum of the "
    "distance between centers and the intersection area', units unspecified); merged box = mean "
    "of the two, confidence = the sum; top classes k = 1",
    "--variant alexnet (torchvision's layout) is not in the paper: it is the only published "
    "ImageNet weight set (--pretrained); OverFeat's own Lua weights are not loaded",
    "detection (§5, with a background class) is not implemented",
]

if __name__ == "__main__":
    try:
        main()
    except (data.DataError, ValueError) as e:
        sys.exit(f"overfeat.py: error: {str(e).strip().splitlines()[-1]}")
