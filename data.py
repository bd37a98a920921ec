"""Data sets, transforms and loaders shared by every script of this repository.

One call per data set of the lecture (EE-559 §7, "Tasks and data-sets"):

    classification  mnist, fashion-mnist, cifar10, cifar100, imagenet, shapes
    detection       voc (VOC2007+2012 trainval -> VOC2007 test), shapes-det
    segmentation    voc-seg (VOC2012 train -> val), cityscapes (fine, 19 classes), shapes-seg

Where things live: `--data-dir`, default `$PYTORCH_DATA_DIR`, else `./data` (the lecture's
convention). What downloads and what must be fetched by hand is in the README ("Data
preparation"); every failure to find or read data raises `DataError` with one line that names the
file or value and says what to do. Nothing falls back silently to other data.

Splits: "train", "val" (held out from the training set, seeded: 1/12 of MNIST, 1/10 of CIFAR,
for model selection), "trainval" (the whole training set, for the final run) and "test" (only for
the final report). VOC, ImageNet and Cityscapes have official splits: "train" and "test" there.

`shapes`, `shapes-det`, `shapes-seg` are one synthetic generator, deterministic from
(seed, split, index), offline and learnable: what tests, CI and `--quick` runs use.

Run `python data.py --data NAME` to check that a data set is in place and to write a preview.
This module imports only torch, torchvision, numpy and the standard library, and no sibling file.
"""
import argparse
import collections
import contextlib
import functools
import inspect
import gzip
import io
import itertools
import math
import os
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import PIL
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, ConcatDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

import metrics  # measures, records and pictures: data.py's runtime writes with them

# ----------------------------------------------------------------------------------------------
# Names, classes, constants

CLASSIFICATION = ("mnist", "fashion-mnist", "cifar10", "cifar100", "cifar10-jpg", "imagenet",
                  "shapes")
DETECTION = ("voc", "shapes-det")
SEGMENTATION = ("voc-seg", "cityscapes", "shapes-seg")
IN_MEMORY = ("mnist", "fashion-mnist", "cifar10", "cifar100", "cifar10-jpg", "shapes")
VAL_FRACTION = {"mnist": 1 / 12, "fashion-mnist": 1 / 12, "cifar10": 1 / 10, "cifar100": 1 / 10,
                "cifar10-jpg": 1 / 10, "shapes": 1 / 10}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR10_JPG = {"folder": "cifar10_test_jpg", "train_fraction": 0.8}

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
VOC_SEG_CLASSES = ("background",) + VOC_CLASSES  # index 0 = background, 255 = void
SHAPES_CLASSES = ("circle", "square", "triangle", "cross", "ring", "semicircle")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
# Cityscapes labelIds -> the 19 training ids of the benchmark (cityscapesScripts' labels.py);
# every other id (void, rare classes such as caravan, trailer, guard rail) -> 255 (ignored).
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                       24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# ImageNet cannot be scanned here; these are the per-channel statistics of the ILSVRC-2012
# training set (torchvision's constants) and its RGB covariance eigen-decomposition used by
# AlexNet's PCA colour augmentation (values as published with fb.resnet.torch). For every other
# data set the statistics are computed from the training images by `channel_stats`/`colour_pca`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


voc_palette = metrics.voc_palette  # VOC's colour map (palette PNG masks), kept in metrics.py


class DataError(Exception):
    """A data set is missing, unreadable or malformed. The message is one line: what, where, fix."""


def default_data_dir():
    return os.environ.get("PYTORCH_DATA_DIR") or "./data"


def task_of(name):
    """'classification', 'detection' or 'segmentation'; DataError for an unknown name."""
    for task, names in (("classification", CLASSIFICATION), ("detection", DETECTION),
                        ("segmentation", SEGMENTATION)):
        if name in names:
            return task
    if str(name).startswith("folder:"):  # the user's own tree (`image_folder`)
        return "classification"
    known = ", ".join(CLASSIFICATION + DETECTION + SEGMENTATION)
    raise DataError(f"unknown data set '{name}'; choose one of: {known}, or folder:DIR (your "
                    f"own DIR/train/<class>/*, DIR/val/<class>/* images)")


def check_task(name, task):
    if task_of(name) != task:
        names = {"classification": CLASSIFICATION, "detection": DETECTION,
                 "segmentation": SEGMENTATION}[task]
        raise DataError(f"'{name}' is a {task_of(name)} data set; this script needs {task} "
                        f"data: one of {', '.join(names)}")


def check_split(name, split, allowed):
    if split not in allowed:
        raise DataError(f"data set '{name}' has no split '{split}'; use one of {', '.join(allowed)}")


# Images are decoded to uint8 tensors by torchvision.io (libjpeg-turbo, libpng, libwebp, giflib:
# pixel for pixel what PIL gives, measured on the VOC JPEGs and palette masks of ../shared/data;
# no PIL image and no HWC->CHW copy on the way); PIL only for the formats torchvision.io does not
# read (BMP, TIFF, PPM/PGM: the user's own files) and for reading image headers (`image_size`).
# torchvision 0.29 deprecates these decoders in favour of TorchCodec, a further dependency: they
# are used while torchvision has them, and PIL decodes everything once it has not.
DECODED_BY_TORCHVISION = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF")  # JPEG PNG GIF WEBP


def read_bytes(path, mine=False):
    """The file's bytes as a uint8 tensor (what `decode` and the GPU decoder take); DataError
    names a missing or empty file (the user's own, `mine`, or a data set's: fetch it again)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        if mine:
            raise DataError(f"{path} does not exist; give an image file or a folder of them")
        raise DataError(f"image file not found: {path}; the data set is incomplete, fetch it again")
    if not raw:
        raise DataError(f"{path} is not an image (the file is empty)" if mine else
                        f"cannot read image {path} (the file is empty); fetch it again")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode(raw, path, mine=False, mode="RGB"):
    """Encoded bytes (uint8 tensor) -> `tv_tensors.Image` uint8 (C, H, W): mode "RGB" (3
    channels; grey, palette and alpha images converted as PIL's convert("RGB") does, 16-bit
    scaled to 8) or "UNCHANGED" (a palette PNG gives its palette indices: VOC's label images).
    A file that cannot be decoded is a one-line DataError naming it."""
    head = bytes(raw[:12].tolist())
    try:
        if head.startswith(DECODED_BY_TORCHVISION) and hasattr(torchvision.io, "decode_image") and \
                (not head.startswith(b"RIFF") or head[8:12] == b"WEBP"):
            x = torchvision.io.decode_image(raw, mode=getattr(torchvision.io.ImageReadMode, mode))
            x = x[0] if x.ndim == 4 else x  # an animated GIF: its first frame, as PIL
            if x.dtype != torch.uint8:  # 16-bit PNG: pixels scaled to 8 bits, labels kept
                x = v2.functional.to_dtype(x, torch.uint8, scale=True) if mode == "RGB" else \
                    x.to(torch.int64)
        else:
            with Image.open(io.BytesIO(raw.numpy().tobytes())) as im:
                im = im.convert("RGB") if mode == "RGB" else im
                x = torch.from_numpy(np.array(im))
                x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
                x = x.contiguous() if x.dtype == torch.uint8 else x.to(torch.int64)
    except (OSError, ValueError, RuntimeError) as e:
        reason = "not a format PIL or torchvision.io reads" if \
            isinstance(e, PIL.UnidentifiedImageError) else \
            str(e).strip().splitlines()[-1].split(", ")[-1] if str(e).strip() else type(e).__name__
        if mine:
            raise DataError(f"{path} is not an image ({reason})")
        raise DataError(f"cannot read image {path} ({reason}); the file is corrupt: fetch it "
                        f"again")
    return tv_tensors.Image(x)


def load_image(path, mine=False):
    """An RGB image file as a uint8 `tv_tensors.Image` (3, H, W) (`read_bytes` + `decode`);
    DataError names a missing or corrupt file as a data set's (fetch it again) or, `mine`, as
    the user's own image (--classify/--detect/...)."""
    return decode(read_bytes(path, mine), path, mine)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")


def user_images(path):
    """The user's images named by PATH (--classify/--detect/--segment): the file itself, or the
    image files (by suffix, IMAGE_SUFFIXES) of a folder and its subfolders, sorted. DataError:
    "PATH does not exist", "FOLDER holds no image files"."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path} does not exist; give an image file or a folder of them")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise DataError(f"{path} holds no image files ({' '.join(IMAGE_SUFFIXES)})")
    return found


def predict_images(path, predict, out, kind):
    """Run `predict(image_path, picture_path) -> list of dicts` (what was found in one image,
    its picture drawn at picture_path) on every image of PATH (`user_images`), the pictures
    named OUT/<stem>_<kind>.png. One image given that is not an image is an error; in a folder
    it is reported, kept with its error, and the others go on. Returns the rows
    ({"image", "picture", "found"} or {"image", "error"}) for metrics.write_predictions."""
    paths, rows = user_images(path), []
    for p in paths:
        stem = os.path.splitext(os.path.relpath(p, path) if os.path.isdir(path) else
                                os.path.basename(p))[0].replace(os.sep, "_")
        picture = os.path.join(out, f"{stem}_{kind}.png")
        try:
            rows.append({"image": p, "picture": picture, "found": predict(p, picture)})
        except DataError as e:
            if len(paths) == 1:
                raise
            print(f"skipped {p}: {error_line(e)}")
            rows.append({"image": p, "error": error_line(e)})
    return rows


def image_size(path):
    """(width, height) from an image file's header (nothing decoded); DataError names a file that
    is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}; the data set is incomplete, fetch it again")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); the file is corrupt: fetch it again")


def test_input(image, mean, std, channels=3, side=224, imagenet=False):
    """A user's image (uint8 (3, H, W)) as a test split gives its images: ImageNet's short side
    256 and centre `side` (224) crop, or an in-memory set's `channels` (1: grey, as the digits)
    and side, squashed to a square as those sets' images are (CIFAR's 32, MNIST's 28).
    Normalised with (mean, std); returns (1, C, h, w) float."""
    x = image.as_subclass(torch.Tensor)
    if imagenet:
        x = v2.functional.center_crop(v2.functional.resize(x, 256, antialias=True), side)
    else:
        if channels == 1:
            x = v2.functional.rgb_to_grayscale(x)
        x = v2.functional.resize(x, [side, side], antialias=True)
    x = v2.functional.normalize(x.float() / 255, list(mean), list(std))
    return x[None]


def prediction_settings(state, path):
    """What --classify needs from a checkpoint beside the weights, written by every
    classification script's `save_training_state(..., **test_settings(info))`: (classes,
    (mean, std), (channels, side)). A one-line error for a checkpoint without them."""
    if state is None or not all(k in state for k in ("classes", "normalisation", "input_shape")):
        raise DataError(f"{path} holds no class names and input settings (a bare state_dict or "
                        f"an older checkpoint); pass a checkpoint this script wrote")
    return list(state["classes"]), tuple(state["normalisation"]), tuple(state["input_shape"])


def test_settings(info):
    """The checkpoint's record of what a test input is (`prediction_settings` reads it back):
    the classes, the normalisation and the input's (channels, side)."""
    return {"classes": list(info["classes"]), "normalisation": (info["mean"], info["std"]),
            "input_shape": (info["in_channels"], info["image_size"])}


def classify_images(path, out, forward, classes, mean, std, input_shape=(3, 224),
                    imagenet=False, k=5):
    """--classify PATH (an image or a folder, `user_images`): each image made a test input
    (`test_input`), `forward(x) -> logits (1, num_classes)` (the script's single-view test),
    its top-k classes printed with their names and probabilities, as the lecture's top-15
    printout, and drawn (OUT/<stem>_classes.png); all of them in OUT/predictions.json and .csv.
    Returns the rows."""
    def one(p, picture):
        image = load_image(p, mine=True)
        with torch.no_grad():
            x = test_input(image, mean, std, *input_shape, imagenet=imagenet)
            probs = forward(x).float().softmax(-1)[0]
        p_top, i_top = probs.topk(min(k, len(classes)))
        top = [(classes[i], float(q)) for q, i in zip(p_top, i_top.tolist())]
        print(f"{p}:")
        for rank, (c, q) in enumerate(top):
            print(f"  #{rank + 1} {100 * q:6.2f}% {c}")
        metrics.draw_classification(image, top, picture)
        return [{"rank": r + 1, "class": c, "probability": q} for r, (c, q) in enumerate(top)]
    rows = predict_images(path, one, out, "classes")
    metrics.write_predictions(out, rows)
    return rows


def _download_error(archive, url, where, reason):
    return DataError(f"could not download {archive} from {url} ({reason}); fetch it by hand and "
                     f"put it at {where} (it is checked and extracted on the next run)")


# ----------------------------------------------------------------------------------------------
# Synthetic shapes: one deterministic generator for the three tasks

def _shape_mask(kind, u, v, r):
    """Inside-test of a shape of class `kind` and radius r, in rotated centred coordinates u, v."""
    d2 = u * u + v * v
    if kind == 0:                                   # circle
        return d2 <= r * r
    if kind == 1:                                   # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == 2:                                   # equilateral triangle (inradius r/2)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.5 * r
        return inside
    if kind == 3:                                   # cross, arms of half-width 0.3 r
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if kind == 4:                                   # ring
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    return (d2 <= r * r) & (v >= 0)                 # semicircle


# Rendered shapes images, shared by every ShapesDataset of the process (a run that builds its
# train, val and test sets twice, or several runs in one process, render each image once); the
# oldest are dropped past _RENDERED_MAX (~260 MB at 64x64, ~65 MB at 32x32).
_RENDERED = collections.OrderedDict()
_RENDERED_MAX = 16384  # the non-quick sets: 12,000 images


