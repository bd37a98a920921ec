"""Writers of small data sets in their real on-disk formats, so the real loading code is tested."""
import os
import pickle
import struct
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def write_idx(path, array):
    """MNIST's idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root, n_train=60, n_test=10, folder="MNIST", seed=0, labels=None):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y)
        out[prefix] = images, y
    return out


def write_cifar10(root, n_per_batch=4, seed=0):
    """cifar-10-batches-py: pickled dicts with 'data' (N, 3072: R, G, B planes) and 'labels'."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)  # str keys, as py2 pickles read with latin1
        out[name] = data, labels
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f)
    return out


def voc_xml(filename, width, height, objects):
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixel corners."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
        # a part with its own box, as VOC's person layout has: must not be read as an object box
        f"<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
        f"<ymax>2</ymax></bndbox></part></object>"
        for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename><size>"
            f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def write_voc(root, year="2007", image_set="test", images=None, seg=False):
    """A VOCdevkit/VOC<year> tree. images: {id: (w, h, objects)}; with seg, palette PNG masks
    (class index = rectangle of the first object, 255 border) and ImageSets/Segmentation."""
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for d in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation",
              "SegmentationClass"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h, objects) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(base, "JPEGImages", f"{i}.jpg"), quality=95)
        with open(os.path.join(base, "Annotations", f"{i}.xml"), "w") as f:
            f.write(voc_xml(f"{i}.jpg", w, h, objects))
        if seg:
            mask = np.zeros((h, w), np.uint8)
            name, x0, y0, x1, y1, _ = objects[0]
            mask[y0 - 1:y1, x0 - 1:x1] = data.VOC_SEG_CLASSES.index(name)
            mask[0, :] = 255
            png = Image.frombytes("P", (w, h), mask.tobytes())
            png.putpalette(data.voc_palette())
            png.save(os.path.join(base, "SegmentationClass", f"{i}.png"))
    sub = "Segmentation" if seg else "Main"
    with open(os.path.join(base, "ImageSets", sub, f"{image_set}.txt"), "w") as f:
        f.write("\n".join(images) + "\n")
    return base


@pytest.fixture
def voc_images():
    return {"000001": (64, 48, [("dog", 5, 6, 30, 40, 0), ("person", 33, 2, 60, 47, 1)]),
            "000002": (50, 40, [("car", 1, 1, 50, 40, 0)])}
