"""metrics.py against hand-worked cases and independent implementations."""
import io
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

import metrics


# ---------------------------------------------------------------------------- classification

def test_error_accuracy_topk_on_a_worked_example():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 1, 2, 2])
    # arg-max: 1, 0, 2, 0 -> right, wrong, right, wrong
    assert metrics.error_rate(scores, target) == 0.5
    assert metrics.accuracy(scores, target) == 0.5
    assert metrics.error_rate(np.array([1, 0, 2, 0]), [1, 1, 2, 2]) == 0.5
    # top-2: {1,2}, {0,1}, {2,1}, {0,1}: the last one misses class 2
    assert metrics.topk_error(scores, target, k=2) == 0.25
    assert metrics.topk_error(scores, target, k=3) == 0.0
    with pytest.raises(ValueError, match="3 predictions for 4 targets"):
        metrics.error_rate(scores[:3], target)
    with pytest.raises(ValueError, match="no samples"):
        metrics.error_rate(torch.zeros(0, 3), torch.zeros(0))


def test_balanced_error_rate_differs_from_error_rate():
    target = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 0, 0, 1, 0, 0]
    # per class: 0/4, 1/2, 2/2 -> BER = (0 + 0.5 + 1) / 3 = 0.5, error rate = 3/8
    assert metrics.balanced_error_rate(pred, target) == pytest.approx(0.5)
    assert metrics.error_rate(pred, target) == pytest.approx(3 / 8)
    # a class that never occurs in the target is left out: (0 + 0.5 + 1) / 3 still
    assert metrics.balanced_error_rate(pred, target, num_classes=5) == pytest.approx(0.5)


def test_confusion_matrix_by_a_double_loop_and_with_ignore():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (500,), generator=g)
    pred = torch.randint(0, 4, (500,), generator=g)
    ref = np.zeros((4, 4), int)
    for t, p in zip(target.tolist(), pred.tolist()):
        ref[t, p] += 1
    assert metrics.confusion_matrix(pred, target, 4).numpy().tolist() == ref.tolist()
    # segmentation maps with 255 = ignore
    t = torch.tensor([[0, 1], [255, 2]])
    p = torch.tensor([[0, 2], [1, 2]])
    cm = metrics.confusion_matrix(p, t, 3, ignore_index=255)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="target value 7 is not a class"):
        metrics.confusion_matrix(p, torch.tensor([[0, 1], [7, 2]]), 3, ignore_index=255)


# ---------------------------------------------------------------------------- ROC

def test_roc_curve_with_ties_worked_by_hand():
    scores = [0.9, 0.8, 0.8, 0.3]
    labels = [1, 1, 0, 0]
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    # t = inf: nothing positive; 0.9: one TP; 0.8: the tied pair enters together; 0.3: all
    assert thr.tolist() == [math.inf, 0.9, 0.8, 0.3]
    assert tpr.tolist() == [0, 0.5, 1, 1] and fpr.tolist() == [0, 0, 0.5, 1]
    # area: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875 = P(s+ > s-) + P(s+ = s-) / 2 = 3.5 / 4
    assert metrics.auc(fpr, tpr) == pytest.approx(0.875)
    assert metrics.tp_fp_rates(scores, labels, 0.8) == (1.0, 0.5)
    assert metrics.tp_fp_rates(scores, labels, 0.85) == (0.5, 0.0)


def test_roc_points_by_brute_force_and_auc_equals_mann_whitney():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, 300) / 20.0  # many ties
    labels = rng.random(300) < 0.3 + 0.4 * scores
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:]):
        assert t == pytest.approx(np.mean(scores[labels] >= th))
        assert f == pytest.approx(np.mean(scores[~labels] >= th))
    assert len(thr) == len(np.unique(scores)) + 1 and np.all(np.diff(thr) < 0)
    u = scipy.stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert metrics.auc(fpr, tpr) == pytest.approx(u / (labels.sum() * (~labels).sum()))


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_curve([0.1, 0.2], [1, 1])
    tp, fp = metrics.tp_fp_rates([0.1, 0.2], [1, 1], 0.15)
    assert tp == 0.5 and math.isnan(fp)


# ---------------------------------------------------------------------------- detection

