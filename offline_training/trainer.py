"""Student training: an explicit step, a short loop, resumable checkpoints, DDP and AMP.

One :class:`Trainer` serves every method (``udakd``, ``fskd``, ``finetune``, ``supervised``);
a method is only a function from (student outputs, batch) to a dict of named loss terms
(:data:`METHOD_LOSSES`), weighted by ``config.loss.<term>_weight`` and summed. Its constructor
is a list of builders over the one :class:`~offline_training.config.TrainConfig`
(:func:`build_device`, :func:`build_frozen_teacher`, :func:`build_student_model`, the
optimizer and schedule of :mod:`offline_training.engine`, :func:`build_train_data`,
:func:`build_losses`, :func:`build_hooks`); ``fit`` is a loop over ``train_step`` whose
logging (:class:`MetricsHook`), progress bar and checkpoints (:class:`CheckpointHook`) are
hooks.

Reproducibility and resume:

- every random choice derives from ``config.seed``: weight init, the data order
  (``DistributedSampler`` seeded per epoch), each sample's augmentation (seeded from
  (seed, epoch, index), independent of which worker loads it) and the InfoNCE sampling
  (seeded from (seed, rank, step));
- a checkpoint (``out_dir/checkpoints/step_XXXXXXXX.pt``, written to a temporary file and
  renamed) holds the model, optimizer, scheduler, grad scaler, step, RNG states and config;
  ``resume=True`` continues from the newest readable one after a crash or ``kill -9``
  (falling back past a truncated one, with a warning), skipping the batches of the current
  epoch already used, so the result matches an uninterrupted run; ``metrics.jsonl`` keeps the
  steps up to it;
- on the CPU a run is bit-for-bit repeatable for a given number of torch threads (1 and 2
  threads round differently, each repeatably): losses gather point rows with
  ``index_select``, whose backward is a serial ``index_add_``, not with advanced indexing,
  whose CPU backward adds in parallel with atomics (two 2-thread runs differed). CUDA runs
  are not bit-identical (atomic scatters, float16 autocast);
- an ``out_dir`` holding an earlier run is refused unless ``resume=True`` (continue it) or
  ``overwrite=True`` (delete it, with a warning, and start over): no run is thrown away
  silently.

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains on its shard
(``DistributedSampler``) inside ``DistributedDataParallel``: gloo on CPU, nccl on CUDA.
Rank 0 writes checkpoints, TensorBoard scalars (``out_dir/tensorboard``), ``metrics.jsonl`` and
the final ``student.pt`` (:func:`cmkd_ros.models.checkpoint.save_checkpoint`, loadable by the
segment node alone).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from cmkd_ros.classes import get_class_map
from cmkd_ros.config import ConfigError, build, to_dict
from cmkd_ros.models.checkpoint import atomic_torch_save
from offline_training.config import DISTILLATION_METHODS, TrainConfig
from offline_training.engine import Hook, ProgressHook, build_optimizer, build_scheduler
from offline_training.losses import (class_balance_weights, fskd_feature_loss, infonce_loss,
                                     sample_image_features, semantic_kl_loss,
                                     supervised_ce_loss, zero_loss)

CHECKPOINT_FORMAT = 'cmkd_train_state'
CHECKPOINT_PATTERN = re.compile(r'^step_(\d{8})\.pt$')
# What a run writes into out_dir besides checkpoints/ (an earlier run is refused or removed).
RUN_FILES = ('metrics.jsonl', 'summary.json', 'eval.json', 'student.pt')
LOG = logging.getLogger('cmkd_ros.train')   # warnings reach stderr without any setup
# Settings that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ('progress', 'threads', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                     'data.num_workers', 'data.val', 'data.val_split', 'out_dir', 'device')


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad checkpoint, mismatched resume, empty data)."""


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    digest = hashlib.blake2b(b'/'.join(str(int(p)).encode() for p in parts), digest_size=8)
    return int.from_bytes(digest.digest(), 'little') >> 1


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Loss terms of each method: (student outputs, batch, context) -> {name: scalar tensor}


