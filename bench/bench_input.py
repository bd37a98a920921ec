"""Images/s per CPU core of every paper's training and test input pipeline on real JPEGs: the
old path (PIL decodes, then the chain with torchvision's augmentation kernels) against the new
one (torchvision.io decodes to a uint8 tensor, then the same chain with the faster kernels of
yolo.ScaleTranslate, data.ColorJitterU8 and ssd.IoUCropIfBoxes: the same draws and outputs),
in the same run; and the cores each would need to feed a GPU at its published training rate.
With --device cuda, also the --gpu-decode path (the workers only
read the files; decode_jpeg and the chain run on the GPU).

    python bench/bench_input.py                      # CPU, one core: the table of the README
    python bench/bench_input.py --device cuda        # adds the GPU-decode path (one command)
    python bench/bench_input.py --loader             # DataLoader settings: workers, prefetch

The images are the 100 real VOC2012 JPEGs of ../shared/data/voc_sample (~500x375, like
ImageNet's): laid out as ImageNet class folders for the classification chains (symbolic links in
a temporary folder), read as VOC for the detection and segmentation chains (boxes, masks).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import alexnet  # noqa: E402,F401  (the papers' chains, from their scripts)
import data  # noqa: E402
import googlenet  # noqa: E402
import overfeat  # noqa: E402
import resnet  # noqa: E402
import resnext  # noqa: E402
import ssd  # noqa: E402
import vgg19  # noqa: E402
import yolo  # noqa: E402

VOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                   "voc_sample")
M, S = data.IMAGENET_MEAN, data.IMAGENET_STD

# Published single-GPU training rates (images/s) to size the CPU side against. NVIDIA
# DeepLearningExamples, 1x A100 80GB, mixed precision: ResNet-50 v1.5 2,470 (PyTorch/
# Classification/ConvNets/resnet50v1.5/README.md, "Training performance: NVIDIA DGX A100"),
# SSD300 v1.1 (ResNet-50 backbone) 724 at batch 128 (PyTorch/Detection/SSD/README.md). The
# others have no such published figure: scaled from ResNet-50's by forward GFLOPs per image
# (ResNet-50 4.1; AlexNet 0.72, VGG-19 19.6, GoogLeNet 1.5, OverFeat-fast 2.8, YOLO 448 ~20,
# FCN-8s on a 500x375 image ~100), which assumes the GPU is compute-bound: an estimate.
GPU_RATE = {"alexnet": (2470 * 4.1 / 0.72, "estimate"), "vgg19": (2470 * 4.1 / 19.6, "estimate"),
            "resnet": (2470, "NVIDIA, ResNet-50 AMP, A100"),
            "resnext": (2470 * 4.1 / 4.2, "estimate (ResNeXt-50 4.2 GFLOPs)"),
            "googlenet": (2470 * 4.1 / 1.5, "estimate"),
            "overfeat": (2470 * 4.1 / 2.8, "estimate"),
            "yolo": (2470 * 4.1 / 20, "estimate"), "ssd": (724, "NVIDIA, SSD300 AMP, A100"),
            "fcn": (2470 * 4.1 / 100, "estimate")}


def pil_load(path, mine=False):
    """The old decoder: PIL opens the file, converts it to RGB, and the array becomes a tensor."""
    with Image.open(path) as im:
        return tv_tensors.Image(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))


def imagenet_tree(folder, voc):
    """The VOC JPEGs as ImageNet class folders (train and val alike), as links."""
    jpegs = sorted(os.listdir(os.path.join(voc, "VOCdevkit", "VOC2012", "JPEGImages")))
    for split in ("train", "val"):
        for k, f in enumerate(jpegs):
            d = os.path.join(folder, "imagenet", split, f"n{k % 10:08d}")
            os.makedirs(d, exist_ok=True)
            os.symlink(os.path.join(voc, "VOCdevkit", "VOC2012", "JPEGImages", f),
                       os.path.join(d, f))
    return folder


def chains(tree, voc):
    """name -> (training set, test set) with each paper's own chains (from its script)."""
    def inet(train_tf, test_tf):
        return (data.imagenet_dataset("train", tree, train_tf),
                data.imagenet_dataset("test", tree, test_tf))

    def voc_det(train_tf, test_tf):
        return (data.VOCDetectionSet(voc, "2012", "val", transforms=train_tf),
                data.VOCDetectionSet(voc, "2012", "val", transforms=test_tf))

    seg = data._voc_files(voc, "2012", "val", "segmentation", False)
    yolo_train, yolo_test = voc_det(None, None)
    return {
        "alexnet": inet(data.classification_transforms("imagenet", True, M, S, square=True),
                        data.classification_transforms("imagenet", False, M, S)),
        "vgg19": inet(vgg19.imagenet_train_transform(256, 512, 224), data.normalised()),
        "resnet": inet(*resnet.imagenet_transforms(224)),
        "resnext": inet(*resnext.imagenet_transforms()),
        "googlenet": inet(googlenet.imagenet_train_transform(224), data.normalised()),
        "overfeat": inet(overfeat.imagenet_train_transform(231), data.normalised()),
        "yolo": (yolo.YoloSet(yolo_train, yolo.train_transforms(448, True), 7, 20),
                 yolo.YoloSet(yolo_test, yolo.train_transforms(448, False), 7, 20)),
        "ssd": voc_det(ssd.train_transforms(300, M, S), ssd.EvalTransform(300, M, S)),
        "fcn": (data.SegmentationSet(*seg, data.VOC_SEG_CLASSES, data.segmentation_transforms(False)),
                data.SegmentationSet(*seg, data.VOC_SEG_CLASSES, data.segmentation_transforms(False))),
    }