def render_shapes(seed, index, size=64, max_shapes=4, split="train"):
    """Render image `index` of the shapes set; the same (seed, split, index, size) gives the same image.

    A textured noisy background (a random colour gradient, low-frequency blobs and pixel noise)
    with 1..max_shapes shapes of random class, colour, rotation, size and position; their
    bounding boxes do not overlap, so every box is the tight box of its mask. The first shape is
    the largest (radius at least 1.5x any other): its class is the classification label.

    Returns (image uint8 (3, size, size), boxes float32 (K, 4) continuous (xmin, ymin, xmax, ymax),
    labels int64 (K,), mask int64 (size, size) with 0 = background and 1 + class elsewhere,
    label of the largest shape).
    """
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    rng = np.random.default_rng([seed, split_id, index])
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    # Background: gradient between two random colours, smooth blobs, pixel noise.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = rng.uniform(0, 2 * math.pi)
    t = ((xx - s / 2) * math.cos(a) + (yy - s / 2) * math.sin(a)) / s + 0.5
    img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    coarse = rng.normal(0, 25, (3, 4, 4)).astype(np.float32)
    img += F.interpolate(torch.from_numpy(coarse)[None], size=(s, s), mode="bicubic",
                         align_corners=False)[0].numpy()
    img += rng.normal(0, 12, (3, s, s))
    mask = np.zeros((s, s), np.int64)
    boxes, labels, placed = [], [], []
    n = int(rng.integers(1, max_shapes + 1))
    r_main = rng.uniform(0.18, 0.28) * s
    for k in range(n):
        kind = int(rng.integers(len(SHAPES_CLASSES)))
        for _ in range(30):  # rejection sampling of a position whose box overlaps no other box
            r = r_main if k == 0 else rng.uniform(0.07 * s, r_main / 1.5)
            cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
            box = (cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in placed):
                break
        else:
            continue  # no room left: fewer shapes in this image
        th = rng.uniform(0, 2 * math.pi)
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
        inside = _shape_mask(kind, u, v, r)
        if inside.sum() < 4:
            continue
        # A colour that stands out from the local background by at least 80 grey levels overall.
        local = img[:, inside].mean(1)
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - local).sum() < 80:
            colour = rng.uniform(0, 255, 3)
        img[:, inside] = colour[:, None] + rng.normal(0, 8, (3, int(inside.sum())))
        mask[inside] = kind + 1
        ys, xs = np.nonzero(inside)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        labels.append(kind)
        placed.append(box)
    image = torch.from_numpy(np.clip(img, 0, 255).round().astype(np.uint8))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return image, boxes, torch.tensor(labels, dtype=torch.int64), torch.from_numpy(mask), labels[0]


SHAPES_MIN_SIZE = 16  # below it, some images have no room for a shape


def shapes_size(split, quick=False):
    """Number of images of each split of the shapes sets (quick: a tiny set for seconds-long runs)."""
    if quick:
        return {"train": 2000, "val": 250, "trainval": 2250, "test": 500}[split]
    return {"train": 9000, "val": 1000, "trainval": 10000, "test": 2000}[split]


class ShapesDataset(Dataset):
    """`shapes` (image, label), `shapes-det` (image, target) or `shapes-seg` (image, mask).

    Images are generated on the fly and cached, so an epoch after the first costs nothing.
    `transforms` is a torchvision.transforms.v2 callable applied to (image, target).
    """

    def __init__(self, task="shapes", split="train", n=None, size=64, seed=0, max_shapes=4,
                 transforms=None, quick=False):
        check_split(task, split, ("train", "val", "trainval", "test"))
        if size < SHAPES_MIN_SIZE:  # measured: at 8 px 96 of 1,500 images hold no shape at all
            raise DataError(f"{task} images of {size}x{size} pixels are too small to hold a "
                            f"shape; draw them at {SHAPES_MIN_SIZE} or more (the script's "
                            f"--img-size or --data-size)")
        self.task, self.size, self.seed, self.max_shapes = task, size, seed, max_shapes
        self.transforms = transforms
        # "trainval" is train followed by val: the same images, so a final run sees both.
        n_train = shapes_size("train", quick) if n is None else n
        n = shapes_size(split, quick) if n is None else n
        if split == "trainval":
            self.index = [("train", i) for i in range(min(n, n_train))] + \
                         [("val", i) for i in range(n - min(n, n_train))]
        else:
            self.index = [(split, i) for i in range(n)]
        self.classes = SHAPES_CLASSES if task == "shapes-det" else \
            (("background",) + SHAPES_CLASSES if task == "shapes-seg" else SHAPES_CLASSES)

    def __len__(self):
        return len(self.index)

    def render(self, i):
        split, j = self.index[i]
        key = (self.seed, split, j, self.size, self.max_shapes)
        if key not in _RENDERED:  # masks kept as uint8: 8x less memory than int64
            image, boxes, labels, mask, label = render_shapes(self.seed, j, self.size,
                                                              self.max_shapes, split)
            _RENDERED[key] = image, boxes, labels, mask.to(torch.uint8), label
            if len(_RENDERED) > _RENDERED_MAX:
                _RENDERED.popitem(last=False)
        return _RENDERED[key]

    def __getitem__(self, i):
        image, boxes, labels, mask, label = self.render(i)
        image = tv_tensors.Image(image)
        if self.task == "shapes":
            return (self.transforms(image) if self.transforms else image), label
        if self.task == "shapes-seg":
            sample = image, tv_tensors.Mask(mask.long())
        else:
            target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                        canvas_size=(self.size, self.size)),
                      "labels": labels, "difficult": torch.zeros(len(labels), dtype=torch.bool),
                      "image_id": i}
            sample = image, target
        return self.transforms(*sample) if self.transforms else sample


# ----------------------------------------------------------------------------------------------
# Classification

def split_indices(n, val_fraction, seed=0):
    """Seeded split of range(n) into (train, val) index tensors, val = round(n * val_fraction)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# Folders where an operating system's packages install data sets: Debian's and Ubuntu's
# `apt-get install dataset-fashion-mnist` puts the four idx .gz files in the first. Looked in after
# --data-dir and before any download; the files are read where they are (nothing is copied).
SYSTEM_DATA_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
                    "mnist": ("/usr/share/datasets/mnist",)}
IDX_FILES = {True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path, fix="delete it and run again to fetch it"):
    """An idx file (MNIST's format, plain or .gz) as a uint8 numpy array; DataError names a
    damaged file (bad magic, wrong length, truncated gzip) and says how to replace it."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile and zlib errors are OSErrors
        raise DataError(f"cannot read {path} ({e}); the file is damaged: {fix}")
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or not 1 <= ndim <= 3:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number); the "
                        f"file is damaged: {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise DataError(f"{path} holds {len(body)} bytes of data where its header announces "
                        f"{math.prod(dims)} {dims}; the file is truncated: {fix}")
    return np.frombuffer(body, np.uint8).reshape(dims).copy()


def system_dataset_dir(name, train):
    """The first of SYSTEM_DATA_DIRS[name] that holds the split's idx .gz files, else None."""
    for folder in SYSTEM_DATA_DIRS.get(name, ()):
        if all(os.path.isfile(os.path.join(folder, f)) for f in IDX_FILES[train]):
            return folder
    return None


class _IdxSet:
    """The split of an MNIST-format set read from a folder of idx .gz files, with the
    attributes classification_arrays reads from torchvision's data sets."""

    def __init__(self, folder, train, classes, fix="delete it and run again to fetch it"):
        images, labels = (read_idx(path, fix) for path in _idx_folder(folder, train))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {IDX_FILES[train][0]} has shape {images.shape} and "
                            f"{IDX_FILES[train][1]} {labels.shape}; they do not match: the files "
                            f"are damaged: {fix}")
        self.data, self.targets, self.classes, self.root = images, labels, classes, folder


def cifar10_jpg(root, train):
    """`cifar10-jpg`: CIFAR-10 images as JPEG files in `ROOT/cifar10_test_jpg/<class>/NNNN.jpg`
    (`../shared/data` holds the 10,000 test images so, 1,000 per class), split by file name: the
    first 80 % of each class (sorted) are the training set, the rest the test set: a fixed
    8,000 / 2,000 of those 10,000. A real-photograph stand-in for CIFAR-10 where the set cannot be
    downloaded; its figures are not comparable with published CIFAR-10 ones (other images, fewer,
    JPEG-compressed). The images are held class by class in turn (airplane, automobile, ...,
    airplane, ...), so that --limit N's first N hold every class, as CIFAR's batches do."""
    folder = os.path.join(root, CIFAR10_JPG["folder"])
    per_class = []
    for label, c in enumerate(CIFAR10_CLASSES):
        where = os.path.join(folder, c)
        files = sorted(f for f in os.listdir(where) if f.lower().endswith(".jpg")) \
            if os.path.isdir(where) else []
        if len(files) < 2:
            raise DataError(f"cifar10-jpg not found: {where} holds {len(files)} .jpg files; put "
                            f"the class folders <class>/NNNN.jpg in {folder}, or point --data-dir "
                            f"at the folder that holds {CIFAR10_JPG['folder']}/")
        n = int(round(CIFAR10_JPG["train_fraction"] * len(files)))
        per_class.append([(os.path.join(where, f), label)
                          for f in (files[:n] if train else files[n:])])
    images, labels = [], []
    for path, label in (x for row in itertools.zip_longest(*per_class) for x in row if x):
        im = load_image(path)
        if im.shape != (3, 32, 32):
            raise DataError(f"{path} is {im.shape[2]}x{im.shape[1]} pixels, not CIFAR's "
                            f"32x32: the file is not one of the set's; remove it")
        images.append(im)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels), CIFAR10_CLASSES


FOLDER_SIZE = 32  # `folder:DIR` images are held as 32x32 RGB, as CIFAR's


def image_folder(root, train, size=FOLDER_SIZE):
    """`--data folder:DIR`, the user's own images in torchvision's ImageFolder layout:
    DIR/train/<class>/* and DIR/val/<class>/* (val is the test split; `--holdout` holds a tenth
    of train out), each image squashed to size x size RGB and held in memory as CIFAR's (the
    networks that take larger inputs upsample them on the device, as they do CIFAR). The classes
    are train's folder names, sorted; val may not have others. One-line errors name the folder
    or image at fault."""
    split = os.path.join(root, "train" if train else "val")
    layout = "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
    for where in (os.path.join(root, "train"), split):
        if not os.path.isdir(where):
            raise DataError(f"--data folder:{root}: {where} does not exist; the images go in "
                            f"{layout}")
    classes = sorted(d for d in os.listdir(os.path.join(root, "train"))
                     if os.path.isdir(os.path.join(root, "train", d)))
    if len(classes) < 2:
        raise DataError(f"--data folder:{root}: {os.path.join(root, 'train')} holds "
                        f"{len(classes)} class folder(s); a classifier needs 2 or more ({layout})")
    extra = sorted(set(d for d in os.listdir(split) if os.path.isdir(os.path.join(split, d)))
                   - set(classes))
    if extra:
        raise DataError(f"--data folder:{root}: {os.path.join(split, extra[0])} is a class that "
                        f"{os.path.join(root, 'train')} does not have")
    images, labels = [], []
    for label, c in enumerate(classes):
        where = os.path.join(split, c)
        files = user_images(where) if os.path.isdir(where) else []
        for path in files:
            im = load_image(path, mine=True).as_subclass(torch.Tensor)
            images.append(v2.functional.resize(im, [size, size], antialias=True))
            labels.append(label)
    if not images:
        raise DataError(f"--data folder:{root}: {split} holds no images ({layout})")
    return torch.stack(images), torch.tensor(labels), tuple(classes)


def _idx_folder(folder, train):
    """A split's (images, labels) idx files in `folder`, each the plain file (as torchvision
    unpacks them) or else its .gz; None for a file that is not there."""
    found = []
    for f in IDX_FILES[train]:
        plain, packed = os.path.join(folder, f[:-3]), os.path.join(folder, f)
        found.append(plain if os.path.isfile(plain) else packed if os.path.isfile(packed) else None)
    return found


