"""The performance measures of the lecture (EE-559 §7, "Tasks and performance measures"), the
progress lines and the results writer that every script of this repository uses.

Tensors, numpy arrays or lists in; Python floats, numpy arrays or dicts out. Each function states
its formula. This module imports only torch, torchvision, numpy and the standard library.

    classification  error_rate, accuracy, topk_error, balanced_error_rate, confusion_matrix
    two classes     tp_fp_rates, roc_curve, auc
    detection       box_iou, voc_ap, detection_map  (the Pascal VOC protocol)
    segmentation    segmentation_scores (pixel accuracy, mean accuracy, IoU = SA, mean IU, fw IU)
    records         Progress, write_results, read_results, summarise_runs (`python metrics.py
                    PATH...`: the table of any runs, run_all.sh's included)
"""
import collections
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision


def _tensor(x, dtype=None):
    """A detached CPU tensor from a tensor, numpy array or (nested) list."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def _numpy(x, dtype=None):
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a if dtype is None else a.astype(dtype, copy=False)


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
    """P^(f(X) != Y) = 1/N sum_n 1{f(x_n) != y_n}, f(x) = argmax of the scores (or the index)."""
    pred, target = _predictions(output), _tensor(target).long()
    _check_pair(pred, target)
    return (pred != target).double().mean().item()


def accuracy(output, target):
    """P^(f(X) = Y) = 1 - error_rate."""
    return 1.0 - error_rate(output, target)


def topk_error(output, target, k=5):
    """1/N sum_n 1{y_n not among the k highest scores of x_n} (ILSVRC's top-5 error). With (N,)
    predicted indices there is one guess: the top-1 error."""
    output, target = _tensor(output), _tensor(target).long()
    if output.ndim == 1:
        return error_rate(output, target)
    _check_pair(output, target)
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return 1.0 - (top == target[:, None]).any(1).double().mean().item()


def balanced_error_rate(output, target, num_classes=None):
    """BER = 1/C sum_y P^(f(X) != y | Y = y): the mean of the per-class error rates. The mean runs
    over the C classes present in `target`: a class without a sample has no conditional error
    rate (it is not counted as 0). num_classes defaults to 1 + the largest label seen."""
    pred, target = _predictions(output), _tensor(target).long()
    _check_pair(pred, target)
    if num_classes is None:
        num_classes = int(max(pred.max(), target.max())) + 1
    cm = confusion_matrix(pred, target, num_classes).double()
    support = cm.sum(1)
    present = support > 0
    return (1 - cm.diagonal()[present] / support[present]).mean().item()


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """n_ij = #{samples of true class i predicted j}: (C, C) int64 counts, rows = truth.

    `pred` is scores with the class on dim 1 ((N, C) for (N,) targets, (N, C, H, W) for (N, H, W)
    maps: arg-max) or labels of the target's shape. Samples whose target is `ignore_index` are
    dropped; any other target or prediction outside 0..C-1 is a ValueError. Counted by
    torch.bincount of target * C + pred, in chunks (10^8 pixels in bounded memory), on the
    target's device."""
    target = torch.as_tensor(target)
    pred = torch.as_tensor(pred, device=target.device)
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(1)
    if pred.numel() != target.numel():
        raise ValueError(f"{pred.numel()} predictions for {target.numel()} targets")
    pred, target = pred.detach().reshape(-1), target.detach().reshape(-1)
    C = num_classes
    wide = torch.int32 if C * C < 2 ** 31 - 1 else torch.int64  # int32 bincount is ~2x faster
    counts = torch.zeros(C * C + 1, dtype=torch.int64, device=target.device)
    for s in range(0, target.numel(), 1 << 24):
        t, p = target[s:s + (1 << 24)], pred[s:s + (1 << 24)]
        ignored = t == ignore_index if ignore_index is not None else None
        for name, v in (("target", t if ignored is None else t.masked_fill(ignored, 0)),
                        ("prediction", p)):
            if v.numel() and (v.min() < 0 or v.max() >= C):  # checked before any cast
                raise ValueError(f"{name} value {v[(v < 0) | (v >= C)][0].item()} is not a class "
                                 f"in 0..{C - 1}" + (f" nor the ignore index {ignore_index}"
                                                     if ignore_index is not None else ""))
        index = t.to(wide) * C + p.to(wide)
        if ignored is not None:
            index.masked_fill_(ignored, C * C)  # an extra bin, dropped: cheaper than t[keep]
        counts += torch.bincount(index, minlength=C * C + 1)
    return counts[:C * C].reshape(C, C).cpu()


# ---------------------------------------------------------------------------------------------
# Two-class scores: TP/FP rates, ROC, AUC

def _binary(scores, labels):
    s, y = _numpy(scores, np.float64).reshape(-1), _numpy(labels).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got {np.setdiff1d(y, (0, 1))[:5].tolist()}")
    return s, y.astype(bool)


def tp_fp_rates(scores, labels, threshold):
    """TP rate P^(s >= t | Y = 1) and FP rate P^(s >= t | Y = 0) at threshold t; NaN for a class
    without samples."""
    s, y = _binary(scores, labels)
    positive = s >= threshold
    tp = positive[y].mean() if y.any() else math.nan
    fp = positive[~y].mean() if (~y).any() else math.nan
    return float(tp), float(fp)


def roc_curve(scores, labels):
    """The ROC curve (FP rate(t), TP rate(t)) for every distinct score t taken as the threshold
    (predict 1 when s >= t): (fpr, tpr, thresholds), t strictly decreasing, starting at (0, 0)
    with t = +inf and ending at (1, 1). Samples with equal scores enter together, so a tie
    between classes gives a diagonal segment. ValueError without positives or negatives."""
    s, y = _binary(scores, labels)
    if y.all() or not y.any():
        raise ValueError("roc_curve needs both positive and negative samples: with one class the "
                         "TP or FP rate is undefined")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, s[last]]