def averaged_features(teacher: torch.nn.Module, images: torch.Tensor,
                      scales: tuple = (1.0,), flip: bool = False) -> torch.Tensor:
    """``teacher.features`` of ``images`` (B, 3, H, W) averaged over the images enlarged by
    each of ``scales`` and, with ``flip``, over their mirror images (mirrored back); every map
    resized (bilinear) to the first one's size. ``scales=(1.0,)`` without flip: the features
    as they are."""
    maps = []
    for scale in scales:
        enlarged = images if scale == 1.0 else F.interpolate(
            images, scale_factor=float(scale), mode='bilinear', align_corners=False)
        for mirror in ((False, True) if flip else (False,)):
            feats = teacher.features(enlarged.flip(-1) if mirror else enlarged)
            feats = feats.flip(-1) if mirror else feats
            if maps and feats.shape[-2:] != maps[0].shape[-2:]:
                feats = F.interpolate(feats, size=maps[0].shape[-2:], mode='bilinear',
                                      align_corners=False)
            maps.append(feats)
    return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)


class TeacherFeatureCache:
    """``teacher.features`` of uint8 images, memoised by image content up to ``max_bytes``.

    The teacher is frozen and images are not augmented, so an image's features never change:
    computing them once per image instead of once per step makes distillation several times
    cheaper on CPU. Features are kept as float16 on the CPU; once the budget is used up new
    images are computed but not stored. ``scales``, ``flip``: the features averaged over
    enlarged and mirrored images (:func:`averaged_features`).
    """

    def __init__(self, teacher: torch.nn.Module, max_bytes: int, scales: tuple = (1.0,),
                 flip: bool = False):
        self.teacher = teacher
        self.scales, self.flip = tuple(scales), bool(flip)
        self.max_bytes = int(max_bytes)
        self.bytes_used = 0
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        data = image.detach().cpu().contiguous().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).digest() + str(tuple(image.shape)).encode()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, D, h, w) float features (no gradient)."""
        with torch.no_grad():
            if self.max_bytes <= 0 or images.dtype != torch.uint8:
                return self._features(images.float() / 255.0 if images.dtype ==
                                      torch.uint8 else images).float()
            keys = [self.key(image) for image in images]
            missing = sorted({i for i, k in enumerate(keys) if k not in self.entries})
            fresh = {}
            if missing:
                # float16 both when stored and when fresh: hits and misses give equal values
                feats = self._features(images[missing].float() / 255.0).half()
                for row, i in enumerate(missing):
                    fresh[keys[i]] = feats[row].float()
                    size = feats[row].numel() * 2
                    if self.bytes_used + size <= self.max_bytes:
                        self.entries[keys[i]] = feats[row].cpu()
                        self.bytes_used += size
            self.misses += len(missing)
            self.hits += len(keys) - len(missing)
            return torch.stack([fresh[k] if k in fresh else
                                self.entries[k].to(images.device, torch.float32)
                                for k in keys])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return averaged_features(self.teacher, images, self.scales, self.flip)


class LossContext:
    """What a method's loss function may use besides the outputs and the batch."""

    def __init__(self, config: TrainConfig, teacher: torch.nn.Module | None,
                 generator: torch.Generator, teacher_features: Callable | None = None):
        self.config = config
        self.teacher = teacher
        self.generator = generator
        self.teacher_features = teacher_features


def correspondence_features(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any],
                            ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    """Student and teacher features of the M camera-LiDAR correspondences of a batch.

    Returns ``rows`` (M,) int64 voxel row of each corresponded point, ``student`` (M, D) the
    pseudo-2D features of those voxels and ``teacher`` (M, D) the frozen teacher's features
    bilinearly sampled at the pixels (no gradient). Points without correspondences are absent.
    """
    if ctx.teacher is None:
        raise TrainingError('this method needs a teacher (teacher.checkpoint)')
    rows = batch['inverse'][batch['corr_point']]
    images = batch['images']
    features = ctx.teacher_features or TeacherFeatureCache(ctx.teacher, 0)
    with torch.no_grad():
        target = sample_image_features(features(images), batch['corr_image'],
                                       batch['corr_uv'], tuple(images.shape[-2:]))
    return rows, outputs['pseudo2d'].index_select(0, rows), target.float()


def udakd_terms(outputs, batch, ctx: LossContext) -> dict[str, torch.Tensor]:
    """UDAKD: InfoNCE between pseudo-2D point features and teacher pixel features."""
    _, student, teacher = correspondence_features(outputs, batch, ctx)
    loss = ctx.config.loss
    return {'infonce': infonce_loss(student, teacher, loss.infonce_temperature,
                                    loss.infonce_samples, ctx.generator)}


