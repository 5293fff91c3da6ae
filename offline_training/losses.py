"""Distillation and supervision losses, each written once.

Shapes: ``M`` camera-LiDAR correspondences, ``D`` the teacher's feature dimension, ``K`` the
number of classes. Teacher tensors are always treated as fixed targets (detached): gradients flow
only into the student.

- :func:`sample_image_features`: teacher features at the pixels of the correspondences.
- :func:`infonce_loss`: UDAKD's contrastive term (SLidR-style, temperature 0.07, 4,096 pairs).
- :func:`fskd_feature_loss`: FSKD's feature term (cosine or L2 of normalised features).
- :func:`semantic_kl_loss`: FSKD's semantic term ``T^2 KL(softmax(2D / T) || softmax(3D / T))``.
- :func:`supervised_ce_loss`: cross-entropy on 3D labels with an ignore index.
- :func:`inverse_sqrt_weights`, :func:`class_balance_weights`: optional weights against class
  imbalance (``loss.class_balance``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

FEATURE_LOSS_KINDS = ('cosine', 'l2')


class LossInputError(ValueError):
    """Loss inputs have inconsistent shapes, dtypes or values."""


def _check_pairs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise LossInputError(f'{what}: expected two (M, D) tensors of the same shape, got '
                             f'{tuple(a.shape)} and {tuple(b.shape)}')


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that stays connected to the graph of ``tensors`` (keeps DDP's gradient sync happy)."""
    total = None
    for t in tensors:
        part = t.sum() * 0.0
        total = part if total is None else total + part
    if total is None:
        raise LossInputError('zero_loss needs at least one tensor')
    return total.float()


