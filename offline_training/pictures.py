"""The paper's own checks as pictures: feature embeddings and teacher-student agreement.

- :func:`embed_2d`: a 2D map of per-point features, by t-SNE (exact, in torch: scikit-learn is
  not a dependency) or PCA; :func:`plot_embeddings` draws one panel per student (with and
  without the DA module), points colored by their ground-truth class.
- :func:`agreement_per_class`: on the points a camera sees, how often each student predicts
  the label its teacher gives the point (:func:`~offline_training.evaluate.teacher_point_labels`),
  per ground-truth class; :func:`plot_agreement` draws it as grouped bars.

:func:`experiment_pictures` draws both for the runs of ``cmkd train experiments``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch

EMBEDDINGS = ('tsne', 'pca')


def pca_2d(feats: torch.Tensor) -> torch.Tensor:
    """``(P, C) -> (P, 2)``: the two leading principal components (signs fixed so that each
    component's largest coordinate is positive: deterministic)."""
    x = feats.double() - feats.double().mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    y = x @ vh[:2].T
    flip = torch.sign(y.gather(0, y.abs().argmax(0, keepdim=True)))[0]
    return (y * torch.where(flip == 0, torch.ones_like(flip), flip)).float()


def _row_affinities(d2: torch.Tensor, perplexity: float, iterations: int = 64) -> torch.Tensor:
    """Conditional Gaussian affinities ``(P, P)`` of squared distances, each row's bandwidth
    bisected (in log space) to the given perplexity."""
    target = math.log(perplexity)
    lo = torch.full((d2.shape[0], 1), -50.0, dtype=d2.dtype)
    hi = torch.full((d2.shape[0], 1), 50.0, dtype=d2.dtype)
    d2 = d2 / d2[d2 > 0].median()  # a scale-free start for the bisection
    eye = torch.eye(d2.shape[0], dtype=torch.bool)
    for _ in range(iterations):
        log_beta = (lo + hi) / 2
        logits = (-d2 * log_beta.exp()).masked_fill(eye, -math.inf)
        p = torch.softmax(logits, 1)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1, keepdim=True)
        wider = entropy > target  # too flat: a larger beta (narrower kernel)
        lo = torch.where(wider, log_beta, lo)
        hi = torch.where(wider, hi, log_beta)
    return p