def test_voc_ap_worked_examples():
    # recall 0.5 at precision 1, recall 1 at precision 0.5:
    # 11-point: t = 0..0.5 (6 points) -> 1, t = 0.6..1 (5 points) -> 0.5: (6 + 2.5) / 11
    assert metrics.voc_ap([0.5, 1.0], [1.0, 0.5], True) == pytest.approx(8.5 / 11)
    # area: 0.5 * 1 + 0.5 * 0.5 = 0.75
    assert metrics.voc_ap([0.5, 1.0], [1.0, 0.5], False) == pytest.approx(0.75)
    # the envelope: a later higher precision lifts earlier points
    assert metrics.voc_ap([0.25, 0.25, 0.5], [1.0, 0.5, 2 / 3], False) == pytest.approx(
        0.25 * 1 + 0.25 * 2 / 3)
    assert metrics.voc_ap([], [], True) == 0.0


def test_detection_map_hand_case_with_difficult_and_duplicate():
    gts = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 0],
            "difficult": [False, True]},
           {"boxes": [[0, 0, 10, 10]], "labels": [1]}]
    dets = [{"boxes": [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]],
             "scores": [0.9, 0.8, 0.7, 0.6], "labels": [0, 0, 0, 0]},
            {"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}]
    r = metrics.detection_map(dets, gts, num_classes=3)
    # class 0, one non-difficult gt. By score: 0.9 TP; 0.8 duplicate FP; 0.7 hits the difficult
    # box: ignored; 0.6 FP; 0.5 (image 1, no class-0 gt) FP. Precision at recall 1 is 1 -> AP 1.
    assert r["ap"][0] == pytest.approx(1.0)
    assert r["ap"][1] == 0.0            # ground truth but no detection
    assert math.isnan(r["ap"][2])       # no ground truth: left out of the mean
    assert r["map"] == pytest.approx(0.5) and r["num_gt"] == [1, 1, 0]
    # The difficult box's detection ranked first instead: still neither TP nor FP.
    dets[0]["scores"] = [0.8, 0.7, 0.95, 0.6]
    assert metrics.detection_map(dets, gts, 3)["ap"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="detection label 5 is not a class"):
        metrics.detection_map([{"boxes": [[0, 0, 1, 1]], "scores": [1], "labels": [5]}],
                              gts[:1], 3)


def reference_voc_eval(dets, gts, cls, thr, use_07):
    """The VOC devkit's algorithm (as in py-faster-rcnn's voc_eval.py), continuous coordinates."""
    recs = {}
    npos = 0
    for i, g in enumerate(gts):
        sel = np.asarray(g["labels"]) == cls
        bb = np.asarray(g["boxes"], float).reshape(-1, 4)[sel]
        diff = np.asarray(g["difficult"], bool)[sel]
        recs[i] = {"bbox": bb, "difficult": diff, "det": [False] * len(bb)}
        npos += int((~diff).sum())
    ids, conf, bbs = [], [], []
    for i, d in enumerate(dets):
        for b, s, l in zip(np.asarray(d["boxes"]).reshape(-1, 4), d["scores"], d["labels"]):
            if l == cls:
                ids.append(i), conf.append(s), bbs.append(b)
    if npos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(conf), kind="stable")
    tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
    for d, k in enumerate(order):
        R, bb = recs[ids[k]], bbs[k]
        ovmax, jmax = -np.inf, -1
        if len(R["bbox"]):
            g = R["bbox"]
            iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]), 0)
            ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]), 0)
            inter = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) \
                - inter
            ov = inter / uni
            ovmax, jmax = ov.max(), ov.argmax()
        if ovmax >= thr:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d], R["det"][jmax] = 1, True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(float).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11
        return ap
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("use_07", [True, False])
def test_detection_map_equals_the_devkit_algorithm_on_random_scenes(use_07):
    rng = np.random.default_rng(2)
    C = 4
    gts, dets = [], []
    for i in range(40):
        m = rng.integers(0, 5)
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.c_[xy, xy + rng.uniform(5, 30, (m, 2))]
        labels = rng.integers(0, C - 1, m)  # class C-1 never has ground truth
        gts.append({"boxes": boxes, "labels": labels, "difficult": rng.random(m) < 0.2})
        # detections: jittered copies (some duplicated), and random boxes of any class
        k = rng.integers(0, 7)
        src = rng.integers(0, max(m, 1), k)
        jit = boxes[src] + rng.normal(0, 3, (k, 4)) if m else rng.uniform(0, 100, (k, 4))
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 1)
        lab = labels[src] if m else rng.integers(0, C, k)
        lab = np.where(rng.random(k) < 0.15, rng.integers(0, C, k), lab)
        if i % 7 == 0:
            jit, lab = np.zeros((0, 4)), np.zeros(0, int)  # an image without detections
        dets.append({"boxes": jit, "scores": rng.random(len(lab)), "labels": lab})
    r = metrics.detection_map(dets, gts, C, use_07_metric=use_07)
    ref = [reference_voc_eval(dets, gts, c, 0.5, use_07) for c in range(C)]
    assert math.isnan(r["ap"][C - 1]) and math.isnan(ref[C - 1])
    assert np.allclose(r["ap"][:C - 1], ref[:C - 1])
    assert r["map"] == pytest.approx(np.nanmean(ref))
    assert 0 < r["map"] < 1