def barrier():
    """torch.distributed.barrier() under torchrun (on NCCL, on this process's GPU); nothing in a
    single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def local_rank_zero_first(fetch):
    """`fetch(..., download, ...)` (a function that may download or unpack a data set) run by
    local rank 0 of each machine first, then, after a barrier, by the other ranks with
    download=False: they read what it wrote. Without this, the first torchrun on a fresh box has
    every rank download into the same files at once (torchvision writes the final paths
    directly): corrupt archives. If rank 0 fails, the others fail too, on the missing files."""
    signature = inspect.signature(fetch)

    @functools.wraps(fetch)
    def first(*args, **kwargs):
        if distributed_info()[1] == 1:
            return fetch(*args, **kwargs)
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
        if not leader:
            barrier()
            if "download" in call.arguments:
                call.arguments["download"] = False
        try:
            return fetch(*call.args, **call.kwargs)
        finally:
            if leader:
                barrier()
    return first


@local_rank_zero_first
def _torchvision_classification(name, train, root, download):
    """MNIST, Fashion-MNIST (their idx files read by `read_idx`, which names a damaged file) or
    CIFAR (torchvision's reader): from --data-dir, else a system-installed copy, else downloaded
    by torchvision when allowed. A set that is there but damaged is an error that names the file,
    never "not found" (re-fetching would not replace files torchvision sees as present)."""
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    digits = name in ("mnist", "fashion-mnist")
    if digits:
        where = os.path.join(root, cls.__name__, "raw")
        found = _idx_folder(where, train)
        if None not in found:
            return _IdxSet(where, train, tuple(cls.classes))
        if found != [None, None] and not download:
            missing = IDX_FILES[train][found.index(None)]
            raise DataError(f"{where} holds {os.path.basename(found[1 - found.index(None)])} but "
                            f"not {missing}; the set is incomplete: put {missing} there, or run "
                            f"without --no-download to fetch it")
    else:
        where = os.path.join(root, cls.base_folder)
        if os.path.isdir(where):
            files = cls.train_list if train else cls.test_list
            for f, md5 in files + [(cls.meta["filename"], cls.meta["md5"])]:
                path = os.path.join(where, f)
                if not os.path.isfile(path):
                    raise DataError(f"{path} is missing; the set is incomplete: delete {where} and "
                                    f"run again to fetch it")
                if not torchvision.datasets.cifar.check_integrity(path, md5):  # as CIFAR10 checks
                    raise DataError(f"{path} is damaged (its md5 is not the published one): "
                                    f"delete {where} and run again to fetch it")
            try:
                return cls(root, train=train, download=False)
            except Exception as e:  # not a pickle, wrong keys: whatever torchvision raises
                raise DataError(f"cannot read {where} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                                f"the files are damaged: delete {where} and run again to fetch it")
    system = system_dataset_dir(name, train)
    if system:
        return _IdxSet(system, train, tuple(cls.classes),
                       fix="reinstall the package that installed it (e.g. apt-get install "
                           "--reinstall dataset-fashion-mnist)")
    if digits:
        files = ", ".join(f for f, _ in cls.resources)
        how = f"put {files} in {where}"
        if name == "fashion-mnist":
            how += " (or, on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
    else:
        where = os.path.join(root, cls.filename)
        how = f"put {cls.filename} at {where}"
    if not download:
        raise DataError(f"{name} not found under {root}; run without --no-download, or {how}")
    try:
        ds = cls(root, train=train, download=True)
    except Exception as e:  # network down, host gone, or a hash mismatch
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"could not download {name} ({reason}); {how} and run again")
    return _IdxSet(os.path.join(root, cls.__name__, "raw"), train, tuple(cls.classes)) \
        if digits else ds


def classification_arrays(name, split, data_dir=None, download=True, quick=False, seed=0,
                          size=32, limit=None):
    """The whole split of an in-memory set as (images uint8 (N, C, H, W), labels int64 (N,), classes).

    "train"/"val" are the seeded held-out split of the official training set (`VAL_FRACTION`);
    "trainval" the whole training set; "test" the official test set. `quick` keeps a small
    stratification-free subset (first 2,000 / 500 images of a fixed permutation) for smoke runs;
    `limit` (--limit) then keeps only the first `limit` images (smoke tests of the code path).
    """
    check_task(name, "classification")
    if name not in IN_MEMORY and not name.startswith("folder:"):
        raise DataError(f"'{name}' does not fit in memory; use classification_dataset()")
    check_split(name, split, ("train", "val", "trainval", "test"))
    if name == "shapes":
        ds = ShapesDataset("shapes", split, size=size, seed=seed, quick=quick)
        n = len(ds) if limit is None else min(limit, len(ds))
        x = torch.stack([ds.render(i)[0] for i in range(n)])
        y = torch.tensor([ds.render(i)[4] for i in range(n)])
        return x, y, SHAPES_CLASSES
    root = data_dir or default_data_dir()
    if name.startswith("folder:"):
        x, y, classes = image_folder(name[len("folder:"):], split != "test")
    elif name == "cifar10-jpg":
        x, y, classes = cifar10_jpg(root, split != "test")
    else:
        ds = _torchvision_classification(name, split != "test", root, download)
        x = torch.as_tensor(np.asarray(ds.data))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        classes = tuple(ds.classes)
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        bad = y[(y < 0) | (y >= len(classes))][0].item()
        raise DataError(f"{name}: label {bad} is outside the {len(classes)} classes; the label "
                        f"file under {root} is corrupt, delete it and fetch it again")
    if split in ("train", "val"):
        train_idx, val_idx = split_indices(len(y), VAL_FRACTION.get(name, 1 / 10), seed=0)
        idx = train_idx if split == "train" else val_idx
        x, y = x[idx], y[idx]
    if quick:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        keep = keep[:2000 if split in ("train", "trainval") else 500].sort().values
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x.contiguous(), y, classes


def channel_stats(images):
    """Per-channel mean and standard deviation, in [0, 1] units, of uint8 images (N, C, H, W)."""
    x = images.double().div_(255) if images.dtype == torch.uint8 else images.double()
    x = x.transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def colour_pca(images):
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance of the pixels,
    in [0, 1] units: the statistics of AlexNet's PCA colour augmentation (Krizhevsky et al. §4.1)."""
    x = images.double().div(255) if images.dtype == torch.uint8 else images.double()
    x = x.transpose(0, 1).reshape(3, -1)
    eigval, eigvec = torch.linalg.eigh(torch.cov(x))
    return eigval.flip(0).float(), eigvec.flip(1).float()


def pca_colour(x, eigval, eigvec, alpha):
    """Add eigvec @ (alpha * eigval) to every pixel: x (..., 3, H, W) float, alpha (..., 3)."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    shift = (torch.as_tensor(eigvec, dtype=x.dtype, device=x.device)
             @ (alpha * torch.as_tensor(eigval, dtype=x.dtype, device=x.device))[..., None])
    return x + shift[..., None]  # (..., 3, 1, 1) broadcasts over the pixels


class PCAColour(v2.Transform):
    """AlexNet's colour augmentation: alpha ~ N(0, alphastd) drawn once per image (§4.1)."""

    def __init__(self, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC, alphastd=0.1):
        super().__init__()
        self.eigval, self.eigvec = torch.tensor(eigval), torch.tensor(eigvec)
        self.alphastd = alphastd

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image) or not inpt.is_floating_point():
            return inpt
        alpha = torch.randn(3) * self.alphastd
        x = inpt.as_subclass(torch.Tensor)
        if x.device.type != "cpu":  # --gpu-decode: the (3,) shift made on the CPU and sent
            # without waiting (the constants copied to the GPU per image would be host syncs)
            shift = pca_colour(torch.zeros(3, 1, 1), self.eigval, self.eigvec, alpha)
            return tv_tensors.wrap(x + shift.to(x.device, non_blocking=True), like=inpt)
        return tv_tensors.wrap(pca_colour(x, self.eigval, self.eigvec, alpha), like=inpt)


class Normalize(v2.Normalize):
    """v2.Normalize, the same arithmetic, with the mean and std of an image on a GPU taken from
    a cache per device (--gpu-decode normalises each image there): torchvision's kernel copies
    them to the device at every image, two blocking copies that each wait for the GPU's queue."""

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image) or inpt.device.type == "cpu":
            return super().transform(inpt, params)
        x = inpt.as_subclass(torch.Tensor)
        key = (x.device, x.dtype)
        if key not in self.__dict__.setdefault("on_device", {}):
            self.on_device[key] = [torch.tensor(v, dtype=x.dtype).view(-1, 1, 1).to(x.device)
                                   for v in (self.mean, self.std)]
        mean, std = self.on_device[key]
        return tv_tensors.wrap((x.sub_(mean) if self.inplace else x.sub(mean)).div_(std),
                               like=inpt)


class ColorJitterU8(v2.ColorJitter):
    """v2.ColorJitter: the same random draws, order and output, with its brightness, contrast
    and saturation steps on uint8 RGB images done by float32 kernels (torchvision's uint8
    kernels multiply uint8 by float, ~3x slower here: `python bench/bench_input.py --steps`).
    Each step is torchvision's formula, rounded down to an integer as its uint8 result is; the
    hue step and other inputs go to torchvision's kernels. Tested equal to v2.ColorJitter."""

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image) or inpt.dtype != torch.uint8 or \
                inpt.shape[-3] != 3:
            return super().transform(inpt, params)

        def grey(x):  # torchvision's luma of a uint8 image, floored
            r, g, b = x.unbind(dim=-3)
            return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(-3)

        def blend(x, other, ratio):
            return x.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 255).floor_()
        x = inpt.as_subclass(torch.Tensor).float()
        for step in params["fn_idx"].tolist():
            factor = params[("brightness", "contrast", "saturation", "hue")[step] + "_factor"]
            if factor is None:
                continue
            if step == 0:
                x = x.mul_(factor).clamp_(0, 255).floor_()
            elif step == 1:
                x = blend(x, grey(x).mean(dim=(-3, -2, -1), keepdim=True), factor)
            elif step == 2:
                x = blend(x, grey(x), factor)
            else:
                x = v2.functional.adjust_hue(x.to(torch.uint8), factor).float()
        return tv_tensors.wrap(x.to(torch.uint8), like=inpt)


def classification_transforms(name, train, mean, std, size=None, square=False):
    """The per-sample (PIL/tensor) pipeline for a classification set.

    Small images: random crop with padding (3 for 28x28 digits, as in the lecture; 4 for 32x32
    CIFAR and shapes), plus a horizontal flip except for digits, whose mirror image is another
    glyph. ImageNet: resize the short side to 256, random 224 crop, flip, PCA colour; with
    `square`, AlexNet's §2 first cuts the central 256x256 patch and crops inside it (without, the
    crops range over the whole short-side-256 image); evaluation: the centre 224 crop (see
    `ten_crop` for the paper's ten-crop test).
    """
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if name == "imagenet":
        size = size or 224
        if train:
            square_crop = [v2.CenterCrop(256)] if square else []
            return v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), *square_crop,
                               v2.RandomCrop(size),
                               v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                               PCAColour(), Normalize(mean, std)])
        return v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(size),
                           v2.ToDtype(torch.float32, scale=True), Normalize(mean, std)])
    if not train:
        return v2.Compose(to_float + [Normalize(mean, std)])
    digits = name in ("mnist", "fashion-mnist")
    size = size or (28 if digits else 32)
    aug = [v2.RandomCrop(size, padding=3 if digits else 4)]
    if name != "mnist":
        aug.append(v2.RandomHorizontalFlip())
    return v2.Compose([v2.ToImage()] + aug + [v2.ToDtype(torch.float32, scale=True),
                                              Normalize(mean, std)])


def normalised(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The whole image as float, normalised: the test input of the papers that crop or rescale
    it themselves (VGG's and OverFeat's dense tests, GoogLeNet's 144 crops, FCN's whole images)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), Normalize(mean, std)])


def ten_crop(images, size):
    """AlexNet's test protocol: the 4 corner and centre crops and their mirror images.

    images (N, C, H, W) -> (N, 10, C, size, size)."""
    crops = v2.functional.ten_crop(images, [size, size])
    return torch.stack(crops, dim=1)


@torch.no_grad()
def ten_crop_predict(model, images, size):
    """Class probabilities averaged over the ten crops of each image (Krizhevsky et al. §4.1)."""
    crops = ten_crop(images, size)
    n = crops.shape[0]
    probs = model(crops.flatten(0, 1)).softmax(dim=1)
    return probs.view(n, 10, -1).mean(1)


def imagenet_class_names():
    """The 1000 ILSVRC-2012 class names in the standard index order (torchvision's weight metadata:
    no download needed)."""
    return list(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


class FileImages(Dataset):
    """A set read from image files. A sample is read (`read`: the image decoded on the CPU by
    `load_image`), then `apply(image, target)` runs its transforms. With `encoded` set
    (--gpu-decode, `make_loader(gpu_decode=True)`) a sample is the file's bytes and its target,
    untransformed: `DecodeOnDevice` decodes a batch of them on the device and calls `apply`
    there; `canvas` gives the (height, width) that targets need from the file's header then."""
    encoded = False

    def read(self, path):
        return (read_bytes(path), path) if self.encoded else load_image(path)

    def finish(self, image, target):  # encoded: ((bytes, path), target), see `is_encoded`
        return (image, target) if self.encoded else self.apply(image, target)

    def apply(self, image, target):
        return (self.transforms(image, target) if self.transforms else (image, target))

    def canvas(self, image, path):
        return image_size(path)[::-1] if self.encoded else tuple(image.shape[-2:])


class _ImageList(FileImages):
    """(path, label) pairs read with `load_image`, so that a corrupt file names itself."""

    def __init__(self, samples, classes, transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.finish(self.read(path), label)

    def apply(self, image, label):
        return (self.transform(image) if self.transform else image), label


@local_rank_zero_first  # torchvision's ImageNet unpacks the archives on first use
def imagenet_dataset(split, data_dir=None, transform=None):
    """ILSVRC-2012 from `DIR/imagenet/{train,val}/<wnid>/*.JPEG` (the usual folder tree; val sorted
    into class folders) or from the official archives in `DIR/imagenet` through torchvision's
    ImageNet (ILSVRC2012_img_{train,val}.tar and ILSVRC2012_devkit_t12.tar.gz). Classes are the
    sorted synset ids, i.e. the standard index order; `.names` holds the human-readable names.
    "test" is the official validation set (the ILSVRC test labels are not public)."""
    check_split("imagenet", split, ("train", "test"))
    root = os.path.join(data_dir or default_data_dir(), "imagenet")
    folder = os.path.join(root, "train" if split == "train" else "val")
    archives = ["ILSVRC2012_devkit_t12.tar.gz",
                "ILSVRC2012_img_train.tar" if split == "train" else "ILSVRC2012_img_val.tar"]
    if os.path.isdir(folder) and any(os.path.isdir(os.path.join(folder, d))
                                     for d in os.listdir(folder)):
        tree = torchvision.datasets.ImageFolder(folder, allow_empty=True)
        samples, wnids = tree.samples, tree.classes
    elif all(os.path.exists(os.path.join(root, a)) for a in archives) or \
            os.path.exists(os.path.join(root, "meta.bin")):
        try:
            tv = torchvision.datasets.ImageNet(root, split="train" if split == "train" else "val")
        except Exception as e:
            raise DataError(f"cannot read the ImageNet archives in {root} ({e}); check the files")
        samples, wnids = tv.samples, tv.wnids
    else:
        raise DataError(f"ImageNet {split} not found: put the class folders in {folder}/<wnid>/, or "
                        f"the archives {', '.join(archives)} in {root} (ImageNet cannot be "
                        f"downloaded automatically: get it from image-net.org)")
    ds = _ImageList(samples, wnids, transform)
    names = imagenet_class_names()
    ds.names = names if len(wnids) == len(names) else list(wnids)
    return ds


def classification_dataset(name, split, data_dir=None, download=True, transform=None, quick=False,
                           seed=0, size=32):
    """A map-style Dataset of (image, label) for the DataLoader path (any classification set)."""
    check_task(name, "classification")
    if name == "imagenet":
        ds = imagenet_dataset(split, data_dir, transform)
        keep = range(len(ds))
        if quick:  # a fixed small subset for smoke runs on a real ImageNet
            keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:2000]
            keep = keep.sort().values.tolist()
        if split == "test":  # every header read now (50,000: seconds), not at the end of training;
            for i in keep:   # the 1.28M training images name themselves when they are read
                image_size(ds.samples[i][0])
        return Subset(ds, keep) if quick else ds
    x, y, classes = classification_arrays(name, split, data_dir, download, quick, seed, size)
    return TensorImageDataset(x, y, classes, transform)


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels as a per-sample Dataset (the lecture's pipeline)."""

    def __init__(self, images, labels, classes, transform=None):
        self.images, self.labels, self.classes = images, labels, classes
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = tv_tensors.Image(self.images[i])
        return (self.transform(image) if self.transform else image), int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Pascal VOC (detection and segmentation) and Cityscapes

def parse_voc_xml(path, classes=VOC_CLASSES):
    """Read a VOC (or ImageNet bounding-box) XML annotation.

    Returns {"boxes": float32 (M, 4), "labels": int64 (M,), "difficult": bool (M,),
    "names": [M class names], "size": (width, height)}. VOC stores 1-based inclusive pixel
    corners; they become continuous coordinates (xmin - 1, ymin - 1, xmax, ymax), so the plain
    IoU of two boxes equals the devkit's "+1" IoU and the box width is xmax - xmin.
    `classes` maps names to label indices (VOC's 20 classes by default; pass the sorted synset ids
    for ImageNet files); a name outside it is an error naming the file and the name.
    """
    index = {c: i for i, c in enumerate(classes)}
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}; the data set is incomplete")
    except ET.ParseError as e:
        raise DataError(f"corrupt annotation {path} ({e}); fetch the data set again")
    try:
        size = root.find("size")
        width = int(float(size.find("width").text))
        height = int(float(size.find("height").text))
        boxes, labels, difficult, names = [], [], [], []
        for obj in root.iter("object"):
            name = obj.find("name").text.strip()
            if name not in index:
                raise DataError(f"{path}: object '{name}' is not one of the {len(classes)} known "
                                f"classes; fix the file or pass the right class list")
            bb = obj.find("bndbox")  # the object's own box, not those of its parts
            x0, y0, x1, y1 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            what = (f"{path}: object {len(names) + 1} ('{name}'), box ({x0:g}, {y0:g}, {x1:g}, "
                    f"{y1:g})")
            if x1 < x0 or y1 < y0:
                raise DataError(f"{what} has xmax < xmin or ymax < ymin; fix the file")
            if x1 <= 0 or y1 <= 0 or x0 - 1 >= width or y0 - 1 >= height:
                raise DataError(f"{what} lies wholly outside the {width}x{height} image; fix the "
                                f"file (or the image size it states)")
            # a box that only sticks out of the image is clipped to it (none of VOC's does)
            boxes.append((max(x0 - 1, 0), max(y0 - 1, 0), min(x1, width), min(y1, height)))
            labels.append(index[name])
            flag = obj.find("difficult")
            difficult.append(flag is not None and flag.text is not None and int(flag.text) == 1)
            names.append(name)
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(f"malformed annotation {path} ({type(e).__name__}: {e}); a field is "
                        f"missing or not a number, fix the file or fetch it again")
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size {width}x{height} is not a size; fix the file")
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.bool),
            "names": names, "size": (width, height)}


