"""Train a 2D teacher on labeled images, and score one (2D mIoU).

:class:`TeacherTrainer` is built from one typed config
(:class:`~offline_training.config.TeacherTrainConfig`) by a short list of builders
(:func:`build_teacher_network`, :func:`class_weights`, :func:`build_image_loader`, and the
optimizer and schedule of :mod:`offline_training.engine` shared with student training). It
takes any map-style dataset of ``{'image': (H, W, 3) uint8, 'label': (H, W) uint8}`` dicts
(:mod:`offline_training.readers.images`: pair datasets, Cityscapes, folder layouts), augments
each image (random scale and crop, horizontal flip, color jitter) and minimises the pixel
cross-entropy (ignore index 255); the history and the progress bar are hooks.
``cmkd train teacher`` calls :func:`train_teacher_from_config`; :func:`train_teacher` is the
short form for code and tests (settings as keywords).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cmkd_ros.classes import ClassMap, get_class_map
from cmkd_ros.config import ConfigError, build, merge, to_dict
from cmkd_ros.metrics import ConfusionMatrix
from cmkd_ros.models.student import resolve_device
from cmkd_ros.models.teacher import Teacher, TeacherConfig, build_teacher
from offline_training.config import TEACHER_RENAMED, TeacherTrainConfig
from offline_training.engine import Hook, ProgressHook, build_optimizer, build_scheduler
from offline_training.losses import inverse_sqrt_weights

IGNORE = 255


class TeacherTrainingError(ValueError):
    """Bad arguments or data for teacher training."""


@dataclass
class ImageAugment:
    """Random scale, crop to ``crop_size`` (h, w), horizontal flip and color jitter.

    Works on (H, W, 3) uint8 images and (H, W) uint8 labels; padding uses 0 for images and 255
    (ignore) for labels. ``rng`` is a numpy Generator.
    """

    crop_size: tuple[int, int] | None = (192, 320)
    scale_range: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    color_jitter: float = 0.3

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 focus: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``focus``: a class id; the crop is centred on a random pixel of it (where present)."""
        import cv2
        # 1. Random scale (bilinear image, nearest label).
        lo, hi = self.scale_range
        scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
        if scale != 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        # 2. Random crop (pad first where the image is smaller than the crop).
        if self.crop_size is not None:
            ch, cw = self.crop_size
            pad_h, pad_w = max(0, ch - image.shape[0]), max(0, cw - image.shape[1])
            if pad_h or pad_w:
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
                label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
            y0 = int(rng.integers(0, image.shape[0] - ch + 1))
            x0 = int(rng.integers(0, image.shape[1] - cw + 1))
            ys, xs = np.nonzero(label == focus) if focus is not None else ((), ())
            if len(ys):
                k = int(rng.integers(0, len(ys)))
                y0 = min(max(int(ys[k]) - ch // 2, 0), image.shape[0] - ch)
                x0 = min(max(int(xs[k]) - cw // 2, 0), image.shape[1] - cw)
            image = image[y0:y0 + ch, x0:x0 + cw]
            label = label[y0:y0 + ch, x0:x0 + cw]
        # 3. Horizontal flip.
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        # 4. Color jitter: brightness, contrast, saturation factors in [1 - j, 1 + j].
        if self.color_jitter > 0:
            j = self.color_jitter
            img = image.astype(np.float32)
            img = img * rng.uniform(1 - j, 1 + j)
            mean = img.mean()
            img = (img - mean) * rng.uniform(1 - j, 1 + j) + mean
            gray = img.mean(axis=2, keepdims=True)
            img = (img - gray) * rng.uniform(1 - j, 1 + j) + gray
            image = np.clip(img, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


class AugmentedImages(torch.utils.data.Dataset):
    """Wraps a labeled image dataset: augmented (3, h, w) float [0, 1] and (h, w) int64 tensors.

    Decoded images are kept in memory up to ``cache_mb`` megabytes (0: none), so small data sets
    are read once instead of at every epoch (each data-loader worker holds its own cache).

    Rare-class sampling (``rare_class_sampling`` = probability p > 0, needs ``num_classes``):
    a draw is replaced with probability p by one that picks a class c with probability
    proportional to ``1 / sqrt(pixel frequency of c)``, then an image showing c, and centres the
    crop on a pixel of c. Tiny, rare objects (signs, poles) are otherwise seen in a few crops
    only. The label histogram is read once at construction.
    """

    def __init__(self, dataset, augment: ImageAugment | None, seed: int = 0,
                 cache_mb: float = 0.0, rare_class_sampling: float = 0.0,
                 num_classes: int = 0):
        self.dataset = dataset
        self.augment = augment
        self.seed = seed
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0
        if not 0.0 <= rare_class_sampling <= 1.0:
            raise TeacherTrainingError(f'rare_class_sampling must lie in [0, 1], got '
                                       f'{rare_class_sampling}')
        self.rare_class_sampling = rare_class_sampling
        self._class_images: list[np.ndarray] = []
        self._class_probability = np.zeros(0)
        if rare_class_sampling > 0:
            if num_classes < 1:
                raise TeacherTrainingError('rare_class_sampling needs num_classes')
            self._index_classes(num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        item = self.dataset[i]
        image, label = np.asarray(item['image']), np.asarray(item['label'])
        size = image.nbytes + label.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[i] = (image, label)
            self._cached_bytes += size
        return image, label

    def _index_classes(self, num_classes: int) -> None:
        """Images showing each class, and the class draw probabilities (1 / sqrt frequency,
        :func:`~offline_training.losses.inverse_sqrt_weights`)."""
        counts = np.zeros((len(self.dataset), num_classes), dtype=np.int64)
        for i in range(len(self.dataset)):
            label = self._read(i)[1].ravel()
            counts[i] = np.bincount(label[label < num_classes], minlength=num_classes)
        total = counts.sum(0)
        if not (total > 0).any():
            raise TeacherTrainingError('rare_class_sampling: no labeled pixel in the dataset')
        weight = inverse_sqrt_weights(total).numpy()
        self._class_probability = weight / weight.sum()
        self._class_images = [np.nonzero(counts[:, c])[0] for c in range(num_classes)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        focus = None
        if self.augment is not None:
            # a fresh stream per draw, reproducible from torch's (per-worker) seed
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))
            if self.rare_class_sampling > 0 and rng.random() < self.rare_class_sampling:
                focus = int(rng.choice(len(self._class_probability), p=self._class_probability))
                i = int(rng.choice(self._class_images[focus]))
        image, label = self._read(i)
        if self.augment is not None:
            image, label = self.augment(image, label, rng, focus)
        return (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
                torch.from_numpy(label.astype(np.int64)))


def class_weights(dataset, num_classes: int, kind: str = 'inverse_sqrt',
                  max_images: int = 64) -> torch.Tensor:
    """(K,) float32 cross-entropy weights from the label histogram of up to ``max_images``.

    ``inverse_sqrt``: :func:`~offline_training.losses.inverse_sqrt_weights` of the pixel
    counts (``w_c = 1 / sqrt(f_c)``, pixel-weighted mean 1), classes never seen getting the
    largest weight of the seen ones; ``none``: all ones. Rare classes (poles, signs,
    pedestrians) otherwise get almost no gradient.
    """
    if kind == 'none':
        return torch.ones(num_classes)
    if kind != 'inverse_sqrt':
        raise TeacherTrainingError(f'unknown class weighting {kind!r}; use none or '
                                   'inverse_sqrt')
    counts = np.zeros(num_classes, dtype=np.int64)
    step = max(1, len(dataset) // max_images)
    for i in range(0, len(dataset), step):
        label = np.asarray(dataset[i]['label']).ravel()
        counts += np.bincount(label[label < num_classes], minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise TeacherTrainingError('no labeled pixel found to compute class weights')
    weights = inverse_sqrt_weights(counts)
    weights[counts == 0] = weights.max()
    return weights.float()


@torch.no_grad()
def evaluate_teacher(teacher: torch.nn.Module, dataset, num_classes: int | None = None,
                     class_names: Sequence[str] | None = None, device: str = 'cpu',
                     image_scale: float = 1.0, max_images: int | None = None) -> dict:
    """2D per-class IoU, mIoU and pixel accuracy of ``teacher`` on labeled images.

    Images are optionally resized by ``image_scale`` before inference; logits are upsampled to
    the label resolution. Returns :meth:`ConfusionMatrix.summary` plus ``confusion`` (K x K).
    """
    import cv2
    dev = resolve_device(device)
    num_classes = int(num_classes or teacher.num_classes)
    if class_names is None and getattr(teacher, 'class_map', None) is not None:
        class_names = teacher.class_map.names
    confusion = ConfusionMatrix(num_classes)
    was_training = teacher.training
    teacher.eval()
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(count):
        item = dataset[i]
        image, label = item['image'], item['label']
        if image_scale != 1.0:
            image = cv2.resize(image, (max(1, round(image.shape[1] * image_scale)),
                                       max(1, round(image.shape[0] * image_scale))),
                               interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(dev)
        logits = teacher(x.float() / 255.0)
        if logits.shape[-2:] != label.shape:
            logits = F.interpolate(logits, size=label.shape, mode='bilinear',
                                   align_corners=False)
        confusion.update(label, logits.argmax(1)[0].cpu().numpy())
    teacher.train(was_training)
    result = confusion.summary(class_names)
    result['confusion'] = confusion.matrix.tolist()
    return result


# ---------------------------------------------------------------------------------------------
# Builders: each reads its part of the config and returns one piece of the trainer.


def build_teacher_network(config: TeacherTrainConfig, class_map: ClassMap | None,
                          teacher: Teacher | None = None) -> Teacher:
    """The network to train: ``teacher`` (continued, given ``class_map``) or a new one of
    ``config.model`` with ``num_classes`` from ``class_map``."""
    if teacher is not None:
        if class_map is not None:
            teacher.class_map = class_map
        return teacher
    model = dict(config.model)
    if class_map is not None and model.setdefault(
            'num_classes', class_map.num_classes) != class_map.num_classes:
        raise ConfigError(f'model.num_classes: {model["num_classes"]} but class map '
                          f'{config.class_map!r} has {class_map.num_classes} classes')
    return build_teacher(model, class_map)


def build_autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (auto resolved)."""
    from cmkd_ros.models.student import precision_context
    try:
        return precision_context(precision, device)
    except ValueError as exc:
        raise TeacherTrainingError(str(exc)) from None


def build_image_loader(config: TeacherTrainConfig, dataset,
                       num_classes: int) -> torch.utils.data.DataLoader:
    """Shuffled, augmented batches of ``dataset`` (:class:`AugmentedImages`), seeded."""
    data = config.data
    augment = ImageAugment(data.crop_size, data.scale_range, data.flip, data.color_jitter)
    images = AugmentedImages(dataset, augment, config.seed, data.cache_mb,
                             data.rare_class_sampling, num_classes)
    # BatchNorm needs more than one value per channel: drop a last batch of one.
    return torch.utils.data.DataLoader(
        images, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers,
        drop_last=len(images) > data.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=data.num_workers > 0)


class HistoryHook(Hook):
    """Every ``config.log_every`` steps (and at the last): the mean loss since the previous
    entry and the learning rate, appended to ``trainer.history``."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def after_step(self, trainer, values) -> None:
        self.total += values['loss']
        self.count += 1
        if trainer.step % trainer.config.log_every == 0 or trainer.step == trainer.config.steps:
            trainer.history['step'].append(trainer.step)
            trainer.history['loss'].append(self.total / self.count)
            trainer.history['lr'].append(trainer.optimizer.param_groups[0]['lr'])
            self.total, self.count = 0.0, 0


class CallbackHook(Hook):
    """``callback(step, loss)`` after every step."""

    def __init__(self, callback: Callable[[int, float], None]):
        self.callback = callback

    def after_step(self, trainer, values) -> None:
        self.callback(trainer.step, values['loss'])


# ---------------------------------------------------------------------------------------------
# The trainer


class TeacherTrainer:
    """Trains a 2D teacher with pixel cross-entropy as ``config`` says; ``fit()`` runs to
    ``config.steps`` and returns ``(teacher, history)`` (see :func:`train_teacher`).

    ``dataset`` / ``val_dataset`` yield ``{'image': (H, W, 3) uint8, 'label': (H, W) uint8}``;
    ``class_map`` is stored with the teacher (None: none); ``teacher`` continues training an
    existing network instead of building one from ``config.model``; ``hooks`` are called
    after the built-in ones (history, then the progress bar when ``config.progress``).
    """

    def __init__(self, config: TeacherTrainConfig, dataset, *, val_dataset=None,
                 class_map: ClassMap | None = None, teacher: Teacher | None = None,
                 hooks: Sequence[Hook] = ()):
        if len(dataset) == 0:
            raise TeacherTrainingError('the training dataset is empty')
        self.config = config
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.autocast = build_autocast(config.precision, self.device)
        self.scaler = torch.amp.GradScaler('cuda', enabled=config.precision == 'float16')
        self.teacher = build_teacher_network(config, class_map, teacher).to(self.device).train()
        self.class_weights = class_weights(dataset, self.teacher.num_classes,
                                           config.loss.class_balance).to(self.device)
        self.loader = build_image_loader(config, dataset, self.teacher.num_classes)
        self.optimizer = build_optimizer(self.teacher.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        self.val_dataset = val_dataset
        self.hooks = [HistoryHook()] + ([ProgressHook('teacher')] if config.progress else [])
        self.hooks += list(hooks)
        self.uses_batchnorm = any(isinstance(m, torch.nn.BatchNorm2d)
                                  for m in self.teacher.modules())
        self.step = 0
        self.history: dict[str, Any] = {'step': [], 'loss': [], 'lr': [],
                                        'class_weights': self.class_weights.tolist()}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """One optimizer step on a batch; the loss, or None for a batch with no labeled pixel
        (skipped: no signal)."""
        if images.shape[0] < 2 and self.uses_batchnorm:
            raise TeacherTrainingError('batch of one image: BatchNorm needs batch_size >= 2 and '
                                       'at least 2 training images')
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast:
            logits = self.teacher(images)
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                               ignore_index=IGNORE)
        if not torch.isfinite(loss):
            if (labels == IGNORE).all():
                return None
            raise TeacherTrainingError(f'loss became {loss.item()} at step {self.step}')
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.teacher.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return float(loss.item())

    def fit(self) -> tuple[Teacher, dict]:
        steps = self.config.steps
        images_seen = 0
        start = time.perf_counter()
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.step < steps:
                for images, labels in self.loader:
                    loss = self.train_step(images, labels)
                    if loss is None:
                        continue
                    images_seen += images.shape[0]
                    for hook in self.hooks:
                        hook.after_step(self, {'loss': loss})
                    if self.step >= steps:
                        break
            for hook in self.hooks:
                hook.after_train(self)
        finally:
            for hook in self.hooks:
                hook.close()
        self.history['seconds'] = time.perf_counter() - start
        self.history['images_per_second'] = images_seen / max(self.history['seconds'], 1e-9)
        self.teacher.eval()
        if self.val_dataset is not None:
            self.history['val'] = evaluate_teacher(
                self.teacher, self.val_dataset, self.teacher.num_classes,
                device=str(self.device), image_scale=self.config.data.val_image_scale)
        return self.teacher, self.history


def teacher_config(config: TeacherTrainConfig | TeacherConfig | Mapping[str, Any] | None,
                   **settings) -> TeacherTrainConfig:
    """A :class:`TeacherTrainConfig` from ``config`` and keyword ``settings`` overriding it.

    ``config`` may also be the network alone (a ``TeacherConfig``, its mapping or None; the
    other settings then start from the defaults, with ``progress`` off). A keyword names a
    setting by its last part (``steps``, ``lr``, ``crop_size``, ``class_balance``) or by an
    old name (``class_weighting``, :data:`~offline_training.config.TEACHER_RENAMED`).
    """
    if isinstance(config, TeacherTrainConfig):
        base = to_dict(config)
    else:
        base = {'progress': False,
                'model': to_dict(config) if isinstance(config, TeacherConfig) else
                dict(config or {})}
    where = {}                       # a section key's last name -> its dotted name
    for name, section in typing.get_type_hints(TeacherTrainConfig).items():
        if dataclasses.is_dataclass(section):
            where.update({f.name: f'{name}.{f.name}' for f in dataclasses.fields(section)})
    values: dict = {}
    for key, value in settings.items():
        dotted = (TEACHER_RENAMED.get(f'options.{key}') or TEACHER_RENAMED.get(key) or
                  where.get(key, key))
        node = values
        *parents, last = dotted.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return build(TeacherTrainConfig, merge(base, values))
    except ConfigError as exc:
        raise TeacherTrainingError(str(exc)) from None


def train_teacher(config: TeacherTrainConfig | TeacherConfig | Mapping[str, Any] | None,
                  dataset, *, val_dataset=None, class_map: ClassMap | None = None,
                  teacher: Teacher | None = None,
                  callback: Callable[[int, float], None] | None = None,
                  **settings) -> tuple[Teacher, dict]:
    """Train a teacher with pixel cross-entropy; returns ``(teacher, history)``.

    ``config``: a :class:`~offline_training.config.TeacherTrainConfig`, or the network alone
    with the other settings as keywords (:func:`teacher_config`, e.g. ``steps=24,
    crop_size=(64, 96), lr=5e-3``). ``dataset`` yields ``{'image': (H, W, 3) uint8, 'label':
    (H, W) uint8}``; ``data.crop_size`` must be set when image sizes differ. ``teacher``
    continues training an existing network; ``callback(step, loss)`` runs after each step.
    ``history`` holds ``step``/``loss``/``lr`` lists (one entry per ``log_every`` steps, the
    mean loss since the last one), ``class_weights``, ``seconds``, ``images_per_second`` and,
    with ``val_dataset``, ``val`` (:func:`evaluate_teacher`). ``precision``: float32, or
    mixed precision with bfloat16 autocast (CPUs with bfloat16 instructions, CUDA) or float16
    autocast and loss scaling (CUDA only); the weights stay float32. The returned teacher is in
    eval mode.
    """
    config = teacher_config(config, **settings)
    hooks = [CallbackHook(callback)] if callback is not None else []
    return TeacherTrainer(config, dataset, val_dataset=val_dataset, class_map=class_map,
                          teacher=teacher, hooks=hooks).fit()


def train_teacher_from_config(config: TeacherTrainConfig) -> dict:
    """``cmkd train teacher``: train on the labeled images of ``data.train`` (pairs, Cityscapes
    or nuImages: ``data.format``, labels mapped onto the class map), save
    ``out_dir/teacher.pt`` (:func:`cmkd_ros.models.teacher.save_teacher`), score on
    ``data.val``; returns the summary also written to ``out_dir/summary.json``."""
    from cmkd_ros.models.teacher import save_teacher
    from offline_training.readers.images import build_image_dataset
    data = config.data
    if not data.train:
        raise ConfigError(f'data.train: a {data.format} folder with labeled images is required')
    class_map = get_class_map(config.class_map)

    def images(root: str, split: str, part: str):
        return build_image_dataset(data.format, root, split, part, config.class_map,
                                   data.label_map)
    dataset = images(data.train, data.train_split, 'train')
    val = images(data.val, data.val_split, 'val') if data.val else None
    teacher, history = TeacherTrainer(config, dataset, val_dataset=val,
                                      class_map=class_map).fit()
    os.makedirs(config.out_dir, exist_ok=True)
    path = os.path.join(config.out_dir, 'teacher.pt')
    weighted = config.loss.class_balance != 'none'
    save_teacher(teacher, path, class_map, history['class_weights'] if weighted else None)
    summary = {'teacher': path, 'steps': config.steps, 'seconds': history['seconds'],
               'loss': history['loss'][-1] if history['loss'] else None,
               'eval': history.get('val'), 'config': to_dict(config)}
    with open(os.path.join(config.out_dir, 'summary.json'), 'w', encoding='utf-8') as fh:
        json.dump(summary, fh, indent=2, default=float)
    return summary
