"""data.py on small files in the real formats, the shapes generator, transforms and loaders."""
import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
from conftest import write_cifar10, write_idx, write_mnist, write_voc


# ---------------------------------------------------------------------------- names and errors

def test_unknown_name_and_wrong_task_are_one_line_errors():
    with pytest.raises(data.DataError, match="unknown data set 'imagenett'.*choose one of"):
        data.task_of("imagenett")
    with pytest.raises(data.DataError, match="'voc' is a detection data set"):
        data.classification_arrays("voc", "train")
    with pytest.raises(data.DataError, match="no split 'val'"):
        data.detection_dataset("voc", "val")


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("PYTORCH_DATA_DIR", "/somewhere")
    assert data.default_data_dir() == "/somewhere"
    monkeypatch.delenv("PYTORCH_DATA_DIR")
    assert data.default_data_dir() == "./data"


# ---------------------------------------------------------------------------- MNIST, CIFAR

def test_mnist_idx_files_and_held_out_split(tmp_path):
    written = write_mnist(tmp_path, n_train=60, n_test=10)
    x, y, classes = data.classification_arrays("mnist", "trainval", tmp_path, download=False)
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.uint8 and len(classes) == 10
    assert torch.equal(x[:, 0], torch.from_numpy(written["train"][0]))
    assert torch.equal(y, torch.from_numpy(written["train"][1]).long())
    xt, yt, _ = data.classification_arrays("mnist", "test", tmp_path, download=False)
    assert torch.equal(xt[:, 0], torch.from_numpy(written["t10k"][0]))
    # 1/12 of the training set is held out (5 of 60), disjoint, seeded, and the rest is "train".
    xtr, ytr, _ = data.classification_arrays("mnist", "train", tmp_path, download=False)
    xva, yva, _ = data.classification_arrays("mnist", "val", tmp_path, download=False)
    assert len(yva) == 5 and len(ytr) == 55
    rows = {bytes(a.numpy()) for a in torch.cat([xtr, xva])}
    assert rows == {bytes(a.numpy()) for a in x}
    xva2, _, _ = data.classification_arrays("mnist", "val", tmp_path, download=False)
    assert torch.equal(xva, xva2)


def test_mnist_label_outside_classes_is_reported(tmp_path):
    write_mnist(tmp_path, n_train=12, n_test=3, labels=None)
    write_idx(os.path.join(tmp_path, "MNIST", "raw", "train-labels-idx1-ubyte"), [3] * 11 + [17])
    with pytest.raises(data.DataError, match="label 17 is outside the 10 classes"):
        data.classification_arrays("mnist", "trainval", tmp_path, download=False)


def test_missing_mnist_says_where_to_put_the_files(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match=r"mnist not found.*train-images-idx3-ubyte.gz.*MNIST"):
        data.classification_arrays("mnist", "train", tmp_path, download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(data.DataError, match=r"could not download mnist.*put train-images"):
        data.classification_arrays("mnist", "train", tmp_path, download=True)


def test_damaged_mnist_is_named_as_damaged_and_fetching_it_again_works(tmp_path, monkeypatch):
    written = write_mnist(tmp_path, n_train=12, n_test=4)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    # torchvision's own reader: an AssertionError traceback for a bad magic, "not found" for a
    # truncated file (and no download, since the files exist). Ours names the damage.
    for damaged, what in ((b"\x00\x00\x0d\x03" + good[4:], "bad magic number"),
                          (good[:-50], "truncated")):
        images.write_bytes(damaged)
        with pytest.raises(data.DataError, match=f"{images}.*{what}.*delete it and run again") as e:
            data.classification_arrays("mnist", "trainval", tmp_path, download=False)
        assert "not found" not in str(e.value)
    # Deleted, as the message says: with --no-download it is "incomplete", naming the file...
    images.unlink()
    with pytest.raises(data.DataError, match="holds train-labels-idx1-ubyte but not "
                                             "train-images-idx3-ubyte.gz; the set is incomplete"):
        data.classification_arrays("mnist", "trainval", tmp_path, download=False)

    # ... and the next run with downloads fetches it again (torchvision's download, offline here).
    def fetch(url, download_root, filename, md5):
        if filename.startswith("train-images"):
            (raw / filename[:-3]).write_bytes(good)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fetch)
    x, _, _ = data.classification_arrays("mnist", "trainval", tmp_path, download=True)
    assert torch.equal(x[:, 0], torch.from_numpy(written["train"][0]))


