"""Score a 3D student: per-class IoU and mIoU for all points and for points no camera sees.

``cmkd evaluate --checkpoint student.pt --data PAIRS [--out DIR]`` loads the student with
:func:`cmkd_ros.models.checkpoint.load_checkpoint`, runs it on every scan of a data set (for
``--format nuscenes|semantickitti`` its official validation split unless ``--split``,
``--scenes`` or ``--sequences`` says otherwise; the report names the split) and reports three
groups of points:

- ``all``: every labeled point;
- ``unseen``: points that no camera sees (no correspondence after the occlusion test), the
  region where only the LiDAR student can label anything;
- ``seen``: the complement.

The mIoU of a group averages the classes present in that group's ground truth or predictions
(see :mod:`cmkd_ros.metrics`). With ``--out`` it writes ``eval.json`` (all figures and confusion
matrices), ``confusion_all.png``, ``confusion_unseen.png`` and ``iou_per_class.png``.
:func:`evaluate_student` is the library entry the trainer calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch

from cmkd_ros.config import PRECISION_CHOICES
from cmkd_ros.metrics import ConfusionMatrix
from cmkd_ros.models.student import resolve_device
from cmkd_ros.progress import progress_bar
from offline_training.config import POINT_DATA_FORMATS

GROUPS = ('all', 'seen', 'unseen')


@torch.no_grad()
def evaluate_student(student: torch.nn.Module, dataset, *, voxel_size: float | None = None,
                     device: str | torch.device = 'cpu', class_names: Sequence[str] | None = None,
                     batch_size: int = 1, num_workers: int = 0, max_scans: int | None = None,
                     progress: bool = False, precision: str = 'float32') -> dict:
    """Per-class IoU, mIoU and accuracy of ``student`` on ``dataset`` (a :class:`ScanDataset`).

    ``voxel_size`` defaults to the student's own; ``precision``: inference arithmetic
    (:func:`cmkd_ros.models.precision_context`). Returns ``{'all'|'seen'|'unseen': summary}``
    (:meth:`ConfusionMatrix.summary`: miou, accuracy, count, iou and support per class) plus
    ``confusion`` (group -> K x K list, rows ground truth), ``class_names``, ``num_scans``,
    ``num_points``, ``unseen_fraction`` (of labeled points) and ``seconds``.
    """
    from cmkd_ros.models import precision_context, resolve_backend
    from offline_training.datasets import SparseCollate
    arithmetic = precision_context(precision, device, resolve_backend(
        getattr(student, 'backend', 'torch'), device))
    config = getattr(student, 'config', None)
    num_classes = int(config.num_classes) if config is not None else int(
        student.classifier.out_features)
    voxel_size = float(voxel_size or student.voxel_size)
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for a student with {num_classes} '
                         'classes')
    device = resolve_device(device)
    indices = range(len(dataset) if max_scans is None else min(len(dataset), max_scans))
    if len(indices) == 0:
        raise ValueError('the evaluation dataset is empty')
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(indices)),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         collate_fn=SparseCollate(voxel_size))
    matrices = {g: ConfusionMatrix(num_classes) for g in GROUPS}
    was_training = student.training
    student.eval()
    start = time.perf_counter()
    scans = points = 0
    bar = progress_bar(len(indices), 'evaluate', 'scan') if progress else None
    try:
        for batch in loader:
            with arithmetic:
                out = student(batch['coords'].to(device), batch['vfeats'].to(device))
            pred = out['logits'].argmax(1).cpu()[batch['inverse']]
            labels = batch['labels']
            seen = batch['visible_any']
            matrices['all'].update(labels, pred)
            matrices['seen'].update(labels[seen], pred[seen])
            matrices['unseen'].update(labels[~seen], pred[~seen])
            scans += len(batch['num_points'])
            points += int(labels.shape[0])
            if bar is not None:
                bar.update(len(batch['num_points']))
    finally:
        student.train(was_training)
        if bar is not None:
            bar.close()
    result = {g: matrices[g].summary(class_names) for g in GROUPS}
    result['confusion'] = {g: matrices[g].matrix.tolist() for g in GROUPS}
    result['class_names'] = list(class_names)
    result['num_scans'] = scans
    result['num_points'] = points
    labeled = matrices['all'].count
    result['unseen_fraction'] = matrices['unseen'].count / labeled if labeled else None
    result['seconds'] = time.perf_counter() - start
    return result


@torch.no_grad()
def teacher_point_labels(teacher: torch.nn.Module, batch: dict, num_classes: int,
                         device: str | torch.device = 'cpu') -> torch.Tensor:
    """The class of the mean teacher softmax at each point's pixels, ``(N,) int64`` on the CPU,
    for one collated batch (:class:`~offline_training.datasets.SparseCollate`); only the
    points of ``batch['visible_any']`` have pixels (the others get class 0)."""
    from offline_training.losses import sample_image_features
    images = batch['images'].to(device)
    feats = sample_image_features(teacher.features(images.float() / 255.0),
                                  batch['corr_image'].to(device),
                                  batch['corr_uv'].to(device), tuple(images.shape[-2:]))
    logits = teacher.classifier(feats[:, :, None, None])[:, :, 0, 0]
    if logits.shape[1] != num_classes:
        raise ValueError(f'the teacher has {logits.shape[1]} classes, class_names '
                         f'{num_classes}')
    votes = torch.zeros(batch['labels'].shape[0], num_classes, device=device)
    votes.index_add_(0, batch['corr_point'].to(device), logits.float().softmax(1))
    return votes.argmax(1).cpu()


def image_point_labels(batch: dict, num_classes: int) -> torch.Tensor:
    """The majority class of the label images at each point's pixels, ``(N,) int64``, for one
    collated batch that has ``label_images``: what a perfect teacher would give each point
    through these correspondences. Points without pixels, or whose pixels are all unlabeled
    (255), get 255."""
    from offline_training.datasets import correspondence_pixel_labels
    pixel = correspondence_pixel_labels(batch, num_classes)
    known = pixel != 255
    votes = torch.zeros(batch['labels'].shape[0], num_classes)
    votes.index_put_((batch['corr_point'][known], pixel[known]),
                     torch.ones(int(known.sum())), accumulate=True)
    labels = votes.argmax(1)
    labels[votes.sum(1) == 0] = 255
    return labels


@torch.no_grad()
def evaluate_label_transfer(teacher: torch.nn.Module | None, dataset, *,
                            class_names: Sequence[str], device: str | torch.device = 'cpu',
                            max_scans: int | None = None) -> dict:
    """mIoU of 2D labels carried to the LiDAR points by the correspondences.

    With a ``teacher``, each point some camera sees gets the class of the mean teacher softmax
    at its pixels (the target FSKD distils, :func:`teacher_point_labels`): what a zero-shot
    student could reach on those points by copying its teacher, no more. With ``teacher=None``
    the dataset's label images are carried instead (:func:`image_point_labels`; the dataset
    must load them): what the correspondences themselves allow (occlusion test, calibration,
    timing), the ceiling of any teacher; seen points whose pixels are all unlabeled are left
    out and counted (``unlabeled_pixels``). The result is the ``seen`` group
    (:meth:`ConfusionMatrix.summary`) and ``num_scans``. ``dataset``: a :class:`ScanDataset`
    with images and correspondences.
    """
    from offline_training.datasets import SparseCollate
    num_classes = len(class_names)
    device = resolve_device(device)
    collate = SparseCollate(1.0)  # the voxels are not used
    matrix = ConfusionMatrix(num_classes)
    count = len(dataset) if max_scans is None else min(len(dataset), max_scans)
    unlabeled = 0
    for index in range(count):
        batch = collate([dataset[index]])
        if teacher is not None:
            labels = teacher_point_labels(teacher, batch, num_classes, device)
        elif 'label_images' in batch:
            labels = image_point_labels(batch, num_classes)
        else:
            raise ValueError(f'scan {index} has no label images to carry (teacher=None)')
        seen = batch['visible_any'] & (labels != 255)
        unlabeled += int((batch['visible_any'] & (labels == 255)).sum())
        matrix.update(batch['labels'][seen], labels[seen])
    result = {'seen': matrix.summary(class_names), 'num_scans': count}
    if teacher is None:
        result['unlabeled_pixels'] = unlabeled
    return result


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no global backend change)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = '') -> None:
    """Row-normalised confusion matrix (rows: ground truth) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = len(class_names)
    size = max(5.0, 0.45 * k + 2)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(norm, vmin=0, vmax=1, cmap='Blues')
    ax.set_xticks(range(k), labels=class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels=class_names, fontsize=8)
    ax.set_xlabel('prediction')
    ax.set_ylabel('ground truth')
    for g in range(k):
        for p in range(k):
            if matrix[g, p] > 0:
                ax.text(p, g, f'{norm[g, p]:.2f}', ha='center', va='center', fontsize=6,
                        color='white' if norm[g, p] > 0.5 else 'black')
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the row')
    ax.set_title(title or 'confusion matrix (row-normalised)')
    fig.tight_layout()
    fig.savefig(path)