class ImageNetBoxes(FileImages):
    """ILSVRC-2012 localisation: the images of imagenet_dataset (DIR/imagenet/{train,val}/
    <wnid>/*.JPEG: torchvision's ImageNet layout, whose devkit step sorts val into class folders)
    with the boxes of the ILSVRC XML files (VOC's format: annotation/size, object/name = a wnid,
    object/bndbox/xmin ymin xmax ymax, read by parse_voc_xml as 1-based corners) found in
    DIR/imagenet/bbox/{train,val}/, per class (<wnid>/<stem>.xml, as the train box archive
    unpacks) or flat (<stem>.xml, as the val one). Names map to class indices in the order of
    imagenet_dataset (sorted wnids). Train keeps the images that have boxes (ILSVRC boxes a
    subset of them); in val every image must have its file."""

    def __init__(self, split, data_dir=None, transforms=None):
        base = imagenet_dataset(split, data_dir)
        self.classes, self.transforms = list(base.classes), transforms
        folder = "train" if split == "train" else "val"
        root = os.path.join(data_dir or default_data_dir(), "imagenet", "bbox", folder)
        if not os.path.isdir(root):
            raise DataError(f"ImageNet bounding boxes not found: put the ILSVRC {folder} "
                                 f"XML files in {root} (<wnid>/<image>.xml or <image>.xml)")
        self.samples = []
        for path, label in base.samples:
            stem = os.path.splitext(os.path.basename(path))[0]
            found = [p for p in (os.path.join(root, self.classes[label], stem + ".xml"),
                                 os.path.join(root, stem + ".xml")) if os.path.isfile(p)]
            if found:
                self.samples.append((path, found[0]))
            elif split != "train":
                raise DataError(f"no bounding-box file for {path} in {root}; every "
                                     f"validation image needs {stem}.xml")
        if not self.samples:
            raise DataError(f"no bounding-box XML in {root} matches an image of "
                                 f"{os.path.dirname(os.path.dirname(base.samples[0][0]))}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, xml = self.samples[i]
        image = self.read(path)
        ann = parse_voc_xml(xml, self.classes)
        if not len(ann["labels"]):
            raise DataError(f"{xml} holds no object box; fix or remove the file")
        target = {"boxes": tv_tensors.BoundingBoxes(ann["boxes"], format="XYXY",
                                                    canvas_size=self.canvas(image, path)),
                  "labels": ann["labels"], "difficult": ann["difficult"], "image_id": i}
        return self.finish(image, target)


@local_rank_zero_first
def _voc_files(root, year, image_set, task, download):
    """(image paths, annotation paths) of one VOC split, downloading it with torchvision when absent."""
    cls = torchvision.datasets.VOCDetection if task == "detection" else \
        torchvision.datasets.VOCSegmentation
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    key = "2007-test" if (year, image_set) == ("2007", "test") else year
    info = torchvision.datasets.voc.DATASET_YEAR_DICT[key]
    split_file = os.path.join(base, "ImageSets", "Main" if task == "detection" else "Segmentation",
                              f"{image_set}.txt")
    if not os.path.exists(split_file):
        where = os.path.join(root, info["filename"])
        if not download:
            raise DataError(f"VOC{year} {image_set} not found ({split_file} is missing); put "
                            f"{info['filename']} at {where} or run with downloads on")
        try:  # only when absent: torchvision would fetch the archive again otherwise
            cls(root, year=year, image_set=image_set, download=True)
        except Exception as e:
            raise _download_error(info["filename"], info["url"], where,
                                  str(e).strip().splitlines()[-1] if str(e).strip() else e)
    ds = cls(root, year=year, image_set=image_set, download=False)
    return ds.images, ds.targets


class VOCDetectionSet(FileImages):
    """One VOC detection split: (image, target) with target = {"boxes": BoundingBoxes XYXY in
    pixels, "labels", "difficult", "image_id"}. `transforms` (v2) moves boxes with the image.

    `keep_difficult=False` drops the "difficult" objects (usual for training); evaluation keeps
    them so that `metrics.detection_map` can ignore detections that hit them.
    `root` holds VOCdevkit/VOC<year>/ (also works on the 100-image sample in shared/data)."""

    def __init__(self, root, year="2007", image_set="test", download=False, transforms=None,
                 keep_difficult=True):
        self.images, self.annotations = _voc_files(root, year, image_set, "detection", download)
        self.transforms, self.keep_difficult = transforms, keep_difficult
        self.classes = VOC_CLASSES

    def __len__(self):
        return len(self.images)

    def validate(self, n=None):
        """Read every annotation (or the first n) and every image's header before any training:
        a damaged file, a box outside its image, or an image whose size is not the one its
        annotation states fails the run in seconds, not at its test step."""
        for image, annotation in list(zip(self.images, self.annotations))[:n]:
            stated = parse_voc_xml(annotation)["size"]
            if image_size(image) != stated:
                raise DataError(f"{image} is {'x'.join(map(str, image_size(image)))} pixels but "
                                f"{annotation} says {stated[0]}x{stated[1]}; the files do not "
                                f"match, fetch the data set again")

    def target(self, i):
        """The annotation of image i in pixels, difficult objects included (for evaluation)."""
        ann = parse_voc_xml(self.annotations[i])
        return {"boxes": ann["boxes"], "labels": ann["labels"], "difficult": ann["difficult"]}

    def __getitem__(self, i):
        image = self.read(self.images[i])
        ann = parse_voc_xml(self.annotations[i])
        keep = torch.ones(len(ann["labels"]), dtype=torch.bool) if self.keep_difficult \
            else ~ann["difficult"]
        target = {"boxes": tv_tensors.BoundingBoxes(ann["boxes"][keep], format="XYXY",
                                                    canvas_size=self.canvas(image, self.images[i])),
                  "labels": ann["labels"][keep], "difficult": ann["difficult"][keep],
                  "image_id": i}
        return self.finish(image, target)


class SegmentationSet(FileImages):
    """(image, mask) pairs read from files; masks are int64 `tv_tensors.Mask`, 255 = ignore.

    `lut` maps the stored label values to training ids (Cityscapes); without it the values
    must already be class indices or 255 (VOC's palette PNGs), anything else is an error."""

    def __init__(self, images, masks, classes, transforms=None, lut=None):
        self.images, self.masks, self.classes = images, masks, classes
        self.transforms, self.lut = transforms, lut

    def __len__(self):
        return len(self.images)

    def validate(self, n=None):
        """Every image's and label image's header (or the first n pairs'), before any training:
        a missing or damaged file, or a label image of another size, fails the run at once."""
        for image, mask in list(zip(self.images, self.masks))[:n]:
            if image_size(image) != image_size(mask):
                raise DataError(f"label image {mask} is {'x'.join(map(str, image_size(mask)))}, "
                                f"its image {image} {'x'.join(map(str, image_size(image)))}; the "
                                f"files do not match")

    def __getitem__(self, i):
        image = self.read(self.images[i])
        mask = decode(read_bytes(self.masks[i]), self.masks[i], mode="UNCHANGED")
        mask = mask.as_subclass(torch.Tensor)[0].long() if len(mask) == 1 else mask.permute(1, 2, 0)
        if mask.ndim != 2 or mask.shape != self.canvas(image, self.images[i]):
            raise DataError(f"label image {self.masks[i]} is {tuple(mask.shape)}, its image is "
                            f"{self.canvas(image, self.images[i])}; the files do not match")
        if self.lut is not None:
            mask = self.lut[mask.clamp(0, len(self.lut) - 1)]
        bad = (mask >= len(self.classes)) & (mask != 255)
        if bad.any():
            raise DataError(f"label image {self.masks[i]} holds value {mask[bad][0].item()}, not "
                            f"a class index (0..{len(self.classes) - 1}) or 255; is it the "
                            f"palette PNG of SegmentationClass?")
        return self.finish(image, tv_tensors.Mask(mask))


def cityscapes_files(root, split):
    """(leftImg8bit images, gtFine labelIds) pairs of a Cityscapes split (manual download)."""
    base = os.path.join(root, "cityscapes")
    img_dir, gt_dir = os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)
    if not (os.path.isdir(img_dir) and os.path.isdir(gt_dir)):
        raise DataError(f"Cityscapes {split} not found in {base}: log in at cityscapes-dataset.com, "
                        f"download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip and "
                        f"unzip both in {base}")
    images, masks = [], []
    for city in sorted(os.listdir(img_dir)):
        for f in sorted(os.listdir(os.path.join(img_dir, city))):
            if f.endswith("_leftImg8bit.png"):
                images.append(os.path.join(img_dir, city, f))
                gt = f.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                masks.append(os.path.join(gt_dir, city, gt))
                if not os.path.exists(masks[-1]):
                    raise DataError(f"Cityscapes label {masks[-1]} is missing for {images[-1]}; "
                                    f"unzip gtFine_trainvaltest.zip in {base}")
    return images, masks


def detection_dataset(name, split, data_dir=None, download=True, transforms=None, quick=False,
                      size=64, seed=0, train_difficult=False):
    """`voc`: "train" = VOC2007 trainval + VOC2012 trainval (difficult objects dropped unless
    `train_difficult`, as SSD's release trains on them), "test" = VOC2007 test (difficult kept,
    flagged, for evaluation). `shapes-det`: the synthetic set."""
    check_task(name, "detection")
    if name == "shapes-det":
        return ShapesDataset("shapes-det", split, size=size, seed=seed, transforms=transforms,
                             quick=quick)
    check_split(name, split, ("train", "test"))
    root = data_dir or default_data_dir()
    if split == "test":
        ds = VOCDetectionSet(root, "2007", "test", download, transforms, keep_difficult=True)
    else:
        parts = [VOCDetectionSet(root, y, "trainval", download, transforms,
                                 keep_difficult=train_difficult) for y in ("2007", "2012")]
        ds = ConcatDataset(parts)
        ds.classes = VOC_CLASSES
    left = 256 if quick else None  # what the run will read, checked now
    for part in ds.datasets if isinstance(ds, ConcatDataset) else (ds,):
        part.validate(left)
        left = None if left is None else max(0, left - len(part))
    if quick:
        sub = Subset(ds, list(range(min(len(ds), 256))))
        sub.classes = VOC_CLASSES
        return sub
    return ds


