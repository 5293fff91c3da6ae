"""Semantic segmentation metrics: confusion matrix, per-class IoU, mIoU and accuracy.

Conventions (shared by 2D and 3D evaluation):

- ``confusion[g, p]`` counts elements whose ground truth is class ``g`` and prediction ``p``
  (rows = ground truth, columns = prediction), shape (K, K) int64.
- Elements whose ground truth is the ignore index (255 by default) are not counted. A ground
  truth outside ``[0, K)`` that is not the ignore index is an error, and so is a prediction
  outside ``[0, K)`` for a counted element.
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. A class that appears neither in the ground truth
  nor in the predictions has no IoU (NaN) and is **excluded from the mIoU**, so a scene without,
  say, trucks neither rewards nor punishes the model for trucks. A class present only in the
  predictions has IoU 0 and counts.
- Accuracy is the fraction of counted elements predicted correctly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = 255


class MetricsError(ValueError):
    """Labels or predictions that cannot be scored (wrong shapes, ids out of range)."""


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, 'detach'):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def confusion_matrix(labels, predictions, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 counts of (ground truth row, prediction column) over non-ignored elements.

    ``labels`` and ``predictions`` are integer arrays (numpy or torch) of the same shape.
    """
    gt = _as_numpy(labels)
    pred = _as_numpy(predictions)
    if gt.shape != pred.shape:
        raise MetricsError(f'labels {gt.shape} and predictions {pred.shape} differ in shape')
    if gt.dtype.kind not in 'iu' or pred.dtype.kind not in 'iu':
        raise MetricsError(f'labels and predictions must be integers, got {gt.dtype} and '
                           f'{pred.dtype}')
    if num_classes <= 0:
        raise MetricsError(f'num_classes must be positive, got {num_classes}')
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    bad_gt = (gt < 0) | (gt >= num_classes)
    if bad_gt.any():
        raise MetricsError(f'ground truth ids {np.unique(gt[bad_gt])[:8].tolist()} are outside '
                           f'[0, {num_classes}) and not the ignore index {ignore_index}')
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bad_pred.any():
        raise MetricsError(f'predicted ids {np.unique(pred[bad_pred])[:8].tolist()} are outside '
                           f'[0, {num_classes})')
    flat = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """(K,) float64 IoU per class; NaN for classes absent from ground truth and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise MetricsError(f'confusion matrix must be square, got shape {confusion.shape}')
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the defined per-class IoUs (NaN if no class is present at all)."""
    iou = iou_per_class(confusion)
    valid = ~np.isnan(iou)
    return float(iou[valid].mean()) if valid.any() else float('nan')


def accuracy(confusion: np.ndarray) -> float:
    """Fraction of counted elements predicted correctly (NaN if nothing was counted)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total > 0 else float('nan')


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix over batches; see the module docstring."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes <= 0:
            raise MetricsError(f'num_classes must be positive, got {num_classes}')
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, labels, predictions) -> None:
        """Add a batch of integer labels and predictions (same shape, any layout)."""
        self.matrix += confusion_matrix(labels, predictions, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        self.matrix[:] = 0

    def merge(self, other: 'ConfusionMatrix') -> None:
        """Add another accumulator's counts (e.g. from another worker process)."""
        if other.num_classes != self.num_classes:
            raise MetricsError(f'cannot merge {other.num_classes} classes into '
                               f'{self.num_classes}')
        self.matrix += other.matrix

    @property
    def count(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        return iou_per_class(self.matrix)

    def miou(self) -> float:
        return mean_iou(self.matrix)

    def accuracy(self) -> float:
        return accuracy(self.matrix)

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-safe dict: miou, accuracy, count, iou per class name (None where undefined)."""
        names = list(class_names) if class_names is not None else [
            str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise MetricsError(f'{len(names)} class names for {self.num_classes} classes')
        iou = self.iou()
        miou = self.miou()
        acc = self.accuracy()
        return {
            'miou': None if np.isnan(miou) else miou,
            'accuracy': None if np.isnan(acc) else acc,
            'count': self.count,
            'iou': {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            'support': {n: int(s) for n, s in zip(names, self.matrix.sum(1))},
        }
