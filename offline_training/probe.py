"""Linear probe: a linear classifier trained on a frozen student's features.

The usual score of pre-trained features: the network stays frozen, one linear layer learns the
classes from the training scans' 3D labels, and the evaluation scores the result as it scores a
student (:func:`offline_training.evaluate.evaluate_student`: all, seen, unseen points). A
zero-shot student is also scored through the teacher's shared classifier; the probe says what
its features hold whatever their scale (UDAKD's InfoNCE leaves the scale free).

``python -m offline_training.probe --checkpoint student.pt --train PAIRS --eval PAIRS``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = ('pseudo2d', 'backbone')


@torch.no_grad()
def point_features_of(student: nn.Module, dataset, *, features: str = 'pseudo2d',
                      max_points: int | None = None, seed: int = 0,
                      max_scans: int | None = None) -> dict:
    """The frozen ``student``'s ``features`` at every labeled point of ``dataset``.

    Returns ``feats (P, C) float32`` (each point gets its voxel's row), ``labels (P,) int64``,
    ``seen (P,) bool`` (some camera sees the point) and ``scan (P,) int64``; with
    ``max_points`` a seeded random subset of that many points.
    """
    from offline_training.datasets import IGNORE, SparseCollate
    if features not in FEATURES:
        raise ValueError(f'features must be one of {FEATURES}, got {features!r}')
    collate = SparseCollate(float(student.voxel_size))
    count = len(dataset) if max_scans is None else min(len(dataset), max_scans)
    if count == 0:
        raise ValueError('the dataset is empty')
    was_training = student.training
    student.eval()
    parts: dict[str, list] = {'feats': [], 'labels': [], 'seen': [], 'scan': []}
    try:
        for index in range(count):
            batch = collate([dataset[index]])
            out = student(batch['coords'], batch['vfeats'])
            keep = batch['labels'] != IGNORE
            parts['feats'].append(out[features].float()[batch['inverse']][keep])
            parts['labels'].append(batch['labels'][keep])
            parts['seen'].append(batch['visible_any'][keep])
            parts['scan'].append(torch.full((int(keep.sum()),), index, dtype=torch.int64))
    finally:
        student.train(was_training)
    result = {k: torch.cat(v) for k, v in parts.items()}
    if max_points is not None and result['labels'].shape[0] > max_points:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(result['labels'].shape[0], generator=gen)[:max_points]
        result = {k: v[pick] for k, v in result.items()}
    return result


def fit_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     steps: int = 200, weight_decay: float = 1e-4,
                     class_balance: str = 'inverse_sqrt') -> nn.Linear:
    """A linear layer ``C -> num_classes`` fitted to ``feats (P, C)`` / ``labels (P,)``.

    Full-batch L-BFGS on the cross-entropy of standardised features (deterministic), plus
    ``weight_decay`` times the squared weights; ``class_balance`` 'inverse_sqrt' weighs each
    class by 1/sqrt(its frequency) (as the training losses do), 'none' not at all. The
    standardisation is folded into the returned layer, which takes raw features.
    """
    if feats.ndim != 2 or labels.shape != (feats.shape[0],) or feats.shape[0] == 0:
        raise ValueError(f'feats must be (P, C) and labels (P,) with P > 0, got '
                         f'{tuple(feats.shape)} and {tuple(labels.shape)}')
    if class_balance not in ('inverse_sqrt', 'none'):
        raise ValueError(f"class_balance must be 'inverse_sqrt' or 'none', got {class_balance!r}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f'labels must lie in [0, {num_classes}), got {int(labels.min())}..'
                         f'{int(labels.max())}')
    feats = feats.detach().double()
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    z = (feats - mean) / std
    weight = None
    if class_balance == 'inverse_sqrt':
        freq = torch.bincount(labels, minlength=num_classes).double()
        weight = torch.where(freq > 0, freq.clamp(min=1).rsqrt(), torch.zeros_like(freq))
        weight = weight / weight[freq > 0].mean()
    w = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn='strong_wolfe', tolerance_grad=1e-9,
                                  tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels, weight=weight)
        loss = loss + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        scaled = w / std
        head.weight.copy_(scaled.float())
        head.bias.copy_((b - scaled @ mean).float())
    return head.requires_grad_(False)


class ProbedStudent(nn.Module):
    """A frozen student whose logits come from ``head`` on its ``features`` (scored by
    :func:`~offline_training.evaluate.evaluate_student` like any student)."""

    def __init__(self, student: nn.Module, head: nn.Linear, features: str = 'pseudo2d'):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f'features must be one of {FEATURES}, got {features!r}')
        self.student, self.head, self.features = student, head, features
        self.config = student.config
        self.backend = getattr(student, 'backend', 'torch')

    @property
    def voxel_size(self) -> float:
        return self.student.voxel_size

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, manager=None) -> dict:
        out = self.student(coords, feats, manager=manager)
        return {**out, 'logits': self.head(out[self.features].float())}


def linear_probe(student: nn.Module, train_dataset, eval_dataset, *,
                 class_names: Sequence[str], features: str = 'pseudo2d', steps: int = 200,
                 max_points: int | None = 300_000, seed: int = 0) -> dict:
    """Fit a linear probe on ``train_dataset``'s labeled points and score it on
    ``eval_dataset``; the student is not changed. Returns ``eval``
    (:func:`~offline_training.evaluate.evaluate_student`), ``features``, ``train_points``,
    ``train_accuracy``, ``steps`` and ``seconds``."""
    from offline_training.evaluate import evaluate_student
    start = time.perf_counter()
    data = point_features_of(student, train_dataset, features=features, max_points=max_points,
                             seed=seed)
    head = fit_linear_probe(data['feats'], data['labels'], len(class_names), steps=steps)
    with torch.no_grad():
        accuracy = float((head(data['feats']).argmax(1) == data['labels']).double().mean())
    result = evaluate_student(ProbedStudent(student, head, features), eval_dataset,
                              class_names=class_names)
    return {'features': features, 'eval': result, 'train_points': int(data['labels'].shape[0]),
            'train_accuracy': accuracy, 'steps': steps,
            'seconds': time.perf_counter() - start}


def probe_checkpoint(checkpoint: str, train: str, eval_data: str, *,
                     features: str = 'pseudo2d', steps: int = 200, seed: int = 0) -> dict:
    """:func:`linear_probe` of a saved student on two pair folders (default
    correspondences, no augmentation)."""
    from cmkd_ros.models.checkpoint import load_checkpoint
    from offline_training.datasets import PairDataset
    student, info = load_checkpoint(checkpoint, backend='torch')
    kind = info['config'].point_features
    return linear_probe(student, PairDataset(train, label_images=False, feature_kind=kind),
                        PairDataset(eval_data, label_images=False, feature_kind=kind),
                        class_names=info['class_names'], features=features, steps=steps,
                        seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m offline_training.probe',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='student checkpoint (student.pt)')
    parser.add_argument('--train', required=True, help='pair folder with 3D labels to fit on')
    parser.add_argument('--eval', required=True, help='pair folder to score on')
    parser.add_argument('--features', default='pseudo2d', choices=FEATURES)
    parser.add_argument('--steps', type=int, default=200, help='L-BFGS iterations')
    parser.add_argument('--out', default=None, help='write the result as JSON here')
    args = parser.parse_args(argv)
    result = probe_checkpoint(args.checkpoint, args.train, args.eval, features=args.features,
                              steps=args.steps)
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as fh:
            json.dump(result, fh, indent=2)
    ev = result['eval']
    print(f'linear probe on {args.features}: mIoU all {ev["all"]["miou"]:.3f} seen '
          f'{ev["seen"]["miou"]:.3f} unseen {ev["unseen"]["miou"] or 0:.3f} '
          f'(train accuracy {result["train_accuracy"]:.3f}, {result["seconds"]:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