def plot_iou_bars(result: dict, path: str, groups: Sequence[str] = ('all', 'unseen')) -> None:
    """Per-class IoU bars for each group (classes absent from a group are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = result['class_names']
    k = len(names)
    fig = Figure(figsize=(max(6.0, 0.55 * k + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    for j, group in enumerate(groups):
        iou = [result[group]['iou'][n] for n in names]
        values = [np.nan if v is None else v for v in iou]
        miou = result[group]['miou']
        label = f'{group} (mIoU {miou:.3f})' if miou is not None else f'{group} (no points)'
        ax.bar(np.arange(k) + (j - (len(groups) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(range(k), labels=names, rotation=60, ha='right', fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel('IoU')
    ax.set_title('per-class IoU')
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_report(result: dict, out_dir: str) -> list[str]:
    """``eval.json`` and the three PNGs into ``out_dir``; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in (
        'eval.json', 'confusion_all.png', 'confusion_unseen.png', 'iou_per_class.png')]
    with open(paths[0], 'w', encoding='utf-8') as fh:
        json.dump(result, fh, indent=2)
    plot_confusion(result['confusion']['all'], result['class_names'], paths[1],
                   'all points (row-normalised)')
    plot_confusion(result['confusion']['unseen'], result['class_names'], paths[2],
                   'points no camera sees (row-normalised)')
    plot_iou_bars(result, paths[3])
    return paths


