"""Losses: hand-checked values, gradient flow only into the student, clear errors."""
import math

import numpy as np
import pytest
import torch

from offline_training import losses
from offline_training.losses import (LossInputError, class_balance_weights, fskd_feature_loss,
                                     infonce_loss, sample_image_features, semantic_kl_loss,
                                     supervised_ce_loss)


def _bilinear_reference(feat: np.ndarray, u: float, v: float, stride: float) -> np.ndarray:
    """Direct bilinear interpolation with feature cell centres at (j + 0.5) * stride - 0.5."""
    _, h, w = feat.shape
    fx = min(max((u + 0.5) / stride - 0.5, 0.0), w - 1.0)
    fy = min(max((v + 0.5) / stride - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(fx)), int(math.floor(fy))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = fx - x0, fy - y0
    return ((1 - ax) * (1 - ay) * feat[:, y0, x0] + ax * (1 - ay) * feat[:, y0, x1]
            + (1 - ax) * ay * feat[:, y1, x0] + ax * ay * feat[:, y1, x1])


def test_sample_full_resolution_hits_pixel_centres():
    height, width = 5, 7
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    feat = torch.stack([xs, ys]).float()[None]                        # value = pixel coordinate
    uv = torch.tensor([[0.0, 0.0], [3.0, 2.0], [6.0, 4.0], [2.5, 1.25]])
    out = sample_image_features(feat, torch.zeros(4, dtype=torch.long), uv, (height, width))
    torch.testing.assert_close(out, uv)


def test_sample_strided_map_matches_direct_bilinear():
    gen = torch.Generator().manual_seed(0)
    height, width, stride = 16, 24, 4
    feat = torch.randn(3, 5, height // stride, width // stride, generator=gen)
    count = 50
    image_index = torch.randint(0, 3, (count,), generator=gen)
    uv = torch.rand(count, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])
    out = sample_image_features(feat, image_index, uv, (height, width))
    assert out.shape == (count, 5)
    for i in range(count):
        ref = _bilinear_reference(feat[image_index[i]].numpy(), float(uv[i, 0]), float(uv[i, 1]),
                                  stride)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_sample_stride_two_known_values():
    # Cells of a stride-2 map are centred on pixels 0.5, 2.5, 4.5: value j at cell j.
    feat = torch.arange(3.0).view(1, 1, 1, 3)
    uv = torch.tensor([[0.5, 0.5], [2.5, 0.5], [1.5, 0.0], [5.0, 1.0], [-0.5, 0.0]])
    out = sample_image_features(feat, torch.zeros(5, dtype=torch.long), uv, (2, 6))
    torch.testing.assert_close(out[:, 0], torch.tensor([0.0, 1.0, 0.5, 2.0, 0.0]))


def test_sample_rejects_bad_inputs():
    feat = torch.zeros(2, 3, 4, 4)
    with pytest.raises(LossInputError, match='image_index'):
        sample_image_features(feat, torch.tensor([2]), torch.zeros(1, 2), (4, 4))
    with pytest.raises(LossInputError, match='uv'):
        sample_image_features(feat, torch.tensor([0]), torch.zeros(1, 3), (4, 4))
    assert sample_image_features(feat, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2),
                                 (4, 4)).shape == (0, 3)


def test_infonce_identical_features_is_log_m():
    count = 6
    feats = torch.ones(count, 4)
    loss = infonce_loss(feats.clone(), feats.clone(), temperature=0.07)
    assert loss.item() == pytest.approx(math.log(count), rel=1e-6)


def test_infonce_matches_direct_formula():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    key = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    temp = 0.5
    qn = [q / np.linalg.norm(q) for q in query.numpy()]
    kn = [k / np.linalg.norm(k) for k in key.numpy()]
    expected = 0.0
    for i in range(3):
        sims = [float(np.dot(qn[i], kn[j])) / temp for j in range(3)]
        expected += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    expected /= 3
    loss = infonce_loss(query, key, temperature=temp)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_infonce_aligned_features_beat_chance_and_sampling_is_seeded():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(300, 16, generator=gen)
    aligned = infonce_loss(feats, feats, temperature=0.07, num_samples=64,
                           generator=torch.Generator().manual_seed(5))
    assert aligned.item() < 0.1 * math.log(64)
    shuffled = infonce_loss(feats, feats[torch.randperm(300, generator=gen)], num_samples=64,
                            generator=torch.Generator().manual_seed(5))
    assert shuffled.item() > math.log(64) * 0.8
    again = infonce_loss(feats, feats, temperature=0.07, num_samples=64,
                         generator=torch.Generator().manual_seed(5))
    assert again.item() == aligned.item()