def segmentation_dataset(name, split, data_dir=None, download=True, transforms=None, quick=False,
                         size=64, seed=0):
    """`voc-seg`: VOC2012 SegmentationClass, "train" = train, "test" = val (the test labels are
    not public; FCN reports on val). `cityscapes`: fine annotations, "train" = train, "test" =
    val, 19 classes. `shapes-seg`: the synthetic set (0 = background)."""
    check_task(name, "segmentation")
    if name == "shapes-seg":
        return ShapesDataset("shapes-seg", split, size=size, seed=seed, transforms=transforms,
                             quick=quick)
    check_split(name, split, ("train", "test"))
    root = data_dir or default_data_dir()
    official = "train" if split == "train" else "val"
    if name == "voc-seg":
        images, masks = _voc_files(root, "2012", official, "segmentation", download)
        ds = SegmentationSet(images, masks, VOC_SEG_CLASSES, transforms)
    else:
        lut = torch.full((256,), 255, dtype=torch.int64)
        for label_id, train_id in CITYSCAPES_TRAIN_ID.items():
            lut[label_id] = train_id
        ds = SegmentationSet(*cityscapes_files(root, official), CITYSCAPES_CLASSES, transforms, lut)
    if quick:
        ds.images, ds.masks = ds.images[:64], ds.masks[:64]
    ds.validate()  # every file the run will read, before its first step
    return ds


def detection_transforms(train, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A plain detection pipeline (flip, resize to size x size, normalise); boxes follow through
    tv_tensors. The papers' own augmentations (YOLO, SSD) are built in their scripts."""
    ops = [v2.ToImage()]
    if train:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True),
            Normalize(mean, std)]
    if train:
        ops.append(v2.SanitizeBoundingBoxes(labels_getter=box_fields))
    return v2.Compose(ops)


def box_fields(sample):
    """For SanitizeBoundingBoxes: the per-box tensors to drop along with degenerate boxes."""
    target = sample[1]
    return tuple(target[k] for k in ("labels", "difficult") if k in target)


def segmentation_transforms(train, crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            scale=(0.5, 2.0)):
    """Training: flip; with `crop`, rescale the image to fit crop x crop times a random factor in
    `scale`, then a random crop padded with 0 in the image and 255 (ignore) in the mask.
    Evaluation: the full image, only normalised (FCN evaluates whole images)."""
    ops = [v2.ToImage()]
    if train:
        ops += [v2.RandomHorizontalFlip()]
        if crop:
            ops += [v2.ScaleJitter((crop, crop), scale_range=scale, antialias=True),
                    v2.RandomCrop(crop, pad_if_needed=True,
                                  fill={tv_tensors.Image: 0, tv_tensors.Mask: 255})]
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            Normalize(mean, std)]
    return v2.Compose(ops)


def detection_collate(batch):
    """Images stacked when they share a size (else a list) and the targets as a list."""
    images, targets = zip(*batch)
    if all(im.shape == images[0].shape for im in images):
        images = torch.stack([im.as_subclass(torch.Tensor) for im in images])
    return images, list(targets)


# ----------------------------------------------------------------------------------------------
# Loaders: the standard DataLoader path and the in-memory device loader

