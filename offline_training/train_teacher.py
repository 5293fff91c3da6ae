"""Train a 2D teacher on labeled images, and score one (2D mIoU).

``train_teacher(cfg, dataset, ...)`` takes any map-style dataset of ``{'image': (H, W, 3) uint8,
'label': (H, W) uint8}`` dicts (:mod:`offline_training.readers.images`: pair datasets,
Cityscapes, folder layouts), augments each image (random scale and crop, horizontal flip, color
jitter), and minimises the pixel cross-entropy (ignore index 255) with AdamW and a cosine
schedule. The ``cmkd train teacher`` command calls it; tests call it on tiny data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from cmkd_ros.classes import ClassMap
from cmkd_ros.metrics import ConfusionMatrix
from cmkd_ros.progress import progress_bar
from cmkd_ros.models.teacher import Teacher, TeacherConfig, build_teacher

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
        """Images showing each class, and the class draw probabilities (1 / sqrt frequency)."""
        counts = np.zeros((len(self.dataset), num_classes), dtype=np.int64)
        for i in range(len(self.dataset)):
            label = self._read(i)[1].ravel()
            counts[i] = np.bincount(label[label < num_classes], minlength=num_classes)
        total = counts.sum(0)
        seen = total > 0
        if not seen.any():
            raise TeacherTrainingError('rare_class_sampling: no labeled pixel in the dataset')
        weight = np.zeros(num_classes)
        weight[seen] = 1.0 / np.sqrt(total[seen] / total.sum())
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

    ``inverse_sqrt``: ``w_c = 1 / sqrt(f_c)`` for class frequency ``f_c`` (classes never seen get
    the largest weight of the seen ones), normalised so the pixel-weighted mean is 1; ``none``:
    all ones. Rare classes (poles, signs, pedestrians) otherwise get almost no gradient.
    """
    if kind == 'none':
        return torch.ones(num_classes)
    if kind != 'inverse_sqrt':
        raise TeacherTrainingError(f'unknown class weighting {kind!r}; use none or '
                                   'inverse_sqrt')
    counts = np.zeros(num_classes, dtype=np.float64)
    step = max(1, len(dataset) // max_images)
    for i in range(0, len(dataset), step):
        label = np.asarray(dataset[i]['label']).ravel()
        label = label[label < num_classes]
        counts += np.bincount(label, minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise TeacherTrainingError('no labeled pixel found to compute class weights')
    freq = counts / counts.sum()
    weights = np.zeros(num_classes)
    seen = freq > 0
    weights[seen] = 1.0 / np.sqrt(freq[seen])
    weights[~seen] = weights[seen].max()
    weights /= (weights * freq).sum()
    return torch.tensor(weights, dtype=torch.float32)


def _autocast(precision: str, device: torch.device):
    """The autocast context of teacher training in ``precision`` on ``device``."""
    from cmkd_ros.models.student import precision_context
    try:
        return precision_context(precision, device)  # resolves auto
    except ValueError as exc:
        raise TeacherTrainingError(str(exc)) from None


def _device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise TeacherTrainingError('device cuda requested but CUDA is not available')
    return torch.device(name)


@torch.no_grad()
def evaluate_teacher(teacher: torch.nn.Module, dataset, num_classes: int | None = None,
                     class_names: Sequence[str] | None = None, device: str = 'cpu',
                     image_scale: float = 1.0, max_images: int | None = None) -> dict:
    """2D per-class IoU, mIoU and pixel accuracy of ``teacher`` on labeled images.

    Images are optionally resized by ``image_scale`` before inference; logits are upsampled to
    the label resolution. Returns :meth:`ConfusionMatrix.summary` plus ``confusion`` (K x K).
    """
    import cv2
    dev = _device(device)
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


def train_teacher(cfg: TeacherConfig | Mapping[str, Any] | None, dataset, *,
                  steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
                  weight_decay: float = 1e-4, crop_size: Sequence[int] | None = (192, 320),
                  scale_range: Sequence[float] = (0.75, 1.25), flip: bool = True,
                  color_jitter: float = 0.3, device: str = 'auto', seed: int = 0,
                  num_workers: int = 0, class_map: ClassMap | None = None,
                  teacher: Teacher | None = None, val_dataset=None, val_image_scale: float = 1.0,
                  class_weighting: str = 'none', rare_class_sampling: float = 0.0,
                  precision: str = 'auto', cache_mb: float = 1024.0, log_every: int = 10,
                  progress: bool = False,
                  callback: Callable[[int, float], None] | None = None
                  ) -> tuple[Teacher, dict]:
    """Train a teacher with pixel cross-entropy; returns ``(teacher, history)``.

    ``dataset`` yields ``{'image': (H, W, 3) uint8, 'label': (H, W) uint8}``; ``crop_size``
    (h, w) must be given when image sizes differ. ``teacher`` continues training an existing
    network instead of building one from ``cfg``. ``history`` holds ``step``/``loss`` lists (one
    entry per ``log_every`` steps, the mean loss since the last one), ``seconds``,
    ``images_per_second`` and, with ``val_dataset``, ``val`` (:func:`evaluate_teacher`).
    ``class_weighting``: ``none`` or ``inverse_sqrt`` (:func:`class_weights`);
    ``rare_class_sampling``: probability of a rare-class draw (:class:`AugmentedImages`).
    ``precision``: ``float32``, or mixed precision with ``bfloat16`` autocast (CPUs with
    bfloat16 instructions and CUDA) or ``float16`` autocast and loss scaling (CUDA only); the
    weights stay float32.
    ``auto``: :func:`cmkd_ros.models.resolve_precision` (bfloat16 on CPUs that have it).
    ``cache_mb``: decoded training images kept in memory (:class:`AugmentedImages`).
    The returned teacher is in eval mode.
    """
    if steps < 1 or batch_size < 1:
        raise TeacherTrainingError(f'steps and batch_size must be >= 1, got {steps}, '
                                   f'{batch_size}')
    if len(dataset) == 0:
        raise TeacherTrainingError('the training dataset is empty')
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = _device(device)
    autocast = _autocast(precision, dev)
    scaler = torch.amp.GradScaler('cuda', enabled=precision == 'float16')
    if teacher is None:
        teacher = build_teacher(cfg, class_map)
    elif class_map is not None:
        teacher.class_map = class_map
    teacher.to(dev).train()
    weights = class_weights(dataset, teacher.num_classes, class_weighting).to(dev)
    history_weights = weights.tolist()
    augment = ImageAugment(tuple(crop_size) if crop_size is not None else None,
                           tuple(scale_range), flip, color_jitter)
    data = AugmentedImages(dataset, augment, seed, cache_mb, rare_class_sampling,
                           teacher.num_classes)
    generator = torch.Generator().manual_seed(seed)
    # BatchNorm needs more than one value per channel: drop a last batch of one.
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        drop_last=len(data) > batch_size, generator=generator,
        persistent_workers=num_workers > 0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: dict[str, Any] = {'step': [], 'loss': [], 'lr': [],
                               'class_weights': history_weights}
    bar = progress_bar(steps, 'teacher') if progress else None
    step, images_seen, running, running_n = 0, 0, 0.0, 0
    start = time.perf_counter()
    while step < steps:
        for images, labels in loader:
            if images.shape[0] < 2 and any(isinstance(m, torch.nn.BatchNorm2d)
                                           for m in teacher.modules()):
                raise TeacherTrainingError('batch of one image: BatchNorm needs batch_size >= '
                                           '2 and at least 2 training images')
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            with autocast:
                logits = teacher(images)
            loss = F.cross_entropy(logits.float(), labels, weight=weights, ignore_index=IGNORE)
            if not torch.isfinite(loss):
                if (labels == IGNORE).all():
                    continue              # a crop with nothing labeled carries no signal
                raise TeacherTrainingError(f'loss became {loss.item()} at step {step}')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            images_seen += images.shape[0]
            running += float(loss.item())
            running_n += 1
            if callback is not None:
                callback(step, float(loss.item()))
            if step % log_every == 0 or step == steps:
                history['step'].append(step)
                history['loss'].append(running / running_n)
                history['lr'].append(optimizer.param_groups[0]['lr'])
                running, running_n = 0.0, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f'{loss.item():.3f}')
            if step >= steps:
                break
    if bar is not None:
        bar.close()
    history['seconds'] = time.perf_counter() - start
    history['images_per_second'] = images_seen / max(history['seconds'], 1e-9)
    teacher.eval()
    if val_dataset is not None:
        history['val'] = evaluate_teacher(teacher, val_dataset, teacher.num_classes,
                                          device=str(dev), image_scale=val_image_scale)
    return teacher, history
