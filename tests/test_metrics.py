"""metrics.py against hand-worked cases and independent implementations."""
import io
import json
import math
import os

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
    assert metrics.error_rate(scores.numpy().tolist(), target.tolist()) == 0.5
    # top-2: {1,2}, {0,1}, {2,1}, {0,1}: the last one misses class 2
    assert metrics.topk_error(scores, target, k=2) == 0.25
    assert metrics.topk_error(scores, target, k=3) == 0.0
    # (N,) predicted indices: one guess, k is irrelevant
    assert metrics.topk_error(torch.tensor([1, 0, 2, 0]), target, k=5) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 4 targets"):
        metrics.error_rate(scores[:3], target)
    with pytest.raises(ValueError, match="no samples"):
        metrics.error_rate(torch.zeros(0, 3), torch.zeros(0))


def test_top5_error_with_distinct_scores():
    # 7 classes, scores without ties; the top-5 of each row is everything but its 2 lowest
    scores = torch.tensor([[7., 6, 5, 4, 3, 2, 1],    # top-5 {0..4}
                           [1., 2, 3, 4, 5, 6, 7],    # top-5 {2..6}
                           [3., 1, 7, 2, 6, 5, 4]])   # top-5 {2, 4, 5, 6, 0}; 1 and 3 are out
    target = torch.tensor([4, 1, 3])
    # row 0: 4 in -> right; row 1: 1 out -> wrong; row 2: 3 out -> wrong
    assert metrics.topk_error(scores, target, k=5) == pytest.approx(2 / 3)
    assert metrics.topk_error(scores, target, k=1) == pytest.approx(1.0)
    assert metrics.topk_error(scores, [0, 6, 2], k=1) == 0.0


def test_balanced_error_rate_differs_from_error_rate():
    target = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 0, 0, 1, 0, 0]
    # per class: 0/4, 1/2, 2/2 -> BER = (0 + 0.5 + 1) / 3 = 0.5, error rate = 3/8
    assert metrics.balanced_error_rate(pred, target) == pytest.approx(0.5)
    assert metrics.error_rate(pred, target) == pytest.approx(3 / 8)
    # a class that never occurs in the target is left out: (0 + 0.5 + 1) / 3 still
    assert metrics.balanced_error_rate(pred, target, num_classes=5) == pytest.approx(0.5)
    # the same through (N, C) scores
    scores = torch.nn.functional.one_hot(torch.tensor(pred), 3).float()
    assert metrics.balanced_error_rate(scores, torch.tensor(target)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="8 predictions for 7 targets"):
        metrics.balanced_error_rate(pred, target[:7])


def test_confusion_matrix_by_a_double_loop():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (500,), generator=g)
    pred = torch.randint(0, 4, (500,), generator=g)
    ref = np.zeros((4, 4), int)
    for t, p in zip(target.tolist(), pred.tolist()):
        ref[t, p] += 1
    cm = metrics.confusion_matrix(pred, target, 4)
    assert cm.dtype == torch.int64 and cm.numpy().tolist() == ref.tolist()
    # (N, C) scores: arg-max over dim 1 first
    scores = torch.randn(500, 4, generator=g)
    ref = np.zeros((4, 4), int)
    for t, row in zip(target.tolist(), scores.tolist()):
        ref[t, int(np.argmax(row))] += 1
    assert metrics.confusion_matrix(scores, target, 4).tolist() == ref.tolist()
    # segmentation: (N, C, H, W) scores against (N, H, W) maps with 255 = void
    maps = torch.randint(0, 3, (2, 5, 6), generator=g, dtype=torch.uint8)
    maps[:, 0, :] = 255
    logits = torch.randn(2, 3, 5, 6, generator=g)
    ref = np.zeros((3, 3), int)
    for n in range(2):
        for y in range(5):
            for x in range(6):
                if maps[n, y, x] != 255:
                    ref[maps[n, y, x], logits[n, :, y, x].argmax()] += 1
    assert metrics.confusion_matrix(logits, maps, 3, ignore_index=255).tolist() == ref.tolist()