def fskd_terms(outputs, batch, ctx: LossContext) -> dict[str, torch.Tensor]:
    """FSKD: feature term + KL between the teacher's logits and the shared-classifier 3D logits;
    with ``loss.image_label_weight`` also a cross-entropy against the label images' classes at
    the pixels (``image_ce``)."""
    rows, student, teacher = correspondence_features(outputs, batch, ctx)
    classifier = ctx.teacher.classifier
    with torch.no_grad():
        logits_2d = F.linear(teacher, classifier.weight.flatten(1).float(),
                             None if classifier.bias is None else classifier.bias.float())
    loss = ctx.config.loss
    weights = None
    if loss.class_balance == 'inverse_sqrt':
        weights = class_balance_weights(logits_2d.argmax(1), logits_2d.shape[1])
    logits_3d = outputs['logits'].index_select(0, rows)
    labels = None
    if loss.image_label_weight > 0 and 'label_images' in batch:
        from offline_training.datasets import correspondence_pixel_labels
        labels = correspondence_pixel_labels(batch, logits_3d.shape[1]).to(logits_3d.device)
        keep = None
        if loss.image_labels_replace_kl:  # the teacher's soft labels only where none is known
            keep = labels == 255
        elif loss.image_labels_drop_wrong_kl:  # ... and where the teacher agrees with the label
            keep = (labels == 255) | (labels == logits_2d.argmax(1).to(labels.device))
        if keep is not None:
            weights = (torch.ones(len(labels), device=labels.device) if weights is None
                       else weights) * keep
    terms = {'feature': fskd_feature_loss(student, teacher, loss.feature_kind),
             'semantic': semantic_kl_loss(logits_3d, logits_2d, loss.kl_temperature, weights)}
    if loss.image_label_weight > 0 and labels is None:
        terms['image_ce'] = zero_loss(logits_3d)        # a batch without label images
    elif loss.image_label_weight > 0:
        balance = (class_balance_weights(labels, logits_3d.shape[1])
                   if loss.class_balance == 'inverse_sqrt' else None)
        terms['image_ce'] = supervised_ce_loss(logits_3d, labels, point_weights=balance)
    return terms


def ce_terms(outputs, batch, ctx: LossContext) -> dict[str, torch.Tensor]:
    """Cross-entropy on the (possibly thinned) 3D labels of every point."""
    logits = outputs['logits'].index_select(0, batch['inverse'])
    weights = None
    if ctx.config.loss.class_balance == 'inverse_sqrt':
        weights = class_balance_weights(batch['labels'], logits.shape[1])
    return {'ce': supervised_ce_loss(logits, batch['labels'], point_weights=weights)}


METHOD_LOSSES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    'udakd': udakd_terms, 'fskd': fskd_terms, 'finetune': ce_terms, 'supervised': ce_terms}
TERM_WEIGHTS = {'infonce': 'infonce_weight', 'feature': 'feature_weight',
                'semantic': 'semantic_weight', 'ce': 'ce_weight',
                'image_ce': 'image_label_weight'}


# ---------------------------------------------------------------------------------------------
# Data


def labeled_scan_indices(count: int, fraction: float, seed: int) -> list[int]:
    """A seeded choice of round(fraction * count) scans (at least one), sorted."""
    keep = max(1, int(round(fraction * count)))
    order = np.random.default_rng(derived_seed(seed, 7)).permutation(count)
    return sorted(int(i) for i in order[:keep])


