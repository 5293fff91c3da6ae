"""Confusion matrix, per-class IoU, mIoU and accuracy against hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from cmkd_ros.metrics import (ConfusionMatrix, MetricsError, accuracy, confusion_matrix,
                              iou_per_class, mean_iou)


def test_confusion_matrix_counts_rows_ground_truth_columns_prediction():
    gt = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(gt, pred, 3)
    # the ignored element (gt 255) is not counted even though its prediction is valid
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.dtype == np.int64


def test_iou_by_hand():
    # class 0: TP 1, FP 1 (gt 2 predicted 0), FN 1 (predicted 1) -> 1/3
    # class 1: TP 2, FP 1, FN 0 -> 2/3; class 2: TP 0, FN 1 -> 0
    cm = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    np.testing.assert_allclose(iou_per_class(cm), [1 / 3, 2 / 3, 0.0])
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert accuracy(cm) == pytest.approx(3 / 5)


def test_absent_class_is_excluded_from_miou_but_false_positive_class_counts():
    # 4 classes: class 3 never appears (excluded); class 2 only predicted (IoU 0, counted).
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])
    cm = confusion_matrix(gt, pred, 4)
    iou = iou_per_class(cm)
    assert iou[0] == 1.0 and iou[1] == 0.5 and iou[2] == 0.0
    assert math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_accumulator_equals_one_shot_and_accepts_torch():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=1000)
    gt[rng.random(1000) < 0.1] = 255
    pred = rng.integers(0, 5, size=1000)
    acc = ConfusionMatrix(5)
    for chunk in range(0, 1000, 300):
        acc.update(torch.from_numpy(gt[chunk:chunk + 300]),
                   torch.from_numpy(pred[chunk:chunk + 300]))
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(gt, pred, 5))
    assert acc.count == int((gt != 255).sum())
    other = ConfusionMatrix(5)
    other.update(gt, pred)
    acc.merge(other)
    np.testing.assert_array_equal(acc.matrix, 2 * confusion_matrix(gt, pred, 5))


def test_summary_names_and_none_for_undefined():
    acc = ConfusionMatrix(3)
    acc.update(np.array([0, 1]), np.array([0, 0]))
    s = acc.summary(['a', 'b', 'c'])
    assert s['iou'] == {'a': 0.5, 'b': 0.0, 'c': None}
    assert s['miou'] == pytest.approx(0.25)
    assert s['accuracy'] == pytest.approx(0.5)
    assert s['support'] == {'a': 1, 'b': 1, 'c': 0}
    empty = ConfusionMatrix(3).summary()
    assert empty['miou'] is None and empty['accuracy'] is None


def test_errors_name_the_problem():
    with pytest.raises(MetricsError, match='shape'):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(MetricsError, match='ground truth ids \\[7\\]'):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 2)
    with pytest.raises(MetricsError, match='predicted ids \\[5\\]'):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), 2)
    with pytest.raises(MetricsError, match='integers'):
        confusion_matrix(np.array([0.0]), np.array([0]), 2)
    with pytest.raises(MetricsError, match='3 class names for 2'):
        ConfusionMatrix(2).summary(['a', 'b', 'c'])