def test_confusion_matrix_with_ignore_and_bad_values():
    t = torch.tensor([[0, 1], [255, 2]])
    p = torch.tensor([[0, 2], [1, 2]])
    # kept pixels (truth, pred): (0,0), (1,2), (2,2); the 255 pixel is dropped
    assert metrics.confusion_matrix(p, t, 3, ignore_index=255).tolist() == \
        [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="target value 7 is not a class"):
        metrics.confusion_matrix(p, torch.tensor([[0, 1], [7, 2]]), 3, ignore_index=255)
    with pytest.raises(ValueError, match="target value 255 is not a class"):
        metrics.confusion_matrix(p, t, 3)  # 255 without ignore_index
    with pytest.raises(ValueError, match="prediction value 3 is not a class"):
        metrics.confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="3 predictions for 4 targets"):
        metrics.confusion_matrix(p.reshape(-1)[:3], t, 3, ignore_index=255)


def test_confusion_matrix_across_its_chunks():
    # 2^24 + 4 pixels: the counting runs in chunks of 2^24; entries on both sides of the seam
    n = (1 << 24) + 4
    t, p = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    t[(1 << 24) - 1] = 255            # last pixel of chunk 1: void
    t[1 << 24], p[1 << 24] = 2, 1     # first pixel of chunk 2: truth 2 predicted 1
    p[-1] = 2                         # last pixel: truth 0 predicted 2
    cm = metrics.confusion_matrix(p, t, 3, ignore_index=255)
    assert cm.tolist() == [[n - 3, 0, 1], [0, 0, 0], [0, 1, 0]]


# ---------------------------------------------------------------------------- ROC

def test_roc_curve_with_ties_worked_by_hand():
    scores = [0.9, 0.8, 0.8, 0.3]
    labels = [1, 1, 0, 0]
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    # t = inf: nothing positive; 0.9: one TP; 0.8: the tied pair enters together (diagonal);
    # 0.3: all
    assert thr.tolist() == [math.inf, 0.9, 0.8, 0.3]
    assert tpr.tolist() == [0, 0.5, 1, 1] and fpr.tolist() == [0, 0, 0.5, 1]
    # area: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875 = P(s+ > s-) + P(s+ = s-) / 2 = 3.5 / 4
    assert metrics.auc(fpr, tpr) == pytest.approx(0.875)


def test_tp_fp_rates_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = torch.tensor([True, True, False, False, True])
    # positives 0.9, 0.8, 0.1; negatives 0.8, 0.3
    assert metrics.tp_fp_rates(scores, labels, 0.8) == (pytest.approx(2 / 3), 0.5)
    assert metrics.tp_fp_rates(scores, labels, 0.85) == (pytest.approx(1 / 3), 0.0)
    assert metrics.tp_fp_rates(scores, labels, 0.0) == (1.0, 1.0)
    assert metrics.tp_fp_rates(scores, labels, 1.0) == (0.0, 0.0)
    tp, fp = metrics.tp_fp_rates([0.1, 0.2], [1, 1], 0.15)  # no negative: FP rate undefined
    assert tp == 0.5 and math.isnan(fp)
    with pytest.raises(ValueError, match="0/1"):
        metrics.tp_fp_rates([0.1, 0.2], [1, 2], 0.15)