class SeededView(Dataset):
    """A dataset whose sample ``i`` in epoch ``e`` is drawn with seeds from (seed, e, i).

    Before loading a sample, Python's, numpy's and torch's global generators are seeded from
    (seed, epoch, index): random augmentations then depend only on the sample and the epoch,
    not on which worker loads it or on where a resumed run restarted. With
    ``point_label_fraction`` < 1 each scan keeps a fixed seeded fraction of its point labels (the
    others become 255), the same in every epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, point_label_fraction: float = 1.0,
                 ignore_index: int = 255):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0
        self.point_label_fraction = float(point_label_fraction)
        self.ignore_index = ignore_index

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_everything(derived_seed(self.seed, self.epoch, index))
        sample = self.dataset[index]
        if self.point_label_fraction < 1.0:
            labels = sample['labels']
            rng = np.random.default_rng(derived_seed(self.seed, 11, index))
            drop = rng.random(len(labels)) >= self.point_label_fraction
            if isinstance(labels, torch.Tensor):
                labels = labels.clone()
                labels[torch.from_numpy(drop)] = self.ignore_index
            else:
                labels = np.array(labels, copy=True)
                labels[drop] = self.ignore_index
            sample = {**sample, 'labels': labels}
        return sample


def build_dataset(config: TrainConfig, part: str = 'train',
                  feature_kind: str = 'height') -> Dataset:
    """The ``part`` ('train' or 'val') data set of ``config.data``
    (:func:`offline_training.datasets.build_dataset`: pairs, nuScenes or SemanticKITTI).

    ``feature_kind`` must be the student's ``point_features``. Augmentation draws from torch's
    global generator, which :class:`SeededView` seeds per sample. Scans must carry 3D labels for
    finetune and supervised (training) and for scoring (validation).
    """
    from offline_training.datasets import build_dataset as build_scans
    labels = part == 'val' or config.method in ('finetune', 'supervised')
    label_images = part == 'train' and config.loss.image_label_weight > 0
    return build_scans(config.data, part, feature_kind=feature_kind, require_labels=labels,
                       label_images=label_images)


def check_label_images(dataset) -> float:
    """loss.image_label_weight needs pairs with label images: none is an error; some pairs
    without them a warning (measured worse than no labels on the synthetic worlds)."""
    fraction = dataset.labeled_fraction()
    if fraction == 0:
        raise ConfigError('loss.image_label_weight: the training pairs carry no label images '
                          '(attach them with cmkd label-images import, or set it to 0)')
    if fraction < 0.9:
        LOG.warning('loss.image_label_weight: only %.0f%% of the training pairs carry label '
                    'images; with a quarter labeled the synthetic validation worlds scored up '
                    'to 5.7 mIoU below FSKD without labels (docs/training.md): label every '
                    'pair, or leave the option off', 100 * fraction)
    return fraction


def build_collate(config: TrainConfig) -> Callable:
    from offline_training.datasets import SparseCollate
    return SparseCollate(config.data.voxel_size)


def move_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of ``batch`` on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Models


def build_student_for(config: TrainConfig, num_classes: int, feature_dim: int | None):
    """The student of ``config.student``; class count, voxel size and D filled in and checked.

    ``num_classes`` comes from the class map, ``feature_dim`` (D) from the teacher (None: no
    teacher, the student's own setting is kept) and the voxel size from ``data.voxel_size``.
    """
    from cmkd_ros.models.student import StudentConfig, build_student
    values = dict(config.student)
    implied = {'num_classes': num_classes, 'voxel_size': config.data.voxel_size}
    if feature_dim is not None:
        implied['feature_dim'] = feature_dim
    for key, value in implied.items():
        if key in values and values[key] != value:
            raise ConfigError(f'student.{key}: {values[key]} disagrees with {value} (from the '
                              f'{"teacher" if key == "feature_dim" else "config"})')
        values[key] = value
    return build_student(build(StudentConfig, values, 'student'))


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when absent."""
    return (int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
            int(os.environ.get('LOCAL_RANK', 0)))


def _rng_state() -> dict:
    state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': {'name': state[0], 'keys': torch.from_numpy(state[1].astype(np.int64)),
                      'pos': int(state[2]), 'has_gauss': int(state[3]),
                      'cached_gaussian': float(state[4])},
            'python': random.getstate()}


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    np_state = state['numpy']
    np.random.set_state((np_state['name'], np_state['keys'].numpy().astype(np.uint32),
                         np_state['pos'], np_state['has_gauss'], np_state['cached_gaussian']))
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))


def _flatten(mapping: Mapping, prefix: str = '') -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and key != 'student':
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def earlier_run(out_dir: str) -> str | None:
    """What of an earlier run ``out_dir`` holds (for messages), or None."""
    found = list_checkpoints(out_dir)
    files = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    parts = ([f'checkpoints up to step {found[-1][0]}'] if found else []) + files
    return ', '.join(parts) or None


def remove_run(out_dir: str) -> list[str]:
    """Delete an earlier run's outputs in ``out_dir`` (checkpoints, :data:`RUN_FILES`,
    TensorBoard events); returns the paths removed."""
    import shutil
    removed = [path for _, path in list_checkpoints(out_dir)]
    removed += [os.path.join(out_dir, n) for n in RUN_FILES
                if os.path.exists(os.path.join(out_dir, n))]
    for path in removed:
        os.remove(path)
    tensorboard = os.path.join(out_dir, 'tensorboard')
    if os.path.isdir(tensorboard):
        shutil.rmtree(tensorboard)
        removed.append(tensorboard)
    return removed


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete ``*.tmp.<pid>`` files a killed run left in ``out_dir`` and its checkpoints."""
    stale = []
    for folder in (out_dir, os.path.join(out_dir, 'checkpoints')):
        if os.path.isdir(folder):
            stale += [os.path.join(folder, n) for n in os.listdir(folder)
                      if re.search(r'\.tmp\.\d+$', n)]
    for path in stale:
        os.remove(path)
    return stale


def truncate_metrics(path: str, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later ones
    again); returns how many rows were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding='utf-8') as fh:
        lines = fh.read().splitlines()
    kept = []
    for line in lines:
        try:
            row_step = int(json.loads(line)['step'])
        except (ValueError, KeyError, TypeError):
            continue                                   # a torn last line of a killed run
        if row_step <= step:
            kept.append(line)
    if len(kept) < len(lines):
        with open(path + '.tmp', 'w', encoding='utf-8') as fh:
            fh.write(''.join(line + '\n' for line in kept))
        os.replace(path + '.tmp', path)
    return len(lines) - len(kept)


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in ``out_dir/checkpoints``, oldest first."""
    folder = os.path.join(out_dir, 'checkpoints')
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Builders of the trainer: each reads its part of the config and returns one piece.