def test_damaged_cifar_is_named_as_damaged_not_missing(tmp_path, monkeypatch):
    write_cifar10(tmp_path, n_per_batch=4)
    base = tmp_path / "cifar-10-batches-py"
    # Our batches are not the published ones: their md5 differs, which is what damage looks like.
    with pytest.raises(data.DataError, match=r"data_batch_1 is damaged \(its md5.*delete .*"
                                             r"cifar-10-batches-py and run again"):
        data.classification_arrays("cifar10", "trainval", tmp_path, download=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    (base / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="data_batch_3 is missing; the set is incomplete"):
        data.classification_arrays("cifar10", "trainval", tmp_path, download=False)
    (base / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="cannot read .*cifar-10-batches-py.*damaged: delete"):
        data.classification_arrays("cifar10", "trainval", tmp_path, download=False)
    assert len(data.classification_arrays("cifar10", "test", tmp_path, download=False)[1]) == 4


def test_cifar10_python_batches_in_nchw(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, n_per_batch=4)
    # Our files are not the real archive, so torchvision's md5 check of each batch is bypassed.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    x, y, classes = data.classification_arrays("cifar10", "trainval", tmp_path, download=False)
    assert x.shape == (20, 3, 32, 32) and classes[0] == "airplane"
    raw, labels = written["data_batch_1"]
    # CIFAR rows are the R, G, B planes of 1024 pixels each, row-major.
    assert torch.equal(x[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))
    assert y[:4].tolist() == labels
    xt, _, _ = data.classification_arrays("cifar10", "test", tmp_path, download=False)
    assert torch.equal(xt[1], torch.from_numpy(written["test_batch"][0][1].reshape(3, 32, 32)))
    assert len(data.classification_arrays("cifar10", "val", tmp_path, download=False)[1]) == 2


def test_missing_cifar_says_which_archive(tmp_path):
    with pytest.raises(data.DataError, match=r"cifar100 not found.*cifar-100-python.tar.gz"):
        data.classification_arrays("cifar100", "test", tmp_path, download=False)


# ---------------------------------------------------------------------------- VOC, ImageNet XML

def test_parse_voc_xml_converts_corners_and_reads_difficult(tmp_path):
    path = tmp_path / "a.xml"
    from conftest import voc_xml
    path.write_text(voc_xml("a.jpg", 100, 80, [("dog", 10, 20, 30, 40, 0),
                                                ("person", 1, 1, 100, 80, 1)]))
    ann = data.parse_voc_xml(path)
    # 1-based inclusive (10..30) -> continuous (9, 30): width 21 pixels, the devkit's x2-x1+1.
    assert ann["boxes"].tolist() == [[9, 19, 30, 40], [0, 0, 100, 80]]
    assert ann["labels"].tolist() == [data.VOC_CLASSES.index("dog"), 14]
    assert ann["difficult"].tolist() == [False, True]
    assert ann["names"] == ["dog", "person"] and ann["size"] == (100, 80)
    # Plain IoU on converted boxes equals the devkit's +1 IoU on the raw corners.
    a, b = (10, 20, 30, 40), (15, 25, 40, 50)
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]) + 1, min(a[3], b[3]) - max(a[1], b[1]) + 1
    devkit = iw * ih / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
                        - iw * ih)
    conv = torch.tensor([[a[0] - 1, a[1] - 1, a[2], a[3]], [b[0] - 1, b[1] - 1, b[2], b[3]]],
                        dtype=torch.float32)
    assert torchvision.ops.box_iou(conv[:1], conv[1:]).item() == pytest.approx(devkit)


def test_parse_imagenet_bounding_box_file_with_synsets(tmp_path):
    # The lecture's example file n02123394_2084.xml (Persian cat, two boxes).
    from conftest import voc_xml
    path = tmp_path / "n02123394_2084.xml"
    path.write_text(voc_xml("n02123394_2084", 500, 375, [("n02123394", 265, 185, 470, 374, 0),
                                                          ("n02123394", 90, 1, 323, 353, 0)]))
    ann = data.parse_voc_xml(path, classes=["n01440764", "n02123394"])
    assert ann["labels"].tolist() == [1, 1]
    assert ann["boxes"][1].tolist() == [89, 0, 323, 353]


@pytest.mark.parametrize("text, message", [
    ("<annotation><size><width>5", "corrupt annotation"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>dog</name>"
     "</object></annotation>", "malformed annotation"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>dragon</name>"
     "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>"
     "</annotation>", "object 'dragon' is not one of the 20"),
    ("<annotation><size><width>5</width><height>5</height></size><object><name>dog</name>"
     "<bndbox><xmin>4</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>"
     "</annotation>", "xmax < xmin"),
])
def test_bad_annotations_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(data.DataError, match=message) as e:
        data.parse_voc_xml(path)
    assert "bad.xml" in str(e.value) and "\n" not in str(e.value)


def test_voc_detection_tree_boxes_follow_a_flip(tmp_path, voc_images):
    write_voc(tmp_path, "2007", "test", voc_images)
    ds = data.VOCDetectionSet(tmp_path, "2007", "test")
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[4, 5, 30, 40], [32, 1, 60, 47]]
    assert target["difficult"].tolist() == [False, True]
    flip = v2.RandomHorizontalFlip(p=1.0)
    _, flipped = data.VOCDetectionSet(tmp_path, "2007", "test", transforms=flip)[0]
    assert isinstance(flipped["boxes"], tv_tensors.BoundingBoxes)
    assert flipped["boxes"].tolist() == [[64 - 30, 5, 64 - 4, 40], [64 - 60, 1, 64 - 32, 47]]
    train = data.VOCDetectionSet(tmp_path, "2007", "test", keep_difficult=False)
    assert train[0][1]["labels"].tolist() == [data.VOC_CLASSES.index("dog")]
    # Through the plain pipeline and the detection collate: boxes scaled with the image.
    ds = data.VOCDetectionSet(tmp_path, "2007", "test",
                              transforms=data.detection_transforms(False, 32))
    images, targets = data.detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2
    assert targets[1]["boxes"].tolist() == [[0, 0, 32, 32]]
    assert torch.allclose(targets[0]["boxes"][0], torch.tensor([4 * 32 / 64, 5 * 32 / 48,
                                                                30 * 32 / 64, 40 * 32 / 48]))