def test_roc_points_by_brute_force_over_thresholds():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 20, 300) / 20.0  # many ties
    labels = rng.random(300) < 0.3 + 0.4 * scores
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    # every distinct score, in decreasing order, after +inf; rates counted directly
    ts = np.r_[np.inf, np.sort(np.unique(scores))[::-1]]
    assert thr.tolist() == ts.tolist()
    for f, t, th in zip(fpr, tpr, ts):
        n_tp = sum(1 for s, y in zip(scores, labels) if y and s >= th)
        n_fp = sum(1 for s, y in zip(scores, labels) if not y and s >= th)
        assert t == pytest.approx(n_tp / labels.sum())
        assert f == pytest.approx(n_fp / (~labels).sum())
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_mann_whitney_u(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(20, 400)
    scores = rng.integers(0, 15, n) / 15.0  # ties within and across classes
    labels = rng.random(n) < 0.2 + 0.6 * scores
    fpr, tpr, _ = metrics.roc_curve(torch.tensor(scores), torch.tensor(labels))
    # U = #{(i+, j-): s_i > s_j} + #{s_i = s_j} / 2
    u = scipy.stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert metrics.auc(fpr, tpr) == pytest.approx(u / (labels.sum() * (~labels).sum()))


def test_auc_of_known_curves_and_roc_needs_both_classes():
    assert metrics.auc([0, 1], [0, 1]) == pytest.approx(0.5)          # chance diagonal
    assert metrics.auc([0, 0, 1], [0, 1, 1]) == pytest.approx(1.0)    # perfect ranking
    # (0,0)-(0.5,1)-(1,1): 0.5 * (0 + 1) / 2 + 0.5 * (1 + 1) / 2 = 0.75
    assert metrics.auc(np.array([0, 0.5, 1]), [0, 1, 1]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_curve([0.1, 0.2], [0, 0])


# ---------------------------------------------------------------------------- detection

def test_box_iou_wraps_torchvision():
    iou = metrics.box_iou([[0, 0, 2, 2]], np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]))
    # [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    assert isinstance(iou, torch.Tensor) and iou.shape == (1, 3)
    assert iou.tolist() == [[pytest.approx(1 / 7), 1.0, 0.0]]


def test_voc_ap_worked_examples():
    # recall 0.5 at precision 1, recall 1 at precision 0.5:
    # 11-point: t = 0..0.5 (6 points) -> 1, t = 0.6..1 (5 points) -> 0.5: (6 + 2.5) / 11
    assert metrics.voc_ap([0.5, 1.0], [1.0, 0.5], True) == pytest.approx(8.5 / 11)
    # area: 0.5 * 1 + 0.5 * 0.5 = 0.75
    assert metrics.voc_ap([0.5, 1.0], [1.0, 0.5], False) == pytest.approx(0.75)
    # the envelope: a later higher precision lifts earlier points
    assert metrics.voc_ap([0.25, 0.25, 0.5], [1.0, 0.5, 2 / 3], False) == pytest.approx(
        0.25 * 1 + 0.25 * 2 / 3)
    # recall never reaching t: 0 for those t; area stops at the last recall
    assert metrics.voc_ap([0.2, 0.4], [1.0, 1.0], True) == pytest.approx(5 / 11)  # t=0..0.4
    assert metrics.voc_ap([0.2, 0.4], [1.0, 1.0], False) == pytest.approx(0.4)
    # the devkit's grid np.arange(0, 1.1, 0.1): its t = 0.3 is 0.30000000000000004, so recall
    # exactly 3/10 counts for t = 0, 0.1, 0.2 only
    assert metrics.voc_ap([3 / 10], [1.0], True) == pytest.approx(3 / 11)
    assert metrics.voc_ap([], [], True) == 0.0 and metrics.voc_ap([], [], False) == 0.0