def tsne_2d(feats: torch.Tensor, *, perplexity: float = 30.0, iterations: int = 750,
            seed: int = 0) -> torch.Tensor:
    """Exact t-SNE (van der Maaten and Hinton, 2008) of ``(P, C)`` features to ``(P, 2)``:
    early exaggeration 12 for the first 250 steps, momentum 0.5 then 0.8, per-coordinate gains,
    learning rate max(P / 48, 50) (scikit-learn's 'auto'), started from the PCA map scaled to a
    standard deviation of 1e-4. O(P^2) memory: meant for a few thousand points."""
    n = feats.shape[0]
    if n < 4:
        raise ValueError(f't-SNE needs at least 4 points, got {n}')
    x = feats.double()
    x = x - x.mean(0)
    d2 = torch.cdist(x, x).square()
    p = _row_affinities(d2, min(perplexity, (n - 1) / 3))
    p = ((p + p.T) / (2 * n)).clamp(min=1e-12).float()  # the descent in float32: 2x faster
    y = pca_2d(x)
    y = y / y[:, 0].std().clamp(min=1e-12) * 1e-4
    gen = torch.Generator().manual_seed(seed)
    y = y + 1e-6 * torch.randn(y.shape, generator=gen)  # ties apart
    velocity = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / 48.0, 50.0)
    for step in range(iterations):
        exaggeration = 12.0 if step < 250 else 1.0
        momentum = 0.5 if step < 250 else 0.8
        num = 1.0 / (1.0 + torch.cdist(y, y).square())
        num.fill_diagonal_(0.0)
        q = (num / num.sum()).clamp(min=1e-12)
        w = (exaggeration * p - q) * num
        grad = 4.0 * (w.sum(1, keepdim=True) * y - w @ y)
        same = torch.sign(grad) == torch.sign(velocity)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp(min=0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
    return (y - y.mean(0)).float()


def embed_2d(feats: torch.Tensor, method: str = 'tsne', seed: int = 0) -> torch.Tensor:
    """``(P, C) -> (P, 2)`` by ``method`` ('tsne' or 'pca'), features standardised first."""
    if method not in EMBEDDINGS:
        raise ValueError(f'method must be one of {EMBEDDINGS}, got {method!r}')
    x = feats.double()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    return tsne_2d(x, seed=seed) if method == 'tsne' else pca_2d(x)


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``per_class`` points of every class (seeded), sorted."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels):
        rows = (labels == c).nonzero()[:, 0]
        picks.append(rows[torch.randperm(rows.shape[0], generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def nearest_neighbour_agreement(embedding: torch.Tensor, labels: torch.Tensor) -> float:
    """How often a point's nearest other point in the map has its class (how well the map
    separates the classes; printed beside each panel)."""
    d = torch.cdist(embedding.double(), embedding.double())
    d.fill_diagonal_(math.inf)
    return float((labels[d.argmin(1)] == labels).double().mean())


def plot_embeddings(panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
                    class_names: Sequence[str], class_colors: Sequence[Sequence[int]],
                    path: str, title: str = '') -> None:
    """One scatter panel per ``(title, embedding (P, 2), labels (P,))``, colored by class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.6 * len(panels) + 1.8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    present = sorted({int(c) for _, _, labels in panels for c in labels.tolist()})
    for i, (name, emb, labels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in present:
            rows = (labels == c).numpy()
            ax.scatter(emb[rows, 0].numpy(), emb[rows, 1].numpy(), s=4,
                       color=np.asarray(class_colors[c]) / 255.0, label=class_names[c])
        score = nearest_neighbour_agreement(emb, labels)
        ax.set_title(f'{name}\n(nearest neighbour same class: {score:.2f})', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[-1].legend(fontsize=7, markerscale=3, loc='center left', bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def agreement_per_class(teacher: torch.nn.Module, students: dict, dataset, *,
                        class_names: Sequence[str]) -> dict:
    """On the points some camera sees, per ground-truth class: the fraction of points where
    each student's class is the teacher's label of the point (``agreement``), and the same
    on the points the teacher labels wrong (``copied``: the teacher's mistakes the student
    repeats). ``students``: name -> student (one voxel size each). Returns ``{'agreement' |
    'copied': {name: {class: fraction or None}}, 'points' | 'teacher_wrong': {class: count}}``.
    """
    from offline_training.datasets import IGNORE, SparseCollate
    from offline_training.evaluate import teacher_point_labels
    k = len(class_names)
    agree = {name: torch.zeros(k, dtype=torch.int64) for name in students}
    copied = {name: torch.zeros(k, dtype=torch.int64) for name in students}
    total = torch.zeros(k, dtype=torch.int64)
    wrong_total = torch.zeros(k, dtype=torch.int64)
    for student in students.values():
        student.eval()
    for index in range(len(dataset)):
        sample = dataset[index]
        batch = SparseCollate(1.0)([sample])
        teacher_labels = teacher_point_labels(teacher, batch, k)
        keep = batch['visible_any'] & (batch['labels'] != IGNORE)
        gt, said = batch['labels'][keep], teacher_labels[keep]
        wrong = said != gt
        total += torch.bincount(gt, minlength=k)
        wrong_total += torch.bincount(gt[wrong], minlength=k)
        for name, student in students.items():
            sb = SparseCollate(float(student.voxel_size))([sample])
            pred = student(sb['coords'], sb['vfeats'])['logits'].argmax(1)[sb['inverse']][keep]
            same = pred == said
            agree[name] += torch.bincount(gt[same], minlength=k)
            copied[name] += torch.bincount(gt[same & wrong], minlength=k)

    def fractions(counts, of):
        return {name: {class_names[c]: (float(counts[name][c] / of[c]) if of[c] else None)
                       for c in range(k)} for name in students}

    return {'agreement': fractions(agree, total), 'copied': fractions(copied, wrong_total),
            'points': {class_names[c]: int(total[c]) for c in range(k)},
            'teacher_wrong': {class_names[c]: int(wrong_total[c]) for c in range(k)}}


def plot_agreement(agreement: dict, path: str) -> None:
    """Grouped bars per class (with points): each student's agreement with its teacher (top)
    and the share of the teacher's mistakes it repeats (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = list(agreement['agreement'])
    classes = [c for c, count in agreement['points'].items() if count]
    fig = Figure(figsize=(max(6.0, 0.6 * len(classes) + 2), 7.5), dpi=100)
    FigureCanvasAgg(fig)
    panels = (('agreement', 'points', 'agreement with the teacher (points a camera sees)'),
              ('copied', 'teacher_wrong', "the teacher's mistakes the student repeats"))
    for i, (key, counts, title) in enumerate(panels):
        ax = fig.add_subplot(2, 1, i + 1)
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            values = [agreement[key][name][c] for c in classes]
            ax.bar(np.arange(len(classes)) + (j - (len(names) - 1) / 2) * width,
                   [np.nan if v is None else v for v in values], width, label=name)
        labels = [f'{c}\n({agreement[counts][c]})' for c in classes]
        ax.set_xticks(range(len(classes)), labels=labels, rotation=60, ha='right', fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel('fraction of points', fontsize=8)
        ax.set_title(f'{title}; (n) points', fontsize=9)
        ax.grid(axis='y', alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path)


def experiment_pictures(out_dir: str, teacher_path: str, eval_dir: str,
                        checkpoints: dict[str, str], *, embed_runs: Sequence[str],
                        method: str = 'tsne', per_class: int = 80, seed: int = 0) -> dict:
    """``embedding.png`` (pseudo-2D features of ``embed_runs`` on ``eval_dir``'s points) and
    ``agreement.png`` (every run of ``checkpoints``: name -> student.pt) into ``out_dir``,
    with their figures in ``pictures.json`` (cached: drawn once)."""
    from cmkd_ros.models.checkpoint import load_checkpoint
    from cmkd_ros.models.teacher import load_teacher
    from offline_training.datasets import PairDataset
    from offline_training.probe import point_features_of
    path = os.path.join(out_dir, 'pictures.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            return json.load(fh)
    os.makedirs(out_dir, exist_ok=True)
    students, info = {}, {}
    for name, checkpoint in checkpoints.items():
        students[name], info = load_checkpoint(checkpoint, backend='torch')
    if not students:
        raise ValueError('no student checkpoint to draw')
    names, colors = info['class_names'], info['class_colors']
    kind = info['config'].point_features
    dataset = PairDataset(eval_dir, label_images=False, feature_kind=kind)
    panels, separation = [], {}
    for name in embed_runs:
        if name not in students:
            continue
        data = point_features_of(students[name], dataset)
        pick = balanced_subset(data['labels'], per_class, seed)
        emb = embed_2d(data['feats'][pick], method, seed)
        label = ('with DA' if students[name].config.use_da else 'without DA')
        panels.append((f'{name} ({label})', emb, data['labels'][pick]))
        separation[name] = nearest_neighbour_agreement(emb, data['labels'][pick])
    result = {'method': method, 'embedding_nn_agreement': separation}
    if panels:
        plot_embeddings(panels, names, colors, os.path.join(out_dir, 'embedding.png'),
                        f'{method} of pseudo-2D point features (scored worlds, up to '
                        f'{per_class} points a class)')
        result['embedding'] = 'embedding.png'
    teacher = load_teacher(teacher_path).eval()
    result['agreement'] = agreement_per_class(teacher, students, dataset, class_names=names)
    plot_agreement(result['agreement'], os.path.join(out_dir, 'agreement.png'))
    result['agreement_png'] = 'agreement.png'
    with open(path + '.tmp', 'w', encoding='utf-8') as fh:
        json.dump(result, fh, indent=2)
    os.replace(path + '.tmp', path)
    return result