def auc(fpr, tpr):
    """Area under the curve by the trapezoidal rule, sum_i (x_{i+1} - x_i)(y_i + y_{i+1}) / 2.
    On roc_curve's points it is P(s+ > s-) + P(s+ = s-) / 2, the Mann-Whitney U / (n+ n-)."""
    x, y = _numpy(fpr, np.float64).reshape(-1), _numpy(tpr, np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values for {len(y)} y values")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


# ---------------------------------------------------------------------------------------------
# Detection: IoU, VOC average precision, mean AP

def box_iou(boxes1, boxes2):
    """IoU = area(B ∩ B^) / area(B ∪ B^) for every pair of (xmin, ymin, xmax, ymax) boxes in
    continuous coordinates (torchvision.ops.box_iou): (N, 4), (M, 4) -> (N, M) float64 tensor."""
    return torchvision.ops.box_iou(_tensor(boxes1, torch.float64).reshape(-1, 4),
                                   _tensor(boxes2, torch.float64).reshape(-1, 4))


def localisation_error(labels, boxes, gt_labels, gt_boxes, k=5, iou_threshold=0.5):
    """ILSVRC's classification-with-localisation error: the fraction of images where none of the
    first `k` guesses (class, box) has a ground-truth class and IoU >= 0.5 with a ground-truth box
    of that class (the ILSVRC 2012-2014 devkit; k = 5 for the challenge, k = 1 for top-1).

    labels (N, K >= k) int, boxes (N, K, 4) (xmin, ymin, xmax, ymax); gt_labels / gt_boxes: per
    image, (G,) and (G, 4). IoU in continuous coordinates, as `box_iou` (the devkit adds 1 to
    widths of integer pixel boxes: a difference below 1 % of the IoU on ImageNet-sized boxes)."""
    labels, boxes = _tensor(labels, torch.int64), _tensor(boxes, torch.float64)
    if labels.dim() == 1:
        labels, boxes = labels[:, None], boxes[:, None]
    if labels.shape[:2] != boxes.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"localisation_error: labels {tuple(labels.shape)} and boxes "
                         f"{tuple(boxes.shape)} do not pair up as (N, K) and (N, K, 4)")
    if labels.shape[1] < k:
        raise ValueError(f"localisation_error: {labels.shape[1]} guesses per image, k = {k}")
    if not (len(labels) == len(gt_labels) == len(gt_boxes)):
        raise ValueError(f"localisation_error: {len(labels)} images of guesses, "
                         f"{len(gt_labels)} of ground truth")
    if len(labels) == 0:
        return 0.0
    misses = 0
    for lab, box, gl, gb in zip(labels[:, :k], boxes[:, :k], gt_labels, gt_boxes):
        gl, gb = _tensor(gl, torch.int64).reshape(-1), _tensor(gb, torch.float64).reshape(-1, 4)
        same_class = lab[:, None] == gl[None]                        # (k, G)
        hit = same_class & (box_iou(box, gb) >= iou_threshold)
        misses += not bool(hit.any())
    return misses / len(labels)


def voc_ap(recall, precision, use_07_metric=True):
    """Average precision of a precision/recall curve, exactly as the VOC devkit computes it.

    VOC2007 11-point: AP = 1/11 sum_{t in 0, 0.1, ..., 1} max{p(r) : r >= t} (0 if no r >= t),
    on the devkit's floating-point grid np.arange(0, 1.1, 0.1) (its "0.3" is 0.30000000000000004).
    VOC2010+ (area): prepend (r, p) = (0, 0), append (1, 0), make p monotone decreasing from the
    right (the envelope), AP = sum (r_{i+1} - r_i) p_{i+1} over the i where recall changes."""
    r, p = _numpy(recall, np.float64).reshape(-1), _numpy(precision, np.float64).reshape(-1)
    if use_07_metric:
        return float(sum(p[r >= t].max() if (r >= t).any() else 0.0
                         for t in np.arange(0.0, 1.1, 0.1)) / 11)
    r, p = np.r_[0.0, r, 1.0], np.r_[0.0, p, 0.0]
    p = np.maximum.accumulate(p[::-1])[::-1]
    i = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[i + 1] - r[i]) * p[i + 1]))