def check_out_dir(out_dir: str, resume: bool, overwrite: bool) -> bool:
    """Whether ``fit`` must delete an earlier run in ``out_dir`` first; raises when one is
    there and neither ``resume`` nor ``overwrite`` says what to do with it."""
    if resume and overwrite:
        raise TrainingError('--resume and --overwrite exclude each other')
    earlier = None if resume else earlier_run(out_dir)
    if earlier and not overwrite:
        raise TrainingError(f'{out_dir} holds an earlier run ({earlier}): add --resume to '
                            'continue it, or --overwrite to start over (deletes it)')
    return bool(earlier)


def build_device(config: TrainConfig, local_rank: int, world_size: int) -> torch.device:
    """This process's device (:func:`cmkd_ros.models.resolve_device`, the GPU of its local
    rank) and, under torchrun, the process group (nccl on CUDA, gloo on CPU)."""
    from cmkd_ros.models import resolve_device
    device = resolve_device(config.device, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


def build_frozen_teacher(config: TrainConfig, class_map, device: torch.device):
    """The frozen teacher of ``teacher.checkpoint`` (distillation, or to share its classifier);
    None when the run needs none."""
    if not config.teacher.checkpoint or not (config.method in DISTILLATION_METHODS or
                                             config.share_teacher_classifier):
        return None
    from cmkd_ros.models.teacher import freeze, load_teacher
    teacher = freeze(load_teacher(config.teacher.checkpoint, device=device))
    if teacher.num_classes != class_map.num_classes:
        raise ConfigError(f'teacher.checkpoint: teacher has {teacher.num_classes} classes, '
                          f'class map {config.class_map!r} has {class_map.num_classes}')
    return teacher


def build_student_model(config: TrainConfig, class_map, teacher):
    """The student: from ``init_from`` or new (D from the teacher), with the teacher's
    classifier shared and frozen as configured; the same init on every rank."""
    if config.init_from:
        from cmkd_ros.models.checkpoint import load_checkpoint
        student, info = load_checkpoint(config.init_from)
        if abs(info['voxel_size'] - config.data.voxel_size) > 1e-9:
            raise ConfigError(f'data.voxel_size: {config.data.voxel_size} but the init_from '
                              f'student uses {info["voxel_size"]}')
        if list(info['class_names']) != list(class_map.names):
            raise ConfigError(f'init_from: the student was trained on classes '
                              f'{info["class_names"]}, class map {config.class_map!r} differs')
    else:
        feature_dim = None if teacher is None else int(teacher.feature_dim)
        student = build_student_for(config, class_map.num_classes, feature_dim)
    if config.share_teacher_classifier and teacher is not None:
        student.load_classifier(teacher.classifier.weight.detach().clone(),
                                teacher.classifier.bias.detach().clone(),
                                freeze=config.freeze_classifier)
    elif config.freeze_classifier:
        student.classifier.requires_grad_(False)
    if config.method == 'udakd':
        # InfoNCE never reaches the classifier; left trainable, DDP would wait for it.
        student.classifier.requires_grad_(False)
    return student


def build_train_data(config: TrainConfig, dataset: Dataset, ignore_index: int, rank: int,
                     world_size: int) -> tuple[SeededView, DistributedSampler, int]:
    """(seeded view, sharded sampler, steps per epoch) of ``dataset``, keeping the labeled
    fraction of scans or points of few-shot methods."""
    point_fraction = 1.0
    if config.method in ('finetune', 'supervised') and config.data.label_fraction < 1.0:
        if config.data.label_unit == 'scans':
            dataset = Subset(dataset, labeled_scan_indices(
                len(dataset), config.data.label_fraction, config.seed))
        else:
            point_fraction = config.data.label_fraction
    view = SeededView(dataset, config.seed, point_fraction, ignore_index)
    sampler = DistributedSampler(view, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    steps_per_epoch = len(sampler) // config.data.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f'{len(view)} training scans are fewer than batch_size x '
                            f'processes = {config.data.batch_size * world_size}')
    return view, sampler, steps_per_epoch


def build_losses(config: TrainConfig) -> Callable[..., dict[str, torch.Tensor]]:
    """The loss terms of ``config.method`` (:data:`METHOD_LOSSES`)."""
    return METHOD_LOSSES[config.method]


class MetricsHook(Hook):
    """Every ``log_every`` steps (and at the last): the losses averaged over the processes
    (``trainer.logged``), written by rank 0 to TensorBoard and ``metrics.jsonl``."""

    def __init__(self):
        self.writer = None
        self.file = None

    def before_train(self, trainer) -> None:
        if trainer.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            out_dir = trainer.config.out_dir
            self.writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'),
                                        purge_step=trainer.step)
            self.file = open(os.path.join(out_dir, 'metrics.jsonl'), 'a', encoding='utf-8')

    def after_step(self, trainer, values) -> None:
        cfg = trainer.config
        if trainer.step % cfg.log_every and trainer.step != cfg.steps:
            return
        trainer.logged = trainer._reduce(values)        # every rank takes part
        if trainer.rank == 0:
            lr = trainer.scheduler.get_last_lr()[0]
            for name, value in trainer.logged.items():
                self.writer.add_scalar(f'loss/{name}', value, trainer.step)
            self.writer.add_scalar('lr', lr, trainer.step)
            self.file.write(json.dumps({'step': trainer.step, 'lr': lr, **trainer.logged}) +
                            '\n')
            self.file.flush()

    def close(self) -> None:
        for handle in (self.writer, self.file):
            if handle is not None:
                handle.close()
        self.writer = self.file = None