def distributed_info():
    """(rank, world_size): (0, 1) unless torch.distributed is initialised (torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(torch.utils.data.Sampler):
    """The training order of (seed, epoch) and nothing else: a permutation of the set drawn from
    a generator seeded with (seed, epoch) (DistributedSampler's), rank r of W taking every W-th
    index (the last incomplete round dropped, so every rank takes as many steps). It yields
    (index, epoch) pairs, which `Seeded` turns into a per-sample random state: whichever worker
    process loads a sample, persistent or new, its augmentation is the same, so a resumed run
    sees exactly the batches of an uninterrupted one."""

    def __init__(self, n, seed=0, rank=0, world=1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler
        order = torch.randperm(self.n, generator=g)[:len(self) * self.world]
        return iter([(int(i), self.epoch) for i in order[self.rank::self.world]])


class Seeded(Dataset):
    """A training set whose sample i of epoch e is drawn under the random state of
    (seed, epoch, i) (`EpochSampler` passes (i, e)): torch's generator, which torchvision's
    transforms use, is seeded for that one sample (in the main process inside a fork of it, so
    the training's own random stream is untouched). Only the CPU generator: torch.manual_seed
    would also re-seed every CUDA generator (dropout's) at each sample. Attributes pass through
    to the set."""

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # e.g. .classes; never Subset's __getitems__ (keys are pairs)
        if name in ("dataset", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        i, epoch = key
        state = (self.seed * 1_000_003 + epoch) * 1_000_003 + i
        if torch.utils.data.get_worker_info() is not None:  # a worker's own generator
            torch.default_generator.manual_seed(state)
            sample = self.dataset[i]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(state)
                sample = self.dataset[i]
        return (*sample, state) if is_encoded(sample) else sample  # --gpu-decode: seeded later


def is_encoded(sample):
    """Whether a sample is a `FileImages.encoded` one, ((bytes, path), target), still to decode."""
    return isinstance(sample[0], tuple)


def file_sets(dataset):
    """The `FileImages` sets inside a data set's wrappers (Subset, Seeded, ConcatDataset, any
    other set that keeps the set it wraps in `.dataset`, e.g. yolo.YoloSet)."""
    while not isinstance(dataset, (FileImages, ConcatDataset)) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if isinstance(dataset, ConcatDataset):
        return [s for part in dataset.datasets for s in file_sets(part)]
    return [dataset] if isinstance(dataset, FileImages) else []


def float_stage(transform):
    """(the uint8 steps, (ToDtype, PCAColour or None, Normalize)) of a v2.Compose chain that
    ends in ToDtype(float32, scale=True), [data.PCAColour], data.Normalize (every ImageNet
    training chain here), else None."""
    steps = list(getattr(transform, "transforms", []))
    k = next((i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype)), None)
    if k is None or not (steps[k].dtype is torch.float32 and steps[k].scale):
        return None
    tail = steps[k + 1:]
    if [type(t) for t in tail] == [Normalize]:
        return v2.Compose(steps[:k]), (steps[k], None, tail[0])
    if [type(t) for t in tail] == [PCAColour, Normalize]:
        return v2.Compose(steps[:k]), (steps[k], tail[0], tail[1])
    return None


def encoded_collate(batch):
    """A batch of encoded samples ((bytes, path), target[, state]) as it leaves a DataLoader
    worker: every file's bytes in ONE uint8 tensor with their offsets. Each tensor a worker sends
    travels as its own shared-memory file descriptor: one per file would exhaust a 1,024-fd limit
    at batch 512 (ImageNet's test loaders use 500)."""
    raws = [s[0][0] for s in batch]
    ends = torch.tensor([len(r) for r in raws]).cumsum(0)
    return (torch.cat(raws), [0, *ends.tolist()], [s[0][1] for s in batch],
            [s[1] for s in batch], [s[2] if len(s) > 2 else None for s in batch])


class DecodeOnDevice:
    """--gpu-decode: iterates a training loader whose samples are encoded files
    (`FileImages.encoded`, sent a batch at a time by `encoded_collate`), decodes each batch's
    JPEGs in one `torchvision.io.decode_jpeg(list, device=...)` call (other formats, and JPEGs
    that nvJPEG refuses, CMYK and 12-bit among them, on the CPU, then moved), runs every
    sample's transforms (`FileImages.apply`) there, under the sample's own random state (as
    `Seeded` does on the CPU), and collates with the loader's `collate_fn`. The CPU path stays the
    default and the reference: nvJPEG upsamples chroma otherwise than libjpeg, so pixels differ
    slightly (test splits are therefore always decoded on the CPU, see `make_loader`)."""

    def __init__(self, loader, apply, collate_fn, device):
        self.loader, self.apply, self.device = loader, apply, torch.device(device)
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.sampler, self.dataset, self.seed = loader.sampler, loader.dataset, loader.seed
        # A classification chain (one image list, default collate) ends in the same float stage
        # for every image: ToDtype, [PCA colour], Normalize, run here once on the whole batch.
        sets = file_sets(loader.dataset)
        self.stages = float_stage(sets[0].transform) if collate_fn is None and len(sets) == 1 \
            and isinstance(sets[0], _ImageList) and apply == sets[0].apply else None

    def __len__(self):
        return len(self.loader)

    def decode_one(self, raw, path):
        """One JPEG on the device, or on the CPU where the device's decoder refuses it (nvJPEG:
        CMYK, 12-bit); a file the CPU cannot decode either is named (DataError)."""
        try:
            return torchvision.io.decode_jpeg(raw, device=self.device,
                                              mode=torchvision.io.ImageReadMode.RGB)
        except RuntimeError:
            return decode(raw, path).as_subclass(torch.Tensor).to(self.device)

    def decode(self, files):
        """[(bytes, path)] -> uint8 images on the device."""
        jpeg = [i for i, (r, _) in enumerate(files) if bytes(r[:3].tolist()) == b"\xff\xd8\xff"]
        images = [None] * len(files)
        if jpeg:
            try:
                decoded = torchvision.io.decode_jpeg([files[i][0] for i in jpeg],
                                                     device=self.device,
                                                     mode=torchvision.io.ImageReadMode.RGB)
            except RuntimeError:  # one file refused: the batch again, file by file
                decoded = [self.decode_one(*files[i]) for i in jpeg]
            for i, x in zip(jpeg, decoded):
                images[i] = x
        return [tv_tensors.Image(x if x is not None else decode(*f).to(self.device))
                for x, f in zip(images, files)]

    def build(self, batch):
        """One batch from the workers' bytes: decoded, each sample transformed under its own
        random state, collated."""
        raw, offsets, paths, targets, states = batch
        files = [(raw[a:b], p) for a, b, p in zip(offsets, offsets[1:], paths)]
        if self.stages:
            return self.build_classification(files, targets, states)
        samples = []
        for image, target, state in zip(self.decode(files), targets, states):
            if isinstance(target, tv_tensors.Mask):
                target = target.to(self.device, non_blocking=True)
            if state is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(state)  # the CPU's alone
                    samples.append(self.apply(image, target))
            else:
                samples.append(self.apply(image, target))
        return self.collate_fn(samples)

    def build_classification(self, files, labels, states):
        """A classification batch: each image's uint8 steps under its own random state (then its
        PCA colour draw, as the float stage would make it next), the float stage once for the
        batch: the same numbers as image by image, with a few kernels instead of ~5 per image."""
        head, (to_float, pca, normalize) = self.stages
        images, shifts = [], []
        for image, state in zip(self.decode(files), states):
            with torch.random.fork_rng(devices=[]):
                if state is not None:
                    torch.default_generator.manual_seed(state)  # the CPU's alone
                images.append(head(image).as_subclass(torch.Tensor))
                if pca is not None:  # PCAColour's draw, its shift made on the CPU
                    alpha = torch.randn(3) * pca.alphastd
                    shifts.append(pca_colour(torch.zeros(3, 1, 1), pca.eigval, pca.eigvec, alpha))
        x = tv_tensors.Image(to_float(tv_tensors.Image(torch.stack(images))))
        if shifts:
            x = x + torch.stack(shifts).to(x.device, non_blocking=True)
        return normalize(tv_tensors.Image(x)).as_subclass(torch.Tensor), torch.tensor(labels)

    def __iter__(self):
        """On CUDA, batch k + 1 is decoded and transformed on a stream of its own while the
        training step of batch k runs on the default stream; the default stream waits for it
        only when it takes the batch, and the batch's tensors are marked as used there (so that
        the allocator does not hand their memory out while the step still reads them)."""
        if self.device.type != "cuda":
            yield from map(self.build, self.loader)
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ahead = None
        for batch in self.loader:
            side.wait_stream(main)  # what the step of the batch before freed may be reused
            with torch.cuda.stream(side):
                built = self.build(batch)
            if ahead is not None:
                yield ahead
            main.wait_stream(side)
            _record_stream(built, main)
            ahead = built
        if ahead is not None:
            yield ahead


def _record_stream(x, stream):
    """Mark every CUDA tensor in a (nested) batch as used on `stream` (Tensor.record_stream;
    the CPU tensors, e.g. labels, are copied by the training loop)."""
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            x.record_stream(stream)
    elif isinstance(x, dict):
        for v in x.values():
            _record_stream(v, stream)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _record_stream(v, stream)


def make_loader(dataset, batch_size, train, workers=2, device="cpu", collate_fn=None, seed=0,
                drop_last=None, shard=True, gpu_decode=False):
    """A DataLoader. Training: `EpochSampler` + `Seeded`, so the order and every sample's
    augmentation depend on (seed, epoch, sample) only (call `set_epoch(loader, epoch)` at each
    epoch): the same with 0 or N workers, persistent or not, resumed or not; under torchrun each
    rank takes its 1/world of every epoch. Evaluation: in order, and under torchrun split
    without padding (rank r: samples r, r + W, ...; `gather_shards` puts every rank's outputs
    back in the set's order). `batch_size` is per process. `shard=False` gives every rank the
    whole set. `gpu_decode` (a set read from image files): in training the workers read the
    files' bytes and `DecodeOnDevice` decodes and augments the batches on `device`; evaluation
    loaders decode on the CPU all the same (nvJPEG's pixels differ slightly from libjpeg's: a
    test figure must not depend on the flag)."""
    gpu_decode = gpu_decode and train
    rank, world = distributed_info() if shard else (0, 1)
    workers = min(workers, os.cpu_count() or 1)  # more processes than cores only slow it down
    sampler = range(rank, len(dataset), world) if world > 1 else None
    given, sets = dataset, file_sets(dataset) if gpu_decode else []
    if gpu_decode and not sets:
        raise DataError("--gpu-decode decodes image files; this data set is held in memory as "
                        "tensors (nothing to decode): drop --gpu-decode")
    for s in sets:
        s.encoded = True
    if train:
        dataset, sampler = Seeded(dataset, seed), EpochSampler(len(dataset), seed, rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=encoded_collate if sets else collate_fn,
                        pin_memory=torch.device(device).type == "cuda" and not sets,
                        drop_last=train if drop_last is None else drop_last,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # not the global one
    loader.seed = seed
    if not sets:
        return loader
    # The transforms of the outermost set that has its own (e.g. yolo.YoloSet), else the files'.
    return DecodeOnDevice(loader, getattr(given, "apply", sets[0].apply), collate_fn, device)


def gather_shards(*parts):
    """Under torchrun, every rank's evaluation outputs put back together in the set's order (rank r
    evaluated samples r, r + W, ...: an evaluation loader's share): each part is a tensor (rows)
    or a list (items), one per sample; every rank gets the whole set (tensors on the CPU). A
    single process gets its arguments back."""
    rank, world = distributed_info()
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(
            gathered, [p.cpu() if isinstance(p, torch.Tensor) else list(p) for p in parts])
        joined = []
        for i, p in enumerate(parts):
            pieces = [g[i] for g in gathered]
            n = sum(len(q) for q in pieces)
            full = p.new_empty((n, *p.shape[1:]), device="cpu") if isinstance(p, torch.Tensor) \
                else [None] * n
            for r, q in enumerate(pieces):
                full[r::world] = q
            joined.append(full)
        parts = tuple(joined)
    return parts if len(parts) > 1 else parts[0]


def set_epoch(loader, epoch):
    """Re-seed the shuffling (and the workers' seeds) of either kind of loader for `epoch`: the
    order of an epoch depends on (seed, epoch) only, so a resumed run sees the same batches as an
    uninterrupted one, and under torchrun the shards change every epoch."""
    loader = loader.loader if isinstance(loader, FirstBatches) else loader  # --dry-run's cut
    target = loader if isinstance(loader, DeviceLoader) else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def random_crop_flip(x, padding, flip=True, generator=None):
    """Batched on-device augmentation: zero-pad by `padding`, crop back to the input size at a
    random offset per image, mirror half of the images. x (N, C, H, W) float."""
    n, _, h, w = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = x.gather(2, rows.expand(n, x.shape[1], h, x.shape[3]))
        x = x.gather(3, cols.expand(n, x.shape[1], h, w))
    if flip:
        m = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def check_fits(nbytes, device, name, fix):
    """A one-line DataError when `nbytes` asked into the memory of a CUDA `device` exceed what is
    free there (with 10 % kept for the network and its activations)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.9 * free:
        raise DataError(f"{name} needs {nbytes / 2**30:.1f} GiB on {device}, which has "
                        f"{free / 2**30:.1f} GiB free; {fix}")


class DeviceLoader:
    """The whole set as one uint8 tensor on the training device, batched, normalised and augmented
    there: no per-sample Python, no host-to-device copy per batch (the lecture's remark that the
    DataLoader is inefficient for sets that fit in memory; see bench/bench_loader.py).
    Under torchrun an evaluation loader gives rank r the samples r, r + W, ... (`gather_shards`);
    `shard=False` gives every rank the whole set.

    Yields (float images normalised with mean/std, labels). `augment` is None, a dict
    {"padding": p, "flip": bool} for `random_crop_flip`, or a script's own function
    f(images in [0, 1], generator) -> images, applied to each batch (LeNet-5's distortions). Shuffling is seeded by (seed, epoch) and,
    under torchrun, each rank takes its interleaved share of the same permutation, like
    DistributedSampler (drop_last in training so that every rank has the same number of batches);
    the augmentation's draws are seeded with the rank too (each rank's crops and flips its own).

    Only the small sets go here (MNIST, Fashion-MNIST: 47 MB; CIFAR: 150 MB; shapes; uint8):
    a set that would not fit in the device's free memory is refused with one line
    (`check_fits`), and the file-backed sets (ImageNet, VOC, Cityscapes) never come here.
    """

    def __init__(self, images, labels, batch_size, train, device="cpu", mean=None, std=None,
                 augment=None, seed=0, drop_last=None, shard=True, name="the data set"):
        self.device = torch.device(device)
        check_fits(images.nbytes + labels.nbytes, self.device, name,
                   "use a smaller --img-size or --limit, or run on a larger GPU")
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        c = images.shape[1]
        self.mean = torch.tensor(mean if mean is not None else (0.0,) * c,
                                 device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std if std is not None else (1.0,) * c,
                                device=self.device).view(1, c, 1, 1)
        self.batch_size, self.train, self.augment = batch_size, train, augment if train else None
        self.seed, self.epoch = seed, 0
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world = distributed_info() if shard else (0, 1)
        self.dataset = self.images  # len(loader.dataset), as with a DataLoader

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world > 1 and not self.train:  # rank r: r, r + W, ... (see gather_shards)
            idx = idx[self.rank::self.world]
        elif self.world > 1:
            per_rank = n // self.world if self.drop_last else math.ceil(n / self.world)
            idx = torch.cat([idx, idx[:per_rank * self.world - n]]) if per_rank * self.world > n \
                else idx[:per_rank * self.world]
            idx = idx[self.rank::self.world]
        return idx.to(self.device)

    def __len__(self):
        n = len(self._indices()) if self.world > 1 else len(self.labels)  # this rank's share
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        g = None
        if self.augment:  # rank r's own draws (rank 0's as a single process's)
            g = torch.Generator(device=self.device).manual_seed(
                self.seed * 100003 + self.epoch + 1 + 1_000_000_007 * self.rank)
        for b in range(len(self)):
            j = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[j].float().div_(255)
            if callable(self.augment):
                x = self.augment(x, g)
            elif self.augment:
                x = random_crop_flip(x, self.augment.get("padding", 0),
                                     self.augment.get("flip", False), generator=g)
            yield (x - self.mean) / self.std, self.labels[j]


def classification_loaders(name, batch_size, device="cpu", data_dir=None, download=True,
                           quick=False, seed=0, augment=True, workers=2, eval_batch_size=500,
                           train_split="train", size=None, square=False, limit=None,
                           test_only=False, stats=None, gpu_decode=False):
    """(train, val, test) loaders and an info dict for a classification set.

    In-memory sets (MNIST, CIFAR, shapes) get `DeviceLoader`s normalised with the statistics of
    their own training images; `train_split` "trainval" (the whole official training set, as the
    papers train) gives no val loader, "train" holds the val split out (`add_holdout_arg`); ImageNet gets DataLoaders with `classification_transforms` (val is
    None: the official validation set is the test set). `batch_size` is per process; under
    torchrun each rank evaluates its share of the evaluation sets (`gather_shards`). `augment`: True for
    `augment_for(name)`, False, or a script's own {"padding", "flip"} or function (in-memory
    sets only: `DeviceLoader`).
    `test_only` (--eval-only): only the test split is read (train and val are None); an
    in-memory set then takes `stats` (mean, std: a checkpoint's "normalisation") and without
    them reads the training images for their statistics only. `gpu_decode`: ImageNet's JPEGs
    decoded and augmented on `device` (`make_loader`); an in-memory set has nothing to decode.
    info = {"classes", "mean", "std", "in_channels", "image_size", "sizes": (train, val, test)}."""
    check_task(name, "classification")
    if name == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        test_set = classification_dataset(name, "test", data_dir, download, quick=quick,
                                          transform=classification_transforms(name, False, mean,
                                                                              std, size))
        test = make_loader(test_set, eval_batch_size, False, workers, device,
                           gpu_decode=gpu_decode)
        train_set, train = [], None
        if not test_only:
            train_set = classification_dataset(
                name, "train", data_dir, download, quick=quick,
                transform=classification_transforms(name, augment, mean, std, size, square))
            train = make_loader(train_set, batch_size, True, workers, device, seed=seed,
                                gpu_decode=gpu_decode)
        classes = getattr(test_set, "names", None) or getattr(test_set.dataset, "names")
        info = {"classes": classes, "mean": mean, "std": std, "in_channels": 3,
                "image_size": size or 224, "sizes": (len(train_set), 0, len(test_set))}
        return train, None, test, info
    if gpu_decode:
        raise DataError(f"--gpu-decode decodes image files; {name} is held in memory as tensors "
                        f"(nothing to decode): drop --gpu-decode")
    # The data (shapes images, the held-out split) are fixed; `seed` only shuffles and augments.
    kw = dict(data_dir=data_dir, download=download, quick=quick, size=size or 32, limit=limit)
    x_test, y_test, classes = classification_arrays(name, "test", **kw)
    train = val = None
    n_train = n_val = 0  # "trainval": the held-out images are in the training set
    if test_only and stats is not None:
        mean, std = (tuple(map(float, s)) for s in stats)
    else:
        x, y, _ = classification_arrays(name, train_split, **kw)
        mean, std = channel_stats(x)
    if not test_only:
        if augment is True:
            augment = augment_for(name)
        train = DeviceLoader(x, y, batch_size, True, device, mean, std, augment or None,
                             seed=seed, name=f"{name}'s training images")
        n_train = len(y)
        if train_split == "train":
            x_val, y_val, _ = classification_arrays(name, "val", **kw)
            val = DeviceLoader(x_val, y_val, eval_batch_size, False, device, mean, std,
                               name=f"{name}'s validation images")
            n_val = len(y_val)
    test = DeviceLoader(x_test, y_test, eval_batch_size, False, device, mean, std,
                        name=f"{name}'s test images")
    info = {"classes": classes, "mean": mean, "std": std, "in_channels": x_test.shape[1],
            "image_size": x_test.shape[-1], "sizes": (n_train, n_val, len(y_test))}
    return train, val, test, info


def augment_for(name):
    """The on-device training augmentation that matches `classification_transforms(name, True)`."""
    if name in ("mnist", "fashion-mnist"):
        return {"padding": 3, "flip": name != "mnist"}
    return {"padding": 4, "flip": True}


# ----------------------------------------------------------------------------------------------
# Devices, torchrun and checkpoints: what every script does before and around its data

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `SCRIPT.py: error: MESSAGE (see --help)`, exit code 2,
    instead of the usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    AT_LEAST = {"workers": 0, "log_every": 1, "limit": 1, "eval_every": 0}  # the runtime flags' lowest values

    def parse_known_args(self, args=None, namespace=None):
        """Every number given on the command line is finite (`--lr nan` or `--lr inf` would
        otherwise pass a `> 0` check and train on NaNs); loader and logging flags are in range
        (`--workers -1` would reach the DataLoader as a traceback). The result is an `Args`,
        whose `given` names the flags typed (`adopt_checkpoint` holds them to a checkpoint's)."""
        ns, extra = super().parse_known_args(args, Args() if namespace is None else namespace)
        if isinstance(ns, Args):  # parsed again with no defaults: what is left was typed
            defaults = [(a, a.default) for a in self._actions]
            saved, self._defaults = self._defaults, {}
            try:
                for a, _ in defaults:
                    a.default = argparse.SUPPRESS
                typed, _ = super().parse_known_args(args, argparse.Namespace())
            finally:
                self._defaults = saved
                for a, d in defaults:
                    a.default = d
            ns.given = set(vars(typed))
        for name, least in self.AT_LEAST.items():
            value = getattr(ns, name, None)
            if value is not None and value < least:
                self.error(f"--{name.replace('_', '-')} {value}: must be {least} or more")
        for name, value in vars(ns).items():
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    self.error(f"--{name.replace('_', '-')} {v}: must be a finite number")
        return ns, extra


class Args(argparse.Namespace):
    """Parsed flags. `given`, the flags typed on the command line, is a slot: it stays out of
    vars(args), so out of results.json and checkpoints."""
    __slots__ = ("given",)


# The runtime flags every script takes, with the same names and meanings (the README lists them
# once; tests/test_runtime.py holds every script's --help to this tuple).
FILE_DATA = ("imagenet", "voc", "voc-seg", "cityscapes")  # read from image files (--gpu-decode)
RUNTIME_FLAGS = ("--data", "--data-dir", "--no-download", "--device", "--cuda", "--workers",
                 "--seed", "--out", "--resume", "--overwrite", "--eval-only", "--weights",
                 "--pretrained", "--amp", "--channels-last", "--compile", "--deterministic",
                 "--log-every", "--eval-every", "--quick", "--dry-run", "--gpu-decode")
DRY_RUN_STEPS = 2  # --dry-run: training steps and evaluation batches


def add_data_args(p, default, sets):
    """--data (`sets`: the data sets this script reads, as `a | b | c`), --data-dir, --no-download:
    the first group of every script's --help."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help=f"{sets} (default: {default or 'see the script'})")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="data root (default: $PYTORCH_DATA_DIR or ./data)")
    g.add_argument("--no-download", action="store_true", help="never download a data set")
    return g


def add_classify_arg(p, k=5, needs="--weights or --pretrained"):
    """--classify PATH of every classification script (`classify_images`)."""
    p.add_argument("--classify", metavar="PATH",
                   help=f"an image or a folder of them: the {k} likeliest classes of each, "
                   f"printed and drawn into --out with predictions.json/.csv (needs {needs})")


def machine_workers():
    """The DataLoader workers a run of the file data sets gets by default: the cores this process
    may use, shared among the processes torchrun starts on this machine (LOCAL_WORLD_SIZE).
    Measured (bench/bench_input.py --loader, AlexNet's chain, batch 32, 2-core CPU): 0 workers
    143-148 images/s, 1 worker 112-135, 2 workers 185-192; a prefetch_factor of 4 instead of 2
    gave no steady gain (179-190), so DataLoader's 2 is kept."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


MACHINE = "machine"  # add_runtime_args(workers=MACHINE): machine_workers() by default


def add_runtime_args(p, quick, *, workers=2, workers_help=None, log_every=100,
                     weights_help="a checkpoint or state_dict to start from (its model only)",
                     pretrained_help="start from torchvision's ImageNet weights",
                     pretrained_is_the_model=True):
    """The runtime flags (RUNTIME_FLAGS but the data ones), the last group of every script's
    --help. `quick`: the --quick help text (`quick_help(QUICK)`, so help and behaviour agree)."""
    g = p.add_argument_group("runtime (the same flags in every script)")
    if workers == MACHINE:
        workers = machine_workers()
        workers_help = workers_help or ("DataLoader processes for the sets read from image files "
                                        "(default: the cores per process, " f"{workers} here)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: the best "
                   "available)")
    g.add_argument("--cuda", action="store_true", help="run on the GPU; an error if there is none")
    g.add_argument("--workers", type=int, default=workers,
                   help=workers_help or f"DataLoader processes (default: {workers})")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed; under torchrun rank r uses seed + r (default: 0)")
    g.add_argument("--out", default=None, help="the run's folder: results.json, checkpoint.pt "
                   "(default: runs/SCRIPT-DATA)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "checkpoint.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such a folder is refused)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --weights" + (" (or --pretrained)" if pretrained_is_the_model
                                                else "") + " on the test split, no training")
    g.add_argument("--weights", default=None, help=weights_help)
    g.add_argument("--pretrained", action="store_true", help=pretrained_help)
    g.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 on GPUs without bf16)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms); "
                   "without it CUDA runs use cuDNN autotuning and TF32 matmuls")
    g.add_argument("--log-every", type=int, default=log_every,
                   help=f"training steps between progress lines (default: {log_every})")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also evaluate the test split after every N epochs, for the curves "
                   "(history and curves.png: the paper's test-error plots); nothing is chosen "
                   "on it (default: 0, the test split once, at the end)")
    g.add_argument("--quick", action="store_true", help=quick)
    g.add_argument("--dry-run", action="store_true",
                   help=f"the run's own settings and data, but {DRY_RUN_STEPS} training steps per "
                   f"stage and {DRY_RUN_STEPS} evaluation batches: checks in minutes that the "
                   "whole run, checkpoint and results.json included, works")
    g.add_argument("--gpu-decode", action="store_true",
                   help="decode the JPEG files of a file data set (ImageNet, VOC, Cityscapes) on "
                   "the GPU (torchvision.io.decode_jpeg) and augment there; CUDA only; default: "
                   "the workers decode and augment on the CPU")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs as if killed, without testing (to try "
                   "--resume)")
    return g