def rate(ds, n, seconds):
    """Samples/s of ds[i] in this process (one core: torch.set_num_threads(1)), cycling over
    the set for at least n samples and `seconds` seconds, after a warm-up pass of 5."""
    for i in range(5):
        ds[i % len(ds)]
    done, start = 0, time.perf_counter()
    while done < n or time.perf_counter() - start < seconds:
        torch.manual_seed(done)
        ds[done % len(ds)]
        done += 1
    return done / (time.perf_counter() - start)


def per_core(sets, n, seconds):
    """{chain: {split: {"pil", "tensor", "speedup"}}}: the old path and the new one, each
    chain's sets timed back to back in the order old, new, old, new, the better of each pair
    kept (one timing alone moved by up to 1.5x between runs here)."""
    out = {}
    for name, (train, test) in sets.items():
        out[name] = {}
        for split, ds in (("train", train), ("test", test)):
            old = new = 0.0
            for _ in range(2):
                old_path(True)
                old = max(old, rate(ds, n, seconds))
                old_path(False)
                new = max(new, rate(ds, n, seconds))
            out[name][split] = {"pil": old, "tensor": new, "speedup": new / old}
            print(f"{name:9s} {split:5s}  PIL {old:6.1f}  tensor {new:6.1f} img/s per core  "
                  f"x{new / old:.2f}", flush=True)
    return out


def gpu_rates(sets, device, batch, n):
    """Images/s of the --gpu-decode path (data.make_loader(gpu_decode=True), workers 0: this
    process reads the bytes, the device decodes and augments), per chain and split."""
    out = {}
    for name, (train, test) in sets.items():
        out[name] = {}
        for split, ds in (("train", train), ("test", test)):
            collate = yolo.collate if name == "yolo" else data.detection_collate \
                if name in ("ssd", "fcn") else None
            loader = data.make_loader(ds, batch, split == "train", 0, device, collate,
                                      drop_last=False, gpu_decode=True)
            done, start = 0, None
            while done < n:
                for b in loader:
                    if start is None:  # the first batch warms the decoder up
                        torch.cuda.synchronize(device)
                        start = time.perf_counter()
                        continue
                    done += len(b[-1]) if isinstance(b, (tuple, list)) else len(b)
                torch.cuda.synchronize(device)
            out[name][split] = done / (time.perf_counter() - start)
            print(f"{name:9s} {split:5s}  --gpu-decode {out[name][split]:7.1f} img/s "
                  f"(one process)", flush=True)
    return out


def loader_rates(train, seconds):
    """AlexNet's training chain through data.make_loader: images/s by workers and
    prefetch_factor (persistent workers, as make_loader makes them)."""
    out = {}
    for workers in range(0, (os.cpu_count() or 1) + 1):
        for prefetch in ((2, 4) if workers else (None,)):
            loader = data.make_loader(train, 32, True, workers, "cpu")
            if prefetch:  # read when the (persistent) workers start, at the first pass
                loader.prefetch_factor = prefetch
            done, start = 0, None
            while start is None or time.perf_counter() - start < seconds:
                for x, y in loader:
                    if start is None:
                        start = time.perf_counter()
                        continue
                    done += len(y)
            r = done / (time.perf_counter() - start)
            key = f"workers={workers}" + (f",prefetch={prefetch}" if prefetch else "")
            out[key] = r
            print(f"loader {key:22s} {r:6.1f} img/s", flush=True)
    return out