def describe_split(info: dict) -> str:
    """One line naming what was scored: format, split and its scenes or sequences."""
    units = info.get('scenes') or info.get('sequences')
    if units is None:
        return f'data: {info["format"]} {info.get("root", "")}'
    shown = ', '.join(units[:8]) + (f', ... ({len(units)} in all)' if len(units) > 8 else '')
    kind = 'scenes' if 'scenes' in info else 'sequences'
    version = f' {info["version"]}' if info.get('version') else ''
    return f'data: {info["format"]}{version} split {info["split"]}, {kind} {shown}'


def format_table(result: dict) -> str:
    """Plain-text per-class table: IoU for all / seen / unseen points and the point support."""
    names = result['class_names']
    width = max(12, max(len(n) for n in names))
    lines = [f'{"class":<{width}}  {"all":>6}  {"seen":>6}  {"unseen":>6}  {"points":>9}']

    def cell(value):
        return f'{value:6.3f}' if value is not None else f'{"-":>6}'

    for n in names:
        lines.append(f'{n:<{width}}  {cell(result["all"]["iou"][n])}  '
                     f'{cell(result["seen"]["iou"][n])}  {cell(result["unseen"]["iou"][n])}  '
                     f'{result["all"]["support"][n]:>9}')
    lines.append(f'{"mIoU":<{width}}  {cell(result["all"]["miou"])}  '
                 f'{cell(result["seen"]["miou"])}  {cell(result["unseen"]["miou"])}  '
                 f'{result["all"]["count"]:>9}')
    lines.append(f'{"accuracy":<{width}}  {cell(result["all"]["accuracy"])}  '
                 f'{cell(result["seen"]["accuracy"])}  {cell(result["unseen"]["accuracy"])}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# cmkd evaluate


def write_pictures(student: torch.nn.Module, dataset, out_dir: str, count: int, *,
                   class_names: Sequence[str], class_colors: Sequence[Sequence[int]],
                   precision: str = 'float32') -> list[str]:
    """For the first ``count`` scans: ``scan<i>_bev.png`` (ground truth beside the student's
    labels, points no camera sees pale) and ``scan<i>_<camera>.png`` (the camera that sees the
    most points, with the student's labels drawn at their pixels)."""
    from cmkd_ros.viz import save_bev_comparison, save_camera_labels
    os.makedirs(out_dir, exist_ok=True)
    colors = np.asarray(class_colors, np.uint8)
    paths = []
    for i in range(min(count, len(dataset))):
        data = dataset.get_data(i)
        pred, _ = student.predict(data['xyz'], data['intensity'], precision=precision)
        pred = pred.cpu().numpy()
        bev = os.path.join(out_dir, f'scan{i}_bev.png')
        name = os.path.basename(str(data['name']))
        save_bev_comparison(bev, data['xyz'], data['labels'], pred, data['visible_any'],
                            class_names, colors, title=f"{name}: bird's-eye view")
        paths.append(bev)
        if len(data['corr_camera']):
            cam = int(np.bincount(data['corr_camera']).argmax())
            name = dataset.get_frame(i).rig.names[cam]
            sel = data['corr_camera'] == cam
            points = data['corr_point'][sel]
            image = os.path.join(out_dir, f'scan{i}_{name}.png')
            save_camera_labels(image, data['images'][cam], data['corr_uv'][sel], pred[points],
                               np.linalg.norm(data['xyz'][points], axis=1), colors)
            paths.append(image)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, help='student checkpoint (student.pt)')
    parser.add_argument('--data', required=True,
                        help='pair dataset folder, nuScenes dataroot or SemanticKITTI root')
    parser.add_argument('--format', default='pairs',
                        choices=POINT_DATA_FORMATS,
                        help='layout of --data (default: pairs)')
    parser.add_argument('--version', default='',
                        help='nuScenes version folder (default: the one in --data)')
    parser.add_argument('--split', default='',
                        help='nuScenes or SemanticKITTI split to score (default: the official '
                        'validation split: nuScenes val, mini_val in v1.0-mini; SemanticKITTI '
                        'sequence 08)')
    parser.add_argument('--scenes', nargs='*', default=None,
                        help='nuScenes scene names to score instead of a split')
    parser.add_argument('--sequences', nargs='*', default=None,
                        help='SemanticKITTI sequences to score instead of a split')
    parser.add_argument('--out', default=None, help='folder for eval.json and the PNG plots')
    parser.add_argument('--cameras', nargs='*', default=None,
                        help='cameras that count as seeing a point (default: all)')
    parser.add_argument('--no-occlusion', action='store_true',
                        help='a point behind a nearer surface still counts as seen')
    parser.add_argument('--no-motion-compensation', action='store_true',
                        help='project points without moving them to the camera stamps')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    parser.add_argument('--precision', default='float32', choices=PRECISION_CHOICES,
                        help='inference arithmetic (float16: CUDA only; auto: bfloat16 on CPUs '
                        'with bfloat16 instructions)')
    parser.add_argument('--max-scans', type=int, default=None, help='score only the first N')
    parser.add_argument('--progress', action='store_true', help='show a progress bar')
    parser.add_argument('--pictures', type=int, default=0, metavar='N',
                        help='with --out: bird\'s-eye and camera pictures of the first N scans')