def test_detection_map_with_no_detections_at_all():
    gts = [{"boxes": [[0, 0, 5, 5]], "labels": [1], "difficult": [False]}]
    dets = [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    r = metrics.detection_map(dets, gts, 2)
    assert math.isnan(r["ap"][0]) and r["ap"][1] == 0.0 and r["map"] == 0.0


def test_box_iou_wraps_torchvision():
    iou = metrics.box_iou([[0, 0, 2, 2]], np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    assert iou.tolist() == [[pytest.approx(1 / 7), 1.0, 0.0]]


# ---------------------------------------------------------------------------- segmentation

def test_segmentation_scores_worked_by_hand():
    # rows = truth, cols = prediction
    n = np.array([[50, 5, 5],
                  [10, 20, 0],
                  [0, 0, 10]])
    s = metrics.segmentation_scores(n)
    assert s["pixel_acc"] == pytest.approx(80 / 100)
    assert s["mean_acc"] == pytest.approx((50 / 60 + 20 / 30 + 10 / 10) / 3)
    # IoU_i = n_ii / (t_i + column sum - n_ii): 50/(60+60-50), 20/(30+25-20), 10/(10+15-10)
    iou = [50 / 70, 20 / 35, 10 / 15]
    assert s["iou"] == pytest.approx(iou) and s["sa"] == s["iou"]
    assert s["mean_iou"] == pytest.approx(np.mean(iou))
    assert s["fw_iou"] == pytest.approx((60 * iou[0] + 30 * iou[1] + 10 * iou[2]) / 100)


def test_segmentation_scores_absent_class_and_all_ignored():
    s = metrics.segmentation_scores(np.array([[4, 0, 0], [0, 0, 0], [1, 0, 5]]))
    assert math.isnan(s["iou"][1]) and s["mean_iou"] == pytest.approx((4 / 5 + 5 / 6) / 2)
    empty = metrics.segmentation_scores(np.zeros((3, 3)))
    assert all(math.isnan(empty[k]) for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"))
    # end to end: a label map with ignored pixels through confusion_matrix
    t = torch.tensor([[0, 0, 255], [1, 1, 255]])
    p = torch.tensor([[0, 1, 1], [1, 1, 0]])
    s = metrics.segmentation_scores(metrics.confusion_matrix(p, t, 2, ignore_index=255))
    assert s["iou"] == pytest.approx([1 / 2, 2 / 3])


# ---------------------------------------------------------------------------- records

def test_write_results_is_strict_json_and_round_trips(tmp_path):
    path = tmp_path / "out" / "results.json"
    rec = metrics.write_results(str(path), "x.py", "shapes",
                                {"test_error": torch.tensor(0.25), "ap": [float("nan"), 0.5],
                                 "count": np.int64(3)},
                                paper={"test_error": 0.2}, config={"lr": 0.1, "dev": torch.device("cpu")},
                                seconds=1.5, history=[{"epoch": 1}])
    text = path.read_text()
    json.loads(text)  # strict: no NaN literal
    assert "NaN" not in text
    back = metrics.read_results(str(path))
    assert back == rec and back["metrics"] == {"test_error": 0.25, "ap": [None, 0.5], "count": 3}
    assert back["config"]["dev"] == "cpu" and "torch_version" in back
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a readable results.json"):
        metrics.read_results(str(tmp_path / "bad.json"))


def test_progress_prints_throughput_and_eta():
    out = io.StringIO()
    p = metrics.Progress(steps_per_epoch=4, epochs=2, every=2, out=out)
    for epoch in range(2):
        for _ in range(4):
            p.step(images=10, loss=1.0, lr=0.1, epoch=epoch)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch 1/2 step 2/4 loss 1.0000 lr 0.1")
    assert "img/s" in lines[0] and lines[-1].endswith("eta 0:00:00")