def sample_image_features(feat: torch.Tensor, image_index: torch.Tensor, uv: torch.Tensor,
                          image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly sample feature maps at pixel coordinates.

    ``feat`` (B, D, h, w) features of B images of size ``image_size`` = (H, W) pixels (the map
    may be strided: h <= H); ``image_index`` (M,) int64 image of each sample; ``uv`` (M, 2)
    float pixel coordinates (x right, y down, pixel centres at integers, OpenCV convention).
    Returns (M, D). Feature cell j covers pixels [j s - 0.5, (j + 1) s - 0.5) with stride
    s = W / w, so its centre sits at (j + 0.5) s - 0.5: this is grid_sample with
    ``align_corners=False`` and the normalised coordinate (2 u + 1) / W - 1. Outside the image
    the border value is used.
    """
    if feat.dim() != 4:
        raise LossInputError(f'feat must be (B, D, h, w), got {tuple(feat.shape)}')
    if uv.dim() != 2 or uv.shape[1] != 2 or image_index.shape != uv.shape[:1]:
        raise LossInputError(f'uv must be (M, 2) with image_index (M,), got {tuple(uv.shape)} '
                             f'and {tuple(image_index.shape)}')
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise LossInputError(f'image_size must be positive (H, W), got {image_size}')
    num_images, dim = feat.shape[:2]
    if uv.shape[0] == 0:
        return feat.new_zeros((0, dim))
    image_index = image_index.long()
    if int(image_index.min()) < 0 or int(image_index.max()) >= num_images:
        raise LossInputError(f'image_index must be in [0, {num_images}), got range '
                             f'[{int(image_index.min())}, {int(image_index.max())}]')
    uv = uv.to(feat.dtype)
    # 1. Pixel coordinates -> grid_sample's normalised [-1, 1] coordinates (align_corners=False).
    grid_x = (2.0 * uv[:, 0] + 1.0) / width - 1.0
    grid_y = (2.0 * uv[:, 1] + 1.0) / height - 1.0
    # 2. Gather samples per image: sort by image, pad each image's samples to the longest run.
    order = torch.argsort(image_index, stable=True)
    sorted_index = image_index[order]
    counts = torch.bincount(sorted_index, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=uv.device) - starts[sorted_index]
    longest = int(counts.max())
    grid = feat.new_zeros((num_images, 1, longest, 2))
    grid[sorted_index, 0, slot, 0] = grid_x[order]
    grid[sorted_index, 0, slot, 1] = grid_y[order]
    # 3. Sample (B, D, 1, L) and scatter back to the input order.
    sampled = F.grid_sample(feat, grid, mode='bilinear', padding_mode='border',
                            align_corners=False)
    picked = sampled[sorted_index, :, 0, slot]                      # (M, D), sorted order
    out = torch.empty_like(picked)
    out[order] = picked
    return out


def infonce_loss(pseudo2d_pts: torch.Tensor, teacher_feats: torch.Tensor,
                 temperature: float = 0.07, num_samples: int = 4096,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """UDAKD contrastive loss between point features and the teacher features at their pixels.

    ``pseudo2d_pts`` (M, D) student pseudo-2D features of the corresponded points;
    ``teacher_feats`` (M, D) teacher features at the same pixels (used as detached targets).
    At most ``num_samples`` pairs are drawn without replacement (with ``generator``); both sides
    are L2-normalised and for each point its own pixel is the positive and the other sampled
    pixels are negatives: ``mean_i -log softmax_j(q_i . k_j / temperature)[i]``.
    Returns a scalar; 0 (connected to the graph) when M == 0.
    """
    _check_pairs(pseudo2d_pts, teacher_feats, 'infonce_loss')
    if temperature <= 0 or num_samples < 1:
        raise LossInputError(f'temperature must be > 0 and num_samples >= 1, got '
                             f'{temperature}, {num_samples}')
    count = pseudo2d_pts.shape[0]
    if count == 0:
        return zero_loss(pseudo2d_pts)
    if count > num_samples:
        pick = torch.randperm(count, generator=generator,
                              device='cpu' if generator is None else generator.device)
        pick = pick[:num_samples].to(pseudo2d_pts.device)
        pseudo2d_pts, teacher_feats = pseudo2d_pts[pick], teacher_feats[pick]
    query = F.normalize(pseudo2d_pts.float(), dim=1)
    key = F.normalize(teacher_feats.detach().float(), dim=1)
    logits = query @ key.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


def fskd_feature_loss(pseudo2d_pts: torch.Tensor, teacher_feats: torch.Tensor,
                      kind: str = 'cosine') -> torch.Tensor:
    """FSKD feature term between (M, D) pseudo-2D point features and teacher features.

    ``cosine``: mean of 1 - cos(a, b), in [0, 2]; ``l2``: mean squared L2 distance of the
    normalised features, ||a/|a| - b/|b| ||^2 = 2 - 2 cos, in [0, 4]. The teacher side is detached.
    """
    _check_pairs(pseudo2d_pts, teacher_feats, 'fskd_feature_loss')
    if kind not in FEATURE_LOSS_KINDS:
        raise LossInputError(f'feature loss kind {kind!r} is not one of {FEATURE_LOSS_KINDS}')
    if pseudo2d_pts.shape[0] == 0:
        return zero_loss(pseudo2d_pts)
    student = F.normalize(pseudo2d_pts.float(), dim=1)
    teacher = F.normalize(teacher_feats.detach().float(), dim=1)
    if kind == 'cosine':
        return (1.0 - (student * teacher).sum(dim=1)).mean()
    return (student - teacher).pow(2).sum(dim=1).mean()


def inverse_sqrt_weights(counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """(K,) float64 class weights ``w_c = 1 / sqrt(f_c)`` from (K,) class counts, where
    ``f_c = counts_c / sum(counts)``, normalised so the count-weighted mean is 1
    (``sum_c f_c w_c = 1``); classes never counted get 0.

    The one inverse-sqrt rule of ``loss.class_balance``: per batch for students
    (:func:`class_balance_weights`), over the label histogram for the teacher
    (:func:`offline_training.train_teacher.class_weights`, which also draws rare classes by it).
    """
    counts = torch.as_tensor(counts).double()
    freq = counts / counts.sum().clamp(min=1)
    seen = freq > 0
    weights = torch.zeros_like(freq)
    weights[seen] = freq[seen].rsqrt()
    total = (weights * freq).sum()
    return weights / total if bool(total > 0) else weights


def class_balance_weights(labels: torch.Tensor, num_classes: int,
                          ignore_index: int = 255) -> torch.Tensor:
    """(N,) float32 per-point weights :func:`inverse_sqrt_weights` of the class frequencies in
    ``labels`` (mean 1 over the labeled points), 0 for ``ignore_index``."""
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    per_class = inverse_sqrt_weights(torch.bincount(labels[valid], minlength=num_classes))
    weights = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    weights[valid] = per_class.float()[labels[valid]]
    return weights


def semantic_kl_loss(logits_3d: torch.Tensor, logits_2d: torch.Tensor,
                     temperature: float = 1.0,
                     point_weights: torch.Tensor | None = None) -> torch.Tensor:
    """FSKD semantic term ``T^2 * KL(softmax(2D / T) || softmax(3D / T))``, mean over points.

    ``logits_3d`` (M, K) the student's logits at corresponded points (the teacher's classifier
    applied to pseudo-2D features); ``logits_2d`` (M, K) the teacher's logits at their pixels,
    detached (the target). The T^2 factor (Hinton et al., 2015) keeps the gradient magnitude
    independent of T, so the term's weight need not change with the temperature.
    ``point_weights`` (M,), if given, weights each point's KL (a weighted mean).
    """
    _check_pairs(logits_3d, logits_2d, 'semantic_kl_loss')
    if temperature <= 0:
        raise LossInputError(f'temperature must be > 0, got {temperature}')
    if logits_3d.shape[0] == 0:
        return zero_loss(logits_3d)
    log_p3d = F.log_softmax(logits_3d.float() / temperature, dim=1)
    log_p2d = F.log_softmax(logits_2d.detach().float() / temperature, dim=1)
    if point_weights is None:
        kl = F.kl_div(log_p3d, log_p2d, reduction='batchmean', log_target=True)
    else:
        per_point = F.kl_div(log_p3d, log_p2d, reduction='none', log_target=True).sum(1)
        kl = _weighted_mean(per_point, point_weights, 'semantic_kl_loss')
    return kl * (temperature * temperature)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor, name: str,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(w * v) / sum(w)`` over the points (only those where ``keep``, if given)."""
    if weights.shape != values.shape:
        raise LossInputError(f'{name}: expected ({values.shape[0]},) point weights, got '
                             f'{tuple(weights.shape)}')
    weights = weights.detach().to(values)
    if keep is not None:
        weights = weights * keep
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


def supervised_ce_loss(logits: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int = 255,
                       point_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (N, K) logits against (N,) int64 labels; ``ignore_index`` is skipped.

    Returns 0 (connected to the graph) when every label is ignored. Labels outside
    [0, K) other than ``ignore_index`` raise LossInputError.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise LossInputError(f'expected (N, K) logits and (N,) labels, got '
                             f'{tuple(logits.shape)} and {tuple(labels.shape)}')
    labels = labels.long()
    valid = labels != ignore_index
    if not bool(valid.any()):
        return zero_loss(logits)
    bad = valid & ((labels < 0) | (labels >= logits.shape[1]))
    if bool(bad.any()):
        raise LossInputError(f'label {int(labels[bad][0])} is outside [0, {logits.shape[1]}) '
                             f'and is not the ignore index {ignore_index}')
    if point_weights is None:
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    per_point = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                                reduction='none')
    return _weighted_mean(per_point, point_weights, 'supervised_ce_loss', keep=valid)
