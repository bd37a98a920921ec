"""The performance measures of the lecture (EE-559 §7, "Tasks and performance measures"), the
progress lines and the results writer that every script of this repository uses.

Tensors, numpy arrays or lists in; Python floats, numpy arrays or dicts out. Each function states
its formula. This module imports only torch, torchvision, numpy and the standard library.

    classification  error_rate, accuracy, topk_error, balanced_error_rate, confusion_matrix
    two classes     tp_fp_rates, roc_curve, auc
    detection       box_iou, voc_ap, detection_map  (the Pascal VOC protocol)
    segmentation    segmentation_scores (pixel accuracy, mean accuracy, IoU/SA, mean IU, fw IU)
    records         Progress, write_results, read_results
"""
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torchvision


def _tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().cpu()
    return t.to(dtype) if dtype is not None else t


def _predictions(output):
    """(N, C) scores -> (N,) arg-max; (N,) predicted indices pass through."""
    output = _tensor(output)
    return output.argmax(1) if output.ndim == 2 else output.long()


def _check_pair(pred, target):
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predictions for {len(target)} targets")
    if len(target) == 0:
        raise ValueError("no samples: the rate is undefined")


# ---------------------------------------------------------------------------------------------
# Classification

def error_rate(output, target):
    """P^(f(X) != Y): the fraction of samples whose predicted class is not the target."""
    pred, target = _predictions(output), _tensor(target).long()
    _check_pair(pred, target)
    return (pred != target).double().mean().item()


def accuracy(output, target):
    """P^(f(X) = Y) = 1 - error_rate."""
    return 1.0 - error_rate(output, target)


def topk_error(output, target, k=5):
    """The fraction of samples whose target is not among the k highest scores (ILSVRC's top-5
    error). With (N,) predicted indices there is one guess: the top-1 error."""
    output, target = _tensor(output), _tensor(target).long()
    if output.ndim == 1:
        return error_rate(output, target)
    _check_pair(output, target)
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return 1.0 - (top == target[:, None]).any(1).double().mean().item()


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """(C, C) int64 counts, rows = truth, columns = prediction. `pred` is (N, C) scores or labels
    of any shape (a segmentation map); targets equal to `ignore_index` are left out."""
    pred = _tensor(pred)
    if pred.ndim == 2 and pred.is_floating_point() and pred.shape[1] == num_classes \
            and _tensor(target).ndim == 1:
        pred = pred.argmax(1)
    pred, target = pred.reshape(-1).long(), _tensor(target).reshape(-1).long()
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predictions for {len(target)} targets")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, v in (("target", target), ("prediction", pred)):
        bad = (v < 0) | (v >= num_classes)
        if bad.any():
            raise ValueError(f"{name} value {v[bad][0].item()} is not a class in "
                             f"0..{num_classes - 1}")
    return torch.bincount(target * num_classes + pred,
                          minlength=num_classes ** 2).reshape(num_classes, num_classes)


def balanced_error_rate(output, target, num_classes=None):
    """BER = 1/C sum_y P^(f(X) != y | Y = y): the mean of the per-class error rates, over the C
    classes present in `target` (a class with no sample has no conditional error rate)."""
    pred, target = _predictions(output), _tensor(target).long()
    _check_pair(pred, target)
    if num_classes is None:
        num_classes = int(max(pred.max(), target.max())) + 1
    cm = confusion_matrix(pred, target, num_classes).double()
    support = cm.sum(1)
    present = support > 0
    return (1 - cm.diagonal()[present] / support[present]).mean().item()


# ---------------------------------------------------------------------------------------------
# Two-class scores: TP/FP rates, ROC, AUC

def _binary(scores, labels):
    scores = _tensor(scores).double().reshape(-1).numpy()
    labels = _tensor(labels).reshape(-1).numpy().astype(bool)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    return scores, labels


