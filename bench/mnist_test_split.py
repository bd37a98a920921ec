"""Make an MNIST data directory from the 10,000 real test digits of ../shared/data: the first
8,000 as the training set, the last 2,000 as the test set, in MNIST's idx layout, so that the
scripts can be measured on real digits on a machine without the MNIST training images.

    python bench/mnist_test_split.py /tmp/mnist8k
    python lenet5.py --data mnist --data-dir /tmp/mnist8k --no-download

Figures from this split are NOT comparable with the paper's (60k training digits): say so.
"""
import gzip
import os
import sys

import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "mnist", "raw")


def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape))
        f.write(array.tobytes())


def main(out):
    with gzip.open(os.path.join(SHARED, "t10k-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(SHARED, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    raw = os.path.join(out, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    write_idx(os.path.join(raw, "train-images-idx3-ubyte"), images[:8000])
    write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), labels[:8000])
    write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), images[8000:])
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), labels[8000:])
    print(f"wrote 8,000 training and 2,000 test digits to {raw}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/mnist_test_split.py OUT_DIR")
    main(sys.argv[1])