def test_voc_standard_protocol_and_missing_archive_message(tmp_path, voc_images):
    with pytest.raises(data.DataError, match=r"VOC2007 test not found.*VOCtest_06-Nov-2007.tar"):
        data.detection_dataset("voc", "test", tmp_path, download=False)
    write_voc(tmp_path, "2007", "test", voc_images)
    write_voc(tmp_path, "2007", "trainval", {"000003": voc_images["000001"]})
    write_voc(tmp_path, "2012", "trainval", {"2008_000001": voc_images["000002"],
                                              "2008_000002": voc_images["000002"]})
    assert len(data.detection_dataset("voc", "test", tmp_path, download=False)) == 2
    train = data.detection_dataset("voc", "train", tmp_path, download=False)
    assert len(train) == 3 and train.classes == data.VOC_CLASSES
    assert train[0][1]["difficult"].sum() == 0  # difficult objects are not trained on


def test_voc_download_failure_says_where_to_put_the_archive(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("host is down")
    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", offline)
    with pytest.raises(data.DataError, match=r"could not download VOCtrainval_11-May-2012.tar .*"
                                             r"host is down.*put it at .*VOCtrainval_11-May-2012"):
        data.segmentation_dataset("voc-seg", "train", tmp_path, download=True)


def test_corrupt_jpeg_names_the_file(tmp_path, voc_images):
    base = write_voc(tmp_path, "2007", "test", voc_images)
    with open(os.path.join(base, "JPEGImages", "000002.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"cannot read image .*000002.jpg"):
        data.VOCDetectionSet(tmp_path, "2007", "test")[1]


def test_bad_files_fail_when_the_set_is_built_not_when_it_is_read(tmp_path, voc_images):
    # A corrupt test JPEG, a box wholly outside its image, an image of another size than its
    # annotation states, a label image of another size: each is found when the run builds its
    # data sets, before training, naming the file (and the object).
    def voc(**changes):
        root = tmp_path / str(len(os.listdir(tmp_path)))
        images = {**voc_images, **changes}
        write_voc(root, "2007", "test", images)
        return root
    root = voc(**{"000003": (40, 30, [("cat", 50, 2, 70, 20, 0)])})  # x from 49 in a 40-wide image
    with pytest.raises(data.DataError, match=r"000003.xml: object 1 \('cat'\), box \(50, 2, 70, "
                                             r"20\) lies wholly outside the 40x30 image"):
        data.detection_dataset("voc", "test", root, download=False)
    root = voc()
    with open(root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000002.jpg", "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"cannot read image .*000002.jpg"):
        data.detection_dataset("voc", "test", root, download=False)
    root = voc()
    xml = root / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("<width>50</width>", "<width>52</width>"))
    with pytest.raises(data.DataError, match=r"000002.jpg is 50x40 pixels but .*000002.xml says "
                                             r"52x40"):
        data.detection_dataset("voc", "test", root, download=False)
    # a box that only sticks out is clipped to the image, as it is drawn
    root = voc(**{"000003": (40, 30, [("cat", 30, 2, 45, 20, 0)])})
    ds = data.detection_dataset("voc", "test", root, download=False)
    assert ds.target(2)["boxes"].tolist() == [[29.0, 1.0, 40.0, 20.0]]
    # segmentation: a label image of another size than its image
    seg = tmp_path / "seg"
    base = write_voc(seg, "2012", "val", voc_images, seg=True)
    Image.new("P", (10, 10)).save(os.path.join(base, "SegmentationClass", "000002.png"))
    with pytest.raises(data.DataError, match=r"label image .*000002.png is 10x10, its image "
                                             r".*000002.jpg 50x40"):
        data.segmentation_dataset("voc-seg", "test", seg, download=False)


def test_voc_segmentation_palette_png(tmp_path, voc_images):
    write_voc(tmp_path, "2012", "val", voc_images, seg=True)
    ds = data.segmentation_dataset("voc-seg", "test", tmp_path, download=False)
    assert ds.classes[0] == "background" and len(ds.classes) == 21
    image, mask = ds[0]
    assert isinstance(mask, tv_tensors.Mask) and mask.shape == (48, 64)
    dog = data.VOC_SEG_CLASSES.index("dog")
    assert set(mask.unique().tolist()) == {0, dog, 255}
    assert (mask[1:] == dog).sum() == 26 * 35 - 0  # rows 6..40, cols 5..30 of the first object
    # Training crop: the image is fitted into 80x80 (scale 1: 48x64 -> 60x80), then padded
    # with 0 and its mask with 255 (ignored) up to the crop size.
    t = data.segmentation_transforms(True, crop=80, scale=(1.0, 1.0))
    torch.manual_seed(0)
    image2, mask2 = t(image, mask)
    assert image2.shape == (3, 80, 80) and mask2.shape == (80, 80) and mask2.dtype == torch.int64
    rows_255 = (mask2 == 255).all(dim=1)
    assert rows_255.sum() >= 20 and (mask2 == dog).sum() == pytest.approx(26 * 35 * 1.25 ** 2, rel=0.1)


def test_segmentation_value_outside_classes_is_reported(tmp_path, voc_images):
    base = write_voc(tmp_path, "2012", "val", voc_images, seg=True)
    png = Image.frombytes("P", (50, 40), np.full((40, 50), 30, np.uint8).tobytes())
    png.putpalette(data.voc_palette())
    png.save(os.path.join(base, "SegmentationClass", "000002.png"))
    ds = data.segmentation_dataset("voc-seg", "test", tmp_path, download=False)
    with pytest.raises(data.DataError, match=r"000002.png holds value 30"):
        ds[1]


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    with pytest.raises(data.DataError, match="Cityscapes train not found.*gtFine_trainvaltest.zip"):
        data.segmentation_dataset("cityscapes", "train", tmp_path)
    img_dir = tmp_path / "cityscapes" / "leftImg8bit" / "val" / "aachen"
    gt_dir = tmp_path / "cityscapes" / "gtFine" / "val" / "aachen"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
    ids = np.array([[7, 8, 26, 33], [0, 1, 34, 24]], np.uint8)  # road, sidewalk, car, bicycle...
    Image.fromarray(ids).save(gt_dir / "aachen_000000_000019_gtFine_labelIds.png")
    ds = data.segmentation_dataset("cityscapes", "test", tmp_path)
    assert len(ds.classes) == 19
    assert ds[0][1].tolist() == [[0, 1, 13, 18], [255, 255, 255, 11]]


def test_imagenet_folder_tree_and_class_names(tmp_path):
    with pytest.raises(data.DataError, match=r"ImageNet train not found.*<wnid>.*ILSVRC2012_img_train"):
        data.imagenet_dataset("train", tmp_path)
    for k, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        d = tmp_path / "imagenet" / "train" / wnid
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (300, 260), (k * 80, j * 50, 0)).save(d / f"{wnid}_{j}.JPEG")
    t = data.classification_transforms("imagenet", False, data.IMAGENET_MEAN, data.IMAGENET_STD)
    ds = data.classification_dataset("imagenet", "train", tmp_path, transform=t)
    assert len(ds) == 6 and ds.classes == ["n01440764", "n01443537", "n01484850"]
    x, y = ds[5]
    assert x.shape == (3, 224, 224) and y == 2
    # The red channel of class 2 is 160/255 everywhere: normalised exactly as computed here.
    assert x[0].mean().item() == pytest.approx((160 / 255 - 0.485) / 0.229, abs=1e-3)
    names = data.imagenet_class_names()
    assert len(names) == 1000 and names[178] == "Weimaraner" and names[0] == "tench"
    # The test split (the official val set) is checked when it is built: a damaged image fails
    # the run before training, naming the file; a training image only when it is read.
    for split, folder in (("test", "val"), ("train", "train")):
        d = tmp_path / "imagenet" / folder / "n01440764"
        d.mkdir(parents=True, exist_ok=True)
        (d / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"cannot read image .*val.*broken.JPEG"):
        data.classification_dataset("imagenet", "test", tmp_path, transform=t)
    assert len(data.classification_dataset("imagenet", "train", tmp_path, transform=t)) == 7


# ---------------------------------------------------------------------------- shapes

def test_shapes_are_deterministic_and_splits_differ():
    a = data.render_shapes(0, 7, 48)
    b = data.render_shapes(0, 7, 48)
    assert all(torch.equal(u, v) for u, v in zip(a[:4], b[:4])) and a[4] == b[4]
    assert not torch.equal(a[0], data.render_shapes(0, 8, 48)[0])
    assert not torch.equal(a[0], data.render_shapes(1, 7, 48)[0])
    assert not torch.equal(a[0], data.render_shapes(0, 7, 48, split="test")[0])


def test_shapes_boxes_are_the_tight_boxes_of_their_masks():
    n_boxes = 0
    for i in range(60):
        image, boxes, labels, mask, label = data.render_shapes(3, i, 64)
        assert label == labels[0].item() and len(boxes) >= 1
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for box, k in zip(boxes.long(), labels):
            x0, y0, x1, y1 = box.tolist()
            inside = mask[y0:y1, x0:x1] == k + 1
            # tight: the shape's class touches all four edges of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] |= inside
            n_boxes += 1
        # every labelled pixel belongs to some box of its class; nothing else is labelled
        assert torch.equal(covered, mask > 0)
    assert n_boxes > 100


def test_shapes_classes_are_balanced_and_tasks_share_images():
    ds = data.ShapesDataset("shapes", "train", n=600, size=32)
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    counts = labels.bincount(minlength=6).float() / len(labels)
    assert (counts - 1 / 6).abs().max() < 0.05
    det = data.ShapesDataset("shapes-det", "train", n=5, size=32)
    seg = data.ShapesDataset("shapes-seg", "train", n=5, size=32)
    assert torch.equal(det[3][0], seg[3][0]) and torch.equal(det[3][0], ds[3][0])
    assert det[3][1]["labels"][0].item() == ds[3][1]
    assert seg.classes[0] == "background" and det.classes == data.SHAPES_CLASSES


def test_shapes_trainval_is_train_then_val():
    tv = data.ShapesDataset("shapes", "trainval", quick=True, size=24)
    tr = data.ShapesDataset("shapes", "train", quick=True, size=24)
    va = data.ShapesDataset("shapes", "val", quick=True, size=24)
    assert len(tv) == len(tr) + len(va)
    assert torch.equal(tv[3][0], tr[3][0]) and torch.equal(tv[len(tr) + 2][0], va[2][0])


# ---------------------------------------------------------------------------- transforms

def test_channel_stats_and_colour_pca_on_known_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = data.channel_stats(x)
    ref = x.double().numpy() / 255
    assert np.allclose(mean, ref.mean((0, 2, 3))) and np.allclose(std, ref.std((0, 2, 3), ddof=1))
    # Pixels drawn with a known covariance: PCA recovers its eigen-decomposition.
    cov = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]]) * 1e-3
    pix = torch.distributions.MultivariateNormal(torch.full((3,), 0.5), cov).sample((200000,))
    images = pix.T.reshape(3, 2000, 100).transpose(0, 1)[..., None]  # (2000, 3, 100, 1)
    eigval, eigvec = data.colour_pca(images)
    true_val, true_vec = torch.linalg.eigh(cov)
    assert torch.allclose(eigval, true_val.flip(0), rtol=0.03)
    assert torch.allclose(eigvec[:, 0].abs(), true_vec[:, -1].abs(), atol=0.02)