def tp_fp_rates(scores, labels, threshold):
    """TP rate P^(s >= t | Y = 1) and FP rate P^(s >= t | Y = 0) at threshold t (NaN for a class
    without samples)."""
    s, y = _binary(scores, labels)
    positive = s >= threshold
    tp = positive[y].mean() if y.any() else float("nan")
    fp = positive[~y].mean() if (~y).any() else float("nan")
    return float(tp), float(fp)


def roc_curve(scores, labels):
    """The ROC curve: (fpr, tpr, thresholds), one point per distinct score taken as threshold
    t (predict 1 when s >= t), in decreasing t, starting at (0, 0) with t = +inf and ending at
    (1, 1). Samples with equal scores enter together, so ties give a diagonal segment."""
    s, y = _binary(scores, labels)
    if y.all() or not y.any():
        raise ValueError("roc_curve needs both positive and negative samples: with one class the "
                         "TP or FP rate is undefined")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def auc(fpr, tpr):
    """Area under a curve by the trapezoidal rule (the ROC's AUC with roc_curve's points)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


# ---------------------------------------------------------------------------------------------
# Detection: IoU, VOC average precision, mean AP

def box_iou(boxes1, boxes2):
    """IoU = area(B ∩ B^) / area(B ∪ B^) for every pair of (xmin, ymin, xmax, ymax) boxes in
    continuous coordinates (torchvision.ops.box_iou): (N, 4), (M, 4) -> (N, M)."""
    return torchvision.ops.box_iou(_tensor(boxes1, torch.float64).reshape(-1, 4),
                                   _tensor(boxes2, torch.float64).reshape(-1, 4))


def voc_ap(recall, precision, use_07_metric=True):
    """Average precision of a precision/recall curve, as the VOC devkit computes it.

    VOC2007 11-point: AP = 1/11 sum_{t in 0, 0.1, ..., 1} max{p(r) : r >= t} (0 if no r >= t).
    VOC2010+ ("area", --voc12-ap): the area under the precision envelope, made monotone from the
    right, AP = sum (r_{i+1} - r_i) p_env(r_{i+1}) over the points where recall changes."""
    r, p = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        return float(np.mean([p[r >= t].max() if (r >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    r, p = np.r_[0.0, r, 1.0], np.r_[0.0, p, 0.0]
    p = np.maximum.accumulate(p[::-1])[::-1]
    i = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[i + 1] - r[i]) * p[i + 1]))


def detection_map(detections, ground_truths, num_classes, iou_threshold=0.5, use_07_metric=True):
    """Per-class AP and mAP by the Pascal VOC protocol (devkit VOCevaldet).

    detections[i] = {"boxes": (K, 4), "scores": (K,), "labels": (K,)} and ground_truths[i] =
    {"boxes": (M, 4), "labels": (M,), "difficult": (M,) bool, optional} for image i; boxes in
    continuous coordinates (data.parse_voc_xml converts VOC's +1 corners), so plain IoU is the
    devkit's. Per class, the detections of all images are taken by decreasing score (ties in
    input order); each is matched to the ground-truth box of its class and image with the highest
    IoU: IoU >= iou_threshold (the devkit's "ovmax >= minoverlap", the lecture's >= 1/2) on a
    difficult box: ignored (neither true nor false positive); on a box not matched before: true
    positive; on a box already matched: false positive (a duplicate); lower IoU: false positive.
    Recall = TP / (non-difficult ground truths), precision = TP / (TP + FP), AP by `voc_ap`.
    A class without non-difficult ground truth has AP NaN and is left out of the mean.

    Returns {"ap": [C floats], "map": float, "num_gt": [C ints]}."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections for {len(ground_truths)} "
                         f"images of ground truth")
    det_rows, gts = [], []  # det_rows: (class, score, image, box); gts[i]: (labels, boxes, diff)
    for i, (d, g) in enumerate(zip(detections, ground_truths)):
        boxes = _tensor(g["boxes"], torch.float64).reshape(-1, 4)
        labels = _tensor(g["labels"]).long().reshape(-1)
        diff = _tensor(g.get("difficult", torch.zeros(len(labels))), torch.bool).reshape(-1)
        dboxes = _tensor(d["boxes"], torch.float64).reshape(-1, 4)
        dlabels = _tensor(d["labels"]).long().reshape(-1)
        dscores = _tensor(d["scores"], torch.float64).reshape(-1)
        if not (len(boxes) == len(labels) == len(diff)) or not (len(dboxes) == len(dlabels) ==
                                                                len(dscores)):
            raise ValueError(f"image {i}: boxes, labels, scores/difficult differ in length")
        for name, v in (("ground-truth", labels), ("detection", dlabels)):
            if len(v) and (v.min() < 0 or v.max() >= num_classes):
                raise ValueError(f"image {i}: {name} label {v[(v < 0) | (v >= num_classes)][0]} "
                                 f"is not a class in 0..{num_classes - 1}")
        gts.append((labels, boxes, diff))
        det_rows.append((dlabels, dscores, dboxes))
    ap, num_gt = [], []
    for c in range(num_classes):
        n_pos = sum(int(((lab == c) & ~dif).sum()) for lab, _, dif in gts)
        num_gt.append(n_pos)
        # All detections of class c: image index, score, box; sorted by score, stable.
        img, score, boxes = [], [], []
        for i, (dl, ds, db) in enumerate(det_rows):
            k = dl == c
            if k.any():
                img.append(torch.full((int(k.sum()),), i))
                score.append(ds[k])
                boxes.append(db[k])
        if n_pos == 0:
            ap.append(float("nan"))
            continue
        if not img:
            ap.append(0.0)
            continue
        img, score, boxes = torch.cat(img), torch.cat(score), torch.cat(boxes)
        order = torch.from_numpy(np.argsort(-score.numpy(), kind="stable"))
        img, boxes = img[order].numpy(), boxes[order]
        # Per image, the IoU of each of its detections with each of its gt boxes of class c.
        best_iou = np.full(len(img), -1.0)
        best_gt = np.full(len(img), -1)
        for i in np.unique(img):
            lab, gb, _ = gts[i]
            gidx = torch.nonzero(lab == c).reshape(-1)
            rows = np.nonzero(img == i)[0]
            if len(gidx):
                iou = box_iou(boxes[rows], gb[gidx])
                v, j = iou.max(1)
                best_iou[rows], best_gt[rows] = v.numpy(), gidx[j].numpy()
        tp, fp = np.zeros(len(img)), np.zeros(len(img))
        taken = set()
        for k in range(len(img)):
            if best_iou[k] >= iou_threshold:
                i, j = img[k], best_gt[k]
                if gts[i][2][j]:
                    continue  # a difficult box: neither true nor false positive
                if (i, j) in taken:
                    fp[k] = 1  # the box was found already: a duplicate
                else:
                    tp[k] = 1
                    taken.add((i, j))
            else:
                fp[k] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / n_pos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap.append(voc_ap(recall, precision, use_07_metric))
    valid = [a for a in ap if not math.isnan(a)]
    return {"ap": ap, "map": float(np.mean(valid)) if valid else float("nan"), "num_gt": num_gt}


