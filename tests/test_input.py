"""Input pipelines: files decoded to uint8 tensors by torchvision.io (pixel for pixel PIL's),
every paper's chain on uint8 until its final ToDtype, unchanged in what it gives the model, boxes
and masks aligned with their images, and the --gpu-decode path (data.DecodeOnDevice, run here
on the CPU) giving the CPU path's batches exactly."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
import googlenet
import overfeat
import resnet
import resnext
import ssd
import vgg19
import yolo
from conftest import write_voc

M, S = data.IMAGENET_MEAN, data.IMAGENET_STD


def photo(h=90, w=120, seed=0):
    """A smooth 'photograph' (gradients and a few blobs), so that JPEG coding is realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / (7 + 5 * c) + rng.uniform(0, 6)) *
                    np.cos(yy / (9 + 3 * c)) for c in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_load(path, mine=False):
    """The decoder the repository used before: PIL, converted to RGB."""
    with Image.open(path) as im:
        return tv_tensors.Image(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"),
                                      ("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("RGB", "GIF"), ("RGB", "WEBP"), ("RGB", "BMP"),
                                      ("RGB", "TIFF"), ("RGB", "PPM")])
def test_every_format_decodes_to_what_pil_gives(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(photo()).convert(mode).save(path, fmt)
    x = data.load_image(str(path))
    assert isinstance(x, tv_tensors.Image) and x.dtype == torch.uint8 and x.shape == (3, 90, 120)
    assert torch.equal(x.as_subclass(torch.Tensor), pil_load(path).as_subclass(torch.Tensor))


def test_a_palette_mask_decodes_to_its_indices_not_its_colours(tmp_path):
    mask = np.random.default_rng(0).choice([0, 3, 15, 255], (20, 30)).astype(np.uint8)
    png = Image.frombytes("P", (30, 20), mask.tobytes())
    png.putpalette(data.voc_palette())
    png.save(tmp_path / "m.png")
    got = data.decode(data.read_bytes(str(tmp_path / "m.png")), "m.png", mode="UNCHANGED")
    assert got.shape == (1, 20, 30) and torch.equal(got[0], torch.from_numpy(mask))


def test_damaged_files_are_one_line_errors_naming_them(tmp_path):
    good = io.BytesIO()
    Image.fromarray(photo()).save(good, "JPEG")
    cases = {"empty.jpg": b"", "text.jpg": b"not an image at all",
             "cut.jpg": good.getvalue()[:300], "bad.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        for mine, says in ((False, "fetch it again"), (True, "is not an image")):
            with pytest.raises(data.DataError) as e:
                data.load_image(str(tmp_path / name), mine=mine)
            line = str(e.value)
            assert name in line and says in line and "\n" not in line, line
            assert "BytesIO" not in line and "/csrc/" not in line
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_image(str(tmp_path / "nowhere.jpg"), mine=True)


def chain_set(tmp_path):
    """A small ImageNet folder tree of 'photographs' of several sizes, as JPEG."""
    for split in ("train", "val"):
        for k in range(6):
            d = tmp_path / "imagenet" / split / f"n0000000{k % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo(70 + 13 * k, 100 + 9 * k, seed=k)).save(d / f"{k}.JPEG",
                                                                          quality=90)
    return str(tmp_path)


CHAINS = {  # each paper's ImageNet chains, from its script
    "alexnet": lambda: (data.classification_transforms("imagenet", True, M, S, square=True),
                        data.classification_transforms("imagenet", False, M, S)),
    "vgg19": lambda: (vgg19.imagenet_train_transform(256, 320, 224), data.normalised()),
    "resnet": lambda: resnet.imagenet_transforms(224),
    "resnext": lambda: resnext.imagenet_transforms(),
    "googlenet": lambda: (googlenet.imagenet_train_transform(224), data.normalised()),
    "overfeat": lambda: (overfeat.imagenet_train_transform(231), data.normalised()),
}


class Recorder(v2.Transform):
    """Wraps one step of a chain and records the type and dtype it was given."""

    def __init__(self, step, log):
        super().__init__()
        self.step, self.log = step, log

    def forward(self, *inputs):
        image = inputs[0]
        self.log.append((type(self.step).__name__, type(image).__name__, image.dtype))
        return self.step(*inputs)


def recorded(chain):
    log = []
    return v2.Compose([Recorder(t, log) for t in chain.transforms]), log


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_imagenet_chains_run_on_uint8_tensors_and_give_the_old_decoders_output(
        tmp_path, monkeypatch, name):
    # The chain's input is a uint8 tv_tensors.Image (never a PIL image) and every step before
    # ToDtype gets uint8; the whole set through the new decoder equals, sample for sample under
    # the same seeds, the set through PIL: the model sees what it saw (mean and std included).
    root = chain_set(tmp_path)
    for train, chain in zip((True, False), CHAINS[name]()):
        chain, log = recorded(chain)
        ds = data.imagenet_dataset("train" if train else "test", root, chain)
        outs = {}
        for decoder in ("tensor", "pil"):
            if decoder == "pil":
                monkeypatch.setattr(data, "load_image", pil_load)
            torch.manual_seed(5)
            outs[decoder] = [ds[i][0].as_subclass(torch.Tensor) for i in range(len(ds))]
            monkeypatch.undo()
        for a, b in zip(outs["tensor"], outs["pil"]):
            assert a.dtype == torch.float32 and torch.equal(a, b)
        cast = [i for i, (step, _, _) in enumerate(log) if step == "ToDtype"][0]
        first = [entry for entry in log if entry[0] == "ToImage"] or log[:1]
        assert all(kind == "Image" and dtype == torch.uint8 for _, kind, dtype in first)
        assert all(dtype == torch.uint8 for _, _, dtype in log[:cast]), log[:cast + 1]
        stack = torch.stack(outs["tensor"]) if train or name in ("alexnet", "resnet", "resnext") \
            else torch.cat([o.flatten(1) for o in outs["tensor"]], 1)
        assert abs(float(stack.mean())) < 1.5 and 0.2 < float(stack.std()) < 3


def boxed_photo(tmp_path, seed=0):
    """A VOC tree whose one image is dark with a bright square where its one box is, and (seg)
    a mask with the class on the same square."""
    w, h, (x0, y0, x1, y1) = 120, 90, (40, 20, 89, 69)  # 1-based corners of the square
    base = write_voc(tmp_path, "2007", "test", {"000001": (w, h, [("dog", x0, y0, x1, y1, 0)])},
                     seg=True)
    img = np.full((h, w, 3), 20, np.uint8)
    img[y0 - 1:y1, x0 - 1:x1] = 235
    Image.fromarray(img).save(os.path.join(base, "JPEGImages", "000001.jpg"), quality=95)
    with open(os.path.join(base, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("000001\n")  # the detection split too
    return str(tmp_path)


def brightness_inside(image, box):
    """Mean brightness inside a box and outside it (image C, H, W, any normalisation)."""
    x = image.as_subclass(torch.Tensor).float().mean(0)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    inside = torch.zeros_like(x, dtype=torch.bool)
    inside[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = True
    return x[inside].mean(), x[~inside].mean() if (~inside).any() else x[inside].mean() - 10


def test_uint8_colour_jitter_equals_torchvisions():
    # data.ColorJitterU8 (GoogLeNet's and YOLO's jitter): v2.ColorJitter's draws, order and
    # pixels, for each step alone and all four together, on uint8 images with grey and
    # saturated pixels; float images go to torchvision's kernels.
    g = torch.Generator().manual_seed(0)
    for k in range(40):
        h, w = [(224, 224), (37, 50)][k % 2]
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        image[:, :5] = image[0, :5]   # grey rows
        image[:, -3:] = 255           # white rows
        image = tv_tensors.Image(image)
        settings = [dict(brightness=0.5), dict(contrast=0.5), dict(saturation=0.5),
                    dict(hue=0.1), dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)]
        for kw in settings:
            torch.manual_seed(k)
            ours = data.ColorJitterU8(**kw)(image)
            torch.manual_seed(k)
            theirs = v2.ColorJitter(**kw)(image)
            assert type(ours) is tv_tensors.Image and torch.equal(ours, theirs), (k, kw)
    x = tv_tensors.Image(torch.rand(3, 8, 8))
    torch.manual_seed(0)
    ours = data.ColorJitterU8(0.5, 0.5, 0.5)(x)
    torch.manual_seed(0)
    assert torch.equal(ours, v2.ColorJitter(0.5, 0.5, 0.5)(x))


@pytest.mark.parametrize("chain", ["ssd", "yolo"])
def test_detection_chains_keep_the_box_on_its_object(tmp_path, chain):
    # 40 seeds of the paper's augmentation (zoom-out, IoU crop, flips, affine, colour): where
    # the box lands, the bright square is; outside it, the dark background (or the fill).
    root = boxed_photo(tmp_path)
    tf = ssd.train_transforms(160, M, S) if chain == "ssd" else yolo.train_transforms(160)
    ds = data.VOCDetectionSet(root, "2007", "test")
    kept = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = ds[0]
        out, t = tf(image, {"boxes": target["boxes"], "labels": target["labels"]})
        assert out.dtype == torch.float32 and out.shape[-2:] == (160, 160)
        for box in t["boxes"]:
            if (box[2] - box[0]) > 12 and (box[3] - box[1]) > 12:
                inside, outside = brightness_inside(out, box)
                assert inside > outside + 0.5, (seed, box)
                kept += 1
    assert kept >= 20


def test_segmentation_chain_keeps_the_mask_on_its_object(tmp_path):
    root = boxed_photo(tmp_path)
    images, masks = data._voc_files(root, "2007", "test", "segmentation", False)
    ds = data.SegmentationSet(images, masks, data.VOC_SEG_CLASSES,
                              data.segmentation_transforms(True, crop=64))
    dog = data.VOC_SEG_CLASSES.index("dog")
    for seed in range(20):
        torch.manual_seed(seed)
        image, mask = ds[0]
        assert image.dtype == torch.float32 and image.shape[-2:] == mask.shape[-2:] == (64, 64)
        bright = image.as_subclass(torch.Tensor).mean(0) > 0.5
        on = mask.as_subclass(torch.Tensor) == dog
        if on.sum() > 30:  # the class is on the bright pixels, not beside them
            assert bright[on].float().mean() > 0.9 and (~bright[on]).sum() < 0.1 * on.sum()


def loaders_both_ways(ds_cpu, ds_gpu, train, collate=None, workers=0):
    batches = []
    for ds, gpu in ((ds_cpu, False), (ds_gpu, True)):
        loader = data.make_loader(ds, 3, train, workers, "cpu", collate, seed=7,
                                  drop_last=False, gpu_decode=gpu)
        data.set_epoch(loader, 2)
        batches.append(list(loader))
    return batches


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("workers", [0, 1])
def test_gpu_decode_path_gives_the_cpu_paths_batches(tmp_path, workers):
    # DecodeOnDevice with the CPU standing in for the GPU: the workers send file bytes, the
    # batch is decoded in one decode_jpeg call and each sample augmented under its own seed:
    # the same batches as the CPU path, for classification (AlexNet's chain), detection (SSD's
    # chain and YOLO's YoloSet) and segmentation (FCN's).
    root = chain_set(tmp_path / "inet")
    train_tf, test_tf = CHAINS["alexnet"]()
    for train, tf in ((True, train_tf), (False, test_tf)):
        a, b = loaders_both_ways(*(data.imagenet_dataset("train", root, tf) for _ in range(2)),
                                 train, workers=workers)
        assert len(a) == len(b) == 2 and same(a, b)
    voc = boxed_photo(tmp_path / "voc")
    det = [data.VOCDetectionSet(voc, "2007", "test", transforms=ssd.train_transforms(96, M, S))
           for _ in range(2)]
    a, b = loaders_both_ways(*det, True, data.detection_collate, workers)
    assert same(a, b)
    ys = [yolo.YoloSet(data.VOCDetectionSet(voc, "2007", "test"), yolo.train_transforms(64), 4,
                       20) for _ in range(2)]
    a, b = loaders_both_ways(*ys, True, yolo.collate, workers)
    assert same(a, b)
    images, masks = data._voc_files(voc, "2007", "test", "segmentation", False)
    seg = [data.SegmentationSet(images, masks, data.VOC_SEG_CLASSES,
                                data.segmentation_transforms(True, crop=48)) for _ in range(2)]
    a, b = loaders_both_ways(*seg, True, data.detection_collate, workers)
    assert same(a, b)


def test_gpu_decode_names_a_damaged_file_and_refuses_sets_in_memory(tmp_path):
    root = chain_set(tmp_path)
    broken = tmp_path / "imagenet" / "train" / "n00000000" / "0.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    loader = data.make_loader(data.imagenet_dataset("train", root, CHAINS["alexnet"]()[0]), 6,
                              True, 0, "cpu", gpu_decode=True)
    with pytest.raises(data.DataError, match=r"cannot read image .*0\.JPEG"):
        list(loader)
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(data.DataError, match="held in memory"):
        data.make_loader(data.TensorImageDataset(x, torch.zeros(4), ("a",)), 2, True, 0, "cpu",
                         gpu_decode=True)


def test_gpu_decode_falls_back_per_file_to_the_cpu_decoder_and_tests_on_the_cpu(tmp_path,
                                                                               monkeypatch):
    # nvJPEG refuses CMYK and 12-bit JPEGs (ImageNet holds ~20 CMYK files) that libjpeg
    # decodes: such a file is decoded on the CPU, the rest of the batch as before; a file
    # that neither decodes is named. Stand-in: a decode_jpeg that refuses CMYK files.
    root = chain_set(tmp_path)
    cmyk = tmp_path / "imagenet" / "train" / "n00000001" / "1.JPEG"
    Image.open(cmyk).convert("CMYK").save(cmyk, quality=90)
    real = data.torchvision.io.decode_jpeg

    def nvjpeg(raw, device="cpu", mode=None):
        for r in (raw if isinstance(raw, list) else [raw]):
            if Image.open(io.BytesIO(r.numpy().tobytes())).mode == "CMYK":
                raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed: unsupported")
        return real(raw, device=device, mode=mode)
    monkeypatch.setattr(data.torchvision.io, "decode_jpeg", nvjpeg)
    tf = CHAINS["alexnet"]()[0]
    a, b = loaders_both_ways(*(data.imagenet_dataset("train", root, tf) for _ in range(2)), True)
    assert same(a, b)
    # the test split is decoded by the CPU workers whatever the flag: a plain DataLoader
    test = data.make_loader(data.imagenet_dataset("test", root, tf), 3, False, 0, "cpu",
                            gpu_decode=True)
    assert isinstance(test, torch.utils.data.DataLoader)


FD_DRIVER = """
import resource, sys
sys.path.insert(0, {root!r})
import data
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
loader = data.make_loader(data.imagenet_dataset("train", {tree!r}, data.normalised()), 300,
                          True, 1, "cpu", gpu_decode=True)
print("BATCH", len(next(iter(loader))[0]))
"""


def test_gpu_decode_sends_a_batch_of_files_through_one_descriptor(tmp_path):
    # Each tensor a DataLoader worker sends costs a file descriptor until the main process
    # takes it: one per file's bytes exhausted a 1,024-fd limit at batch 512. Here a 128-fd
    # limit and a batch of 300 files from one worker: one tensor for the batch's bytes.
    d = tmp_path / "imagenet" / "train" / "n00000000"
    d.mkdir(parents=True)
    for k in range(300):
        Image.fromarray(photo(8, 8, seed=k)).save(d / f"{k}.JPEG")
    driver = tmp_path / "driver.py"
    driver.write_text(FD_DRIVER.format(root=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), tree=str(tmp_path)))
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "BATCH 300" in r.stdout, r.stderr[-1500:]


SCRIPTS = ["lenet5", "alexnet", "vgg19", "resnet", "resnext", "googlenet", "overfeat",
           "monster_finetune", "yolo", "ssd", "fcn"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_decode_needs_a_gpu_and_image_files(tmp_path, monkeypatch, script):
    # On the CPU: one line, before any data is read or any folder made. On a GPU (faked: the
    # check comes before the device is used), a set held in memory has nothing to decode.
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(data.DataError, match="--gpu-decode decodes on a CUDA GPU and this run "
                       "is on cpu: drop --gpu-decode .* or run with --cuda"):
        module.main(["--gpu-decode", "--device", "cpu", "--out", str(tmp_path / "x")])
    memory = {"yolo": "shapes-det", "ssd": "shapes-det", "fcn": "shapes-seg"}.get(script,
                                                                                 "shapes")
    monkeypatch.setattr(data, "select_device", lambda *a: torch.device("cuda"))
    with pytest.raises(data.DataError, match=f"{memory} is held in memory"):
        module.main(["--gpu-decode", "--data", memory, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_normalize_copies_its_constants_to_the_gpu_once(monkeypatch):
    # torchvision's Normalize copies the mean and std to the image's device at every image (a
    # blocking copy: it waits for the GPU's queue); data.Normalize keeps them there. The meta
    # device stands in for the GPU; on the CPU both give the same numbers.
    x = tv_tensors.Image(torch.rand(3, 5, 7))
    assert torch.equal(data.Normalize(M, S)(x), v2.Normalize(M, S)(x))
    copies, as_tensor, to = [], torch.as_tensor, torch.Tensor.to
    monkeypatch.setattr(torch, "as_tensor", lambda *a, device=None, **k: copies.append(
        device) or as_tensor(*a, device=device, **k))
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(a or k) or
                        to(t, *a, **k))
    meta = [tv_tensors.Image(torch.empty(3, 5, 7, device="meta")) for _ in range(4)]
    for t in meta:
        v2.Normalize(M, S)(t)
    assert sum(str(c) == "meta" for c in copies) == 8
    copies.clear()
    ours = data.Normalize(M, S)
    outs = [ours(t) for t in meta]
    assert len(copies) == 2 and all(o.device.type == "meta" for o in outs)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_gpu_decode_runs_a_classification_chains_float_stage_once_per_batch(tmp_path, chain,
                                                                              monkeypatch):
    # Every ImageNet training chain ends in ToDtype, [PCA colour], Normalize: under --gpu-decode
    # that stage runs on the whole batch (a few kernels, not ~5 per image), with the same
    # numbers as the CPU path's image-by-image chain under the same seeds.
    root = chain_set(tmp_path)
    train_tf = CHAINS[chain]()[0]
    assert data.float_stage(train_tf) is not None
    calls, real = [], data.Normalize.transform
    monkeypatch.setattr(data.Normalize, "transform",
                        lambda self, x, p: calls.append(tuple(x.shape)) or real(self, x, p))
    cpu = data.make_loader(data.imagenet_dataset("train", root, train_tf), 3, True, 0, "cpu",
                           seed=7)
    on_device = data.make_loader(data.imagenet_dataset("train", root, CHAINS[chain]()[0]), 3,
                                 True, 0, "cpu", seed=7, gpu_decode=True)
    data.set_epoch(cpu, 2)
    data.set_epoch(on_device, 2)
    a = list(cpu)
    assert len(calls) == 6 and all(len(c) == 3 for c in calls)  # image by image
    calls.clear()
    b = list(on_device)
    assert [len(c) for c in calls] == [4, 4]  # once per batch of 3
    assert same(a, b)