def eval_due(args, epoch):
    """--eval-every N: whether the test split is evaluated after `epoch` (0-based) for the
    curves. Its figures go into the history only: no epoch, checkpoint or setting is chosen on
    them, and the final test is made as without the flag."""
    every = getattr(args, "eval_every", 0) or 0
    return every > 0 and (epoch + 1) % every == 0


Runtime = collections.namedtuple("Runtime", ["device", "rank", "world", "is_main"])


def default_out(name, data_name):
    """`--out`'s default: runs/NAME-DATA (NAME: the script's, or its variant family's)."""
    name = os.path.splitext(os.path.basename(name))[0]
    return os.path.join("runs", f"{name}-{data_name}" if data_name else name)


def setup(args, script, pretrained_is_the_model=True, name=None):
    """Everything a script does between parsing its flags and reading data, in this order:
    the device (`--device`/`--cuda`), `--out` (default runs/NAME-DATA, NAME the script's unless
    given, e.g. googlenet.py's "nin" for NIN; runs/NAME-DATA-eval with --eval-only; checked by
    `start_run`
    before any data is read), the torchrun process group, the seed (rank r: seed + r), the
    kernels (`--deterministic`, else cuDNN autotuning and TF32 on CUDA) and `--dry-run` (at most
    one epoch; the script wraps its loaders with `dry_run_batches`). Sets args.world; returns
    Runtime(device, rank, world, is_main)."""
    device = select_device(args.device, args.cuda)
    if args.gpu_decode and device.type != "cuda":
        raise DataError(f"--gpu-decode decodes on a CUDA GPU and this run is on {device}: drop "
                        f"--gpu-decode (the CPU workers decode) or run with --cuda")
    if args.gpu_decode and args.data not in FILE_DATA:
        raise DataError(f"--gpu-decode decodes image files ({', '.join(FILE_DATA)}); {args.data} "
                        f"is held in memory as tensors (nothing to decode): drop --gpu-decode")
    if args.out is None:  # an evaluation of a run's checkpoint writes beside it, not over it
        args.out = default_out(name or script, args.data) + \
            ("-predictions" if predicting(args) else "-eval" if getattr(args, "eval_only", False)
             else "")
    start_run(args, pretrained_is_the_model)
    metrics.start_run(script)  # the code's commit and hashes as the run starts (results.json)
    rank, args.world = init_distributed(device)
    torch.manual_seed(args.seed + rank)  # the CPU and every CUDA device
    set_kernels(device, args.deterministic)
    if args.dry_run and hasattr(args, "epochs"):  # one epoch; 0 (a stage that is off) stays 0
        args.epochs = 1 if args.epochs is None else min(args.epochs, 1)
    return Runtime(device, rank, args.world, rank == 0)


# How a run runs, not what it trains or tests: never taken from a checkpoint (a resumed run may
# move to another device, worker count, precision or output folder).
HOW_IT_RUNS = ("data_dir", "no_download", "device", "cuda", "workers", "out", "resume",
               "overwrite", "eval_only", "weights", "pretrained", "amp", "channels_last",
               "compile", "deterministic", "log_every", "dry_run", "stop_after", "script",
               "gpu_decode")
# Taken from a resumed run's checkpoint unless given, and then free to differ: a run may be
# lengthened, or drawn or tested at another threshold.
MAY_DIFFER = ("epochs", "score_threshold", "nms_iou", "classify", "detect", "segment",
              "eval_every")


def predicting(args):
    """The run predicts on the user's images (--classify, --detect or --segment PATH)."""
    return any(getattr(args, k, None) for k in ("classify", "detect", "segment"))


def adopt_checkpoint(args, script, model_flags, may_differ=(), name=None):
    """A checkpoint is enough: call it first, right after parsing. `--resume` takes every setting
    of the run in --out (the checkpoint.pt there) but HOW_IT_RUNS; `--weights CKPT` (training
    from it, `--eval-only`, or predicting) takes the flags that build the network,
    `model_flags`, and when evaluating or predicting also `--data` unless given (evaluating on
    another set with the same classes stays possible). A flag typed on the command line that
    contradicts the checkpoint is a one-line error naming both values (MAY_DIFFER and the
    script's `may_differ`, e.g. its test scales, excepted: they are taken unless given). A
    bare state_dict (torchvision's weights, an older checkpoint) has no settings: nothing is
    taken. A checkpoint of another script is an error. Sets args.script (in results.json).
    Returns the checkpoint's state (None without --resume/--weights)."""
    given = getattr(args, "given", set())
    if getattr(args, "resume", False):
        path = os.path.join(args.out or default_out(name or script, args.data), "checkpoint.pt")
        if not os.path.isfile(path):
            raise DataError(f"--resume: {path} not found; give the --out (or --data) of the run "
                            f"to continue, or drop --resume")
        keys = None  # every saved setting
    elif getattr(args, "weights", None):
        path, keys = args.weights, list(model_flags) + (
            ["data", "epochs", *may_differ] if args.eval_only or predicting(args) else [])
    else:
        args.script = script
        return None
    state = load_checkpoint(path)
    saved = state.get("args")
    if isinstance(saved, dict) and saved.get("script") not in (None, script):
        raise DataError(f"{path} was written by {saved['script']}, not {script}; run "
                        f"{saved['script']} with it, or pass a checkpoint of {script}")
    if isinstance(saved, dict) and (saved.get("script") == script or keys is None):
        for k in (saved if keys is None else keys):
            if k in HOW_IT_RUNS or k not in saved or not hasattr(args, k):
                continue
            new, old = getattr(args, k), saved[k]
            if k in given and _plain(new) != _plain(old):
                if k in MAY_DIFFER or k in may_differ or (k == "data" and keys is not None):
                    continue
                raise DataError(f"{_flag(k, new)} contradicts {path}, trained with "
                                f"{_flag(k, old)}; drop {_flag(k)} (the checkpoint's value "
                                f"is used) or pass another checkpoint")
            if k not in given:
                setattr(args, k, list(old) if isinstance(old, tuple) else old)
    args.script = script
    return state


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _flag(name, value=argparse.SUPPRESS):
    """A flag as typed: `--width 0.25`, `--bn`, `no --bn` (False or None); no value: `--bn`."""
    flag = "--" + name.replace("_", "-")
    if value is argparse.SUPPRESS:
        return flag
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def set_kernels(device, deterministic):
    """`--deterministic`: only deterministic kernels (an op without one is an error naming it) and
    no autotuning; otherwise, on CUDA, cuDNN picks the fastest algorithms and float32 matmuls and
    convolutions use TF32 (Ampere and later; ~10 bits of mantissa in the products). Set on every
    call, so that one run in a process does not leak its choice into the next."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    torch.use_deterministic_algorithms(bool(deterministic))
    fast = device.type == "cuda" and not deterministic
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = not deterministic  # PyTorch's default: on


# Layers whose PyTorch kernels have no deterministic CUDA backward (torch.use_deterministic_
# algorithms' list: AvgPool3d, which LocalResponseNorm uses, and AdaptiveAvgPool2d), written with
# ops that have one. Several scripts' networks use them; their state_dicts are unchanged.

class LocalResponseNorm(torch.nn.Module):
    """nn.LocalResponseNorm across channels (AlexNet §3.3, GoogLeNet's Table 1), b = a / (k +
    alpha/n sum_{j in n channels} a_j^2)^beta, with the channel window summed by avg_pool2d
    instead of torch's avg_pool3d (whose CUDA backward is not deterministic): the same numbers
    (tests/test_runtime.py). It computes in float32 under --amp: squares of fp16 activations
    overflow above 255, and bf16's 8 bits of mantissa blur the window's sum."""

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            a = x.float()
            n, c = a.shape[:2]
            div = F.pad(a.mul(a).reshape(n, 1, c, -1), (0, 0, self.size // 2, (self.size - 1) // 2))
            div = F.avg_pool2d(div, (self.size, 1), stride=1).reshape(a.shape)
            return (a / div.mul(self.alpha).add(self.k).pow(self.beta)).to(x.dtype)

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def deterministic_cuda(x):
    """Whether `x` is computed under --deterministic on CUDA, where torch's kernels without a
    deterministic backward raise (tests replace this function to take that path on a CPU)."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=64)
def _pool_matrix(n_in, n_out, dtype, device):
    """(n_out, n_in) rows of adaptive average pooling along one axis: row i averages the inputs
    [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)), as F.adaptive_avg_pool2d. Made once per
    size and device (a copy to the GPU at every forward would wait for its queue)."""
    i = torch.arange(n_out)
    lo, hi = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in)
    m = ((j >= lo[:, None]) & (j < hi[:, None])).to(torch.float64)
    return (m / m.sum(1, keepdim=True)).to(device=device, dtype=dtype)


def adaptive_avg_pool2d(x, size, deterministic=None):
    """F.adaptive_avg_pool2d(x, size) that trains under --deterministic on CUDA: the input itself
    when it already has that size (AlexNet's 6x6 and GoogLeNet's aux 4x4 at 224), the mean for
    1x1, and otherwise, when deterministic kernels are asked for on CUDA, the same averages as
    two small matmuls (A_h x A_w^T, each row of A one output's window): deterministic, equal to
    torch's kernel up to float rounding. `deterministic`: None follows
    torch.are_deterministic_algorithms_enabled() on CUDA."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if size == (1, 1):
        return x.mean((-2, -1), keepdim=True)
    if deterministic is None:
        deterministic = deterministic_cuda(x)
    if not deterministic:
        return F.adaptive_avg_pool2d(x, size)
    a_h = _pool_matrix(x.shape[-2], size[0], x.dtype, x.device)
    a_w = _pool_matrix(x.shape[-1], size[1], x.dtype, x.device)
    return torch.matmul(torch.matmul(a_h, x), a_w.t())


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d through `adaptive_avg_pool2d` (same name, no parameters: torchvision's
    state_dicts load unchanged)."""

    def forward(self, x):
        return adaptive_avg_pool2d(x, self.output_size)


@contextlib.contextmanager
def no_autotune():
    """cuDNN autotuning off inside (restored after): where every batch has a new shape (FCN's
    whole images at batch 1, the dense multi-scale tests of VGG and OverFeat) each new shape
    would be benchmarked once and never reused, costing more than it gains."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class FirstBatches:
    """The first `n` batches of a loader (`--dry-run`); everything else (set_epoch, dataset,
    sampler) is the loader's own."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return min(self.n, len(self.loader))

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(len(self)):
            yield next(it)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def dry_run_batches(args, *loaders):
    """The loaders as given, or under `--dry-run` their first DRY_RUN_STEPS batches (None stays
    None)."""
    if not getattr(args, "dry_run", False):
        return loaders if len(loaders) > 1 else loaders[0]
    out = tuple(None if l is None else FirstBatches(l, DRY_RUN_STEPS) for l in loaders)
    return out if len(out) > 1 else out[0]


def wrap(model, args, **ddp_kwargs):
    """The network the training loop calls: DistributedDataParallel under torchrun, then
    torch.compile with `--compile`; `model` itself stays the unwrapped one to save and test."""
    net = model
    if args.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if args.compile:
        net = torch.compile(net)
    return net


def run_main(main, script):
    """Every script's `__main__`: a DataError/ValueError (bad input, a diverged run) is one line
    on stderr and exit 1, never a traceback; the torchrun process group is destroyed however
    main() ends (a run that stops early included)."""
    try:
        main()
    except (DataError, ValueError) as e:
        sys.exit(f"{script}: error: {error_line(e)}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def apply_quick(args, quick):
    """With --quick, every flag named in the script's QUICK dict that the user did not set takes
    its QUICK value (the first 2,000 / 500 images of the set and a step budget large enough to
    learn them); without --quick nothing changes."""
    if getattr(args, "quick", False):
        for name, value in quick.items():
            if getattr(args, name, None) is None:
                setattr(args, name, list(value) if isinstance(value, (list, tuple)) else value)


def add_holdout_arg(p, default=False, why=""):
    """--holdout / --no-holdout: train on the official training set minus the seeded validation
    split (VAL_FRACTION: 5k of CIFAR's 50k, 5k of MNIST's 60k) and report the val error every
    epoch, for tuning; by default (the papers' protocol) train on the whole training set and
    touch only the test set, once. results.json's config says which (holdout, sizes)."""
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=default,
                   help="hold the validation split out of the training set, for tuning "
                   f"(default: {'on' if default else 'off: the whole training set, as the paper'}"
                   f"{'; ' + why if why else ''})")