# ---------------------------------------------------------------------------------------------
# Segmentation

def segmentation_scores(confusion):
    """The FCN paper's measures from a (C, C) confusion matrix n (rows = truth), t_i = sum_j n_ij:

        pixel accuracy  sum_i n_ii / sum_i t_i
        mean accuracy   1/C sum_i n_ii / t_i
        IoU_i           n_ii / (t_i + sum_j n_ji - n_ii)
        mean IU         1/C sum_i IoU_i
        fw IU           (sum_k t_k)^-1 sum_i t_i IoU_i

    The lecture's segmentation accuracy SA = n / (n + e), "n pixels of the right class predicted
    as such, e pixels erroneously labelled", is in VOC's definition this IoU: e counts the false
    positives and the false negatives of the class; "sa" equals "iou". A class absent from both
    truth and prediction (0/0) is NaN and left out of the means."""
    n = _tensor(confusion).double().numpy()
    t = n.sum(1)
    union = t + n.sum(0) - np.diag(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, np.diag(n) / union, np.nan)
        acc = np.where(t > 0, np.diag(n) / t, np.nan)
    total = t.sum()
    nanmean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return {"pixel_acc": float(np.diag(n).sum() / total) if total else float("nan"),
            "mean_acc": nanmean(acc), "mean_iou": nanmean(iou),
            "fw_iou": float(np.nansum(t * iou) / total) if total else float("nan"),
            "iou": iou.tolist(), "sa": iou.tolist()}