def test_detection_map_hand_case_with_difficult_and_duplicate():
    gts = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 0],
            "difficult": [False, True]},
           {"boxes": [[0, 0, 10, 10]], "labels": [1]}]       # no "difficult": all False
    dets = [{"boxes": [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]],
             "scores": [0.9, 0.8, 0.7, 0.6], "labels": [0, 0, 0, 0]},
            {"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}]
    r = metrics.detection_map(dets, gts, num_classes=3)
    # class 0, one non-difficult gt. By score: 0.9 TP; 0.8 duplicate FP (IoU 81/100); 0.7 hits
    # the difficult box: ignored; 0.6 FP; 0.5 (image 1, no class-0 gt) FP.
    # precision 1/1, 1/2, (ignored: 1/2), 1/3, 1/4 at recall 1 throughout -> AP 1 (both metrics)
    assert r["ap"][0] == pytest.approx(1.0)
    assert r["ap"][1] == 0.0            # ground truth but no detection
    assert math.isnan(r["ap"][2])       # no ground truth: left out of the mean
    assert r["map"] == pytest.approx(0.5) and r["num_gt"] == [1, 1, 0]
    # the duplicate ranked first: it is the TP (IoU 0.81), the exact box is the duplicate
    dets[0]["scores"] = [0.8, 0.9, 0.7, 0.6]
    assert metrics.detection_map(dets, gts, 3)["ap"][0] == pytest.approx(1.0)
    # the false positive 0.6 ranked first: precision 1/2 at recall 1 -> AP 0.5
    dets[0]["scores"] = [0.9, 0.8, 0.7, 0.95]
    assert metrics.detection_map(dets, gts, 3, use_07_metric=False)["ap"][0] == pytest.approx(0.5)
    # IoU exactly 1/2 is a hit (>=): [0,0,10,10] vs [0,0,10,5]: 50 / 100
    half = [{"boxes": [[0, 0, 10, 5]], "scores": [1.0], "labels": [0]}]
    gt1 = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    assert metrics.detection_map(half, gt1, 1)["ap"] == [1.0]
    assert metrics.detection_map(half, gt1, 1, iou_threshold=0.51)["ap"] == [0.0]


def test_detection_map_input_validation():
    gt = [{"boxes": [[0, 0, 1, 1]], "labels": [0]}]
    det = [{"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0]}]
    with pytest.raises(ValueError, match="detection label 5 is not a class"):
        metrics.detection_map([{"boxes": [[0, 0, 1, 1]], "scores": [1], "labels": [5]}], gt, 3)
    with pytest.raises(ValueError, match="ground-truth label -1 is not a class"):
        metrics.detection_map(det, [{"boxes": [[0, 0, 1, 1]], "labels": [-1]}], 3)
    with pytest.raises(ValueError, match="1 images of detections for 2 images"):
        metrics.detection_map(det, gt * 2, 3)
    with pytest.raises(ValueError, match=r"shape \(1, 3\), expected \(K, 4\)"):
        metrics.detection_map([{"boxes": [[0, 0, 1]], "scores": [1.0], "labels": [0]}], gt, 3)
    with pytest.raises(ValueError, match="image 0"):
        metrics.detection_map([{"boxes": [[0, 0, 1, 1]], "scores": [1.0, 0.5], "labels": [0]}],
                              gt, 3)


def reference_voc_eval(dets, gts, cls, thr, use_07):
    """The VOC devkit's algorithm (as in py-faster-rcnn's voc_eval.py), continuous coordinates:
    one Python loop over the detections of the class by decreasing score, IoU by np.maximum."""
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


def random_scenes(seed, n_images=40, C=5):
    """Ground truth of classes 0..C-3 (class C-1 never has any: NaN; class C-2 has ground truth
    but its detections are removed: AP 0), 20 % difficult; detections jittered from the boxes
    (sampled with replacement: duplicates), exact copies, wrong classes, scores with ties,
    images without detections or without ground truth."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_images):
        m = rng.integers(0, 5)
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.c_[xy, xy + rng.uniform(5, 30, (m, 2))]
        labels = rng.integers(0, C - 1, m)
        gts.append({"boxes": boxes, "labels": labels, "difficult": rng.random(m) < 0.2})
        k = rng.integers(0, 8)
        src = rng.integers(0, max(m, 1), k)
        jit = boxes[src] + rng.normal(0, 3, (k, 4)) if m else rng.uniform(0, 100, (k, 4))
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 1)
        lab = labels[src] if m else rng.integers(0, C, k)
        if m:
            jit, lab = np.r_[jit, boxes[:1]], np.r_[lab, labels[:1]]  # an exact copy
        lab = np.where(rng.random(len(lab)) < 0.15, rng.integers(0, C, len(lab)), lab)
        keep = lab != C - 2
        jit, lab = jit[keep], lab[keep]
        if i % 7 == 0:
            jit, lab = np.zeros((0, 4)), np.zeros(0, int)  # an image without detections
        dets.append({"boxes": torch.tensor(jit), "scores": np.round(rng.random(len(lab)), 1),
                     "labels": lab.tolist()})
    return dets, gts


@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_detection_map_equals_the_devkit_algorithm_on_random_scenes(seed, use_07, thr):
    C = 5
    dets, gts = random_scenes(seed, C=C)
    r = metrics.detection_map(dets, gts, C, iou_threshold=thr, use_07_metric=use_07)
    ref = [reference_voc_eval(dets, gts, c, thr, use_07) for c in range(C)]
    assert math.isnan(r["ap"][C - 1]) and math.isnan(ref[C - 1])
    assert r["ap"][C - 2] == 0.0 and ref[C - 2] == 0.0
    assert np.allclose(r["ap"][:C - 1], ref[:C - 1], rtol=0, atol=1e-12)
    assert r["map"] == pytest.approx(np.nanmean(ref))
    assert r["num_gt"] == [int(sum(((np.asarray(g["labels"]) == c) & ~g["difficult"]).sum()
                                   for g in gts)) for c in range(C)]
    assert 0 < r["map"] < 1 and any(0 < a < 1 for a in r["ap"][:C - 2])


def test_detection_map_with_no_detections_at_all():
    gts = [{"boxes": [[0, 0, 5, 5]], "labels": [1], "difficult": [False]},
           {"boxes": np.zeros((0, 4)), "labels": []}]
    dets = [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []},
            {"boxes": [], "scores": [], "labels": []}]
    for use_07 in (True, False):
        r = metrics.detection_map(dets, gts, 2, use_07_metric=use_07)
        assert math.isnan(r["ap"][0]) and r["ap"][1] == 0.0 and r["map"] == 0.0
    r = metrics.detection_map([], [], 2)
    assert all(math.isnan(a) for a in r["ap"]) and math.isnan(r["map"]) and r["num_gt"] == [0, 0]


# ---------------------------------------------------------------------------- segmentation

def test_segmentation_scores_worked_by_hand():
    # rows = truth, cols = prediction
    n = np.array([[50, 5, 5],
                  [10, 20, 0],
                  [0, 0, 10]])
    s = metrics.segmentation_scores(n)
    # t = (60, 30, 10), diagonal (50, 20, 10), column sums (60, 25, 15)
    assert s["pixel_acc"] == pytest.approx(80 / 100)
    assert s["mean_acc"] == pytest.approx((50 / 60 + 20 / 30 + 10 / 10) / 3)
    # IoU_i = n_ii / (t_i + column sum - n_ii): 50/(60+60-50), 20/(30+25-20), 10/(10+15-10)
    iou = [50 / 70, 20 / 35, 10 / 15]
    assert s["iou"] == pytest.approx(iou) and s["sa"] == s["iou"]
    assert s["mean_iou"] == pytest.approx(np.mean(iou))
    assert s["fw_iou"] == pytest.approx((60 * iou[0] + 30 * iou[1] + 10 * iou[2]) / 100)


def test_segmentation_scores_absent_class_and_all_ignored():
    # class 1 in neither truth nor prediction: NaN, left out of the means
    s = metrics.segmentation_scores(torch.tensor([[4, 0, 0], [0, 0, 0], [1, 0, 5]]))
    assert math.isnan(s["iou"][1]) and s["mean_iou"] == pytest.approx((4 / 5 + 5 / 6) / 2)
    assert s["mean_acc"] == pytest.approx((1 + 5 / 6) / 2)
    assert s["fw_iou"] == pytest.approx((4 * 4 / 5 + 6 * 5 / 6) / 10)
    # class 2 predicted but never true: IoU 0 (counted), accuracy 0/0 (left out)
    s = metrics.segmentation_scores(np.array([[3, 1, 1], [0, 2, 0], [0, 0, 0]]))
    assert s["iou"] == pytest.approx([3 / 5, 2 / 3, 0.0])
    assert s["mean_acc"] == pytest.approx((3 / 5 + 1) / 2)
    empty = metrics.segmentation_scores(np.zeros((3, 3)))
    assert all(math.isnan(empty[k]) for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"))
    assert all(math.isnan(v) for v in empty["iou"])
    # end to end: a label map with ignored pixels through confusion_matrix
    t = torch.tensor([[0, 0, 255], [1, 1, 255]])
    p = torch.tensor([[0, 1, 1], [1, 1, 0]])
    # kept: (0,0), (0,1), (1,1), (1,1) -> IoU 0: 1/(2+1-1), 1: 2/(2+3-2)
    s = metrics.segmentation_scores(metrics.confusion_matrix(p, t, 2, ignore_index=255))
    assert s["iou"] == pytest.approx([1 / 2, 2 / 3]) and s["pixel_acc"] == pytest.approx(3 / 4)


# ---------------------------------------------------------------------------- records

def _strict(text):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_write_results_is_strict_json_and_round_trips(tmp_path):
    path = tmp_path / "out" / "deeper" / "results.json"
    rec = metrics.write_results(str(path), "x.py", "shapes",
                                {"test_error": torch.tensor(0.25), "ap": [float("nan"), 0.5],
                                 "iou": torch.tensor([0.5, float("nan")]),
                                 "count": np.int64(3), "mean": np.float32(0.5)},
                                paper={"test_error": 0.2},
                                config={"lr": 0.1, "dev": torch.device("cpu")},
                                seconds=1.5, history=[{"epoch": 1, "loss": np.float64("inf")}],
                                note="extra key")
    back = _strict(path.read_text())
    assert back == rec == metrics.read_results(str(path))
    assert back["metrics"] == {"test_error": 0.25, "ap": [None, 0.5], "iou": [0.5, None],
                               "count": 3, "mean": 0.5}
    assert back["history"] == [{"epoch": 1, "loss": None}] and back["note"] == "extra key"
    assert back["config"]["dev"] == "cpu" and back["device"] is None
    assert {"script", "data", "metrics", "paper", "config", "device", "seconds", "history",
            "torch_version", "torchvision_version", "python_version", "date"} <= set(back)
    assert back["date"].endswith("+00:00") and back["torch_version"] == torch.__version__
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left


def test_write_results_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    metrics.write_results(str(path), "a.py", "d", {"e": 0.1})

    def fail(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        metrics.write_results(str(path), "b.py", "d", {"e": 0.2})
    # the previous file is whole and the temporary file is gone
    assert metrics.read_results(str(path))["script"] == "a.py"
    assert os.listdir(tmp_path) == ["results.json"]


def test_read_results_rejects_what_is_not_a_results_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a readable results.json") as e:
        metrics.read_results(str(bad))
    assert "\n" not in str(e.value)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"script": "x.py"}))
    with pytest.raises(ValueError, match="other.json is not a results.json"):
        metrics.read_results(str(other))
    with pytest.raises(ValueError, match="missing.json"):
        metrics.read_results(str(tmp_path / "missing.json"))


def test_progress_prints_throughput_and_eta():
    out = io.StringIO()
    p = metrics.Progress(steps_per_epoch=4, epochs=2, every=2, out=out)
    for epoch in range(2):
        for _ in range(4):
            p.step(images=10, loss=1.0, lr=0.1, epoch=epoch)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch 1/2 step 2/4 loss 1.0000 lr 0.1")
    assert "img/s" in lines[0] and lines[-1].endswith("eta 0:00:00")


def test_localisation_error_is_ilsvrcs_top1_and_top5_measure():
    box = [0.0, 0.0, 10.0, 10.0]
    far = [50.0, 50.0, 60.0, 60.0]
    labels = torch.tensor([[3, 0, 0, 0, 0, 0],    # right class and box at once: a hit
                           [1, 2, 2, 0, 0, 0],    # class 2: IoU 0.4 (miss), then 0.6 (hit)
                           [5, 1, 1, 1, 1, 1],    # class 5, the second of its two boxes
                           [1, 1, 1, 1, 1, 7],    # the right guess is the sixth: no hit
                           [4, 0, 0, 0, 0, 0]])   # right class, box elsewhere
    boxes = torch.tensor([[box] * 6,
                          [box, [0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 6.0]] + [far] * 3,
                          [[20.0, 20.0, 30.0, 30.0]] + [far] * 5,
                          [box] * 6,
                          [far] * 6])
    gt_labels = [torch.tensor([3]), torch.tensor([2]), torch.tensor([5, 5]), torch.tensor([7]),
                 torch.tensor([4])]
    gt_boxes = [torch.tensor([box]), torch.tensor([box]),
                torch.tensor([box, [20.0, 20.0, 30.0, 30.0]]), torch.tensor([box]),
                torch.tensor([box])]
    assert metrics.localisation_error(labels, boxes, gt_labels, gt_boxes, k=1) == 3 / 5
    assert metrics.localisation_error(labels, boxes, gt_labels, gt_boxes, k=5) == 2 / 5
    assert metrics.localisation_error(labels, boxes, gt_labels, gt_boxes, k=6) == 1 / 5
    # a box of the right place but another ground-truth class is no hit
    assert metrics.localisation_error(torch.tensor([[2]]), torch.tensor([[box]]),
                                      [torch.tensor([3, 2])], [torch.tensor([box, far])],
                                      k=1) == 1.0
    with pytest.raises(ValueError, match="guesses per image"):
        metrics.localisation_error(labels[:, :3], boxes[:, :3], gt_labels, gt_boxes, k=5)


def test_classification_report_counts_by_hand_and_uses_the_data_sets_classes():
    # 4 samples, 3 classes in the data set; the scores' arg-max is [0, 1, 1, 2], targets [0, 1, 2, 2]
    out = torch.tensor([[3., 1, 0], [0, 2, 1], [0, 5, 1], [0, 0, 9]])
    y = torch.tensor([0, 1, 2, 2])
    p1 = torch.tensor([[3., 1, 0], [2, 0, 1], [0, 5, 1], [0, 0, 9]])  # a view wrong twice
    r = metrics.classification_report(out, y, 3, views={"single_crop": p1})
    assert (r["test_error"], r["test_accuracy"], r["errors"], r["samples"]) == (0.25, 0.75, 1, 4)
    assert r["balanced_error"] == pytest.approx((0 + 0 + 0.5) / 3)  # per-class errors 0, 0, 1/2
    assert r["single_crop_error"] == 0.5 and "top5_error" not in r
    big = metrics.classification_report(torch.eye(100), torch.arange(100), 100)
    assert big["top5_error"] == 0.0 and big["test_error"] == 0.0


def test_a_run_draws_its_curves_confusion_roc_and_pr_beside_results_json(tmp_path, monkeypatch,
                                                                         capsys):
    pytest.importorskip("matplotlib")  # in requirements.txt; a bare interpreter says so instead
    monkeypatch.delenv("REPRO_NO_PLOTS")
    out = torch.tensor([[2.0, 0.1], [0.3, 1.0], [1.5, 0.2], [0.1, 0.4], [0.2, 2.2]])
    y = torch.tensor([0, 1, 1, 1, 0])
    report = metrics.classification_report(out, y, 2)
    assert report["confusion"] == [[1, 1], [1, 2]]  # rows = truth
    assert report["per_class_error"] == [0.5, pytest.approx(1 / 3)]
    # AUC by hand: P(s+ > s-) over the 3 x 2 (positive, negative) pairs of class-1 probabilities
    p1 = out.softmax(1)[:, 1]
    pairs = [(p1[i] > p1[j]).item() for i in (1, 2, 3) for j in (0, 4)]
    assert report["auc"] == pytest.approx(sum(pairs) / 6)
    classes = ("cat", "dog")
    extra = metrics.class_records(report, classes)
    assert extra["per_class_error"] == {"cat": 0.5, "dog": pytest.approx(1 / 3)}
    dets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]),
             "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([0, 1])}]
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50.0, 50, 60, 60]]),
            "labels": torch.tensor([0, 1])}]
    dm = metrics.detection_map(dets, gts, 2)
    recall, precision = dm["pr"][0]
    assert recall.tolist() == [1.0] and precision.tolist() == [1.0] and dm["ap"][1] == 0.0
    extra.update(metrics.detection_records(dm, classes))
    assert extra["pr"]["dog"] == {"ap": 0.0, "recall": [0.0], "precision": [0.0]}
    history = [{"epoch": e, "train_loss": 1 / e, "val_error": 0.5 / e, "lr": 0.1 / e,
                "frozen": e < 2} for e in (1, 2, 3)]
    metrics.write_results(str(tmp_path / "results.json"), "x.py", "shapes",
                          {"test_error": report["test_error"], "map": dm["map"]},
                          history=history, **extra)
    said = capsys.readouterr().out
    for name in ("curves", "confusion", "roc", "pr"):
        assert os.path.getsize(tmp_path / f"{name}.png") > 5000, name
    assert said.startswith("pictures: " + str(tmp_path / "curves.png"))
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["confusion"] == {"classes": ["cat", "dog"], "counts": [[1, 1], [1, 2]]}
    monkeypatch.setenv("REPRO_NO_PLOTS", "1")
    assert metrics.draw_run_pictures(saved, str(tmp_path / "none")) == []


def test_every_results_json_names_the_code_that_made_it(tmp_path):
    # The commit, whether tracked files differed from it (and which), and the sha256 of the
    # script, data.py and metrics.py as the run started; a copied script without git says so.
    import hashlib
    import shutil
    import subprocess
    import lenet5
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = lenet5.main(["--data", "shapes", "--epochs", "1", "--limit", "32", "--device", "cpu",
                     "--out", str(tmp_path / "run")])
    code = json.load(open(tmp_path / "run" / "results.json"))["provenance"]
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a clone (CI's included)
        differ = [line for line in subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True).stdout.splitlines() if line.strip()
            and not line.endswith("results.json")]  # run records are not code
        assert code["commit"] == head.stdout.strip() and code["dirty"] == bool(differ)
        assert len(code["differ"]) == len(differ)
    for name in ("lenet5.py", "data.py", "metrics.py"):
        with open(os.path.join(root, name), "rb") as f:
            assert code["sha256"][name] == hashlib.sha256(f.read()).hexdigest()
    assert r["provenance"] == code
    row = metrics.summary_row("lenet5", r)
    assert row["code"] == (code["commit"][:8] + ("+" if code["dirty"] else "")
                           if code["commit"] else "no git")
    # a script copied out of any repository: no commit, the reason, the hashes all the same
    for name in ("lenet5.py", "data.py", "metrics.py"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    alone = metrics.provenance(str(tmp_path / "lenet5.py"))
    assert alone["commit"] is None and alone["git"].startswith("no git commit recorded")
    assert alone["sha256"]["lenet5.py"] == code["sha256"]["lenet5.py"]
    assert metrics.summary_row("x", {"provenance": alone, "metrics": {}})["code"] == "no git"


def test_a_run_record_rewritten_in_the_repository_is_not_a_code_change(tmp_path):
    # results/<table>/<run>/results.json are kept in git; a run rewriting one (its own, or the
    # table's others) leaves the code clean, while any other tracked file makes it dirty
    import subprocess
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "results" / "a").mkdir(parents=True)
    for name, text in (("x.py", "print(1)\n"), ("results/a/results.json", "{}\n")):
        (tmp_path / name).write_text(text)
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    (tmp_path / "results" / "a" / "results.json").write_text('{"new": 1}\n')
    clean = metrics.provenance(str(tmp_path / "x.py"))
    assert clean["commit"] and clean["dirty"] is False and clean["differ"] == []
    (tmp_path / "x.py").write_text("print(2)\n")
    assert metrics.provenance(str(tmp_path / "x.py"))["differ"] == ["x.py"]


def test_summary_headline_per_kind_of_run():
    # OverFeat's localisation records hold an mAP and the top-5 localisation error: the latter is
    # their headline, beside the paper's 29.9 %; a detector's is its mAP, a classifier's on
    # ImageNet its top-5 error, else the test error
    paper = {"data": "imagenet", "loc_error_top5": 0.299, "top5_error": 0.1627}
    loc = {"data": "imagenet", "paper": paper,
           "metrics": {"map": 0.31, "loc_error_top5": 0.42, "test_error": 0.5, "top5_error": 0.2}}
    row = metrics.summary_row("loc", loc)
    assert (row["metric"], row["ours"], row["paper"]) == ("loc_error_top5", 0.42, 0.299)
    det = {"data": "voc", "paper": {"data": "voc", "map": 0.743}, "metrics": {"map": 0.5}}
    assert (metrics.summary_row("d", det)["metric"], metrics.summary_row("d", det)["paper"]) == \
        ("map", 0.743)
    cls = {"data": "imagenet", "paper": paper, "metrics": {"test_error": 0.4, "top5_error": 0.18}}
    assert (metrics.summary_row("c", cls)["metric"], metrics.summary_row("c", cls)["paper"]) == \
        ("top5_error", 0.1627)
    assert metrics.summary_row("s", {"data": "shapes", "metrics": {"test_error": 0.1}})["metric"] \
        == "test_error"