def step_times(sets, n=20):
    """Milliseconds per image of each step of every training chain (new decoder), on the first
    n images, and of the decoding itself: where a chain's time goes."""
    out = {}
    for name, (train, _) in sets.items():
        base = data.file_sets(train)[0]
        own = getattr(train, "transforms", None) if train is not base else None  # YoloSet's
        chain = own or getattr(base, "transforms", None) or getattr(base, "transform", None)
        times = {"decode": 0.0}
        for i in range(min(n, len(base))):
            kept = base.__dict__.pop("transforms", None), base.__dict__.pop("transform", None)
            base.transforms = base.transform = None  # the untransformed sample, decoded
            start = time.perf_counter()
            image, target = base[i]
            times["decode"] += time.perf_counter() - start  # with the annotation's parsing
            base.transforms, base.transform = kept
            x = image if isinstance(target, int) else (image, target) if \
                isinstance(target, tv_tensors.Mask) else \
                (image, {"boxes": target["boxes"], "labels": target["labels"]})
            for step in chain.transforms:
                start = time.perf_counter()
                x = step(*x) if isinstance(x, tuple) else step(x)
                key = type(step).__name__
                times[key] = times.get(key, 0.0) + time.perf_counter() - start
        out[name] = {k: 1000 * v / min(n, len(base)) for k, v in times.items()}
        print(f"{name:9s} " + ", ".join(f"{k} {v:.2f}" for k, v in out[name].items()) + " ms")
    return out


NEW_LOAD = data.load_image
# The old path's augmentation kernels: torchvision's own, in place of the faster ones written
# since (the same draws and outputs, tested in tests/): swapped in together with the decoder.
KERNELS = [(yolo.ScaleTranslate, "transform", v2.RandomAffine.transform),
           (data.ColorJitterU8, "transform", v2.ColorJitter.transform),
           (ssd.IoUCropIfBoxes, "make_params", v2.RandomIoUCrop.make_params)]
OURS = [cls.__dict__[name] for cls, name, _ in KERNELS]


def old_path(old):
    """Switch between the old path (PIL, torchvision's kernels) and the new one."""
    data.load_image = pil_load if old else NEW_LOAD
    for (cls, name, theirs), ours in zip(KERNELS, OURS):
        setattr(cls, name, theirs if old else ours)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", default=VOC, help="folder holding VOCdevkit/VOC2012 (default: "
                   "../shared/data/voc_sample)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to add the --gpu-decode path")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(GPU_RATE),
                   help="some chains only")
    p.add_argument("--samples", type=int, default=100, help="at least this many per timing")
    p.add_argument("--seconds", type=float, default=2.0, help="and at least this long")
    p.add_argument("--loader", action="store_true", help="also time DataLoader settings")
    p.add_argument("--steps", action="store_true", help="only the milliseconds per image of "
                   "each training chain's steps (decoding included)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.voc, "VOCdevkit", "VOC2012", "JPEGImages")):
        sys.exit(f"bench_input.py: error: no VOCdevkit/VOC2012/JPEGImages in {args.voc}; "
                 f"give --voc")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_input.py: error: --device cuda given but no CUDA GPU is visible")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = chains(imagenet_tree(tmp, args.voc), args.voc)
        if args.only:
            sets = {k: sets[k] for k in args.only}
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; one core each (torch.set_num_threads(1))", flush=True)
        if args.steps:
            step_times(sets)
            return
        res = {"per_core": per_core(sets, args.samples, args.seconds)}
        print("\ncores to feed one GPU at its training rate (new path, training chain):")
        res["cores_needed"] = {}
        for name, r in res["per_core"].items():
            gpu, source = GPU_RATE[name]
            need = gpu / r["train"]["tensor"]
            res["cores_needed"][name] = {"gpu_images_per_s": gpu, "source": source,
                                         "cores": need, "cores_old": gpu / r["train"]["pil"]}
            print(f"  {name:9s} {gpu:7.0f} img/s ({source}): {need:5.1f} cores "
                  f"(old path {gpu / r['train']['pil']:5.1f})")
        if args.device.startswith("cuda"):
            res["gpu_decode"] = gpu_rates(sets, torch.device(args.device), 64, args.samples * 2)
        if args.loader:
            res["loader"] = loader_rates(sets["alexnet"][0], args.seconds * 2)
    res["machine"] = {"torch": torch.__version__, "cores": os.cpu_count(),
                      "cpu": platform.processor() or platform.machine()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