def test_pca_colour_adds_one_rgb_shift_per_image():
    eigval, eigvec = torch.tensor(data.IMAGENET_EIGVAL), torch.tensor(data.IMAGENET_EIGVEC)
    x = torch.rand(2, 3, 4, 5)
    alpha = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
    y = data.pca_colour(x, eigval, eigvec, alpha)
    expected = eigvec @ (alpha[0] * eigval)  # worked: sum_j eigvec[:, j] * alpha_j * lambda_j
    assert torch.allclose(y[0] - x[0], expected[:, None, None].expand(3, 4, 5), atol=1e-6)
    assert torch.equal(y[1], x[1])
    t = data.PCAColour(alphastd=0.1)
    img = tv_tensors.Image(torch.rand(3, 6, 6))
    out = t(img)
    shift = out - img
    assert shift.std(dim=(1, 2)).max() < 1e-6 and shift.abs().max() > 0  # one colour per image
    assert torch.equal(t(tv_tensors.Image(torch.zeros(3, 2, 2, dtype=torch.uint8))),
                       torch.zeros(3, 2, 2, dtype=torch.uint8))  # uint8 input left alone


def test_ten_crop_corners_centre_and_mirrors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    crops = data.ten_crop(x, 2)[0, :, 0]
    assert crops.shape == (10, 2, 2)
    assert crops[0].tolist() == [[0, 1], [4, 5]]        # top-left
    assert crops[3].tolist() == [[10, 11], [14, 15]]    # bottom-right
    assert crops[4].tolist() == [[5, 6], [9, 10]]       # centre
    # then the same five crops of the mirrored image: its top-left is the mirrored top-right
    assert torch.equal(crops[5], crops[1].flip(-1)) and torch.equal(crops[9], crops[4].flip(-1))

    class MeanOfCrop(torch.nn.Module):  # logits (0, crop mean): its softmax is known per crop
        def forward(self, z):
            return torch.stack([torch.zeros(len(z)), z.mean((1, 2, 3))], 1)
    probs = data.ten_crop_predict(MeanOfCrop(), x, 2)
    means = crops.mean((1, 2))
    assert torch.allclose(probs[0, 1], torch.sigmoid(means).mean())


