"""yolo.py: the parameter count of Fig. 3's network by hand, output shapes, the loss term by term
on a hand-built target, target encoding (one object per cell) and decoding, NMS at test time,
the real VOC path on tiny files, --pretrain / --backbone-weights, --detect, resume equality,
one-line errors and a learning test."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

import data
import yolo
from conftest import any_host_reads, command, ddp_results_json, write_voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny configuration for end-to-end runs: --quick's network (Fast YOLO, 2 strides dropped) at
# 64 px, width 1/16, S=2, 48 images, without --quick's shapes pretraining (tested on its own).
TINY = ["--data", "shapes-det", "--quick", "--img-size", "64", "--width", "0.0625", "--grid", "2",
        "--batch-size", "8", "--limit", "48", "--device", "cpu", "--log-every", "1000",
        "--pretrain-epochs", "0"]


def conv(c_in, c, k):
    return c_in * c * k * k + c


def fc(a, b):
    return a * b + b


def test_parameter_count_by_hand_from_the_layer_table_and_output_shape():
    # Fig. 3: the 20 pretrained convolutions ...
    backbone = conv(3, 64, 7) + conv(64, 192, 3) + conv(192, 128, 1) + conv(128, 256, 3) + \
        conv(256, 256, 1) + conv(256, 512, 3) + 4 * (conv(512, 256, 1) + conv(256, 512, 3)) + \
        conv(512, 512, 1) + conv(512, 1024, 3) + 2 * (conv(1024, 512, 1) + conv(512, 1024, 3))
    # ... 4 added 3x3x1024 convolutions (the second with stride 2: 14 -> 7), fc 7*7*1024 -> 4096,
    # fc 4096 -> 7 * 7 * (5 * 2 + 20) = 1470.
    head = 4 * conv(1024, 1024, 3)
    fcs = fc(7 * 7 * 1024, 4096) + fc(4096, 1470)
    assert (backbone, head, fcs) == (22_403_136, 37_752_832, 211_547_582)
    with torch.device("meta"):
        m = yolo.YOLO("full", 20, 7, 2, 1.0, 448)
        fast = yolo.YOLO("fast", 20, 7, 2, 1.0, 448)
    assert yolo.count_parameters(m.backbone) == backbone
    assert yolo.count_parameters(m.head) == head and yolo.count_parameters(m.fc) == fcs
    assert yolo.count_parameters(m) == backbone + head + fcs == 271_703_550
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 24
    # Fast YOLO: 9 convolutions 16 ... 1024 (darknet's v1 yolo-tiny.cfg), 7 x 7 map at 448.
    fast_convs = conv(3, 16, 3) + conv(16, 32, 3) + conv(32, 64, 3) + conv(64, 128, 3) + \
        conv(128, 256, 3) + conv(256, 512, 3) + conv(512, 1024, 3) + 2 * conv(1024, 1024, 3)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in fast.modules()) == 9
    assert yolo.count_parameters(fast) == fast_convs + fcs and fast.map_size == (7, 7)
    # The real forward at 448 (width 1/16 to be cheap): (N, 7, 7, 30), the 1470 outputs.
    torch.manual_seed(0)
    small = yolo.YOLO("full", 20, 7, 2, 1 / 16, 448).eval()
    assert small.map_size == (7, 7)
    with torch.no_grad():
        assert small(torch.randn(2, 3, 448, 448)).shape == (2, 7, 7, 30)
    names = dict(m.named_modules())
    assert "backbone.conv20" in names and "head.conv24" in names and "fc.fc2" in names
    with pytest.raises(ValueError, match="too small"):
        yolo.YOLO("full", img_size=16)


def test_drop_strides_keeps_the_weights_and_gives_an_s_by_s_map():
    # The full net's 6 stride-2 steps: 64 px -> 1 x 1; without conv22's stride and pool16 -> 4 x 4
    # (the --quick S); Fast YOLO's 6 pools: 128 px -> 2 x 2, one dropped -> 4 x 4.
    spec = yolo.drop_strides(yolo.FULL, 2)
    assert spec.count("M") == yolo.FULL.count("M") - 1 and (1024, 3, 2) not in spec
    assert yolo.map_size(yolo.FULL, 64) == 1 and yolo.map_size(spec, 64) == 4
    assert yolo.map_size(yolo.drop_strides(yolo.FAST, 1), 128) == 4
    with torch.device("meta"):
        a = yolo.YOLO("full", 6, 4, 2, 0.125, 64)
        b = yolo.YOLO("full", 6, 4, 2, 0.125, 64, dropped=2)
    assert a.map_size == (1, 1) and b.map_size == (4, 4)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(a.backbone) == shapes(b.backbone) and shapes(a.head) == shapes(b.head)
    with pytest.raises(ValueError, match="drop-strides"):
        yolo.drop_strides(yolo.FAST, 7)


def hand_prediction():
    """S=2, B=2, C=2, batch of 2. Image 0: one object in cell (row 0, col 1), class 1, x=0.5,
    y=0.25, w=0.25, h=0.36. Image 1: no object."""
    S, B, C = 2, 2, 2
    target = torch.zeros(2, S, S, 5 + C)
    target[0, 0, 1, :5] = torch.tensor([0.5, 0.25, 0.25, 0.36, 1.0])
    target[0, 0, 1, 5 + 1] = 1.0
    pred = torch.zeros(2, S, S, 5 * B + C)
    pred[0, ..., 4] = pred[0, ..., 9] = 0.2      # every confidence of image 0: 0.2 ...
    pred[1, ..., 4] = pred[1, ..., 9] = 0.1      # ... of image 1: 0.1
    pred[..., 10:] = 0.7                          # class outputs of empty cells: not counted
    # Predictor 0 of the object's cell: same centre, sqrt w = sqrt(0.125) -> w = 0.125: IoU 1/2.
    pred[0, 0, 1, 0:5] = torch.tensor([0.5, 0.25, math.sqrt(0.125), 0.6, 0.8])
    # Predictor 1: a small box far away (IoU 0), confidence 0.3.
    pred[0, 0, 1, 5:10] = torch.tensor([0.1, 0.9, 0.2, 0.2, 0.3])
    pred[0, 0, 1, 10:] = torch.tensor([0.3, 0.6])
    return pred, target


def test_loss_term_by_term_by_hand():
    pred, target = hand_prediction()
    L = yolo.yolo_loss(pred, target, B=2)
    # coord: lambda_coord 5 x ((sqrt 0.25 - sqrt 0.125)^2) on the responsible predictor 0.
    coord = 5 * (0.5 - math.sqrt(0.125)) ** 2
    conf_obj = (0.8 - 0.5) ** 2                       # target = its IoU with the truth, 1/2
    # noobj, lambda 0.5: predictor 1 of the object cell (0.3) + 6 others of image 0 at 0.2,
    # + 8 predictors of image 1 at 0.1.
    conf_noobj = 0.5 * (0.3 ** 2 + 6 * 0.2 ** 2 + 8 * 0.1 ** 2)
    cls = 0.3 ** 2 + (1 - 0.6) ** 2                   # only the object's cell
    want = {"coord": coord / 2, "conf_obj": conf_obj / 2, "conf_noobj": conf_noobj / 2,
            "class": cls / 2}                         # sums divided by the batch size 2
    for k, v in want.items():
        assert L[k].item() == pytest.approx(v, rel=1e-5), k
    assert L["loss"].item() == pytest.approx(sum(want.values()), rel=1e-5)
    # The IoU target is detached: no gradient flows into the coordinates through it.
    pred.requires_grad_(True)
    yolo.yolo_loss(pred, target, B=2)["conf_obj"].backward()
    assert pred.grad[0, 0, 1, :4].abs().sum() == 0 and pred.grad[0, 0, 1, 4] != 0


def test_the_responsible_predictor_is_the_higher_iou_one():
    pred, target = hand_prediction()
    # Swap: predictor 1 now holds the IoU-1/2 box, predictor 0 the far one.
    pred[0, 0, 1, :10] = torch.cat([pred[0, 0, 1, 5:10], pred[0, 0, 1, 0:5]])
    L = yolo.yolo_loss(pred, target, B=2)
    assert L["coord"].item() == pytest.approx(5 * (0.5 - math.sqrt(0.125)) ** 2 / 2, rel=1e-5)
    assert L["conf_obj"].item() == pytest.approx(0.09 / 2, rel=1e-5)
    # Make predictor 0 the better one (exact box, IoU 1): it takes over, coord 0, target 1.
    pred[0, 0, 1, 0:4] = torch.tensor([0.5, 0.25, 0.5, 0.6])
    L = yolo.yolo_loss(pred, target, B=2)
    assert L["coord"].item() == pytest.approx(0.0, abs=1e-7)
    assert L["conf_obj"].item() == pytest.approx((0.3 - 1.0) ** 2 / 2, rel=1e-5)


def test_with_every_iou_zero_the_smallest_rmse_predictor_is_responsible():
    # darknet's detection layer: both boxes miss the truth (x 0.625..0.875 in the image, y
    # 0.035..0.395); predictor 1 (x 0.95) is nearer than predictor 0 (x 0.5) in (x, y, w, h)
    pred, target = hand_prediction()
    tiny = math.sqrt(0.01)
    pred[0, 0, 1, 0:4] = torch.tensor([0.0, 0.25, tiny, tiny])
    pred[0, 0, 1, 5:9] = torch.tensor([0.9, 0.25, tiny, tiny])
    L = yolo.yolo_loss(pred, target, B=2)
    coord_1 = 5 * ((0.9 - 0.5) ** 2 + (tiny - 0.5) ** 2 + (tiny - 0.6) ** 2)
    assert L["coord"].item() == pytest.approx(coord_1 / 2, rel=1e-5)
    assert L["conf_obj"].item() == pytest.approx(0.3 ** 2 / 2, rel=1e-5)  # predictor 1's 0.3
    pred[0, 0, 1, 0] = 0.05                       # now predictor 0 is the nearer one
    pred[0, 0, 1, 5] = 0.99
    L = yolo.yolo_loss(pred, target, B=2)
    coord_0 = 5 * ((0.05 - 0.5) ** 2 + (tiny - 0.5) ** 2 + (tiny - 0.6) ** 2)
    assert L["coord"].item() == pytest.approx(coord_0 / 2, rel=1e-5)


def test_negative_confidence_times_negative_class_output_is_no_detection():
    S, B, C = 2, 2, 2
    pred = torch.zeros(1, S, S, 5 * B + C)
    pred[0, 0, 0, 0:5] = torch.tensor([0.5, 0.5, 0.5, 0.5, -0.8])   # a box, confidence < 0
    pred[0, 0, 0, 10:] = torch.tensor([-0.9, 0.2])                   # a class output < 0
    (d,) = yolo.decode(pred, B, 64, conf_threshold=0.005)
    assert len(d["scores"]) == 0                  # -0.8 x -0.9 = 0.72 would have passed
    pred[0, 0, 0, 4] = 0.8
    (d,) = yolo.decode(pred, B, 64, conf_threshold=0.005)
    assert d["labels"].tolist() == [1] and d["scores"].tolist() == pytest.approx([0.16])


def test_encode_then_decode_gives_back_the_boxes():
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0], [40.0, 10.0, 60.0, 22.0], [30.0, 40.0, 50.0, 63.0]])
    labels = torch.tensor([3, 0, 5])
    S, C = 4, 6
    t = yolo.encode_targets(boxes, labels, (64, 64), S, C)
    assert t.shape == (4, 4, 11) and t[..., 4].sum() == 3
    # Box 0: centre (12, 18) -> cell (row 1, col 0), offsets (12/16, 18/16 - 1), w 16/64, h 24/64.
    assert torch.allclose(t[1, 0, :5], torch.tensor([0.75, 0.125, 0.25, 0.375, 1.0]))
    assert t[1, 0, 5 + 3] == 1 and t[1, 0, 5:].sum() == 1
    pred = torch.zeros(1, S, S, 5 * 2 + C)  # the truth as predictor 0, confidence 1
    pred[0, ..., 0:2], pred[0, ..., 2:4] = t[..., 0:2], t[..., 2:4].sqrt()
    pred[0, ..., 4], pred[0, ..., 10:] = t[..., 4], t[..., 5:]
    (d,) = yolo.decode(pred, 2, 64, conf_threshold=0.5)
    order = d["labels"].argsort()
    assert torch.allclose(d["boxes"][order], boxes[[1, 0, 2]], atol=1e-4)
    assert d["labels"][order].tolist() == [0, 3, 5] and torch.allclose(d["scores"], torch.ones(3))


def test_one_object_per_cell_keeps_the_largest():
    small, large = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 14.0, 14.0]  # centres 5 and 7: cell (0, 0)
    for boxes, labels in (([small, large], [1, 2]), ([large, small], [2, 1])):
        t = yolo.encode_targets(torch.tensor(boxes), torch.tensor(labels), (64, 64), 4, 3)
        assert t[..., 4].sum() == 1 and t[0, 0, 5 + 2] == 1
        assert torch.allclose(t[0, 0, 2:4], torch.tensor([14 / 64, 14 / 64]))


def test_inference_scores_and_nms_remove_a_duplicate():
    S, B, C = 2, 2, 3
    pred = torch.zeros(1, S, S, 5 * B + C)
    # Cell (0, 0) predictor 0 and cell (0, 1) predictor 1 see the same box (IoU > 0.5), class 1;
    # centre (0.5, 0.25) of the image = offset 1.0 in cell 0 / 0.0 in cell 1.
    pred[0, 0, 0, 0:5] = torch.tensor([1.0, 0.5, 0.6, 0.6, 0.9])
    pred[0, 0, 1, 5:10] = torch.tensor([0.02, 0.5, 0.6, 0.6, 0.8])
    pred[0, 0, 0, 10:] = torch.tensor([0.1, 0.8, 0.1])
    pred[0, 0, 1, 10:] = torch.tensor([0.1, 0.7, 0.2])
    (d,) = yolo.decode(pred, B, 100, conf_threshold=0.1, nms_iou=0.5)
    # class scores = P(class | object) x confidence: 0.72 (kept), 0.56 (suppressed), and the
    # class-2 score 0.16 of the second box survives (NMS is per class); 0.09, 0.08 < 0.1.
    assert d["labels"].tolist() == [1, 2]
    assert torch.allclose(d["scores"], torch.tensor([0.72, 0.16]))
    assert torch.allclose(d["boxes"][0], torch.tensor([32.0, 7.0, 68.0, 43.0]), atol=1e-4)
    (d,) = yolo.decode(pred, B, 100, conf_threshold=0.1, nms_iou=1.0)
    assert len(d["scores"]) == 3  # without suppression the duplicate is there
    # the test and --detect take the IoU from --nms-iou (predict, as the parser gives it)
    for iou, n in (("0.5", 2), ("1", 3)):
        args = yolo.get_args_parser().parse_args(["--nms-iou", iou, "--img-size", "100"])
        _, (d,) = yolo.predict(lambda x: pred, torch.zeros(1), args, torch.device("cpu"),
                               [(100, 100)], 0.1)
        assert len(d["scores"]) == n


def test_lr_schedule_fractions():
    assert yolo.lr_factor(0) == pytest.approx(0.1)                 # 1e-3 of 1e-2
    assert yolo.lr_factor(yolo.WARMUP / 2) == pytest.approx(0.55)
    assert yolo.lr_factor(10 / 135) == 1.0 and yolo.lr_factor(74.9 / 135) == 1.0
    assert yolo.lr_factor(80 / 135) == 0.1 and yolo.lr_factor(110 / 135) == 0.01


def test_weight_decay_is_on_the_convolution_and_fc_weights_only():
    # darknet (update_convolutional_layer, update_connected_layer): -decay * w on the weights'
    # updates alone; biases and batch-norm scales and shifts without
    for bn, conv_biases in ((True, 0), (False, 9)):
        torch.manual_seed(0)
        m = yolo.YOLO("fast", 6, 4, 2, 0.0625, 64, bn=bn, dropped=2)
        groups = yolo.param_groups(m, 5e-4)
        name = {id(p): n for n, p in m.named_parameters()}
        decayed = [name[id(p)] for p in groups[0]["params"]]
        free = [name[id(p)] for p in groups[1]["params"]]
        assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
        assert sorted(decayed + free) == sorted(name.values())          # each parameter once
        assert decayed == [f"backbone.conv{i}.weight" for i in range(1, 8)] + \
            ["head.conv8.weight", "head.conv9.weight", "fc.fc1.weight", "fc.fc2.weight"]
        assert len(free) == 2 * 9 * bn + conv_biases + 2 and "fc.fc2.bias" in free
        assert all(n.endswith("bias") or ".bn" in n for n in free)
        # one step on zero gradients: only the decayed weights shrink, by lr * decay
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in m.named_parameters():
            factor = 1 - 0.1 * 5e-4 if n in decayed else 1.0
            assert torch.allclose(p, before[n] * factor, rtol=0, atol=1e-7), n


def test_pretraining_recipes_and_their_lr_at_given_steps():
    # darknet's extraction.cfg: 2015 (released with v1, no batch norm): lr 0.5, poly power 6,
    # batch 128, 500,000 batches = 50 epochs of 1.28M images, darknet's init; 2016 (batch norm,
    # our --bn): lr 0.1, power 4, 1,600,000 batches = 160 epochs
    assert yolo.pretrain_recipe("imagenet", False) == yolo.EXTRACTION == \
        {"lr": 0.5, "power": 6, "epochs": 50, "batch_size": 128, "init": "darknet"}
    assert round(500_000 * 128 / 1_281_167) == 50 and round(1_600_000 * 128 / 1_281_167) == 160
    assert yolo.pretrain_recipe("imagenet", True) == yolo.EXTRACTION_BN == \
        {"lr": 0.1, "power": 4, "epochs": 160, "batch_size": 128, "init": None}
    assert yolo.pretrain_recipe("shapes", True) == yolo.SHAPES_PRETRAIN  # ours, cosine
    # darknet's init: weights uniform in +-sqrt(2 / fan-in), conv biases 0, fc biases the bound
    torch.manual_seed(0)
    m = yolo.Classifier(torch.nn.Conv2d(8, 16, 3), 16, 10)
    yolo.darknet_init(m)
    for w, fan_in in ((m.backbone.weight, 8 * 9), (m.fc.weight, 16)):
        bound = math.sqrt(2 / fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.2)  # a third of He's
    assert torch.equal(m.backbone.bias, torch.zeros(16))
    assert torch.allclose(m.fc.bias, torch.full((10,), math.sqrt(2 / 16)))
    # poly: the n-th update (it + 1) at (1 - n / max_batches)^power, the last at 0
    f = yolo.pretrain_lr_factor
    assert f(0, 100, 10, 4) == pytest.approx(0.999 ** 4)
    assert f(499, 100, 10, 4) == pytest.approx(0.5 ** 4) and f(249, 100, 10, 6) == \
        pytest.approx(0.75 ** 6)
    assert f(999, 100, 10, 4) == 0.0
    # ours on the shapes: a cosine over the epochs, constant within each (100 steps an epoch)
    assert f(0, 100, 10) == f(99, 100, 10) == 1.0
    assert f(500, 100, 10) == f(599, 100, 10) == pytest.approx(0.5)
    # the defaults each command resolves to
    def resolved(*argv):
        args = yolo.get_args_parser().parse_args(list(argv))
        yolo.resolve_defaults(args)
        return args.epochs, args.lr, args.batch_size, args.pretrain_lr, args.pretrain_batch_size
    lr = 0.5
    assert resolved("--data", "voc", "--pretrain", "imagenet") == (50, lr, 128, lr, 128)
    assert resolved("--data", "voc", "--pretrain", "imagenet", "--bn") == (160, 0.1, 128, 0.1, 128)
    assert resolved("--data", "voc", "--pretrain", "imagenet", "--batch-size", "64",
                    "--lr", "0.01") == (50, 0.01, 64, lr, 64)
    assert resolved("--data", "voc", "--pretrain-epochs", "90") == (135, 1e-2, 64, lr, 128)
    assert resolved("--data", "voc", "--pretrain-epochs", "90", "--batch-size", "16")[2:] == \
        (16, lr, 16)                                    # run_all.sh's `-- --batch-size N`
    assert resolved("--data", "shapes-det", "--quick") == (15, 2e-3, 32, 2e-2, 32)
    assert resolved("--data", "shapes-det", "--quick", "--pretrain", "shapes") == \
        (30, 2e-2, 32, 2e-2, 32)


def test_pretraining_lr_follows_the_recipe_per_step_and_resumes_exactly(tmp_path, monkeypatch):
    # extraction.cfg's poly, stepped per iteration, from darknet's init (on the shapes here: the
    # recipe stands in for ImageNet's, at a small lr); the lr of the last step of each epoch is
    # in the history, and a run stopped after epoch 1 and resumed gives the uninterrupted one's
    monkeypatch.setattr(yolo, "pretrain_recipe", lambda name, bn: yolo.EXTRACTION)
    inits = []
    monkeypatch.setattr(yolo, "darknet_init",
                        lambda m, f=yolo.darknet_init: inits.append(1) or f(m))
    argv = ["--pretrain", "shapes", "--pretrain-size", "32", "--quick", "--variant", "fast",
            "--width", "0.0625", "--epochs", "2", "--batch-size", "16", "--limit", "48",
            "--device", "cpu", "--log-every", "1000", "--lr", "0.01"]
    a = yolo.main(argv + ["--out", str(tmp_path / "a")])
    assert [h["lr"] for h in a["history"]] == pytest.approx([0.01 * (1 - 3 / 6) ** 6, 0.0])
    assert a["config"]["batch_size"] == 16 and inits == [1]
    assert yolo.main(argv + ["--out", str(tmp_path / "b"), "--stop-after", "1"]) is None
    b = yolo.main(argv + ["--out", str(tmp_path / "b"), "--resume"])
    assert a["history"] == b["history"] and a["metrics"] == b["metrics"]


def test_fast_augmentation_kernels_equal_torchvisions():
    # ScaleTranslate and data.ColorJitterU8 draw as v2.RandomAffine and v2.ColorJitter do and
    # must give the same pixels and boxes: over 60 draws on uint8 images of several sizes,
    # square and not, with boxes pushed partly outside.
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    g = torch.Generator().manual_seed(0)
    for k in range(60):
        h, w = [(448, 448), (300, 300), (375, 500), (64, 48)][k % 4]
        image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        boxes = tv_tensors.BoundingBoxes([[0, 0, w // 2, h // 3], [w // 4, h // 5, w, h]],
                                         format="XYXY", canvas_size=(h, w))
        pairs = ((yolo.ScaleTranslate((0.2, 0.2), (0.8, 1.2)),
                  v2.RandomAffine(degrees=0, translate=(0.2, 0.2), scale=(0.8, 1.2))),
                 (data.ColorJitterU8(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
                  v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5))))
        for ours, theirs in pairs:
            torch.manual_seed(k)
            a = ours(image, boxes)
            torch.manual_seed(k)
            b = theirs(image, boxes)
            assert type(a[0]) is tv_tensors.Image and a[0].dtype == torch.uint8
            assert torch.equal(a[0], b[0]), (k, type(ours).__name__)
            assert torch.equal(a[1], b[1])
    # the whole training chain, on a real-format sample: the same as with torchvision's classes
    image = tv_tensors.Image(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g))
    target = {"boxes": tv_tensors.BoundingBoxes([[5, 6, 30, 40]], format="XYXY",
                                                canvas_size=(48, 64)), "labels": torch.tensor([3])}
    ours = yolo.train_transforms(64)
    theirs = v2.Compose([v2.RandomAffine(degrees=0, translate=(0.2, 0.2), scale=(0.8, 1.2))
                         if isinstance(t, yolo.ScaleTranslate) else
                         v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5))
                         if isinstance(t, data.ColorJitterU8) else t
                         for t in ours.transforms])
    assert [type(t) for t in theirs.transforms] != [type(t) for t in ours.transforms]
    for seed in range(10):
        torch.manual_seed(seed)
        a = ours(image, target)
        torch.manual_seed(seed)
        b = theirs(image, target)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_training_flips_half_the_images_and_the_boxes_follow():
    # darknet's load_data_region flips half the images (rand()%2), boxes with them. A box whose
    # left half is red and right half blue: through the whole training chain (less the float
    # stages) red left of blue = not flipped; every draw's box stays on the object's pixels.
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    chain = yolo.train_transforms(64)
    kinds = [type(t) for t in chain.transforms]
    flip = chain.transforms[kinds.index(v2.RandomHorizontalFlip)]
    assert kinds.count(v2.RandomHorizontalFlip) == 1 and flip.p == 0.5
    assert kinds.index(yolo.ScaleTranslate) < kinds.index(v2.RandomHorizontalFlip)  # as darknet
    assert v2.RandomHorizontalFlip not in map(type, yolo.train_transforms(64, False).transforms)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0, 20:40, 10:18], image[2, 20:40, 18:26] = 255, 255     # red x 10..17, blue 18..25
    image = tv_tensors.Image(image)
    target = {"boxes": tv_tensors.BoundingBoxes([[10, 20, 26, 40]], format="XYXY",
                                                canvas_size=(64, 64)), "labels": torch.tensor([2])}
    uint8 = v2.Compose(chain.transforms[:-2])                       # no ToDtype, Normalize
    assert [type(t) for t in chain.transforms[-2:]] == [v2.ToDtype, data.Normalize]
    flipped = []
    for seed in range(200):
        torch.manual_seed(seed)
        x, t = uint8(image, target)
        (box,) = t["boxes"].tolist()
        red, blue = x[0] > x[2] + 30, x[2] > x[0] + 30
        cols = torch.arange(64.0)
        on = (red | blue).nonzero()
        # the box bounds the object's pixels (nearest-neighbour warp: within 2 pixels)
        assert abs(on[:, 1].min() - box[0]) <= 2 and abs(on[:, 1].max() + 1 - box[2]) <= 2
        assert abs(on[:, 0].min() - box[1]) <= 2 and abs(on[:, 0].max() + 1 - box[3]) <= 2
        flipped.append((red.float().sum(0) @ cols / red.sum() >
                        blue.float().sum(0) @ cols / blue.sum()).item())
    assert 0.4 < sum(flipped) / len(flipped) < 0.6
    # a flip alone: the image mirrored, boxes x -> W - x
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        x, t = flip(image, target)
        mirrored = torch.equal(x, image.flip(-1))
        assert mirrored or torch.equal(x, image)
        assert t["boxes"].tolist() == ([[64 - 26, 20, 64 - 10, 40]] if mirrored else
                                       [[10, 20, 26, 40]])
        outcomes.add(mirrored)
    assert outcomes == {True, False}


def test_scale_translate_reads_nothing_back_from_the_images_device():
    # Under --gpu-decode the augmentation runs on the GPU image: the source rows and columns
    # are computed on the CPU (torchvision's float32 steps, as before), so counting the rows
    # that fall outside reads nothing back per image. The meta device stands in for the GPU
    # (no data: any read fails there); the CPU result is torchvision's (tested above).
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.zeros(3, 64, 48, dtype=torch.uint8, device="meta"))
    t = yolo.ScaleTranslate((0.2, 0.2), (0.8, 1.2))
    for seed in range(5):
        torch.manual_seed(seed)
        out = t(image)
        assert type(out) is tv_tensors.Image and out.shape == image.shape
        assert out.device.type == "meta"


def test_training_loop_reads_the_losses_once_per_epoch(monkeypatch):
    # The four terms and the loss stay on the device: the reads into Python over an epoch
    # (Progress's and the terms' means, at its end) do not grow with its steps; the returned
    # means are those of the steps' terms, weighted by their images.
    ds = data.detection_dataset("shapes-det", "train", quick=True)
    s = yolo.YoloSet(ds, yolo.train_transforms(64, augment=False), 4, 6)
    batches = [yolo.collate([s[4 * b + i] for i in range(4)]) for b in range(4)]
    torch.manual_seed(0)
    model = yolo.YOLO("fast", 6, 4, 2, 0.0625, 64, dropout=0.0, dropped=2)
    args = yolo.get_args_parser().parse_args([])
    args.world, args.channels_last = 1, False
    cpu = torch.device("cpu")
    counts = []
    for steps in (2, 4):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
        progress = yolo.metrics.Progress(steps, 1, 1000, enabled=False, model=model)
        with monkeypatch.context() as m:
            reads = any_host_reads(m)
            terms = yolo.train_one_epoch(model, batches[:steps], optimizer, scheduler,
                                         data.grad_scaler(cpu, False), args, cpu, 0, progress)
        counts.append(len(reads))
        assert list(terms) == ["coord", "conf_obj", "conf_noobj", "class", "loss"]
        assert terms["loss"] == pytest.approx(sum(v for k, v in terms.items() if k != "loss"),
                                              rel=1e-5)
    assert counts[0] == counts[1], counts


def test_pretraining_scales_its_loss_with_the_grad_scaler(tmp_path, monkeypatch):
    # §2.2's pretraining loop steps through the run's GradScaler as the detection loop does
    # (with fp16 --amp on a GPU without bf16, unscaled gradients underflow): scale(loss)
    # .backward(), step, update at every step. A scaler that records its calls stands in.
    import torch.nn.functional as F
    calls = []

    class Recording(torch.amp.GradScaler):
        def scale(self, outputs):
            calls.append(("scale", outputs.requires_grad and outputs.dim() == 0))
            return super().scale(outputs)

        def step(self, optimizer, *a, **kw):
            calls.append(("step", isinstance(optimizer, torch.optim.SGD)))
            return super().step(optimizer, *a, **kw)

        def update(self, *a, **kw):
            calls.append(("update", True))
            return super().update(*a, **kw)

    made = []
    monkeypatch.setattr(data, "grad_scaler", lambda device, amp: made.append(amp) or
                        Recording(device.type, enabled=False))
    ce = F.cross_entropy  # 2-D logits: not the nll_loss2d path (no deterministic CUDA kernel)
    monkeypatch.setattr(F, "cross_entropy", lambda input, *a, **kw: ce(input, *a, **kw)
                        if input.dim() == 2 else pytest.fail("cross_entropy on a map"))
    r = yolo.main(["--pretrain", "shapes", "--pretrain-size", "32", "--quick", "--variant",
                   "fast", "--width", "0.0625", "--epochs", "1", "--batch-size", "16",
                   "--limit", "48", "--device", "cpu", "--out", str(tmp_path / "pre"),
                   "--log-every", "1000"])
    assert made == [False]
    assert calls == [("scale", True), ("step", True), ("update", True)] * 3  # 48 / 16 steps
    assert math.isfinite(r["history"][0]["train_loss"])


def test_overfit_one_batch():
    ds = data.detection_dataset("shapes-det", "train", quick=True)
    s = yolo.YoloSet(ds, yolo.train_transforms(64, augment=False), 4, 6)
    x, t, _, _ = yolo.collate([s[i] for i in range(16)])
    torch.manual_seed(0)
    m = yolo.YOLO("fast", 6, 4, 2, 0.125, 64, bn=True, dropout=0.0)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    first = None
    for _ in range(40):
        loss = yolo.yolo_loss(m(x), t, 2)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    every = ["--eval-every", "2"]  # the test split after epoch 2 only, in the resumed run too
    straight = yolo.main(TINY + ["--epochs", "2", "--out", a, *every])
    assert yolo.main(TINY + ["--epochs", "2", "--out", b, "--stop-after", "1", *every]) is None
    resumed = yolo.main(TINY + ["--epochs", "2", "--out", b, "--resume", *every])
    assert straight["history"] == resumed["history"]
    assert straight["metrics"]["map"] == resumed["metrics"]["map"]
    assert ["test_map" in h for h in straight["history"]] == [False, True]
    last, final = straight["history"][-1], straight["metrics"]  # the final test's figures
    assert (last["test_map"], last["test_loss"]) == (final["map"], final["test_loss"])
    # --eval-only with that checkpoint renders the test scenes alone: the same figures
    sets = data.detection_dataset
    monkeypatch.setattr(data, "detection_dataset", lambda name, split, *a, **kw:
                        sets(name, split, *a, **kw) if split == "test"
                        else pytest.fail(f"--eval-only read the {split} split"))
    again = yolo.main(TINY + ["--eval-only", "--weights", os.path.join(a, "checkpoint.pt"),
                              "--out", str(tmp_path / "e")])
    assert again["config"]["sizes"] == {"train": 0, "val": 0, "test": 48}
    assert straight["config"]["sizes"] == {"train": 48, "val": 0, "test": 48}
    assert {k: v for k, v in again["metrics"].items() if k != "train_images_per_s"} == \
        {k: v for k, v in straight["metrics"].items() if k != "train_images_per_s"}
    sa = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)
    # the optimiser decays the weights only (--quick: batch norm, no conv biases)
    assert [(len(g["params"]), g["weight_decay"]) for g in sa["optimizer"]["param_groups"]] == \
        [(11, 5e-4), (2 * 9 + 2, 0.0)]
    sa = sa["model"]
    sb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rec = json.load(open(os.path.join(a, "results.json")))
    assert len(rec["metrics"]["ap"]) == 6 and rec["config"]["classes"][0] == "circle"
    assert 0 <= rec["metrics"]["map"] <= 1
    assert set(rec["pr"]) <= set(data.SHAPES_CLASSES) and rec["pr"]  # the PR curves
    # --detect on a folder of 2 shapes images and a non-image with that checkpoint: 2 PNGs, a
    # row per image (boxes in its pixels), the non-image reported and skipped
    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(2):
        image, _, _, _, _ = data.render_shapes(0, i, 64 + 16 * i, split="test")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(mine / f"shape{i}.png")
    (mine / "readme.png").write_text("not an image")
    rows = yolo.main(["--detect", str(mine), "--weights", os.path.join(a, "checkpoint.pt"),
                      "--out", str(tmp_path / "det"), "--score-threshold", "0", "--device",
                      "cpu"])
    assert [os.path.basename(r["image"]) for r in rows] == ["readme.png", "shape0.png",
                                                            "shape1.png"]
    assert "is not an image" in rows[0]["error"]
    assert os.path.isfile(tmp_path / "det" / "shape1_detections.png")
    for r, side in zip(rows[1:], (64, 80)):
        assert os.path.isfile(r["picture"]) and 0 < len(r["found"]) <= 100
        assert set(r["found"][0]) == {"class", "score", "xmin", "ymin", "xmax", "ymax"}
        assert all(f["class"] in data.SHAPES_CLASSES and f["xmax"] <= side + 1e-4
                   for f in r["found"])
    assert len(json.load(open(tmp_path / "det" / "predictions.json"))) == 3
    with pytest.raises(data.DataError, match="gone.png does not exist") as e:
        yolo.main(["--detect", str(tmp_path / "gone.png"), "--weights",
                   os.path.join(a, "checkpoint.pt"), "--out", str(tmp_path / "x"), "--device",
                   "cpu"])
    assert "\n" not in str(e.value)


def test_real_voc_path_on_tiny_files(tmp_path, voc_images):
    root = str(tmp_path)
    write_voc(root, "2007", "trainval", voc_images)
    write_voc(root, "2012", "trainval", {"2012_000001": (40, 60, [("cat", 3, 4, 30, 50, 0)])})
    write_voc(root, "2007", "test", voc_images)
    args = yolo.get_args_parser().parse_args(["--data", "voc", "--data-dir", root,
                                              "--no-download", "--img-size", "64"])
    args.quick, args.limit, args.augment = False, None, True
    _, test, classes = yolo.detection_sets(args, 7)
    x, t, gt, size = test[0]
    # Ground truth stays in the original (64 x 48) pixels, VOC's 1-based corners made continuous,
    # difficult flags kept; the network input is 64 x 64 and the person is encoded.
    assert size == (48, 64) and x.shape == (3, 64, 64)
    assert torch.equal(gt["boxes"], torch.tensor([[4.0, 5.0, 30.0, 40.0], [32.0, 1.0, 60.0, 47.0]]))
    assert gt["difficult"].tolist() == [False, True] and t[..., 4].sum() == 2
    r = yolo.main(["--data", "voc", "--data-dir", root, "--no-download", "--img-size", "64",
                   "--width", "0.0625", "--epochs", "1", "--batch-size", "2", "--workers", "0",
                   "--device", "cpu", "--out", str(tmp_path / "run")])
    assert len(r["metrics"]["ap"]) == 20 and r["metrics"]["num_gt"][data.VOC_CLASSES.index("dog")] == 1


def test_pretrain_writes_a_backbone_that_detection_loads(tmp_path):
    pre = str(tmp_path / "pre")
    r = yolo.main(["--pretrain", "shapes", "--pretrain-size", "32", "--quick", "--variant", "full",
                   "--width", "0.0625",
                   "--epochs", "1", "--batch-size", "32", "--limit", "128", "--device", "cpu",
                   "--out", pre,
                   "--log-every", "1000"])
    assert 0 <= r["metrics"]["test_error"] <= 1
    state = torch.load(os.path.join(pre, "backbone.pt"), weights_only=True)
    assert state["arch"] == "yolo-full-w0.0625-bn-backbone"  # --quick: batch norm
    # --eval-only of the pretraining checkpoint: its test figures again, nothing trained
    again = yolo.main(["--pretrain", "shapes", "--eval-only", "--weights",
                       os.path.join(pre, "checkpoint.pt"), "--device", "cpu", "--quick",
                       "--limit", "128", "--out", str(tmp_path / "pre-eval")])  # the same images
    assert again["metrics"] == r["metrics"] and again["history"] == []
    assert not (tmp_path / "pre-eval" / "backbone.pt").exists()
    assert not (tmp_path / "pre-eval" / "checkpoint.pt").exists()
    r = yolo.main(TINY + ["--variant", "full", "--epochs", "1", "--limit", "16",
                          "--backbone-weights", os.path.join(pre, "backbone.pt"),
                          "--out", str(tmp_path / "det"), "--stop-after", "1"])
    ckpt = torch.load(os.path.join(tmp_path / "det", "checkpoint.pt"), weights_only=True)
    assert ckpt["model"]["backbone.conv1.weight"].shape == state["model"]["conv1.weight"].shape
    with pytest.raises(data.DataError, match="not 'yolo-fast"):
        yolo.main(TINY + ["--variant", "fast", "--backbone-weights",
                          os.path.join(pre, "backbone.pt"), "--out", str(tmp_path / "x")])


def test_quick_pretrains_on_shapes_then_detects_from_that_backbone(tmp_path):
    # --quick on shapes-det: §2.2's two stages in one command (here 1 epoch each on 32 images);
    # --eval-every 1: each stage's test split after its epoch, as its final test
    out = str(tmp_path / "q")
    r = yolo.main(TINY + ["--pretrain-epochs", "1", "--epochs", "1", "--limit", "32", "--out", out,
                          "--eval-every", "1"])
    assert r["history"][0]["test_map"] == r["metrics"]["map"]
    with open(os.path.join(out, "pretrain", "results.json")) as f:
        saved = json.load(f)
    assert saved["history"][0]["test_error"] == saved["metrics"]["test_error"]
    pre = torch.load(os.path.join(out, "pretrain", "backbone.pt"), weights_only=True)
    assert pre["arch"] == "yolo-fast-w0.0625-bn-backbone"
    assert r["config"]["backbone_weights"] == os.path.join(out, "pretrain", "backbone.pt")
    assert r["config"]["map_size"] == [4, 4] and r["config"]["dropout"] == 0.0
    assert math.isfinite(r["history"][0]["train_loss"])
    args = yolo.get_args_parser().parse_args(["--data", "shapes-det", "--quick"])
    yolo.resolve_defaults(args)
    assert (args.variant, args.drop_strides, args.pretrain_epochs, args.augment) == \
        ("fast", 2, yolo.QUICK["pretrain_epochs"], True)
    args = yolo.get_args_parser().parse_args(["--data", "voc"])  # the paper's recipe for VOC
    yolo.resolve_defaults(args)
    assert (args.variant, args.drop_strides, args.pretrain_epochs, args.dropout, args.bn,
            args.img_size, args.grid, args.lr) == ("full", 0, 0, 0.5, False, 448, 7, 1e-2)


def test_bad_input_is_a_one_line_error(tmp_path):
    r = command("yolo.py", ["--device", "cpu", "--out", str(tmp_path),
                        "--data", "voc", "--data-dir", "/nonexistent", "--no-download"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolo.py: error: VOC2007 trainval not found")
    # The same one-line DataErrors in process (the __main__ guard prints them as above).
    for argv, words in ((["--data", "shapes-det", "--batch-size", "0"], "--batch-size"),
                        (["--data", "shapes", "--quick"], "shapes"),
                        (["--data", "shapes-det", "--pretrained"], "--backbone-weights"),
                        (["--data", "shapes-det", "--detect", "x.png"], "--weights"),
                        (["--data", "shapes-det", "--weights", str(tmp_path / "no.pt")],
                         "not found")):
        with pytest.raises(data.DataError, match=words):
            yolo.main(TINY + argv + ["--out", str(tmp_path / "bad")])


def test_dry_run_takes_two_steps_checks_the_checkpoint_and_writes_results(tmp_path, capsys):
    # The paper's settings (the full network at width 1, S=7, SGD, 135 epochs, batch 64 -> 2)
    # cut to 1 epoch of 2 steps and 2 test batches of 64. Input 64 px (the rendered size: a 1 x 1
    # last map, fc1 1024 -> 4096), not the paper's 448: there fc1 (7 x 7 x 1024 -> 4096, 205M
    # weights) and the convolutions make the 2 training steps alone take 65 s on this 2-core
    # CPU (measured) and the 128 test images several minutes.
    out = tmp_path / "dry"
    r = yolo.main(["--data", "shapes-det", "--img-size", "64", "--batch-size", "2", "--device",
                   "cpu", "--dry-run", "--out", str(out), "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")]
    assert r["metrics"]["samples"] == 2 * 64 and re.search(r"^test mAP .*, 128 images\)", said,
                                                           re.M)
    assert r["config"]["dry_run"] is True and r["config"]["epochs"] == 1
    assert (r["config"]["variant"], r["config"]["width"], r["config"]["grid"]) == ("full", 1, 7)
    assert data.load_checkpoint(str(out / "checkpoint.pt"), "yolo-full-w1")["epoch"] == 0
    assert json.loads((out / "results.json").read_text())["config"]["dry_run"] is True


def test_dry_run_cuts_every_stage_to_one_epoch_of_two_steps(tmp_path, capsys):
    # --pretrain-epochs chains §2.2's pre-training before detection: under --dry-run both stages
    # run, each for 1 epoch of 2 steps (the tiny network: the stages, not the sizes, are tested).
    out = tmp_path / "dry"
    r = yolo.main(TINY + ["--pretrain-epochs", "5", "--epochs", "3", "--dry-run", "--out",
                          str(out), "--log-every", "1"])
    said = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1 step (\d+)/(\d+) ", said, re.M) == [("1", "2"), ("2", "2")] * 2
    pre = json.loads((out / "pretrain" / "results.json").read_text())
    assert pre["config"]["dry_run"] is True and pre["config"]["epochs"] == 1
    assert data.load_checkpoint(str(out / "pretrain" / "checkpoint.pt"),
                                "yolo-fast-w0.0625-bn-pretrain")["epoch"] == 0
    assert (r["config"]["pretrain_epochs"], r["config"]["epochs"]) == (1, 1)
    assert r["config"]["backbone_weights"] == str(out / "pretrain" / "backbone.pt")


# One step on the same global batch (the whole --limit 8 set), without batch norm, augmentation
# or dropout, so that 2 processes and 1 train the same weights.
YOLO_DDP = TINY + ["--limit", "8", "--batch-size", "8", "--epochs", "1", "--no-bn",
                   "--no-augment", "--workers", "0"]


@pytest.mark.slow
@pytest.mark.ddp("yolo", "yolo", YOLO_DDP)
def test_torchrun_two_processes_equal_one_process(tmp_path, ddp_runs):
    # Each process evaluates 4 of the 8 test images; the gathered detections and ground truths
    # give one process's mAP, box counts and test loss.
    one = yolo.main(YOLO_DDP + ["--out", str(tmp_path / "one")])
    two = ddp_results_json(ddp_runs, "yolo")
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"],
                                                            rel=1e-5)
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["samples"] == m2["samples"] == 8 and m1["num_gt"] == m2["num_gt"]
    assert m2["map"] == pytest.approx(m1["map"], abs=1e-4)
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-4)
    assert m2["detections_per_image"] == pytest.approx(m1["detections_per_image"], abs=0.2)