def build_eval_dataset(args: argparse.Namespace, feature_kind: str):
    from offline_training.datasets import NuScenesDataset, PairDataset, SemanticKITTIDataset
    common = {'occlusion': not args.no_occlusion,
              'motion_compensation': not args.no_motion_compensation,
              'feature_kind': feature_kind}
    chosen = args.scenes if args.format == 'nuscenes' else args.sequences
    if args.split and chosen:
        raise ValueError('give --split or --scenes/--sequences, not both')
    if args.format == 'pairs':
        if args.split or args.scenes or args.sequences or args.version:
            raise ValueError('--split, --scenes, --sequences and --version are for the '
                             'nuscenes and semantickitti formats')
        return PairDataset(args.data, cameras=args.cameras, label_images=False, **common)
    if args.format == 'nuscenes':
        if args.sequences:
            raise ValueError('--sequences is for --format semantickitti; use --scenes')
        return NuScenesDataset(args.data, args.version, split=chosen or args.split, part='val',
                               cameras=args.cameras, require_labels=True, **common)
    if args.scenes or args.version:
        raise ValueError('--scenes and --version are for --format nuscenes')
    return SemanticKITTIDataset(args.data, chosen or args.split, part='val',
                                cameras=args.cameras, **common)


def run(args: argparse.Namespace) -> int:
    from cmkd_ros.models.checkpoint import load_checkpoint
    try:
        student, info = load_checkpoint(args.checkpoint, map_location=args.device)
        dataset = build_eval_dataset(args, info['config'].point_features)
        result = evaluate_student(student, dataset, voxel_size=info['voxel_size'],
                                  device=args.device, class_names=info['class_names'],
                                  max_scans=args.max_scans, progress=args.progress,
                                  precision=args.precision)
    except (ValueError, OSError) as exc:          # checkpoint, data and metric errors
        print(f'cmkd evaluate: {exc}', file=sys.stderr)
        return 1
    result['checkpoint'] = os.path.abspath(args.checkpoint)
    result['data'] = os.path.abspath(args.data)
    result['split'] = dataset.split_info()
    print(format_table(result))
    print(describe_split(result['split']))
    print(f'{result["num_scans"]} scans, {result["num_points"]} points, '
          f'{100 * (result["unseen_fraction"] or 0):.1f}% of labeled points unseen by any '
          f'camera, {result["seconds"]:.1f} s')
    if args.out:
        paths = write_report(result, args.out)
        if args.pictures > 0:
            try:
                paths += write_pictures(student, dataset, args.out, args.pictures,
                                        class_names=info['class_names'],
                                        class_colors=info['class_colors'],
                                        precision=args.precision)
            except (ValueError, OSError) as exc:
                print(f'cmkd evaluate: pictures: {exc}', file=sys.stderr)
                return 1
        for path in paths:
            print(f'wrote {path}')
    return 0