def test_classification_transforms_flip_only_where_it_is_safe():
    has_flip = lambda t: any(isinstance(o, v2.RandomHorizontalFlip) for o in t.transforms)
    assert not has_flip(data.classification_transforms("mnist", True, (0.1,), (0.3,)))
    assert has_flip(data.classification_transforms("cifar10", True, (0.5,) * 3, (0.2,) * 3))
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    mean, std = data.channel_stats(x)
    t = data.classification_transforms("mnist", False, mean, std)
    z = torch.stack([t(tv_tensors.Image(im)) for im in x])
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-3



def test_alexnets_crops_lie_inside_the_central_256_square():
    # §2: short side to 256, the central 256x256 patch, random 224 crops of it. On a 256 x 512
    # image whose outer quarters are 0 and centre 255, every crop is all centre with `square`;
    # without it, crops reach the outer quarters.
    img = torch.zeros(3, 256, 512, dtype=torch.uint8)
    img[:, :, 128:384] = 255
    mean, std = (0.0,) * 3, (1.0,) * 3
    for square, want_all_centre in ((True, True), (False, False)):
        t = data.classification_transforms("imagenet", True, mean, std, 224, square=square)
        t = v2.Compose([o for o in t.transforms if not isinstance(o, data.PCAColour)])
        torch.manual_seed(0)
        mins = [float(t(tv_tensors.Image(img)).min()) for _ in range(30)]
        assert all(m == 1.0 for m in mins) == want_all_centre, (square, mins)


# ---------------------------------------------------------------------------- loaders

def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(16, 2, 6, 7)
    g = torch.Generator().manual_seed(0)
    y = data.random_crop_flip(x, 2, flip=True, generator=g)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    flips = 0
    for i in range(16):
        windows = [(padded[i, :, dy:dy + 6, dx:dx + 7], f) for dy in range(5) for dx in range(5)
                   for f in (False, True)]
        match = [f for w, f in windows if torch.equal(y[i], w.flip(-1) if f else w)]
        assert match, f"image {i} is not a padded crop"
        flips += match[0]
    assert 0 < flips < 16


def test_device_loader_covers_every_sample_once_per_epoch_and_is_seeded():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    loader = data.DeviceLoader(x, y, 3, train=True, mean=(0.0,), std=(1 / 255,), seed=1,
                               drop_last=False)
    epoch0 = torch.cat([b for _, b in loader])
    assert sorted(epoch0.tolist()) == list(range(10)) and len(loader) == 4
    xb, yb = next(iter(loader))
    assert torch.allclose(xb[:, 0, 0, 0], yb.float())  # images stay paired with their labels
    assert torch.equal(torch.cat([b for _, b in loader]), epoch0)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b for _, b in loader]), epoch0)
    ev = data.DeviceLoader(x, y, 4, train=False)
    assert torch.cat([b for _, b in ev]).tolist() == list(range(10))