def _boxes(x, where):
    b = _numpy(x, np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{where}: boxes of shape {tuple(b.shape)}, expected (K, 4)")
    return b


def detection_map(detections, ground_truths, num_classes, iou_threshold=0.5, use_07_metric=True):
    """Per-class AP and mAP by the Pascal VOC protocol (devkit VOCevaldet, voc_eval.py).

    detections[i] = {"boxes": (K, 4), "scores": (K,), "labels": (K,)} and ground_truths[i] =
    {"boxes": (M, 4), "labels": (M,), "difficult": (M,) bool, optional: all False} for image i.
    Boxes are continuous (xmin, ymin, xmax, ymax) (data.parse_voc_xml turns VOC's 1-based
    inclusive corners into (xmin - 1, ymin - 1, xmax, ymax)), so plain IoU is the devkit's "+1"
    IoU. Per class, the detections of all images are taken by decreasing score (ties in input
    order: image, then detection); each is matched to the ground-truth box of its class and
    image with the highest IoU. IoU >= iou_threshold (the devkit's "ovmax >= minoverlap", the
    lecture's ">= 1/2") on a difficult box: ignored, neither TP nor FP; on a box not matched
    before: TP; on a box already matched: FP (a duplicate). Lower IoU, or no box: FP.
    recall = cumsum(TP) / #non-difficult boxes, precision = cumsum(TP) / cumsum(TP + FP), AP by
    voc_ap. A class without non-difficult box has AP NaN, left out of the mean; one with boxes
    but no detection has AP 0.

    Returns {"ap": [C floats], "map": float, "num_gt": [C non-difficult counts], "pr": per class
    (recall, precision) arrays over its ranked detections, None without boxes or detections:
    the precision-recall curves (`plot_pr`)}."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections for {len(ground_truths)} "
                         f"images of ground truth")
    C = num_classes
    det_img, det_lab, det_score, best_iou, best_gt = [], [], [], [], []
    gt_img, gt_lab, gt_diff = [], [], []
    n_gt = 0  # ground-truth boxes of the images before: global gt index = n_gt + local index
    for i, (d, g) in enumerate(zip(detections, ground_truths)):
        gb, db = _boxes(g["boxes"], f"image {i} ground truth"), _boxes(d["boxes"], f"image {i}")
        gl, dl = _numpy(g["labels"], np.int64).ravel(), _numpy(d["labels"], np.int64).ravel()
        gd = _numpy(g["difficult"], bool).ravel() if "difficult" in g else np.zeros(len(gl), bool)
        ds = _numpy(d["scores"], np.float64).ravel()
        if not (len(gb) == len(gl) == len(gd)) or not (len(db) == len(dl) == len(ds)):
            raise ValueError(f"image {i}: {len(gb)}, {len(gl)}, {len(gd)} ground-truth boxes, "
                             f"labels, difficult; {len(db)}, {len(dl)}, {len(ds)} detection "
                             f"boxes, labels, scores")
        # The best ground-truth box of each detection among those of its class (IoU -1: none).
        j, best = np.zeros(len(db), np.int64), np.full(len(db), -1.0)
        if len(db) and len(gb):
            iou = np.nan_to_num(box_iou(db, gb).numpy())  # 0/0 of two empty boxes: 0
            iou[dl[:, None] != gl[None, :]] = -1.0
            j = iou.argmax(1)  # the first of equal IoUs, like the devkit
            best = iou[np.arange(len(db)), j]
        best_iou.append(best), best_gt.append(n_gt + j)
        det_img.append(np.full(len(db), i)), det_lab.append(dl), det_score.append(ds)
        gt_img.append(np.full(len(gb), i)), gt_lab.append(gl), gt_diff.append(gd)
        n_gt += len(gb)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
    det_img, det_lab, det_score = cat(det_img, int), cat(det_lab, int), cat(det_score, float)
    best_iou, best_gt = cat(best_iou, float), cat(best_gt, int)
    gt_img, gt_lab, gt_diff = cat(gt_img, int), cat(gt_lab, int), cat(gt_diff, bool)
    for name, lab, img in (("ground-truth", gt_lab, gt_img), ("detection", det_lab, det_img)):
        bad = (lab < 0) | (lab >= C)
        if bad.any():
            raise ValueError(f"image {img[bad][0]}: {name} label {lab[bad][0]} is not a class in "
                             f"0..{C - 1}")
    num_gt = np.bincount(gt_lab[~gt_diff], minlength=C)
    order = np.argsort(-det_score, kind="stable")  # one sort; each class keeps this order
    sorted_lab = det_lab[order]
    ap, pr = [], []  # pr: per class (recall, precision) over its ranked detections, or None
    for c in range(C):
        k = order[sorted_lab == c]  # detections of class c by decreasing score
        if num_gt[c] == 0 or len(k) == 0:
            ap.append(math.nan if num_gt[c] == 0 else 0.0)
            pr.append(None)
            continue
        hit, g = best_iou[k] >= iou_threshold, best_gt[k]
        ignored = hit & gt_diff[np.where(hit, g, 0)]
        # The devkit's loop marks a box on its first (highest-scored) hit: that one is the TP,
        # any later hit of the same box is a duplicate FP.
        cand = np.nonzero(hit & ~ignored)[0]
        tp = np.zeros(len(k))
        tp[cand[np.unique(g[cand], return_index=True)[1]]] = 1
        fp = (~ignored).astype(float) - tp
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall, precision = tp / num_gt[c], tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap.append(voc_ap(recall, precision, use_07_metric))
        pr.append((recall, precision))
    valid = [a for a in ap if not math.isnan(a)]
    return {"ap": ap, "map": float(np.mean(valid)) if valid else math.nan,
            "num_gt": num_gt.tolist(), "pr": pr}


# ---------------------------------------------------------------------------------------------
# Segmentation

def segmentation_scores(confusion):
    """The FCN paper's measures (Long et al. 2015, its score.py) from a (C, C) confusion n_ij
    (pixels of true class i predicted j), t_i = sum_j n_ij:

        pixel accuracy  sum_i n_ii / sum_i t_i
        mean accuracy   1/C sum_i n_ii / t_i
        IoU_i           n_ii / (t_i + sum_j n_ji - n_ii)
        mean IU         1/C sum_i IoU_i
        fw IU           (sum_k t_k)^-1 sum_i t_i IoU_i

    The lecture's segmentation accuracy SA = n / (n + e) (n pixels of the class predicted as such,
    e pixels erroneously labelled) is, in VOC's definition, this IoU: n = true positives, e =
    false positives + false negatives; "sa" equals "iou". A class absent from both truth and
    prediction has IoU 0/0: NaN, left out of the means (nanmean); so is its accuracy (absent from
    truth). An all-zero confusion (everything ignored) gives NaN everywhere."""
    n = _numpy(confusion, np.float64)
    t, diag = n.sum(1), np.diag(n)
    union = t + n.sum(0) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, diag / union, np.nan)
        acc = np.where(t > 0, diag / t, np.nan)
    total = t.sum()
    nanmean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return {"pixel_acc": float(diag.sum() / total) if total else math.nan,
            "mean_acc": nanmean(acc), "mean_iou": nanmean(iou),
            "fw_iou": float(np.nansum(t * iou) / total) if total else math.nan,
            "iou": iou.tolist(), "sa": iou.tolist()}


# ---------------------------------------------------------------------------------------------
# Progress lines and results records

def classification_report(out, target, num_classes, views=None):
    """The figures every classification script reports for its test: error, accuracy, balanced
    error (over `num_classes`, the data set's classes, not the output's width), the error count,
    and top-5 error where there are >= 100 classes; `views` {name: output} adds the error (and
    top-5 error) of other views of the same images, e.g. {"single_crop": p1}. Also the error of
    each class (None for a class without test images), the confusion matrix (rows = truth) and,
    for two classes, the ROC curve of class 1's probability and its AUC (`write_results` draws
    them)."""
    out, target = _tensor(out), _tensor(target)
    confusion = confusion_matrix(_predictions(out), target, num_classes)
    totals = confusion.sum(1)
    r = {"test_error": error_rate(out, target), "test_accuracy": accuracy(out, target),
         "balanced_error": balanced_error_rate(out, target, num_classes),
         "errors": int((_predictions(out) != target).sum()), "samples": len(target),
         "per_class_error": [float(1 - confusion[c, c] / totals[c]) if totals[c] else None
                             for c in range(num_classes)],
         "confusion": confusion.tolist()}
    if num_classes == 2 and out.ndim == 2 and 0 < int(target.sum()) < len(target):
        # two classes: the ROC of the softmax score of class 1, and its area
        fpr, tpr, _ = roc_curve(out.float().softmax(1)[:, 1], target)
        r["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        r["auc"] = auc(fpr, tpr)
    for name, view in (views or {}).items():
        r[f"{name}_error"] = error_rate(view, target)
    if num_classes >= 100:
        r["top5_error"] = topk_error(out, target, 5)
        for name, view in (views or {}).items():
            r[f"{name}_top5_error"] = topk_error(view, target, 5)
    return r


def global_mean(total, n, device="cpu"):
    """total / n over every torchrun rank's (total, n), as one process would compute it (each rank's
    own mean in a single process). `total` may be a tensor on the device (read here: one host
    sync)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.stack([torch.as_tensor(total, dtype=torch.float64, device=device).reshape(()),
                         torch.tensor(float(n), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(t)
        total, n = t.tolist()
    return float(total) / max(n, 1)


class Diverged(ValueError):
    """The training loss became NaN or infinite: the run stops (every script turns this into its
    one-line error and a non-zero exit) before anything of it is written."""


class Progress:
    """One line every `every` steps: epoch, step, loss (mean since the last line), learning rate,
    images/s and the time left for the whole run. Pass `enabled=False` on non-main ranks.

    `step` takes the step's loss as the 0-dim tensor the loss function returned, left on its
    device: reading it (`.item()`) at every step is a host sync that stalls the GPU's queue, and
    the small in-memory nets become launch-bound. The losses are read once per line (every
    `every` steps) and at the epoch's end, all at once; a NaN or infinite one then raises
    `Diverged`, naming its step, before the epoch's checkpoint is written. `epoch_loss()` ends
    the epoch: the mean training loss over every rank's samples (weighted by `step`'s `n`)."""

    def __init__(self, steps_per_epoch, epochs, every=100, start_epoch=0, enabled=True,
                 out=None, model=None):
        self.steps_per_epoch, self.epochs, self.every = steps_per_epoch, epochs, max(1, every)
        self.remaining = (epochs - start_epoch) * steps_per_epoch
        self.enabled, self.out = enabled, out  # None: sys.stdout as it is when printing
        self.step_in_epoch, self.epoch = 0, start_epoch
        self.window, self.images = [], 0  # the losses since the last line, unread
        self.epoch_sum, self.epoch_n, self.device = 0.0, 0, "cpu"
        self.start = self.last = time.perf_counter()
        self.done, self.lr = 0, None
        self.model = model  # its weights are checked at the end of every epoch and of the run

    def step(self, images, loss, lr, epoch, n=None):
        """`images`: this step's images over every rank (the throughput); `loss`: this rank's
        mean loss of the step (a tensor, or a number); `n`: this rank's samples, its weight in
        `epoch_loss` (default: images)."""
        self.lr = lr  # the last step's, for the epoch's row of the history (curves.png)
        if epoch != self.epoch:
            self.epoch, self.step_in_epoch = epoch, 0
        self.step_in_epoch += 1
        self.done += 1
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().reshape(())
            self.device = loss.device
        n = images if n is None else n
        self.window.append(loss)
        self.epoch_sum, self.epoch_n = self.epoch_sum + loss * n, self.epoch_n + n
        self.images += images
        last = self.step_in_epoch == self.steps_per_epoch or self.done == self.remaining
        if self.step_in_epoch % self.every == 0 or last:
            self._line(epoch)
        if last and self.model is not None:  # the loss of a step is that of the weights before it
            norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
            if not torch.isfinite(torch.stack(norms).sum()):
                raise Diverged(f"the weights became non-finite in epoch {epoch + 1} (the loss "
                               f"was still finite); the run stopped before writing this epoch's "
                               f"checkpoint or any results: lower --lr (now {lr:g})")

    def _line(self, epoch):
        """Read the window's losses (one host sync), stop at a non-finite one, print the line."""
        if not self.window:
            return
        losses = [float(v) for v in torch.stack([torch.as_tensor(v, dtype=torch.float32,
                                                                 device=self.device)
                                                 for v in self.window]).tolist()]
        first = self.step_in_epoch - len(losses) + 1
        for k, v in enumerate(losses):
            if not math.isfinite(v):
                raise Diverged(f"the loss became {v} at epoch {epoch + 1} step {first + k}; the "
                               f"run stopped and wrote no results (a checkpoint already in its "
                               f"folder is as it was): lower --lr (now {self.lr:g}) or check the "
                               f"input data")
        now = time.perf_counter()
        rate = self.images / max(now - self.last, 1e-9)
        eta = (now - self.start) / self.done * (self.remaining - self.done)
        if self.enabled:
            print(f"epoch {epoch + 1}/{self.epochs} step {self.step_in_epoch}/"
                  f"{self.steps_per_epoch} loss {sum(losses) / len(losses):.4f} lr {self.lr:.3g} "
                  f"{rate:,.0f} img/s eta {datetime.timedelta(seconds=round(eta))}",
                  file=self.out or sys.stdout, flush=True)
        self.window, self.images, self.last = [], 0, now

    def epoch_loss(self):
        """End the epoch: check the losses not yet read (an epoch cut short), then the mean
        training loss of the epoch over every rank's samples (one host sync, an all-reduce
        under torchrun)."""
        self._line(self.epoch)
        mean = global_mean(self.epoch_sum, self.epoch_n, self.device)
        self.epoch_sum, self.epoch_n = 0.0, 0
        return mean


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


def provenance(script):
    """The code that makes a run: the git commit of the repository the script is in, whether
    tracked files other than run records differ from it (`dirty`, and which: `differ`), and the
    sha256 of the script, data.py and metrics.py as they are on disk now. Without git (a copied
    script, no git installed) `commit` is None and `git` says why; the run goes on."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = script if os.path.isfile(script) else os.path.join(here, os.path.basename(script))
    sha = {}
    for f in (path, os.path.join(here, "data.py"), os.path.join(here, "metrics.py")):
        try:
            with open(f, "rb") as fh:
                sha[os.path.basename(f)] = hashlib.sha256(fh.read()).hexdigest()
        except OSError as e:
            sha[os.path.basename(f)] = f"unreadable ({e.strerror or e})"
    record = {"commit": None, "dirty": None, "differ": [], "sha256": sha}
    git = ["git", "-C", os.path.dirname(os.path.abspath(path))]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode != 0:
            raise OSError((head.stderr.strip().splitlines() or ["git failed"])[-1])
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
        # the run records kept in the repository (results/*/results.json) are what runs write,
        # not code: a run overwriting its own record leaves the code clean
        differ = sorted(f for f in (line[3:] for line in status.stdout.splitlines()
                                    if line.strip()) if os.path.basename(f) != "results.json")
        record.update(commit=head.stdout.strip(), dirty=bool(differ), differ=differ)
    except (OSError, subprocess.SubprocessError) as e:
        record["git"] = f"no git commit recorded: {str(e)[:200]}"
    return record


_STARTED = {}  # script -> its provenance when its run started (start_run): what write_results keeps


def start_run(script):
    """Take the code's provenance at the start of a run (the files may change while it trains)
    and the command line that started it (when the script is the program: `python SCRIPT ...`,
    under torchrun `torchrun --nproc_per_node=N SCRIPT ...`); `write_results` writes both."""
    code = provenance(script)
    if os.path.basename(sys.argv[0]) == os.path.basename(script):
        world = int(os.environ.get("WORLD_SIZE", 1))
        launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
        code["command"] = shlex.join(launcher + [os.path.basename(script), *sys.argv[1:]])
    _STARTED[os.path.basename(script)] = code


def hardware(device=None):
    """What ran it, for the results table: the GPU's name on CUDA, else the CPU model and cores."""
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(torch.device(device))}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write_results(path, script, data, metrics, paper=None, config=None, device=None,
                  seconds=None, history=None, **extra):
    """Write results.json atomically (a temporary file in the same folder, fsync, os.replace) and
    return the dict written: script, data, metrics (fractions), paper, config, device, seconds,
    history, the extra keys, the code's provenance (`provenance`, as `start_run` took it), the
    hardware, torch/torchvision/python versions and the UTC date. Tensors and numpy values become
    plain Python, NaN and infinities null: the file is strict JSON."""
    code = _STARTED.get(os.path.basename(script)) or provenance(script)
    record = _plain({"script": script, "data": data, "metrics": metrics, "paper": paper or {},
                     "config": config or {}, "device": device, "seconds": seconds,
                     "history": history or [], **extra, "provenance": code,
                     "hardware": hardware(device),
                     "torch_version": torch.__version__,
                     "torchvision_version": torchvision.__version__,
                     "python_version": platform.python_version(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")})
    text = json.dumps(record, indent=1, allow_nan=False)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    pictures = draw_run_pictures(record, folder)
    if pictures:
        print("pictures: " + " ".join(pictures))
    checkpoint = os.path.join(os.path.dirname(path), "checkpoint.pt")
    print(f"results: {path}" + (f"  checkpoint: {checkpoint}" if os.path.isfile(checkpoint)
                                 else ""), flush=True)
    return record


def class_records(report, classes, max_confusion=100):
    """The per-class part of a classification report for results.json (write_results' extras):
    {"per_class_error": {class: error}}, the confusion matrix {"classes", "counts"} (rows =
    truth) for at most `max_confusion` classes, and for two classes "roc" and "auc"."""
    rec = {"per_class_error": dict(zip(classes, report["per_class_error"]))}
    if len(classes) <= max_confusion:
        rec["confusion"] = {"classes": list(classes), "counts": report["confusion"]}
    if "roc" in report:
        rec.update(roc=report["roc"], auc=report["auc"])
    return rec


def detection_records(result, classes, points=200):
    """The precision-recall curve of each class of a `detection_map` result for results.json
    (write_results' extras): {"pr": {class: {"ap", "recall", "precision"}}}, each curve cut to
    at most `points` points (evenly over its ranked detections, the last one kept)."""
    pr = {}
    for name, ap, curve in zip(classes, result["ap"], result["pr"]):
        if curve is None:
            continue
        recall, precision = (np.asarray(c) for c in curve)
        keep = np.unique(np.r_[np.linspace(0, len(recall) - 1, points).round().astype(int)])
        pr[name] = {"ap": ap, "recall": recall[keep].tolist(),
                    "precision": precision[keep].tolist()}
    return {"pr": pr}


# Curves drawn beside each results.json (REPRO_NO_PLOTS=1 turns them off: the tests set it,
# but for the tests of the pictures themselves, to keep ~100 runs from drawing 2-3 figures each)
def draw_run_pictures(record, folder):
    """curves.png (training losses, validation/test measures and the learning rate per epoch,
    from the history), confusion.png (classifiers, <= 100 classes; not FCN's pixel counts),
    roc.png (two classes) and pr.png (detectors' precision-recall per class), as the record
    holds them. Needs matplotlib (requirements.txt); without it one line says so and nothing is drawn."""
    if os.environ.get("REPRO_NO_PLOTS") == "1":
        return []
    try:
        from matplotlib.figure import Figure  # imported here: only drawing needs it
    except ImportError:
        print("pictures not drawn: matplotlib is not installed (pip install -r requirements.txt)")
        return []
    written = []
    for name, draw, key in (("curves", plot_curves, "history"),
                            ("confusion", plot_confusion, "confusion"),
                            ("roc", plot_roc, "roc"), ("pr", plot_pr, "pr")):
        # a classifier's confusion is {"classes", "counts"} (class_records); FCN's pixel
        # confusion matrix, a bare list, is not drawn
        if record.get(key) and (key != "confusion" or isinstance(record[key], dict)):
            path = os.path.join(folder, f"{name}.png")
            fig = draw(Figure, record)
            if fig is not None:
                fig.savefig(path)
                written.append(path)
    return written


def plot_curves(Figure, record):
    """One panel each for the losses, the other measures (errors, mAP, IoU...) and the lr, per
    epoch; None when the history has no numeric column."""
    history = record["history"]
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    keys = list(dict.fromkeys(k for r in history for k, v in r.items() if k not in
                              ("epoch", "iteration") and isinstance(v, (int, float)) and
                              not isinstance(v, bool)))
    groups = [("loss", [k for k in keys if "loss" in k]),
              ("measures", [k for k in keys if "loss" not in k and "lr" != k[-2:]]),
              ("learning rate", [k for k in keys if k[-2:] == "lr"])]
    groups = [(title, ks) for title, ks in groups if ks]
    if not groups:
        return None
    fig = Figure(figsize=(4.2 * len(groups), 3.4), dpi=100)
    fig.subplots_adjust(left=0.1 / len(groups) + 0.04, right=0.98, bottom=0.16, top=0.86,
                        wspace=0.32)
    for ax, (title, ks) in zip(np.atleast_1d(fig.subplots(1, len(groups))), groups):
        for k in ks:
            pts = [(e, r[k]) for e, r in zip(epochs, history) if isinstance(r.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="o", markersize=3, label=k)
        if title == "learning rate" and all(r.get(k, 1) > 0 for r in history for k in ks):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not 1.5
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record.get('script', '')} on {record.get('data', '')}", fontsize=10)
    return fig


def plot_confusion(Figure, record):
    """The confusion matrix, each row (true class) as fractions of its images, counts written in
    the cells for up to 20 classes."""
    names, counts = record["confusion"]["classes"], np.asarray(record["confusion"]["counts"])
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(names)
    side = min(12, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    err = record.get("metrics", {}).get("test_error")
    ax.set_title("confusion matrix" + (f" (test error {100 * err:.2f} %)" if err is not None
                                       else ""))
    fig.subplots_adjust(left=0.2, bottom=0.2, right=0.88, top=0.92)
    return fig


def plot_roc(Figure, record):
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(record["roc"]["fpr"], record["roc"]["tpr"], label=f"AUC {record['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.15, bottom=0.12, right=0.96, top=0.92)
    return fig


def plot_pr(Figure, record):
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    ax = fig.subplots()
    for name, c in record["pr"].items():
        ax.plot(c["recall"], c["precision"], label=f"{name} (AP {100 * c['ap']:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    m = record.get("metrics", {}).get("map")
    ax.set_title("precision-recall per class" + (f" (mAP {100 * m:.1f})" if m is not None
                                                 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.1, bottom=0.12, right=0.68, top=0.92)
    return fig


def read_results(path):
    """Load a results.json; a one-line ValueError naming the file when it is not one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable results.json ({e})".replace("\n", " "))
    if not isinstance(record, dict) or "script" not in record or "metrics" not in record:
        raise ValueError(f"{path} is not a results.json: it lacks 'script' or 'metrics'")
    return record


# ---------------------------------------------------------------------------------------------
# Pictures of predictions: what a classifier, a detector or a segmenter found in an image, drawn
# on the image upscaled to at least MIN_SIDE pixels, one colour per class (VOC's colour map),
# labels kept inside the picture, a legend of the classes drawn. torchvision draws the boxes and
# masks; PIL (torchvision's own image library) the text.

MIN_SIDE = 512


def voc_palette(n=256):
    """VOC's colour map as a flat [r, g, b, ...] list (PIL's putpalette): the bits of the class
    index spread over R, G, B from the top bit down; 255 (void) is (224, 224, 192)."""
    pal = []
    for c in range(n):
        r = g = b = 0
        cid = c
        for j in range(8):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        pal += [r, g, b]
    return pal


def class_colour(k):
    """The colour of class index k (0-based, no background): VOC's colour of label k + 1, the
    colour FCN's masks give the same class."""
    pal = voc_palette(k + 2)
    return tuple(pal[3 * (k + 1):3 * (k + 2)])


def _text_colour(rgb):
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _font(size):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)  # Pillow's scalable built-in font: no font file


def upscale(image, min_side=MIN_SIDE):
    """uint8 image (C, H, W) resized (bilinear) so that its short side is at least `min_side`;
    returns it and the factor (1 when it was large enough already)."""
    h, w = image.shape[-2:]
    s = max(1.0, min_side / min(h, w))
    if s > 1:
        image = torchvision.transforms.v2.functional.resize(
            image, [round(h * s), round(w * s)], antialias=True)
    return image.expand(3, -1, -1).contiguous(), s


def _with_legend(image, entries, title=None):
    """The image (uint8 (3, H, W)) with a strip below it: a colour swatch and a text per entry
    ((rgb, text) pairs), wrapped over as many lines as the width needs. Returns a PIL image."""
    from PIL import Image, ImageDraw
    W, H = image.shape[-1], image.shape[-2]
    font, pad = _font(max(14, W // 40)), max(6, W // 100)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + pad
    items = ([(None, title)] if title else []) + list(entries)
    x, y, placed = pad, pad, []
    for rgb, text in items:
        w = probe.textlength(text, font=font) + (line_h + pad if rgb else 0) + 2 * pad
        if x + w > W and x > pad:
            x, y = pad, y + line_h
        placed.append((x, y, rgb, text))
        x += w
    strip = line_h + y + pad if items else 0
    canvas = Image.new("RGB", (W, H + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x, y, rgb, text in placed:
        if rgb:
            draw.rectangle([x, H + y, x + line_h - pad, H + y + line_h - pad], fill=rgb,
                           outline=(0, 0, 0))
            x += line_h
        draw.text((x, H + y), text, fill=(0, 0, 0), font=font)
    return canvas


def draw_detections(image, boxes, labels, scores, classes, path, min_side=MIN_SIDE):
    """Boxes (K, 4) in the image's pixels, class indices and scores drawn on the upscaled image,
    each labelled "class score" inside the picture (above its box, or inside it at the top edge;
    a label that would cover another moves down), and a legend of the classes drawn with their
    counts. Writes the PNG at `path`; returns the PIL image."""
    from PIL import Image, ImageDraw
    img, s = upscale(torch.as_tensor(image).to(torch.uint8), min_side)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * s
    labels = [int(k) for k in labels]
    colours = [class_colour(k) for k in labels]
    if len(labels):
        img = torchvision.utils.draw_bounding_boxes(img, boxes, colors=colours,
                                                    width=max(2, img.shape[-1] // 200))
    canvas = Image.fromarray(img.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(canvas), _font(max(13, img.shape[-1] // 45))
    W, H = canvas.size
    taken = []
    for box, k, score, rgb in sorted(zip(boxes.tolist(), labels, [float(x) for x in scores],
                                         colours), key=lambda t: -t[2]):
        text = f"{classes[k]} {score:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        w, h = r - l + 6, b - t + 6
        x = min(max(0, box[0]), W - w)
        y = box[1] - h if box[1] - h >= 0 else max(0, box[1])
        while any(x < tx + tw and tx < x + w and y < ty + th and ty < y + h
                  for tx, ty, tw, th in taken) and y + h < H:
            y += h
        y = min(y, H - h)
        taken.append((x, y, w, h))
        draw.rectangle([x, y, x + w, y + h], fill=rgb)
        draw.text((x + 3 - l, y + 3 - t), text, fill=_text_colour(rgb), font=font)
    counts = collections.Counter(labels)
    picture = _with_legend(torch.from_numpy(np.array(canvas)).permute(2, 0, 1),
                           [(class_colour(k), f"{classes[k]} ({n})")
                            for k, n in sorted(counts.items())],
                           None if counts else "no detection above the threshold")
    _save(picture, path)
    return picture


def draw_segmentation(image, pred, classes, path, min_side=MIN_SIDE, background=0):
    """A label map (H, W) of class indices (0 = `classes[0]`, the background, left uncoloured)
    over the upscaled image at half opacity, with a legend of the classes found and their share
    of the pixels. Writes the PNG at `path`; returns the PIL image."""
    img, s = upscale(torch.as_tensor(image).to(torch.uint8), min_side)
    pred = torch.as_tensor(pred)
    big = torch.nn.functional.interpolate(pred[None, None].float(), size=img.shape[-2:],
                                          mode="nearest")[0, 0].long()
    found = [int(k) for k in pred.unique() if int(k) != background and 0 <= int(k) < len(classes)]
    if found:  # VOC's colour of label k: class_colour(k - 1)
        img = torchvision.utils.draw_segmentation_masks(
            img, torch.stack([big == k for k in found]), alpha=0.5,
            colors=[class_colour(k - 1) for k in found])
    share = {k: float((pred == k).float().mean()) for k in found}
    picture = _with_legend(img, [(class_colour(k - 1), f"{classes[k]} {100 * share[k]:.1f} %")
                                 for k in sorted(found, key=lambda k: -share[k])],
                           None if found else f"only {classes[background]}")
    _save(picture, path)
    return picture


def draw_classification(image, top, path, min_side=MIN_SIDE):
    """The upscaled image with its top-k classes and probabilities ((name, probability) pairs,
    best first) listed below it. Writes the PNG at `path`; returns the PIL image."""
    img, _ = upscale(torch.as_tensor(image).to(torch.uint8), min_side)
    picture = _with_legend(img, [(None, f"{i + 1}. {name} {100 * p:.1f} %")
                                 for i, (name, p) in enumerate(top)])
    _save(picture, path)
    return picture


def _save(picture, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)


def write_predictions(folder, rows, name="predictions"):
    """What a --classify/--detect/--segment run found: FOLDER/NAME.json (the rows as given, one
    dict per image) and FOLDER/NAME.csv (one line per row of each image's "found" list, beside
    the image's path). Returns the two paths."""
    os.makedirs(folder, exist_ok=True)
    json_path, csv_path = (os.path.join(folder, f"{name}.{ext}") for ext in ("json", "csv"))
    with open(json_path, "w") as f:
        json.dump(_plain(rows), f, indent=1)
    flat = [{"image": r["image"], **item} for r in rows for item in r.get("found", [])] + \
        [{"image": r["image"], "error": r["error"]} for r in rows if "error" in r]
    keys = list(dict.fromkeys(k for row in flat for k in row)) or ["image"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(_plain(flat))
    print(f"{len(rows)} image(s): pictures in {folder}, what was found in {json_path} and "
          f"{csv_path}")
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------
# The summary of many runs (run_all.sh): one row per run, from its results.json only

# The headline measure of each kind of run, first found wins: ILSVRC's top-5 localisation error
# (OverFeat §4; its records hold an mAP too), detection mAP, segmentation mean IU, localisation
# IoU>=0.5 rate, then top-5 error where the paper reports one (ImageNet), else the test error.
HEADLINE = ("loc_error_top5", "map", "mean_iou", "iou50_rate", "top5_error", "test_error")
SUMMARY_COLUMNS = ("run", "script", "data", "metric", "ours", "paper", "epochs", "device", "code",
                   "seconds", "status", "command")


def summary_row(run, record=None, command="", status="ok", error=None, seconds=None):
    """One summary row. `record` is the run's results.json (None when the run failed); the paper's
    figure is shown only when the run used the paper's data set (a shapes figure has none)."""
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    command = command or ((record or {}).get("provenance") or {}).get("command", "")
    row.update(run=run, command=command, status=status if record else f"failed: {error or '?'}")
    row["seconds"] = seconds
    if record:
        m, paper = record.get("metrics", {}), record.get("paper") or {}
        key = next((k for k in HEADLINE if m.get(k) is not None
                    and (k != "top5_error" or paper.get(k) is not None)), None)
        row.update(script=record.get("script", ""), data=record.get("data", ""), metric=key or "",
                   ours=m.get(key) if key else None,
                   device=", ".join(x for x in (record.get("device"), record.get("hardware")) if x),
                   epochs=(record.get("config") or {}).get("epochs", ""), code=code_of(record),
                   seconds=record.get("seconds") if record.get("seconds") is not None else seconds)
        if key and paper.get("data") == record.get("data"):
            row["paper"] = paper.get(key)
        if (record.get("config") or {}).get("dry_run"):  # 2 steps: its figure means nothing
            row.update(status="ok (dry run)", paper="")
    return row


def code_of(record):
    """The commit a run's results.json names, short, `+` when tracked files differed from it."""
    code = record.get("provenance") or {}
    if not code.get("commit"):
        return "no git" if code else ""
    return code["commit"][:8] + ("+" if code.get("dirty") else "")


def _cell(x, percent=False):
    if x is None or x == "":
        return "—" if percent else ""
    if percent and isinstance(x, (int, float)):
        return f"{100 * x:.2f} %"
    if isinstance(x, float):
        return f"{x:.0f}"
    return str(x).replace("|", "\\|")


def summary_lines(rows):
    """The rows as a Markdown table (figures in percent), one string per line."""
    head = ("run", "script", "data", "metric", "ours", "paper", "epochs", "device", "code",
            "time (s)", "status", "command")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r["run"]), _cell(r["script"]), _cell(r["data"]), _cell(r["metric"]),
                 _cell(r["ours"], True), _cell(r["paper"], True), _cell(r["epochs"]),
                 _cell(r["device"]), _cell(r["code"]), _cell(r["seconds"]), _cell(r["status"]),
                 f"`{r['command']}`" if r["command"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(rows, md_path, csv_path=None, title="Results"):
    """summary.md (a Markdown table, figures in percent) and/or .csv (raw fractions)."""
    for path in (md_path, csv_path):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if md_path:
        with open(md_path, "w") as f:
            f.write("\n".join([f"# {title}", "", *summary_lines(rows)]) + "\n")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS)
            w.writeheader()
            w.writerows(rows)


def find_runs(paths):
    """Every run folder under `paths` (each a run folder or a folder of them, searched at any
    depth), sorted: a folder holding a results.json, or the status.txt of a run_all.sh run that
    failed before writing one. Returns (name, folder) pairs; the name is the folder's path below
    the PATH given (the PATH's own name for a run folder given itself)."""
    found = []
    for root in paths:
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            if "results.json" in files or "status.txt" in files:
                name = os.path.basename(os.path.abspath(root)) if os.path.samefile(folder, root) \
                    else os.path.relpath(folder, root)
                found.append((name, folder))
    return found


def summarise_runs(paths, md_path=None, csv_path=None):
    """One row per run folder under `paths` (`find_runs`), whoever made it. A run_all.sh folder
    also holds command.txt, status.txt ("<exit code> <seconds>") and error.txt (a failed run's
    error line); any other folder is read from its results.json alone (a damaged one is a row
    marked failed, naming the file). Writes the summary files when paths are given; returns the
    rows."""
    rows = []
    for run, folder in find_runs([paths] if isinstance(paths, str) else paths):
        read = lambda name: open(os.path.join(folder, name)).read().strip() \
            if os.path.isfile(os.path.join(folder, name)) else ""
        status = read("status.txt")
        code, seconds = (status.split() + ["1", ""])[:2] if status else ("0", "")
        record, error = None, read("error.txt") or f"exit code {code}"
        if code == "0":
            try:
                record = read_results(os.path.join(folder, "results.json"))
            except ValueError as e:
                error = str(e)
        rows.append(summary_row(run, record, read("command.txt"), error=error,
                                seconds=float(seconds) if seconds else None))
    if md_path:
        write_summary(rows, md_path, csv_path)
    return rows


def main(argv=None):
    """python metrics.py PATH... [--md FILE] [--csv FILE]: the table of every run under the
    PATHs, printed and written to the files named (run_all.sh calls it on its runs folder)."""
    import argparse
    p = argparse.ArgumentParser(prog="metrics.py", description="Tabulate the runs under each "
                                "PATH (a run folder, or a folder of run folders at any depth): "
                                "one row per results.json, whoever wrote it.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--md", help="also write the table as Markdown to this file")
    p.add_argument("--csv", help="also write the rows as CSV (fractions, not percent)")
    args = p.parse_args(argv)
    for path in args.paths:
        if not os.path.isdir(path):
            p.exit(2, f"metrics.py: error: {path} is not a folder (give run folders or folders "
                      f"of them)\n")
    rows = summarise_runs(args.paths)
    if not rows:
        p.exit(1, f"metrics.py: error: no results.json under {' '.join(args.paths)}\n")
    print("\n".join(summary_lines(rows)))
    if args.md:
        write_summary(rows, args.md, args.csv)
    elif args.csv:
        write_summary(rows, None, args.csv)
    failed = [r["run"] for r in rows if not r["status"].startswith("ok")]
    print(f"{len(rows)} run(s), {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}"
          + "".join(f"; {kind} in {f}" for kind, f in (("table", args.md), ("rows", args.csv))
                    if f))
    return rows


if __name__ == "__main__":
    main()