def test_feature_loss_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [2.0, 0.0]])                        # cos = 1 and 0
    assert fskd_feature_loss(a, b, 'cosine').item() == pytest.approx(0.5)
    assert fskd_feature_loss(a, b, 'l2').item() == pytest.approx(1.0)   # (0 + 2) / 2
    with pytest.raises(LossInputError, match='kind'):
        fskd_feature_loss(a, b, 'l1')


def test_semantic_kl_hand_value_and_temperature_scaling():
    equal = torch.randn(4, 5)
    assert semantic_kl_loss(equal, equal.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    logits_2d = torch.tensor([[0.0, 0.0]])                            # p2d = (1/2, 1/2)
    logits_3d = torch.tensor([[math.log(3.0), 0.0]])                  # p3d = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert semantic_kl_loss(logits_3d, logits_2d, 1.0).item() == pytest.approx(expected)
    # At T = 2 the doubled logits give the same distributions; the loss is scaled by T^2 = 4.
    assert semantic_kl_loss(2 * logits_3d, logits_2d, 2.0).item() == pytest.approx(4 * expected)


def test_gradients_reach_only_the_student():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(20, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(20, 8, generator=gen, requires_grad=True)
    total = (infonce_loss(student, teacher) + fskd_feature_loss(student, teacher)
             + semantic_kl_loss(student, teacher, 2.0))
    total.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_supervised_ce_ignores_index_and_checks_labels():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]])
    labels = torch.tensor([0, 255, 1])
    expected = (-math.log(0.75) - math.log(math.exp(-5) / (math.exp(5) + math.exp(-5)))) / 2
    assert supervised_ce_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(LossInputError, match='outside'):
        supervised_ce_loss(logits, torch.tensor([0, 2, 1]))


def test_class_balance_weights_and_weighted_losses():
    # Class 0 four times, class 1 once, one ignored point: weights 1/sqrt(4) and 1/sqrt(1),
    # normalised to mean 1 over the five labeled points.
    labels = torch.tensor([0, 0, 0, 0, 1, 255])
    weights = class_balance_weights(labels, 3)
    scale = 5 / (4 * 0.5 + 1.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0]) * scale)
    gen = torch.Generator().manual_seed(4)
    logits_3d, logits_2d = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    # Weighted means of the per-point terms; unit weights give the plain losses.
    p2d = logits_2d.softmax(1)
    per_point = (p2d * (p2d.log() - logits_3d.log_softmax(1))).sum(1)
    expected = float((per_point * weights).sum() / weights.sum())
    assert semantic_kl_loss(logits_3d, logits_2d, 1.0, weights).item() == pytest.approx(expected)
    ones = torch.ones(6)
    assert semantic_kl_loss(logits_3d, logits_2d, 1.0, ones).item() == pytest.approx(
        semantic_kl_loss(logits_3d, logits_2d, 1.0).item())
    ce = torch.nn.functional.cross_entropy(logits_3d[:5], labels[:5], reduction='none')
    expected = float((ce * weights[:5]).sum() / weights[:5].sum())
    assert supervised_ce_loss(logits_3d, labels, point_weights=weights).item() == \
        pytest.approx(expected)
    assert supervised_ce_loss(logits_3d, labels, point_weights=ones).item() == pytest.approx(
        supervised_ce_loss(logits_3d, labels).item())
    with pytest.raises(LossInputError, match='point weights'):
        supervised_ce_loss(logits_3d, labels, point_weights=torch.ones(5))
    with pytest.raises(LossInputError, match='point weights'):
        semantic_kl_loss(logits_3d, logits_2d, 1.0, torch.ones(2))


def test_empty_inputs_give_connected_zero():
    empty = torch.zeros(0, 4, requires_grad=True)
    for value in (infonce_loss(empty, empty.detach()), fskd_feature_loss(empty, empty.detach()),
                  semantic_kl_loss(empty, empty.detach())):
        assert value.item() == 0.0 and value.requires_grad
    logits = torch.zeros(3, 2, requires_grad=True)
    value = supervised_ce_loss(logits, torch.full((3,), 255))
    assert value.item() == 0.0 and value.requires_grad
    with pytest.raises(LossInputError):
        losses.zero_loss()