def test_device_loader_shards_like_distributed_sampler(monkeypatch):
    x, y = torch.zeros(11, 1, 2, 2, dtype=torch.uint8), torch.arange(11)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(data, "distributed_info", lambda r=rank: (r, 2))
        loader = data.DeviceLoader(x, y, 2, train=True, seed=0)
        seen.append(torch.cat([b for _, b in loader]).tolist())
        assert len(loader) == 2  # 11 // 2 = 5 per rank, 2 full batches each
    assert not set(seen[0]) & set(seen[1])
    monkeypatch.setattr(data, "distributed_info", lambda: (1, 2))
    ds = torch.utils.data.TensorDataset(torch.arange(11))
    loader = data.make_loader(ds, 2, train=False, workers=0)  # evaluation: strided, no padding
    assert torch.cat([b[0] for b in loader]).tolist() == [1, 3, 5, 7, 9]
    shards = []
    for rank in range(2):
        monkeypatch.setattr(data, "distributed_info", lambda r=rank: (r, 2))
        loader = data.make_loader(ds, 2, train=True, workers=0)
        shards.append(torch.cat([b[0] for b in loader]).tolist())
        assert len(loader) == 2  # 11 // 2 = 5 per rank: 2 full batches each
    assert not set(shards[0]) & set(shards[1])