class CheckpointHook(Hook):
    """A resumable checkpoint every ``checkpoint_every`` steps and at the end
    (``trainer.checkpoint_path``), after copying rank 0's BatchNorm statistics to every rank."""

    def after_step(self, trainer, values) -> None:
        step = trainer.step
        if step % trainer.config.checkpoint_every == 0 and step < trainer.config.steps:
            trainer._sync_buffers()
            trainer.save_checkpoint()

    def after_train(self, trainer) -> None:
        trainer._sync_buffers()
        trainer.checkpoint_path = trainer.save_checkpoint()


def build_hooks(config: TrainConfig, rank: int) -> list[Hook]:
    """Metrics, the progress bar (rank 0, ``progress``) and checkpoints, in this order."""
    progress = [ProgressHook(config.method)] if rank == 0 and config.progress else []
    return [MetricsHook(), *progress, CheckpointHook()]


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains a student as ``config`` says; ``fit()`` runs to ``config.steps``.

    ``resume=True`` continues from the newest readable checkpoint in ``config.out_dir`` (or
    starts fresh when there is none); the stored config must match except for
    :data:`RESUMABLE_CHANGES`. Without it an ``out_dir`` holding an earlier run raises
    :class:`TrainingError`, unless ``overwrite=True``: ``fit`` then deletes that run first.
    ``train_dataset`` optionally replaces the pair dataset of ``config.data.train`` (any
    map-style dataset of :mod:`offline_training.datasets` samples, e.g. nuScenes).
    """

    def __init__(self, config: TrainConfig, resume: bool = False,
                 train_dataset: Dataset | None = None, overwrite: bool = False):
        if not isinstance(config, TrainConfig):
            raise TypeError('config must be a TrainConfig (offline_training.config)')
        self.overwrite = check_out_dir(config.out_dir, resume, overwrite)
        self.config = config
        self.rank, self.world_size, local_rank = distributed_env()
        self.distributed = self.world_size > 1
        self.device = build_device(config, local_rank, self.world_size)
        self.use_amp = bool(config.amp and self.device.type == 'cuda')
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.class_map = get_class_map(config.class_map)
        self.teacher = build_frozen_teacher(config, self.class_map, self.device)
        self.teacher_cache = None if self.teacher is None else TeacherFeatureCache(
            self.teacher, config.teacher.cache_mb * 2 ** 20, config.teacher.scales,
            config.teacher.flip)
        self.student = build_student_model(config, self.class_map, self.teacher).to(self.device)
        self.model: torch.nn.Module = self.student
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.optimizer = build_optimizer([p for p in self.student.parameters()
                                          if p.requires_grad], config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.use_amp)
        dataset = train_dataset if train_dataset is not None else build_dataset(
            config, 'train', self.student.config.point_features)
        self.train_split = dataset.split_info() if hasattr(dataset, 'split_info') else None
        if config.loss.image_label_weight > 0:
            check_label_images(dataset)
        self.dataset, self.sampler, self.steps_per_epoch = build_train_data(
            config, dataset, self.class_map.ignore_index, self.rank, self.world_size)
        self.collate = build_collate(config)
        self.loss_terms = build_losses(config)
        self.hooks = build_hooks(config, self.rank)
        self.logged: dict[str, float] = {}
        self.checkpoint_path: str | None = None
        self.step = 0
        if resume:
            self._resume()

    # -- one step ---------------------------------------------------------------------------

    def loss_dict(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Forward the student on ``batch`` (on the device) and return its named loss terms."""
        generator = torch.Generator().manual_seed(derived_seed(self.config.seed, self.rank,
                                                               self.step))
        context = LossContext(self.config, self.teacher, generator, self.teacher_cache)
        outputs = self.model(batch['coords'], batch['vfeats'])
        return self.loss_terms(outputs, batch, context)

    def weighted_total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, value in terms.items():
            part = getattr(self.config.loss, TERM_WEIGHTS[name]) * value
            total = part if total is None else total + part
        return total

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch``; returns this process's loss terms and ``total``."""
        self.model.train()
        batch = move_to(batch, self.device)
        autocast = torch.autocast('cuda', dtype=torch.float16) if self.use_amp else \
            contextlib.nullcontext()
        with autocast:
            terms = self.loss_dict(batch)
            total = self.weighted_total(terms)
        if not torch.isfinite(total):
            raise TrainingError(f'step {self.step}: loss is not finite '
                                f'({ {k: float(v) for k, v in terms.items()} })')
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                           self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        out = {name: float(value.detach()) for name, value in terms.items()}
        out['total'] = float(total.detach())
        return out

    # -- data order -------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        batch_size = self.config.data.batch_size
        indices = list(self.sampler)[:self.steps_per_epoch * batch_size][skip_batches *
                                                                         batch_size:]
        workers = self.config.data.num_workers
        return DataLoader(self.dataset, batch_size=batch_size, sampler=indices,
                          collate_fn=self.collate, num_workers=workers, drop_last=True,
                          pin_memory=self.device.type == 'cuda',
                          persistent_workers=False)

    def batches(self):
        """Batches from the current step on, epoch after epoch (resumes mid-epoch)."""
        while True:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            for batch in self._epoch_loader(epoch, done):
                yield batch

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict:
        return {'format': CHECKPOINT_FORMAT, 'step': self.step,
                'student': self.student.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
                'rng': _rng_state(), 'config': to_dict(self.config),
                'world_size': self.world_size}

    def save_checkpoint(self) -> str | None:
        """Rank 0 writes ``checkpoints/step_<step>.pt`` atomically and prunes old ones."""
        path = None
        if self.rank == 0:
            folder = os.path.join(self.config.out_dir, 'checkpoints')
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f'step_{self.step:08d}.pt')
            atomic_torch_save(self.state(), path)
            for _, old in list_checkpoints(self.config.out_dir)[:-self.config.keep_checkpoints]:
                os.remove(old)
        if self.distributed:
            dist.barrier()
        return path

    def _resume(self) -> None:
        found = list_checkpoints(self.config.out_dir)
        if not found:
            return
        unreadable = []
        for step, path in reversed(found):         # the newest readable one
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                break
            except Exception as exc:               # truncated by a crash or a full disk
                unreadable.append(f'{path} ({type(exc).__name__}: {exc})')
        else:
            raise TrainingError(f'no readable checkpoint to resume from: '
                                f'{"; ".join(unreadable)}')
        if unreadable:
            LOG.warning(f'cmkd train: unreadable checkpoint(s) {"; ".join(unreadable)}: '
                        f'resuming from {path} (step {step})')
        if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
            raise TrainingError(f'{path}: not a training checkpoint')
        old, new = _flatten(state['config']), _flatten(to_dict(self.config))
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise TrainingError(f'{path}: cannot resume, settings changed: {", ".join(changed)}')
        if state['world_size'] != self.world_size:
            raise TrainingError(f'{path}: written by {state["world_size"]} processes, resuming '
                                f'with {self.world_size} would change the data order')
        self.student.load_state_dict(state['student'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        _set_rng_state(state['rng'])
        self.step = int(state['step'])
        if self.step != step:
            raise TrainingError(f'{path}: file name says step {step}, contents {self.step}')

    # -- loop -------------------------------------------------------------------------------

    def _clean_out_dir(self) -> None:
        """Before training: delete an earlier run (``overwrite``), temporary files of a killed
        one, and the metrics rows after the step resumed from."""
        out_dir = self.config.out_dir
        if self.overwrite:
            removed = remove_run(out_dir)
            LOG.warning(f'cmkd train: --overwrite: deleted the earlier run in {out_dir} '
                        f'({len(removed)} files and folders)')
            self.overwrite = False
        remove_stale_temporaries(out_dir)
        truncate_metrics(os.path.join(out_dir, 'metrics.jsonl'), self.step)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if not self.distributed:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                              device=self.device if self.device.type == 'cuda' else 'cpu')
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist())}

    def _sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
        if self.distributed:
            for buffer in self.student.buffers():
                dist.broadcast(buffer.data, 0)

    def fit(self) -> dict:
        """Train until ``config.steps``; returns a summary (final losses, output paths)."""
        cfg = self.config
        start = time.monotonic()
        start_step = self.step
        if self.rank == 0:
            self._clean_out_dir()
            os.makedirs(cfg.out_dir, exist_ok=True)
        try:
            for hook in self.hooks:
                hook.before_train(self)
            batches = self.batches()
            while self.step < cfg.steps:
                values = self.train_step(next(batches))
                for hook in self.hooks:
                    hook.after_step(self, values)
            for hook in self.hooks:
                hook.after_train(self)
        finally:
            for hook in self.hooks:
                hook.close()
        summary = {'method': cfg.method, 'start_step': start_step, 'steps': self.step,
                   'losses': self.logged,
                   'seconds': time.monotonic() - start, 'checkpoint': self.checkpoint_path,
                   'world_size': self.world_size, 'device': self.device.type,
                   'amp': self.use_amp, 'train_split': self.train_split}
        if self.rank == 0:
            summary['class_prior_shift'] = self.correct_class_prior()
            summary['student'] = self.export_student()
            if cfg.data.val:
                summary['eval'] = self.evaluate()
            with open(os.path.join(cfg.out_dir, 'summary.json'), 'w', encoding='utf-8') as fh:
                json.dump(summary, fh, indent=2)
        return summary

    # -- outputs ----------------------------------------------------------------------------

    def correct_class_prior(self) -> list[float] | None:
        """FSKD with the teacher's classifier: take ``prior_correction`` of the teacher's
        training class weights out of the student's classifier bias (logged); the (K,) shift,
        or None when there is nothing to correct."""
        cfg = self.config
        weights = getattr(self.teacher, 'class_weights', None)
        if cfg.method != 'fskd' or not cfg.share_teacher_classifier or not cfg.prior_correction:
            return None
        if weights is None:
            LOG.info('prior_correction: the teacher carries no training class weights '
                     '(unweighted, or not from cmkd train teacher): classifier kept')
            return None
        shift = self.student.shift_class_prior(weights, cfg.prior_correction).tolist()
        LOG.info('prior_correction %.2f: classifier bias shifted by %s', cfg.prior_correction,
                 ', '.join(f'{n} {v:+.2f}' for n, v in zip(self.class_map.names, shift)))
        return shift

    def export_student(self) -> str:
        """Save the student for inference (``out_dir/student.pt``) with its class map."""
        from cmkd_ros.models.checkpoint import save_checkpoint
        path = os.path.join(self.config.out_dir, 'student.pt')
        save_checkpoint(path, self.student, class_names=self.class_map.names,
                        class_colors=self.class_map.colors,
                        extra={'train_config': to_dict(self.config), 'step': self.step})
        return path

    def evaluate(self) -> dict:
        """Score the student on ``data.val`` (the official validation split for the real data
        sets, unless ``data.val_split`` names another); also written to eval.json, with the split
        scored (``split``).

        The evaluation data always uses the default correspondences (occlusion test and motion
        compensation on), so the ``unseen`` points are the same for every trained variant.
        """
        from offline_training.evaluate import evaluate_student
        dataset = build_dataset(self.config, 'val', self.student.config.point_features)
        result = evaluate_student(self.student, dataset, voxel_size=self.config.data.voxel_size,
                                  device=self.device, class_names=self.class_map.names)
        result['split'] = dataset.split_info()
        with open(os.path.join(self.config.out_dir, 'eval.json'), 'w', encoding='utf-8') as fh:
            json.dump(result, fh, indent=2, default=float)
        return result


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Build a :class:`Trainer` for ``config`` and run it; tears down the process group."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
