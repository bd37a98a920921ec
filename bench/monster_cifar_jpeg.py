"""What freezing buys in the lecture's fine-tuning example, measured offline on real images.

    python bench/monster_cifar_jpeg.py JPEG_DIR ALEXNET_CHECKPOINT OUT [extra monster flags]

JPEG_DIR holds the CIFAR-10 test images as <class>/NNNN.jpg (../shared/data/cifar10_test_jpg):
the first 800 images of each class become a training set, the other 200 the test set (8,000 /
2,000; with --holdout monster_finetune.py leaves 1/10 of them out, training on 7,200), written
as CIFAR-10 python batches under OUT/data. CIFAR's md5 check is skipped for these
re-made batches (they are not the published files). Then monster_finetune.py --compare runs the
same recipe frozen then fine-tuned, never frozen, and from scratch, from the AlexNet first layer in
ALEXNET_CHECKPOINT (any alexnet.py or torchvision checkpoint).
"""
import os
import pickle
import sys

import numpy as np
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monster_finetune  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_split(jpeg_dir, root, n_train=800):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    train, test = ([], []), ([], [])
    for label, name in enumerate(CLASSES):
        files = sorted(os.listdir(os.path.join(jpeg_dir, name)))
        for i, f in enumerate(files):
            img = np.asarray(Image.open(os.path.join(jpeg_dir, name, f)).convert("RGB"))
            row = img.transpose(2, 0, 1).reshape(-1)  # R, G, B planes, as CIFAR's batches
            part = train if i < n_train else test
            part[0].append(row)
            part[1].append(label)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train[1]))
    x, y = np.stack(train[0])[order], np.array(train[1])[order]
    for k, chunk in enumerate(np.array_split(np.arange(len(y)), 5)):
        with open(os.path.join(base, f"data_batch_{k + 1}"), "wb") as f:
            pickle.dump({"data": x[chunk], "labels": y[chunk].tolist()}, f)
    with open(os.path.join(base, "test_batch"), "wb") as f:
        pickle.dump({"data": np.stack(test[0]), "labels": test[1]}, f)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return len(y), len(test[1])


def main():
    jpeg_dir, alexnet_ckpt, out = sys.argv[1:4]
    root = os.path.join(out, "data")
    print("train / test images:", write_split(jpeg_dir, root))
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    monster_finetune.main(["--data", "cifar10", "--data-dir", root, "--no-download",
                           "--alexnet-weights", alexnet_ckpt, "--compare", "--out", out,
                           *sys.argv[4:]])


if __name__ == "__main__":
    main()