class RandomAugmentation(torch.utils.data.Dataset):
    """Sample i and a draw of torch's generator, as a random transform makes one."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


def epochs_of(loader, epochs):
    seen = []
    for e in epochs:
        data.set_epoch(loader, e)
        seen.append([(int(i), float(r)) for b in loader for i, r in zip(*b)])
    return seen


def test_training_batches_depend_on_seed_epoch_and_sample_only_whatever_the_workers():
    # The order and each sample's random augmentation are functions of (seed, epoch, sample):
    # 0 workers or 2 persistent ones, an uninterrupted loader or a new one started at epoch 1
    # (a resumed run), give the same batches; another epoch or seed gives others.
    ds = RandomAugmentation()
    straight = epochs_of(data.make_loader(ds, 4, True, workers=0, seed=3), [0, 1])
    assert epochs_of(data.make_loader(ds, 4, True, workers=2, seed=3), [0, 1]) == straight
    assert epochs_of(data.make_loader(ds, 4, True, workers=2, seed=3), [1]) == straight[1:]
    assert straight[0] != straight[1]
    assert sorted(i for i, _ in straight[0]) == list(range(24))
    assert epochs_of(data.make_loader(ds, 4, True, workers=0, seed=4), [0]) != straight[:1]
    before = torch.get_rng_state()  # the main process's own stream is untouched
    epochs_of(data.make_loader(ds, 4, True, workers=0, seed=3), [0])
    assert torch.equal(torch.get_rng_state(), before)


def test_detection_loader_on_shapes_det():
    ds = data.detection_dataset("shapes-det", "train", quick=True, size=48,
                                transforms=data.detection_transforms(True, 48))
    loader = data.make_loader(ds, 8, train=True, workers=0, collate_fn=data.detection_collate)
    images, targets = next(iter(loader))
    assert images.shape == (8, 3, 48, 48) and len(targets) == 8
    for t in targets:
        b = t["boxes"]
        assert len(b) == len(t["labels"]) == len(t["difficult"]) >= 1
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and b.max() <= 48


@pytest.mark.slow
def test_shapes_is_learnable_by_a_small_cnn_but_not_in_one_batch():
    # 3,000 32x32 images: a 3-layer CNN passes 75 % within a few of its 12 epochs (~90 % at 12).
    torch.manual_seed(0)
    ds = data.ShapesDataset("shapes", "train", n=3000, size=32)
    x = torch.stack([ds.render(i)[0] for i in range(len(ds))])
    y = torch.tensor([ds.render(i)[4] for i in range(len(ds))])
    xt, yt, _ = data.classification_arrays("shapes", "test", quick=True)
    mean, std = data.channel_stats(x)
    block = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o),
                          torch.nn.ReLU()]
    net = torch.nn.Sequential(*block(3, 32), torch.nn.MaxPool2d(2), *block(32, 64),
                              torch.nn.MaxPool2d(2), *block(64, 64), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 6))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    test = data.DeviceLoader(xt, yt, 256, train=False, mean=mean, std=std)

    def accuracy():
        net.eval()
        with torch.no_grad():
            right = sum((net(a).argmax(1) == b).sum().item() for a, b in test)
        net.train()
        return right / len(yt)
    train = data.DeviceLoader(x, y, 64, train=True, mean=mean, std=std,
                              augment={"padding": 2, "flip": True})
    after_one_batch = None
    for epoch in range(12):
        train.set_epoch(epoch)
        for a, b in train:
            loss = torch.nn.functional.cross_entropy(net(a), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_one_batch is None:
                after_one_batch = accuracy()
        if accuracy() > 0.75:              # learnt: the remaining epochs would only add time
            break
    assert after_one_batch < 0.35          # chance is 1/6: one batch does not solve it
    assert accuracy() > 0.75, epoch        # a small CNN learns it in seconds on a CPU


# ---------------------------------------------------------------------------- devices, checkpoints

def test_cuda_flag_without_gpu_is_an_error_not_a_cpu_run():
    if torch.cuda.is_available():
        assert data.select_device(cuda=True).type == "cuda"
    else:
        with pytest.raises(data.DataError, match="no CUDA GPU is visible"):
            data.select_device(cuda=True)
    assert data.select_device("cpu").type == "cpu"
    with pytest.raises(data.DataError, match="unknown device 'tpu7'"):
        data.select_device("tpu7")


def test_checkpoints_are_atomic_and_mismatches_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    path = str(tmp_path / "run" / "checkpoint.pt")
    data.save_checkpoint(path, {"arch": "tiny", "model": model.state_dict(), "epoch": 3})
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]  # no temporary file left behind
    state = data.load_checkpoint(path, "tiny")
    other = torch.nn.Sequential(torch.nn.Linear(3, 4))
    data.load_weights(other, state, path)
    assert torch.equal(other[0].weight, model[0].weight) and state["epoch"] == 3
    with pytest.raises(data.DataError, match="is of 'tiny', not 'resnet20'"):
        data.load_checkpoint(path, "resnet20")
    with pytest.raises(data.DataError, match=r"0.weight is \(4, 3\) there and \(5, 3\) here"):
        data.load_weights(torch.nn.Sequential(torch.nn.Linear(3, 5)), state, path)
    with pytest.raises(data.DataError, match="missing"):
        data.load_weights(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)),
                          state, path)
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(data.DataError, match="cannot read checkpoint .*junk.pt"):
        data.load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(data.DataError, match="checkpoint .*nothere.pt not found"):
        data.load_checkpoint(str(tmp_path / "nothere.pt"))


def test_classification_loaders_normalise_with_the_training_statistics(tmp_path):
    write_mnist(tmp_path, n_train=120, n_test=20)
    train, val, test, info = data.classification_loaders("mnist", 16, data_dir=tmp_path,
                                                         download=False, augment=False)
    assert info["sizes"] == (110, 10, 20) and info["in_channels"] == 1
    assert info["image_size"] == 28 and len(info["classes"]) == 10
    x = torch.cat([a for a, _ in train])  # drop_last: 6 full batches of 16
    assert x.shape == (96, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert sum(len(b) for _, b in test) == 20 and sum(len(b) for _, b in val) == 10


def test_argument_parser_errors_in_one_line_and_positive_flags(capsys):
    p = data.ArgumentParser(prog="x.py")
    p.add_argument("--epochs", type=int, default=None)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--epochs", "two"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("x.py: error: argument --epochs")
    data.check_positive(p.parse_args([]), "epochs", "batch_size")  # unset or absent: no error
    for value in (0, -3):
        with pytest.raises(data.DataError, match=f"--epochs {value}: must be a positive"):
            data.check_positive(p.parse_args(["--epochs", str(value)]), "epochs")


def test_set_epoch_makes_the_order_a_function_of_seed_and_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    order = lambda loader: torch.cat([b[0] for b in loader]).tolist()  # noqa: E731
    a = data.make_loader(ds, 10, True, workers=0, seed=3)
    data.set_epoch(a, 0), order(a)
    data.set_epoch(a, 1)
    second = order(a)
    b = data.make_loader(ds, 10, True, workers=0, seed=3)  # a resumed run starts at epoch 1
    data.set_epoch(b, 1)
    assert order(b) == second
    data.set_epoch(b, 2)
    assert order(b) != second and sorted(order(b)) == list(range(50))


def test_torchvision_weights_offline_is_one_line_and_quiet(monkeypatch, capsys):
    import urllib.error

    def offline(url, *a, **k):
        print(f'Downloading: "{url}" to /somewhere')  # what torch.hub prints, on stdout
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    with pytest.raises(data.DataError) as e:
        data.torchvision_weights(w)
    msg = str(e.value)
    assert "\n" not in msg and "VGG16_Weights.IMAGENET1K_V1" in msg and "name resolution" in msg
    assert os.path.basename(w.url) in msg and "checkpoints" in msg
    assert capsys.readouterr() == ("", "")  # nothing but the error itself


def test_amp_helpers_bf16_on_cpu_and_no_scaler_for_bf16():
    cpu = torch.device("cpu")
    with data.autocast(cpu, True):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with data.autocast(cpu, False):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert not data.grad_scaler(cpu, True).is_enabled()  # bf16 needs no loss scaling


def test_error_line_is_the_message_without_a_worker_traceback():
    worker = ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1\ndata.DataError: corrupt "
                        "annotation a.xml (unclosed token); fetch the data set again")
    assert data.error_line(worker) == "corrupt annotation a.xml (unclosed token); fetch the data set again"
    assert data.error_line(data.DataError("plain message")) == "plain message"


def test_system_installed_fashion_mnist_is_read_in_place_and_damage_is_named(tmp_path, monkeypatch):
    import gzip
    import shutil
    # A Debian-style package folder with the four .gz idx files, and an empty --data-dir.
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_mnist(tmp_path / "plain", n_train=24, n_test=6, folder="F")
    system.mkdir()
    for f in os.listdir(tmp_path / "plain" / "F" / "raw"):
        with open(tmp_path / "plain" / "F" / "raw" / f, "rb") as src, \
                gzip.open(system / (f + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", (str(tmp_path / "absent"), str(system)))
    empty = tmp_path / "data"
    x, y, classes = data.classification_arrays("fashion-mnist", "trainval", empty, download=False)
    assert x.shape == (24, 1, 28, 28) and classes[0] == "T-shirt/top" and not empty.exists()
    xt, _, _ = data.classification_arrays("fashion-mnist", "test", empty, download=False)
    assert len(xt) == 6
    # --data-dir wins over the system copy when it holds the set.
    write_mnist(empty, n_train=12, n_test=3, folder="FashionMNIST")
    assert len(data.classification_arrays("fashion-mnist", "trainval", empty, download=False)[1]) == 12
    # Damaged system files: truncated gzip, wrong magic, body shorter than the header says.
    images = system / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    for damaged, message in ((images.read_bytes()[:40], "cannot read"),
                             (gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]), "bad magic number"),
                             (gzip.compress(raw[:-100]), "truncated")):
        images.write_bytes(damaged)
        with pytest.raises(data.DataError, match=message) as e:
            data.classification_arrays("fashion-mnist", "train", tmp_path / "data2", download=False)
        assert str(images) in str(e.value) and "\n" not in str(e.value)


def test_cifar10_jpg_folder_is_split_by_file_name_and_damage_is_named(tmp_path):
    # The layout of ../shared/data/cifar10_test_jpg, 5 images per class: per class, the first 4
    # file names (sorted) train, the last one tests; each image a flat colour that encodes its
    # class and index, so the labels and the order can be read back through JPEG's loss.
    folder = tmp_path / "cifar10_test_jpg"
    for label, c in enumerate(data.CIFAR10_CLASSES):
        (folder / c).mkdir(parents=True)
        for i in (4, 0, 3, 1, 2):  # written out of order: the split goes by name, not by mtime
            im = torch.zeros(3, 32, 32, dtype=torch.uint8)
            im[0], im[1] = 20 * label + 10, 40 * i + 20
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / c / f"{i:04d}.jpg",
                                                              quality=95)
    x, y, classes = data.classification_arrays("cifar10-jpg", "trainval", tmp_path)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and classes[3] == "cat"
    # class by class in turn: any first N (--limit N) holds every class, as CIFAR's batches do
    assert torch.equal(y, torch.arange(10).repeat(4))
    red, green = x[:, 0].float().mean((1, 2)), x[:, 1].float().mean((1, 2))
    assert torch.allclose(red, (20 * y + 10).float(), atol=4)
    assert torch.allclose(green, (40 * torch.arange(4).repeat_interleave(10) + 20).float(), atol=4)
    xt, yt, _ = data.classification_arrays("cifar10-jpg", "test", tmp_path)
    assert torch.equal(yt, torch.arange(10)) and torch.allclose(
        xt[:, 1].float().mean((1, 2)), torch.full((10,), 180.0), atol=4)
    _, _, _, info = data.classification_loaders("cifar10-jpg", 8, data_dir=tmp_path,
                                                train_split="trainval")
    assert info["sizes"] == (40, 0, 10) and info["in_channels"] == 3
    # A damaged JPEG is named as damaged; a missing class folder as not found, with the fix.
    (folder / "ship" / "0002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(data.DataError, match="0002.jpg.*corrupt") as e:
        data.classification_arrays("cifar10-jpg", "trainval", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="cifar10-jpg not found.*--data-dir"):
        data.classification_arrays("cifar10-jpg", "test", tmp_path / "elsewhere")


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", (str(tmp_path / "absent"),))
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.classification_arrays("fashion-mnist", "train", tmp_path, download=False)


def test_caffe_param_groups_give_biases_twice_the_lr_and_no_decay():
    import torch.nn as nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2),
                          nn.GroupNorm(2, 2))
    model[3].weight.requires_grad_(False)                       # frozen: left out
    weights, biases, norms = data.caffe_param_groups(model, 0.01, 5e-4)
    assert (weights["lr"], weights["weight_decay"]) == (0.01, 5e-4)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(weights["params"]) == ids([model[0].weight, model[2].weight])
    assert ids(biases["params"]) == ids([model[0].bias, model[2].bias])
    # BN's scale and shift together, at the lr without decay (neither decayed nor at 2x)
    assert (norms["lr"], norms["weight_decay"]) == (0.01, 0.0)
    assert ids(norms["params"]) == ids([model[1].weight, model[1].bias, model[3].bias])
    # no normalisation layer (AlexNet): the two Caffe groups alone
    assert len(data.caffe_param_groups(model[:1], 0.01, 5e-4)) == 2
    # one SGD step on a zero gradient: the weights decay, the biases do not
    opt = torch.optim.SGD(data.caffe_param_groups(model, 0.1, 0.5), lr=0.1)
    before = [p.detach().clone() for p in (model[0].weight, model[0].bias)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model[0].weight, before[0] * (1 - 0.1 * 0.5))
    assert torch.equal(model[0].bias, before[1])


def test_every_classification_script_trains_on_the_whole_training_set_by_default():
    import alexnet, googlenet, lenet5, monster_finetune, overfeat, resnet, resnext, vgg19  # noqa: E401
    for m in (alexnet, googlenet, lenet5, monster_finetune, overfeat, resnet, resnext):
        assert m.get_args_parser().parse_args([]).holdout is False, m.__name__
        assert m.get_args_parser().parse_args(["--holdout"]).holdout is True, m.__name__
    # VGG's §3.1 plateau schedule needs the val split: held out on small sets unless asked not to
    for argv, holdout, schedule in (([], True, "plateau"), (["--no-holdout"], False, "steps"),
                                    (["--lr-schedule", "steps"], False, "steps")):
        args = vgg19.get_args_parser().parse_args(["--data", "shapes", *argv])
        vgg19.resolve_defaults(args)
        assert (args.holdout, args.lr_schedule) == (holdout, schedule), argv
    with pytest.raises(data.DataError, match="ImageNet has no held-out split"):
        args = resnet.get_args_parser().parse_args(["--data", "imagenet", "--holdout"])
        data.train_split(args)


def test_shapes_too_small_to_hold_a_shape_is_a_one_line_error():
    with pytest.raises(data.DataError, match="8x8 pixels are too small to hold a shape; draw "
                                             "them at 16 or more"):
        data.ShapesDataset("shapes", "train", n=10, size=8)
    assert len(data.ShapesDataset("shapes", "train", n=10, size=16)) == 10