def add_limit_arg(p):
    """--limit N: only the first N images of each split (smoke tests of the whole code path in
    seconds; the figures mean nothing); ArgumentParser.AT_LEAST keeps it >= 1."""
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N images of each split of an in-memory set (smoke "
                   "tests: the figures mean nothing)")


def train_split(args):
    """The classification_loaders split that --holdout asks for; ImageNet has no held-out split
    here (its official val set is the test set), and no --limit."""
    if args.data == "imagenet" and args.holdout:
        raise DataError("--holdout: ImageNet has no held-out split here (its val set is the "
                        "test set); drop --holdout")
    if args.data == "imagenet" and getattr(args, "limit", None):
        raise DataError("--limit applies to the in-memory sets; on ImageNet use --quick")
    return "train" if args.holdout else "trainval"


def quick_help(quick, what="a run on the first 2,000 training / 500 test images"):
    """The --quick help text, generated from the QUICK dict so that help and behaviour agree."""
    flags = ", ".join(f"--{k.replace('_', '-')} "
                      f"{' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                      for k, v in quick.items())
    return f"{what} with {flags} (each unless given): minutes on a CPU"


def check_positive(args, *names):
    """A DataError for a numeric flag that is set but not > 0 (`--batch-size 0`, `--epochs -1`):
    checked before any default is filled in, so a 0 is never silently replaced by the default."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            flag = "--" + name.replace("_", "-")
            hint = "; to evaluate without training use --eval-only" if name == "epochs" else ""
            raise DataError(f"{flag} {value}: must be a positive number{hint}")


def select_device(device=None, cuda=False):
    """`--device` as given, `--cuda` (an error without a GPU: never a silent CPU run), else the
    best available: cuda, then mps, then cpu. Under torchrun each process takes its LOCAL_RANK
    GPU; `--device cuda:N` there (every rank on one GPU) and `--cuda` with a non-CUDA `--device`
    are one-line errors."""
    if cuda and device and not device.startswith("cuda"):
        raise DataError(f"--cuda asks for a GPU and --device {device} for another device; drop "
                        f"one of them")
    if device and device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise DataError(f"--device {device} under torchrun would put every process on one GPU; "
                        f"use --cuda (or --device cuda): each process takes its LOCAL_RANK GPU")
    if cuda or (device and device.startswith("cuda")):
        if not torch.cuda.is_available():
            raise DataError("--cuda/--device cuda given but no CUDA GPU is visible; drop the flag "
                            "to run on the CPU, or check the driver with nvidia-smi")
        if device in (None, "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise DataError(f"unknown device '{device}' ({e}); use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def caffe_param_groups(model, lr, weight_decay, bias_lr_mult=2.0):
    """The Caffe references' per-parameter rates (AlexNet's and GoogLeNet's `lr_mult: 2,
    decay_mult: 0` on every bias): the biases at `bias_lr_mult` x the lr without weight decay,
    every other trained parameter at the lr with `weight_decay`. The weights' group comes first
    (its lr is the one progress lines print).

    Normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) are in no Caffe
    reference these rates come from; sorted by name, BN's scale (`weight`) would be decayed and
    its shift (`bias`) take 2x the lr, a split neither BVLC nor torchvision makes. Both go to a
    third group, last, at the lr without weight decay: the common practice (torchvision's
    references' --norm-weight-decay 0; He et al. 2019, arXiv:1812.01187, §3.1 "no bias decay").
    A model without such layers (AlexNet) gets the two groups as before."""
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
                  torch.nn.modules.instancenorm._InstanceNorm)  # torchvision's references' list
    norm = {id(p) for m in model.modules() if isinstance(m, norm_types)
            for p in m.parameters(recurse=False)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if id(p) not in norm and not n.endswith("bias")],
               "lr": lr, "weight_decay": weight_decay},
              {"params": [p for n, p in named if id(p) not in norm and n.endswith("bias")],
               "lr": bias_lr_mult * lr, "weight_decay": 0.0}]
    norms = [p for _, p in named if id(p) in norm]
    return groups + ([{"params": norms, "lr": lr, "weight_decay": 0.0}] if norms else [])


@functools.lru_cache(maxsize=None)
def amp_dtype(device):
    """(dtype, why) of `--amp` on `device`: bf16 where the hardware has it (CPU; CUDA GPUs of
    compute capability 8.0 and later), fp16 with loss scaling on older GPUs (V100, T4).
    torch.cuda.is_bf16_supported() alone counts emulation, which would choose a bf16 that runs
    far slower on those GPUs and never take the fp16 + GradScaler path."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.bfloat16, f"bf16 autocast on {device.type}"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no emulation to count
        native = torch.cuda.is_bf16_supported()
    if native:
        return torch.bfloat16, "bf16 autocast: the GPU computes in bf16"
    return torch.float16, "fp16 autocast + loss scaling: the GPU has no bf16 units"


def autocast(device, enabled):
    """`--amp`: autocast to `amp_dtype(device)`."""
    return torch.autocast(device.type, dtype=amp_dtype(device)[0] if enabled else None,
                          enabled=enabled)


def grad_scaler(device, amp):
    """The loss scaler `--amp` needs: active only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=bool(amp) and
                                amp_dtype(device)[0] == torch.float16)


def init_distributed(device):
    """Join the torchrun process group when torchrun's variables are set (NCCL on GPU, gloo on
    CPU); returns (rank, world_size). A plain `python script.py` run stays single-process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return distributed_info()


def start_run(args, pretrained_is_the_model=True):
    """What every script checks before it reads data: `--eval-only` has weights to evaluate
    (`--weights`, or `--pretrained` where that flag loads the whole model rather than a base
    network to train from), and `--out` is usable (`prepare_out`)."""
    flag = "--eval-only" if getattr(args, "eval_only", False) else \
        next((f"--{k}" for k in ("classify", "detect", "segment") if getattr(args, k, None)),
             None)
    if flag and not (args.weights or (pretrained_is_the_model and
                                      getattr(args, "pretrained", False))):
        what = "--weights CKPT" + (" or --pretrained" if pretrained_is_the_model and
                                   hasattr(args, "pretrained") else "")
        raise DataError(f"{flag} needs {what}: without it " +
                        ("the test would score" if flag == "--eval-only" else "it would run") +
                        " an untrained network")
    prepare_out(args.out, args.resume, args.overwrite)


def prepare_out(folder, resume=False, overwrite=False):
    """Check, before any data is read or step is taken, that the run's output folder can be made
    and written: `--out` that is (or lies under) a regular file, or a folder that cannot be
    written, is a one-line error now, not a traceback at the first checkpoint hours later.
    Nothing is left behind (a test file is written and removed in the folder, or in the nearest
    folder above it that exists; the run creates its folder when it first writes). A folder that
    already holds a run (its results.json or checkpoint.pt) is refused unless `--resume`
    continues that run or `--overwrite` replaces it (even then its checkpoint is only ever
    replaced, atomically, by a newer good one: a failing run leaves it as it was)."""
    held = [f for f in ("results.json", "checkpoint.pt") if os.path.isfile(os.path.join(folder, f))]
    if held and not (resume or overwrite):
        raise DataError(f"--out {folder} already holds a run ({', '.join(held)}); pass --resume "
                        f"to continue it, --overwrite to replace it, or choose another --out")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"--out {folder}: {existing} is a file, in the way of the run's folder; "
                        f"choose another --out or move the file")
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise DataError(f"--out {folder}: cannot write in {existing} ({e.strerror or e}); choose "
                        f"a writable folder with --out")


def save_checkpoint(path, state):
    """torch.save to a temporary file, then an atomic rename: a kill never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def error_line(e):
    """The one line a script prints for a DataError/ValueError: the message's last line, without
    the "data.DataError: " a DataLoader worker's re-raised traceback puts in front of it."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    return re.sub(r"^[\w.]*(DataError|ValueError): ", "", line)


@local_rank_zero_first  # one download into the hub cache; the other ranks read it
def torchvision_weights(weights):
    """The state_dict of a torchvision weights enum member (e.g. VGG16_Weights.IMAGENET1K_V1),
    downloaded once into the torch hub cache; offline, a one-line DataError naming the file and
    where to put it (torch.hub's "Downloading ..." line is shown only when the download works)."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            state = weights.get_state_dict(progress=False)
        print(said.getvalue(), end="")
        return state
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:100]
        where = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise DataError(f"could not download torchvision's {type(weights).__name__}."
                        f"{weights.name} ({reason}); put {os.path.basename(weights.url)} in "
                        f"{where}, or drop --pretrained")


def load_checkpoint(path, arch=None):
    """Load a checkpoint written by `save_checkpoint` (or a bare state_dict, e.g. torchvision's
    weights) with weights_only=True. `arch`, when given, must match the checkpoint's "arch"."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found; give the path of a .pt file written by "
                        f"--out, or drop --resume/--weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise DataError(f"cannot read checkpoint {path} ({reason}); it is corrupt or not a "
                        f"PyTorch file")
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    if arch is not None and "arch" in state and state["arch"] != arch:
        raise DataError(f"checkpoint {path} is of '{state['arch']}', not '{arch}'; pass the "
                        f"flags it was trained with (--variant, --depth, --config...) or another "
                        f"checkpoint")
    return state


def rng_state():
    """This process's random state: the CPU generator's and, where CUDA is in use, every GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save_training_state(path, arch, model, optimizer, scheduler, scaler, epoch, args, history,
                        **extra):
    """The end-of-epoch checkpoint: everything `resume_training_state` needs to continue a killed
    run to the same weights (state_dicts of the unwrapped model, optimiser, scheduler and scaler,
    the epoch just finished, the arguments, the history so far, and every rank's RNG state).
    Call it on every rank: the RNG states are gathered, rank 0 writes. Under `--dry-run` the
    file is read back at once and compared with the model (a checkpoint that cannot be reloaded
    is found in minutes, not after the real run)."""
    rngs = [rng_state()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rngs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rngs, rng_state())
        if torch.distributed.get_rank() != 0:
            return
    save_checkpoint(path, {"arch": arch, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict(), "epoch": epoch, "args": args,
                           "rng": rngs, "history": history, **extra})
    if args.get("dry_run"):
        saved = load_checkpoint(path, arch)["model"]
        for k, v in model.state_dict().items():
            if k not in saved or not torch.equal(saved[k], v.cpu()):
                raise DataError(f"--dry-run: {path} does not give back {k} as saved; the "
                                f"checkpoint cannot be trusted")


def resume_training_state(path, arch, model, optimizer, scheduler, scaler):
    """Restore what `save_training_state` wrote; returns (first epoch to run, history). Each rank
    takes its own RNG state back (rank r the r-th; with another number of processes than the
    run had, rank r takes state r mod the saved count)."""
    state = load_checkpoint(path, arch)
    load_weights(model, state, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        # the lr of the epoch to come, from this run's schedule (which may scale with --epochs:
        # a run cut short by a smaller --epochs resumes on the longer run's schedule)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    if state["scaler"] and scaler.is_enabled():  # an fp16 run's; empty when it had none (bf16,
        scaler.load_state_dict(state["scaler"])  # CPU): the scaler then starts afresh
    rngs = state["rng"]
    if isinstance(rngs, torch.Tensor):  # a checkpoint of an earlier version: rank 0's CPU state
        rngs = [{"cpu": rngs}]
    set_rng_state(rngs[distributed_info()[0] % len(rngs)])
    return state["epoch"] + 1, state["history"]


def load_weights(model, state, path="checkpoint"):
    """load_state_dict with a one-line error naming the first mismatching tensor (e.g. a
    checkpoint trained with another number of classes) instead of a page of traceback."""
    state = state.get("model", state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DataError(f"{path} does not fit this model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; is it another architecture?")
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise DataError(f"{path} does not fit this model: {k} is {tuple(state[k].shape)} there "
                            f"and {tuple(v.shape)} here (another number of classes?)")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Command line: check that a data set is in place and look at it

def preview(dataset, path, n=16):
    """Write a grid of the first n samples (boxes drawn, masks overlaid) as a PNG."""
    tiles = []
    for i in range(min(n, len(dataset))):
        image, target = dataset[i]
        image = image.as_subclass(torch.Tensor)
        if image.is_floating_point():
            image = (image - image.amin()) / (image.amax() - image.amin() + 1e-8) * 255
        image = image.to(torch.uint8).expand(3, -1, -1)
        if isinstance(target, dict):
            names = [dataset.classes[k] for k in target["labels"]]
            image = torchvision.utils.draw_bounding_boxes(image, target["boxes"], names,
                                                          colors="yellow")
        elif isinstance(target, torch.Tensor) and target.ndim == 2:
            masks = torch.stack([target == k for k in range(1, len(dataset.classes))])
            image = torchvision.utils.draw_segmentation_masks(image, masks, alpha=0.5)
        tiles.append(v2.functional.resize(image, [128, 128], antialias=True))
    grid = torchvision.utils.make_grid(tiles, nrow=int(math.ceil(math.sqrt(len(tiles)))))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Check that a data set is in place: prints its splits "
                                "and classes and writes a preview grid of its first images.")
    p.add_argument("--data", default="shapes-det", help="data set name (default: shapes-det)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="root of the data sets (default: $PYTORCH_DATA_DIR or ./data)")
    p.add_argument("--split", default="test", help="split to preview (default: test)")
    p.add_argument("--no-download", action="store_true", help="never try to download")
    p.add_argument("--out", default="preview.png", help="preview image to write")
    args = p.parse_args(argv)
    try:
        task = task_of(args.data)
        kw = dict(data_dir=args.data_dir, download=not args.no_download)
        if task == "classification":
            ds = classification_dataset(args.data, args.split, **kw)
        elif task == "detection":
            ds = detection_dataset(args.data, args.split, **kw)
        else:
            ds = segmentation_dataset(args.data, args.split, **kw)
        print(f"{args.data} {args.split}: {len(ds)} images, {len(ds.classes)} classes: "
              f"{', '.join(map(str, ds.classes[:25]))}{' ...' if len(ds.classes) > 25 else ''}")
        preview(ds, args.out)
        print(f"preview written to {args.out}")
    except DataError as e:
        sys.exit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
