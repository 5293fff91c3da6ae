"""Training configuration: every key declared once here, with its default and a help text.

Precedence: these defaults, then an experiment YAML (``config/fskd.yaml`` ...), then CLI
``key.sub=value`` overrides; the result is a frozen :class:`TrainConfig` (or
:class:`TeacherTrainConfig` for ``cmkd train teacher``) stored in every checkpoint
(``cmkd_ros.config.to_dict``). ``student`` and ``teacher.model`` are mappings validated against
the model's own schemas (``StudentConfig``, ``TeacherConfig``) when the models are built, so the
model code stays the single owner of its settings.

Teacher settings renamed when the teacher config got its typed sections (``train`` ->
``data.train``, ``lr`` -> ``optim.lr``, ``options.class_weighting`` -> ``loss.class_balance``,
...: :data:`TEACHER_RENAMED`) still work, with a FutureWarning naming the new key.

Print every key with its help: ``cmkd train fskd --print-config`` (values) or
``offline_training.config.print_settings()`` (help texts).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from cmkd_ros.config import (PRECISION_CHOICES, ConfigError, build, describe, load_yaml, merge,
                             parse_overrides, setting)

# Student-training methods (``cmkd train <method>``); ``teacher`` is separate.
METHODS = ('udakd', 'fskd', 'finetune', 'supervised')
DISTILLATION_METHODS = ('udakd', 'fskd')
# The class map each real data set's reader maps its 3D labels to.
FORMAT_CLASS_MAPS = {'nuscenes': 'nuscenes_lidarseg16', 'semantickitti': 'semantickitti19'}
CLASS_BALANCE_KINDS = ('none', 'inverse_sqrt')

# Layouts of point data sets (data.format): training, evaluation and their readers.
POINT_DATA_FORMATS = ('pairs', 'nuscenes', 'semantickitti')


@dataclass(frozen=True)
class DataSection:
    """Where the scans come from and how they become batches."""

    format: str = setting('pairs', 'layout of data.train and data.val: pairs (cmkd sim --format '
                          'frames, the collect node output), nuscenes (lidarseg, six cameras) or '
                          'semantickitti (color cameras image_2 and image_3)',
                          choices=POINT_DATA_FORMATS)
    train: str = setting('', 'folder to train on: a pair dataset, a nuScenes data root (holding '
                         'v1.0-*/, samples/, lidarseg/) or a SemanticKITTI root (holding '
                         'sequences/), as data.format says')
    val: str = setting('', 'folder scored after training (eval.json), same layout as data.train '
                       '(for nuscenes and semantickitti usually the same root: data.val_split '
                       'picks the scenes); empty: no evaluation')
    version: str = setting('', 'nuscenes: the version folder (v1.0-trainval, v1.0-mini, '
                           'v1.0-test); empty: the one found in the data root')
    train_split: tuple[str, ...] = setting(
        (), 'nuscenes/semantickitti: what to train on; []: the official training split '
        '(nuScenes train, or mini_train in v1.0-mini; SemanticKITTI sequences 00-07 and 09-10); '
        'a split name ([mini_val]) or scene names / sequence numbers ([scene-0061], ["00"])')
    val_split: tuple[str, ...] = setting(
        (), 'nuscenes/semantickitti: what data.val scores; []: the official validation split '
        '(nuScenes val, or mini_val in v1.0-mini; SemanticKITTI sequence 08); or as '
        'data.train_split')
    voxel_size: float = setting(0.1, 'voxel edge length, metres (student input grid)', gt=0.0,
                                le=5.0)
    batch_size: int = setting(2, 'LiDAR scans per batch and process', ge=1, le=1024)
    num_workers: int = setting(0, 'DataLoader worker processes per training process', ge=0,
                               le=64)
    cameras: tuple[str, ...] = setting((), 'camera names to use; empty: every camera of the '
                                       'source (a pair\'s cameras, the six nuScenes '
                                       'cameras, image_2 and image_3 where present)')
    occlusion: bool = setting(True, 'drop correspondences of points hidden behind nearer '
                              'points (the occlusion test)')
    motion_compensation: bool = setting(True, 'move points to each camera stamp with the ego '
                                        'trajectory before projecting (when poses exist)')
    image_scale: float = setting(1.0, 'resize camera images by this factor before the teacher '
                                 '(pixel coordinates follow)', gt=0.0, le=4.0)
    augment: bool = setting(True, 'random rotation about z, x/y flips and isotropic scaling '
                            'by 0.95..1.05 of the points (correspondences are kept)')
    augment_scale_xy: tuple[float, float] = setting(
        (1.0, 1.0), 'with augment: extra horizontal scaling by a factor in [low, high] (heights '
        'kept; < 1 packs points as densely as near the sensor, where no camera looks, so a '
        'student distilled on camera-visible points also labels the near range; it also '
        'shortens cars, so it is off by default and on in the synthetic configs); [1, 1]: off',
        gt=0.0)
    label_fraction: float = setting(1.0, 'fraction of 3D labels kept (finetune/supervised); '
                                    'the rest become the ignore label', gt=0.0, le=1.0)
    label_unit: str = setting('scans', 'what label_fraction counts: whole scans or points',
                              choices=('scans', 'points'))

    def validate(self) -> None:
        low, high = self.augment_scale_xy
        if not low <= high:
            raise ConfigError(f'augment_scale_xy: need low <= high, got [{low}, {high}]')


@dataclass(frozen=True)
class OptimSection:
    """Optimizer and learning-rate schedule."""

    name: str = setting('adamw', 'optimizer', choices=('adamw', 'sgd'))
    lr: float = setting(1e-3, 'peak learning rate', gt=0.0, le=10.0)
    weight_decay: float = setting(1e-4, 'decoupled weight decay (adamw) or L2 (sgd)', ge=0.0,
                                  le=1.0)
    momentum: float = setting(0.9, 'SGD momentum (sgd only)', ge=0.0, lt=1.0)
    scheduler: str = setting('cosine', 'learning-rate decay after warm-up',
                             choices=('cosine', 'constant'))
    warmup_steps: int = setting(0, 'linear warm-up steps from 0 to lr', ge=0)
    min_lr_ratio: float = setting(0.01, 'cosine floor as a fraction of lr', ge=0.0, le=1.0)
    grad_clip: float = setting(0.0, 'clip the gradient norm to this value; 0: no clipping',
                               ge=0.0)


def class_balance_setting(default: str) -> Any:
    """``loss.class_balance`` of student and teacher training (one key, one function)."""
    return setting(default, 'loss weights against class imbalance: none, or inverse_sqrt = '
                   '1/sqrt(class frequency), normalised to mean 1 over the labeled points '
                   '(offline_training.losses.inverse_sqrt_weights; students: frequencies in the '
                   "batch, the teacher's label for the semantic KL and the 3D label for the "
                   'cross-entropy; the teacher: pixel frequencies of up to 64 training images)',
                   choices=CLASS_BALANCE_KINDS)


@dataclass(frozen=True)
class LossSection:
    """Loss hyper-parameters and term weights (a weight of 0 drops the term)."""

    infonce_temperature: float = setting(0.07, 'UDAKD InfoNCE temperature', gt=0.0, le=10.0)
    infonce_samples: int = setting(4096, 'UDAKD pairs sampled per batch (negatives = the '
                                   'other sampled pixels)', ge=2)
    feature_kind: str = setting('cosine', 'FSKD feature term on normalised features',
                                choices=('cosine', 'l2'))
    kl_temperature: float = setting(1.0, 'FSKD semantic KL temperature T (loss scaled by '
                                    'T^2)', gt=0.0, le=100.0)
    infonce_weight: float = setting(1.0, 'weight of the UDAKD InfoNCE term', ge=0.0)
    feature_weight: float = setting(1.0, 'weight of the FSKD feature term', ge=0.0)
    semantic_weight: float = setting(1.0, 'weight of the FSKD semantic KL term', ge=0.0)
    image_label_weight: float = setting(
        0.0, 'FSKD: weight of a cross-entropy on the ground-truth label images at the points\' '
        'pixels, where a pair carries them (the labeled images the teacher learned from, used '
        'directly; the teacher\'s targets elsewhere; pairs format only). 0: off', ge=0.0)
    image_labels_replace_kl: bool = setting(
        False, 'with image_label_weight: the semantic KL only at pixels without a label (the '
        "label replaces the teacher's soft label where it is known)")
    image_labels_drop_wrong_kl: bool = setting(
        False, "with image_label_weight: no semantic KL where the teacher's class differs from "
        "the pixel's label (its soft label is wrong there; kept where it agrees or none is known)")
    ce_weight: float = setting(1.0, 'weight of the 3D cross-entropy (finetune, supervised)',
                               ge=0.0)
    class_balance: str = class_balance_setting('inverse_sqrt')


@dataclass(frozen=True)
class TeacherSection:
    """The frozen 2D teacher used by udakd and fskd."""

    checkpoint: str = setting('', 'teacher checkpoint (from cmkd train teacher, or a user '
                              'state dict / TorchScript file); required by udakd and fskd')
    cache_mb: int = setting(2048, 'memory (MiB, per process) for teacher features memoised per '
                            'image (the teacher is frozen); 0: recompute every step', ge=0)
    scales: tuple[float, ...] = setting(
        (1.0,), "the distillation targets: the teacher's features averaged over the images "
        'enlarged by these factors (each map resized to the first one\'s size; thin objects '
        'cover more feature cells in an enlarged image)', gt=0.0, le=4.0)
    flip: bool = setting(False, "the distillation targets: the teacher's features averaged "
                         'with those of the mirrored images (mirrored back)')

    def validate(self) -> None:
        if not self.scales:
            raise ConfigError('teacher.scales: give at least one scale (1.0: the images as '
                              'they are)')


@dataclass(frozen=True)
class RunSettings:
    """What every training run (student or teacher) sets: seed, length, device, logging."""

    seed: int = setting(0, 'seed of every random generator (weights, data order, sampling, '
                        'augmentation)', ge=0)
    steps: int = setting(2000, 'optimizer steps in total (over all processes)', ge=1)
    log_every: int = setting(10, 'log the mean losses every N steps (students: TensorBoard and '
                             'metrics.jsonl; the teacher: its history in summary.json)', ge=1)
    device: str = setting('auto', 'auto (CUDA when available), cpu or cuda',
                          choices=('auto', 'cpu', 'cuda'))
    threads: int = setting(0, 'torch intra-op CPU threads per process; 0: torch default',
                           ge=0, le=256)
    progress: bool = setting(True, 'tqdm progress bar (rank 0)')
    class_map: str = setting('synthetic', 'built-in class map of the labels, saved with the '
                             'model (cmkd_ros.classes)')


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    """Student training (``cmkd train fskd|udakd|finetune|supervised``)."""

    method: str = setting('fskd', 'training method (set by the cmkd train subcommand)',
                          choices=METHODS)
    out_dir: str = setting('runs/student', 'output folder: checkpoints, TensorBoard, '
                           'student.pt, eval.json')
    checkpoint_every: int = setting(200, 'write a resumable checkpoint every N steps (and at '
                                    'the end)', ge=1)
    keep_checkpoints: int = setting(2, 'how many step checkpoints to keep on disk', ge=1)
    amp: bool = setting(True, 'mixed precision (float16 autocast + grad scaling); CUDA only')
    init_from: str = setting('', 'student checkpoint to start from (e.g. UDAKD weights for '
                             'finetune); empty: random init')
    share_teacher_classifier: bool = setting(True, 'load the teacher 1x1 classifier into the '
                                             'student (needs teacher.checkpoint)')
    freeze_classifier: bool = setting(True, 'keep the student classifier frozen (FSKD: the '
                                      "teacher's shared classifier)")
    prior_correction: float = setting(
        0.5, "fskd with the teacher's classifier: this fraction of the teacher's training "
        'class weights (kept in teachers from cmkd train teacher) is taken out of the final '
        "student's classifier bias (logits - f log w): a class-weighted teacher, and so its "
        'student, over-predicts the up-weighted classes. 0: off (docs/training.md)',
        ge=0.0, le=1.0)
    data: DataSection = setting(default_factory=DataSection)
    optim: OptimSection = setting(default_factory=OptimSection)
    loss: LossSection = setting(default_factory=LossSection)
    teacher: TeacherSection = setting(default_factory=TeacherSection)
    student: dict[str, Any] = setting(
        default_factory=dict, help='StudentConfig keys (cmkd_ros.models.student); num_classes '
        'and the pseudo-2D dimension are filled in from the class map and the teacher')

    def validate(self) -> None:
        if self.method in DISTILLATION_METHODS and not self.teacher.checkpoint:
            raise ConfigError(f'teacher.checkpoint: required by method {self.method!r}')
        if self.share_teacher_classifier and not self.teacher.checkpoint and \
                not self.init_from:
            raise ConfigError('share_teacher_classifier needs teacher.checkpoint (or set it '
                              'to false)')
        if self.freeze_classifier and not self.share_teacher_classifier and not self.init_from:
            raise ConfigError('freeze_classifier: a freshly initialised classifier would stay '
                              'random; set share_teacher_classifier or freeze_classifier: false')
        if self.method in ('finetune', 'supervised') and self.loss.ce_weight == 0:
            raise ConfigError(f'loss.ce_weight: must be > 0 for method {self.method!r}')
        if self.loss.image_label_weight > 0 and (self.method != 'fskd' or
                                                 self.data.format != 'pairs'):
            raise ConfigError('loss.image_label_weight: only for method fskd on pair data '
                              f'(got method {self.method!r}, data.format {self.data.format!r})')
        if self.loss.image_labels_replace_kl and self.loss.image_labels_drop_wrong_kl:
            raise ConfigError('loss.image_labels_replace_kl and loss.image_labels_drop_wrong_kl: '
                              'choose one (the first drops the KL wherever a label is known)')
        expected = FORMAT_CLASS_MAPS.get(self.data.format)
        if expected and self.class_map != expected:
            raise ConfigError(f'class_map: the {self.data.format} reader labels points with '
                              f'{expected!r}, not {self.class_map!r}')


@dataclass(frozen=True)
class TeacherDataSection:
    """Labeled camera images for teacher training, and their augmentation."""

    format: str = setting('pairs', 'layout of train and val: pairs (with label images), '
                          'cityscapes (leftImg8bit/, gtFine/) or nuimages (v1.0-*/ tables, '
                          'samples/)', choices=('pairs', 'cityscapes', 'nuimages'))
    train: str = setting('', 'folder of labeled images to train on: a pair dataset, or the '
                         'Cityscapes / nuImages root')
    val: str = setting('', 'held-out images for the 2D mIoU (eval.json), same layout (for '
                       'cityscapes and nuimages usually the same root as train); empty: none')
    train_split: str = setting('', 'cityscapes: the split folder (default train); nuimages: the '
                               'version folder (default v1.0-train)')
    val_split: str = setting('', 'cityscapes: the split folder (default val); nuimages: the '
                             'version folder (default v1.0-val)')
    label_map: str = setting('', "cityscapes/nuimages: YAML mapping of the data set's classes "
                             'onto class_map (offline_training/readers/label_maps.py); empty: '
                             'the built-in mapping onto nuscenes_lidarseg16 or semantickitti19')
    batch_size: int = setting(8, 'images per batch', ge=1, le=1024)
    num_workers: int = setting(0, 'DataLoader worker processes', ge=0, le=64)
    crop_size: tuple[int, int] | None = setting(
        (192, 320), 'random crop (height, width) in pixels after scaling, padded with the ignore '
        'label where the image is smaller; null: whole images (all of one size)', ge=1)
    scale_range: tuple[float, float] = setting((0.75, 1.25), 'random scale factor in [low, '
                                               'high] before the crop', gt=0.0, le=8.0)
    flip: bool = setting(True, 'random horizontal flips')
    color_jitter: float = setting(0.3, 'brightness, contrast and saturation factors drawn in '
                                  '[1 - j, 1 + j]; 0: off', ge=0.0, le=1.0)
    rare_class_sampling: float = setting(
        0.0, 'probability that a draw picks a class by 1/sqrt(pixel frequency), then an image '
        'showing it, and centres the crop on one of its pixels; 0: off', ge=0.0, le=1.0)
    cache_mb: float = setting(1024.0, 'decoded training images kept in memory (MiB, per '
                              'loader process)', ge=0.0)
    val_image_scale: float = setting(1.0, 'resize validation images by this factor before the '
                                     'teacher (logits are upsampled to the labels)', gt=0.0,
                                     le=4.0)

    def validate(self) -> None:
        low, high = self.scale_range
        if not low <= high:
            raise ConfigError(f'scale_range: need low <= high, got [{low}, {high}]')


@dataclass(frozen=True)
class TeacherLossSection:
    """The pixel cross-entropy of teacher training."""

    class_balance: str = class_balance_setting('none')


# Teacher settings renamed when the teacher config got typed sections: old (dotted) name -> new.
TEACHER_RENAMED = {
    'train': 'data.train', 'val': 'data.val', 'batch_size': 'data.batch_size', 'lr': 'optim.lr',
    'options.crop_size': 'data.crop_size', 'options.scale_range': 'data.scale_range',
    'options.flip': 'data.flip', 'options.color_jitter': 'data.color_jitter',
    'options.num_workers': 'data.num_workers', 'options.cache_mb': 'data.cache_mb',
    'options.rare_class_sampling': 'data.rare_class_sampling',
    'options.val_image_scale': 'data.val_image_scale',
    'options.weight_decay': 'optim.weight_decay', 'options.class_weighting': 'loss.class_balance',
    'options.log_every': 'log_every'}


@dataclass(frozen=True)
class TeacherTrainConfig(RunSettings):
    """2D teacher training (``cmkd train teacher``) on labeled images: a pair dataset, Cityscapes
    or nuImages (``data.format``), their labels mapped onto the class map."""

    out_dir: str = setting('runs/teacher', 'output folder; the teacher is saved as '
                           'teacher.pt there')
    precision: str = setting('auto', 'training arithmetic: float32, bfloat16 autocast (CPUs '
                             'with bfloat16 instructions, CUDA), float16 autocast (CUDA) or auto '
                             '(bfloat16 on CPUs that have it in hardware, else float32)')
    model: dict[str, Any] = setting(default_factory=dict,
                                    help='TeacherConfig keys (cmkd_ros.models.teacher); '
                                    'num_classes is filled in from the class map')
    data: TeacherDataSection = setting(default_factory=TeacherDataSection)
    optim: OptimSection = setting(default_factory=OptimSection)
    loss: TeacherLossSection = setting(default_factory=TeacherLossSection)

    @classmethod
    def expand_settings(cls, data: Mapping[str, Any]) -> dict:
        return move_renamed_teacher_settings(data)

    def validate(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f'precision must be one of {list(PRECISION_CHOICES)}, got '
                              f'{self.precision!r}')


def _put(tree: dict, dotted: str, value: Any, old: str) -> None:
    """Set ``tree[a][b]... = value`` for ``dotted`` = 'a.b...' (copying the mappings on the
    way); a value already there is a conflict between ``old`` and its new name."""
    *parents, last = dotted.split('.')
    node = tree
    for part in parents:
        child = node.get(part)
        if child is not None and not isinstance(child, Mapping):
            raise ConfigError(f'{part}: expected a mapping, got {type(child).__name__}')
        node[part] = dict(child or {})
        node = node[part]
    if last in node:
        raise ConfigError(f'{old} and {dotted} both given: {old} is the old name of {dotted}; '
                          f'keep {dotted}')
    node[last] = value


def move_renamed_teacher_settings(data: Mapping[str, Any], warn: bool = True) -> dict:
    """``data`` with the old teacher keys of :data:`TEACHER_RENAMED` moved to their new place
    (a FutureWarning names each one when ``warn``); an unknown ``options`` key raises."""
    options = data.get('options') or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f'options: expected a mapping, got {type(options).__name__}')
    old = [(key, data[key]) for key in data if key in TEACHER_RENAMED]
    for key, value in options.items():
        if f'options.{key}' not in TEACHER_RENAMED:
            raise ConfigError(f'options.{key}: unknown teacher setting; the options mapping is '
                              'gone, its keys live in data, optim and loss (cmkd train teacher '
                              '--print-config lists them)')
        old.append((f'options.{key}', value))
    out = {k: v for k, v in data.items() if k != 'options' and k not in TEACHER_RENAMED}
    for key, value in old:
        _put(out, TEACHER_RENAMED[key], value, key)
        if warn:
            warnings.warn(f'teacher setting {key} is now {TEACHER_RENAMED[key]} (the old name '
                          'still works)', FutureWarning, stacklevel=3)
    return out


def load_train_config(method: str, path: str | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides, for ``method``."""
    if method not in METHODS:
        raise ConfigError(f'unknown method {method!r}; choose from {list(METHODS)}')
    data = merge(load_yaml(path) if path else {}, parse_overrides(list(overrides)))
    if data.get('method', method) != method:
        raise ConfigError(f'method: the config says {data["method"]!r} but the command is '
                          f'{method!r}')
    data['method'] = method
    return build(TrainConfig, data)


def load_teacher_config(path: str | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> TeacherTrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides (teacher training);
    old key names are moved in each source before they are merged, so the later one wins."""
    file_data = move_renamed_teacher_settings(load_yaml(path) if path else {})
    return build(TeacherTrainConfig, merge(file_data, move_renamed_teacher_settings(
        parse_overrides(list(overrides)))))


def print_settings() -> None:
    """Print every training key with its default and help text."""
    for cls in (TrainConfig, TeacherTrainConfig):
        print(f'# {cls.__name__}')
        for name, kind, default, text in describe(cls):
            print(f'{name} ({kind}, default {default!r}): {text}')


__all__ = ['METHODS', 'DISTILLATION_METHODS', 'CLASS_BALANCE_KINDS', 'DataSection',
           'OptimSection', 'LossSection', 'TeacherSection', 'RunSettings', 'TrainConfig',
           'TeacherDataSection', 'TeacherLossSection', 'TeacherTrainConfig', 'TEACHER_RENAMED',
           'class_balance_setting', 'move_renamed_teacher_settings', 'load_train_config',
           'load_teacher_config', 'print_settings']