# ---------------------------------------------------------------------------------------------
# Progress lines and results records

class Progress:
    """One line every `every` steps: epoch, step, loss (mean since the last line), learning rate,
    images/s and the time left for the whole run. Pass `enabled=False` on non-main ranks."""

    def __init__(self, steps_per_epoch, epochs, every=100, start_epoch=0, enabled=True,
                 out=sys.stdout):
        self.steps_per_epoch, self.epochs, self.every = steps_per_epoch, epochs, max(1, every)
        self.remaining = (epochs - start_epoch) * steps_per_epoch
        self.enabled, self.out = enabled, out
        self.step_in_epoch, self.epoch = 0, start_epoch
        self.loss_sum, self.loss_n, self.images = 0.0, 0, 0
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, images, loss, lr, epoch):
        if epoch != self.epoch:
            self.epoch, self.step_in_epoch = epoch, 0
        self.step_in_epoch += 1
        self.done += 1
        self.loss_sum, self.loss_n, self.images = self.loss_sum + loss, self.loss_n + 1, \
            self.images + images
        if self.step_in_epoch % self.every == 0 or self.step_in_epoch == self.steps_per_epoch:
            now = time.perf_counter()
            rate = self.images / max(now - self.last, 1e-9)
            eta = (now - self.start) / self.done * (self.remaining - self.done)
            if self.enabled:
                print(f"epoch {epoch + 1}/{self.epochs} step {self.step_in_epoch}/"
                      f"{self.steps_per_epoch} loss {self.loss_sum / self.loss_n:.4f} lr {lr:.3g} "
                      f"{rate:,.0f} img/s eta {datetime.timedelta(seconds=round(eta))}",
                      file=self.out, flush=True)
            self.loss_sum, self.loss_n, self.images, self.last = 0.0, 0, 0, now


def _plain(x):
    """Tensors, numpy values and tuples as plain JSON values; NaN and infinities as null."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.item() if x.ndim == 0 else x.tolist()
    elif isinstance(x, np.ndarray):
        x = x.tolist()
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)  # devices, paths, dtypes


def write_results(path, script, data, metrics, paper=None, config=None, device=None,
                  seconds=None, history=None, **extra):
    """Write results.json atomically (a temporary file renamed into place) and return the dict:
    script, data, metrics (fractions), paper, config, device, seconds, history, versions, date.
    NaN is written as null, so the file is strict JSON."""
    record = _plain({"script": script, "data": data, "metrics": metrics, "paper": paper or {},
                     "config": config or {}, "device": device, "seconds": seconds,
                     "history": history or [], **extra,
                     "torch_version": torch.__version__,
                     "torchvision_version": torchvision.__version__,
                     "python_version": platform.python_version(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return record


def read_results(path):
    """Load a results.json; ValueError naming the file when it is not one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable results.json ({e})")
    if not isinstance(record, dict) or "script" not in record or "metrics" not in record:
        raise ValueError(f"{path} is not a results.json: it lacks 'script' or 'metrics'")
    return record
