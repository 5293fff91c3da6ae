"""2D teacher networks, split into ``features(images) -> (B, D, h, w)`` and a 1x1 ``classifier``.

Architectures (``TeacherConfig.arch``):

- ``deeplabv3_resnet50`` / ``deeplabv3_resnet18``: DeepLabV3 (Chen et al., 2017) on a dilated
  ResNet (output stride 8 or 16) with an ASPP head. Written in plain PyTorch; module names follow
  torchvision's ``resnet*`` and ``deeplabv3_resnet50`` so their state dicts load
  (:func:`convert_torchvision_state_dict`), e.g. ImageNet weights through ``pretrained_path``.
- ``small``: a CPU-friendly network (about 0.8 M parameters): a stride-8 encoder of residual
  blocks, a light ASPP and a stride-4 decoder (DeepLabV3+ style skip). It trains in minutes on
  two CPU cores on the synthetic world's images.

The split matters for distillation: ``features`` are the teacher's pixel features (the targets of
the student's pseudo-2D features) and ``classifier`` is the 1x1 convolution the student shares,
frozen, to turn pseudo-2D features into logits.

Saved teachers (:func:`save_teacher`) are plain dicts, loadable with weights_only=True:
``{'format': 'cmkd_teacher', 'config': ..., 'class_map': ..., 'state_dict': ...}``, and
``'class_weights'`` when its training weighted the classes (:func:`load_teacher` sets them as
the teacher's ``class_weights``, else None).
:func:`load_teacher` also accepts a bare state dict or a TorchScript file.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cmkd_ros.classes import ClassMap
from cmkd_ros.config import ConfigError, build, setting, to_dict

TEACHER_FORMAT = 'cmkd_teacher'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(ValueError):
    """A teacher file or input that cannot be used (wrong format, shapes, classes)."""


@dataclass(frozen=True)
class TeacherConfig:
    """How to build a 2D teacher."""

    arch: str = setting('small', 'network: deeplabv3_resnet50, deeplabv3_resnet18 or small',
                        choices=('deeplabv3_resnet50', 'deeplabv3_resnet18', 'small'))
    num_classes: int = setting(12, 'number of classes K of the classifier', ge=1, le=255)
    feature_dim: int = setting(64, 'feature dimension D of features(); DeepLabV3 uses 256',
                               ge=1)
    output_stride: int = setting(0, 'feature stride: 8 or 16 for ResNets, 2, 4 or 8 for small '
                                 '(2: a second decoder step on the stride-2 stem, for thin '
                                 'objects in small images); 0: the default of the arch (8 '
                                 'ResNets, 4 small)',
                                 choices=(0, 2, 4, 8, 16))
    pretrained_path: str | None = setting(
        None, 'optional weights to initialise from (torchvision ResNet/DeepLabV3 state dict or '
        'a saved teacher); matching keys are loaded, the rest stay random')
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, 'RGB mean subtracted from [0, 1] '
                                               'images inside the network', length=3)
    std: tuple[float, float, float] = setting(IMAGENET_STD, 'RGB std dividing [0, 1] images '
                                              'inside the network', length=3, gt=0)
    width: int = setting(32, 'small only: channels of the first stage (then 2x and 3x)', ge=4)

    @property
    def stride(self) -> int:
        """The feature stride, with 0 resolved to the architecture's default."""
        if self.output_stride:
            return self.output_stride
        return 4 if self.arch == 'small' else 8

    def validate(self) -> None:
        if self.output_stride == 0:
            return
        if self.arch == 'small' and self.output_stride not in (2, 4, 8):
            raise ConfigError(f'output_stride: small teacher supports 2, 4 or 8, got '
                              f'{self.output_stride}')
        if self.arch != 'small' and self.output_stride not in (8, 16):
            raise ConfigError(f'output_stride: {self.arch} supports 8 or 16, got '
                              f'{self.output_stride}')


# ---------------------------------------------------------------------------------------------
# ResNet (torchvision module names, dilation support for both block types)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 convolution), as in torchvision."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """ResNet without pooling/fc; ``replace_stride_with_dilation`` for layer2..4 as torchvision.

    ``forward(x)`` returns the layer4 map (B, 512 * expansion, H / stride, W / stride) and
    ``forward_with_skip`` also the layer1 map (stride 4).
    """

    def __init__(self, block: type, layers: Sequence[int],
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False)):
        super().__init__()
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.out_channels = 512 * block.expansion
        self.stride = 32 // 2 ** sum(bool(d) for d in replace_stride_with_dilation)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------------------------------------
# ASPP head (torchvision DeepLabHead module names)


class _ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, one dilated 3x3 per rate, image pooling; projected."""

    def __init__(self, cin: int, rates: Sequence[int], cout: int, dropout: float = 0.5):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU())]
        for rate in rates:
            branches.append(nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()))
        branches.append(_ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


def _deeplab_head(cin: int, feature_dim: int, rates: Sequence[int]) -> nn.Sequential:
    """ASPP then a 3x3 conv, BN, ReLU: torchvision's DeepLabHead without its last 1x1 conv."""
    return nn.Sequential(ASPP(cin, rates, feature_dim), _conv3x3(feature_dim, feature_dim),
                         nn.BatchNorm2d(feature_dim), nn.ReLU())


# ---------------------------------------------------------------------------------------------
# Small CPU teacher


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv3x3(cin, cout, stride, dilation), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallEncoder(nn.Module):
    """Stride-4 stem and block (the skip), then a stride-8 dilated residual stage (deep); the
    stem's stride-2 map is the fine skip of output stride 2."""

    def __init__(self, width: int):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 3 * width
        self.stem = nn.Sequential(_conv_bn_relu(3, c1, 2), _conv_bn_relu(c1, c1),
                                  _conv_bn_relu(c1, c2, 2))
        self.stage1 = BasicBlock(c2, c2)
        self.stage2 = nn.Sequential(
            BasicBlock(c2, c3, 2, nn.Sequential(nn.Conv2d(c2, c3, 1, stride=2, bias=False),
                                                nn.BatchNorm2d(c3))),
            BasicBlock(c3, c3, dilation=2), BasicBlock(c3, c3, dilation=4))
        self.skip_channels = c2
        self.fine_channels = c1
        self.out_channels = c3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(deep stride 8, skip stride 4, fine stride 2) maps."""
        fine = self.stem[1](self.stem[0](x))
        skip = self.stage1(self.stem[2](fine))
        return self.stage2(skip), skip, fine


class SmallHead(nn.Module):
    """Light ASPP at the deep map, then (output stride 4 or 2) a decoder fusing the stride-4
    skip, and (output stride 2) a second step fusing the stem's stride-2 map."""

    __constants__ = ['use_fine']    # TorchScript skips the layers a stride-4/8 head lacks

    def __init__(self, cin: int, skip_channels: int, feature_dim: int, output_stride: int,
                 fine_channels: int = 0):
        super().__init__()
        self.aspp = ASPP(cin, (2, 4, 6), feature_dim, dropout=0.1)
        self.use_skip = output_stride in (2, 4)
        self.use_fine = output_stride == 2
        self.skip = nn.Sequential(nn.Conv2d(skip_channels, 16, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        fused = feature_dim + (16 if self.use_skip else 0)
        self.fuse = _conv_bn_relu(fused, feature_dim)
        if self.use_fine:  # only in stride-2 models: stride-4/8 checkpoints keep their keys
            self.fine = nn.Sequential(nn.Conv2d(fine_channels, 16, 1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            self.fuse_fine = _conv_bn_relu(feature_dim + 16, feature_dim)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor,
                fine: torch.Tensor) -> torch.Tensor:
        x = self.aspp(deep)
        if self.use_skip:
            x = F.interpolate(x, size=skip.shape[-2:], mode='bilinear', align_corners=False)
            x = torch.cat([x, self.skip(skip)], dim=1)
        x = self.fuse(x)
        if self.use_fine:
            x = F.interpolate(x, size=fine.shape[-2:], mode='bilinear', align_corners=False)
            x = self.fuse_fine(torch.cat([x, self.fine(fine)], dim=1))
        return x


# ---------------------------------------------------------------------------------------------
# Teacher


class Teacher(nn.Module):
    """A 2D segmentation network split into ``features`` and a 1x1 ``classifier``.

    ``features(images)`` maps float (B, 3, H, W) RGB in [0, 1] (uint8 0..255 also accepted) to
    (B, D, ceil(H / s), ceil(W / s)) with ``s = feature_stride``; ``forward(images)`` returns
    logits (B, K, H, W) upsampled bilinearly to the input size.
    """

    class_weights: torch.Tensor | None = None   # (K,) of its training, see save_teacher

    def __init__(self, cfg: TeacherConfig, class_map: ClassMap | None = None):
        super().__init__()
        self.arch = cfg.arch
        self.feature_stride = int(cfg.stride)
        self.feature_dim = int(cfg.feature_dim)
        self.num_classes = int(cfg.num_classes)
        self.config = cfg
        self.class_map = class_map
        self.register_buffer('mean', torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.classifier = nn.Conv2d(cfg.feature_dim, cfg.num_classes, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise TeacherError('images must be (B, 3, H, W) RGB')
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise TeacherError('images must be float in [0, 1] or uint8')
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D, h, w) pixel features at ``feature_stride``."""
        raise NotImplementedError('Teacher subclasses implement features()')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, K, H, W) logits at the input resolution."""
        logits = self.classifier(self.features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode='bilinear',
                             align_corners=False)


class DeepLabTeacher(Teacher):
    """DeepLabV3 on a dilated ResNet-50/18: ``backbone`` (ResNetTrunk), ``head`` (ASPP + conv)."""

    def __init__(self, cfg: TeacherConfig, class_map: ClassMap | None = None):
        super().__init__(cfg, class_map)
        block, layers = {'deeplabv3_resnet50': (Bottleneck, (3, 4, 6, 3)),
                         'deeplabv3_resnet18': (BasicBlock, (2, 2, 2, 2))}[cfg.arch]
        dilate = (False, True, True) if cfg.stride == 8 else (False, False, True)
        rates = (12, 24, 36) if cfg.stride == 8 else (6, 12, 18)
        self.backbone = ResNetTrunk(block, layers, dilate)
        self.head = _deeplab_head(self.backbone.out_channels, cfg.feature_dim, rates)

    @torch.jit.export
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D, H / s, W / s) pixel features, s = stride."""
        return self.head(self.backbone(self.normalize(images)))


class SmallTeacher(Teacher):
    """CPU-friendly teacher: ``backbone`` (SmallEncoder), ``head`` (light ASPP + decoder)."""

    def __init__(self, cfg: TeacherConfig, class_map: ClassMap | None = None):
        super().__init__(cfg, class_map)
        self.backbone = SmallEncoder(cfg.width)
        self.head = SmallHead(self.backbone.out_channels, self.backbone.skip_channels,
                              cfg.feature_dim, cfg.stride, self.backbone.fine_channels)

    @torch.jit.export
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D, H / s, W / s) pixel features, s = stride."""
        deep, skip, fine = self.backbone(self.normalize(images))
        return self.head(deep, skip, fine)


class ScriptedTeacher(nn.Module):
    """The :class:`Teacher` interface around a TorchScript module exporting ``features``.

    The scripted module must have a ``features`` method (``@torch.jit.export``) and a 1x1
    ``classifier`` convolution; its classifier weights are copied into a plain ``nn.Conv2d``.
    """

    class_weights: torch.Tensor | None = None   # unknown for an imported module

    def __init__(self, module: torch.jit.ScriptModule, feature_stride: int,
                 class_map: ClassMap | None = None):
        super().__init__()
        self.module = module
        if not hasattr(module, 'features') or not hasattr(module, 'classifier'):
            raise TeacherError('TorchScript teacher must export a features() method and have a '
                               'classifier submodule')
        weight = module.classifier.weight.detach().clone()
        if weight.dim() != 4 or weight.shape[-2:] != (1, 1):
            raise TeacherError(f'TorchScript teacher classifier must be a 1x1 conv, weight '
                               f'shape {tuple(weight.shape)}')
        bias = getattr(module.classifier, 'bias', None)
        self.classifier = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            if bias is not None:
                self.classifier.bias.copy_(bias.detach())
        self.feature_stride = int(feature_stride)
        self.feature_dim = int(weight.shape[1])
        self.num_classes = int(weight.shape[0])
        self.class_map = class_map

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode='bilinear',
                             align_corners=False)


# ---------------------------------------------------------------------------------------------
# Building, saving and loading


def convert_torchvision_state_dict(state: Mapping[str, torch.Tensor]) -> dict:
    """Rename torchvision ``resnet*`` / ``deeplabv3_resnet*`` keys to :class:`Teacher` keys.

    ResNet: ``conv1.*`` -> ``backbone.conv1.*`` (``fc.*`` dropped). DeepLabV3: ``backbone.*``
    kept, ``classifier.0..3`` -> ``head.0..3``, ``classifier.4`` -> ``classifier``
    (``aux_classifier.*`` dropped). Keys already in Teacher form pass through.
    """
    out = {}
    for key, value in state.items():
        if key.startswith(('fc.', 'aux_classifier.')):
            continue
        if key.startswith(('conv1.', 'bn1.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')):
            key = 'backbone.' + key
        elif key.startswith('classifier.') and key.split('.')[1] in ('0', '1', '2', '3') \
                and len(key.split('.')) > 2:
            key = 'head.' + key[len('classifier.'):]
        elif key.startswith('classifier.4.'):
            key = 'classifier.' + key[len('classifier.4.'):]
        out[key] = value
    return out


def _read_state(path: str) -> dict:
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise TeacherError(f'teacher weights not found: {path}') from None
    except Exception as exc:  # unpickling errors come in several types
        raise TeacherError(f'{path}: not a weights file loadable with weights_only=True '
                           f'({exc})') from None
    if isinstance(data, Mapping) and data.get('format') == TEACHER_FORMAT:
        return dict(data['state_dict'])
    if isinstance(data, Mapping) and 'state_dict' in data and isinstance(data['state_dict'],
                                                                         Mapping):
        data = data['state_dict']
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor)
                                                for v in data.values()):
        raise TeacherError(f'{path}: expected a state dict (name -> tensor)')
    return dict(data)


def load_pretrained(teacher: Teacher, path: str) -> list[str]:
    """Load the entries of ``path`` whose names and shapes match; returns the keys left random.

    Raises :class:`TeacherError` when nothing matches (wrong architecture or file).
    """
    state = convert_torchvision_state_dict(_read_state(path))
    own = teacher.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise TeacherError(f'{path}: no parameter matches a {teacher.arch} teacher (first keys: '
                           f'{list(state)[:4]})')
    teacher.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def build_teacher(cfg: TeacherConfig | Mapping | None = None,
                  class_map: ClassMap | None = None) -> Teacher:
    """Build a :class:`Teacher` from its config (a mapping is validated first)."""
    if not isinstance(cfg, TeacherConfig):
        cfg = build(TeacherConfig, cfg or {})
    if class_map is not None and class_map.num_classes != cfg.num_classes:
        raise TeacherError(f'class map has {class_map.num_classes} classes, teacher config '
                           f'{cfg.num_classes}')
    teacher = (SmallTeacher if cfg.arch == 'small' else DeepLabTeacher)(cfg, class_map)
    if cfg.pretrained_path:
        load_pretrained(teacher, cfg.pretrained_path)
    return teacher


def _checked_class_weights(weights, num_classes: int, what: str) -> torch.Tensor:
    """(K,) float32 training class weights, or TeacherError unless K positive values."""
    values = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    if values.numel() != num_classes or bool((values <= 0).any()):
        raise TeacherError(f'{what}: need {num_classes} positive values, got '
                           f'{values.tolist()}')
    return values


def save_teacher(teacher: Teacher, path: str, class_map: ClassMap | None = None,
                 class_weights: Sequence[float] | None = None) -> None:
    """Write ``teacher`` (config, class map, weights) atomically; load with load_teacher.

    ``class_weights`` (K,): the cross-entropy class weights it was trained with, if any (they
    bias its predictions towards the up-weighted classes; FSKD can take part of that back out,
    ``TrainConfig.prior_correction``).
    """
    class_map = class_map or teacher.class_map
    data = {'format': TEACHER_FORMAT, 'config': to_dict(teacher.config),
            'class_map': class_map.to_dict() if class_map is not None else None,
            'state_dict': {k: v.detach().cpu() for k, v in teacher.state_dict().items()}}
    if class_weights is not None:
        data['class_weights'] = _checked_class_weights(class_weights, teacher.num_classes,
                                                       'class_weights').tolist()
    from .checkpoint import atomic_torch_save
    atomic_torch_save(data, path)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith('constants.pkl') or '/code/' in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_teacher(path: str, cfg: TeacherConfig | Mapping | None = None,
                 class_map: ClassMap | None = None, feature_stride: int | None = None,
                 device: str | torch.device = 'cpu') -> nn.Module:
    """Load a teacher in eval mode from a saved teacher, a bare state dict or TorchScript.

    - saved teacher (:func:`save_teacher`): config and class map come from the file; ``cfg``
      and ``class_map`` may be omitted (if given they must agree).
    - bare state dict (Teacher or torchvision key names): ``cfg`` is required.
    - TorchScript: the module must export ``features`` and have a 1x1 ``classifier``;
      ``feature_stride`` is read from the module's ``feature_stride`` attribute or passed.
    """
    if not os.path.isfile(path):
        raise TeacherError(f'teacher file not found: {path}')
    if cfg is not None and not isinstance(cfg, TeacherConfig):
        cfg = build(TeacherConfig, cfg)
    if _is_torchscript(path):
        module = torch.jit.load(path, map_location=device)
        stride = feature_stride or getattr(module, 'feature_stride', None)
        if stride is None:
            raise TeacherError(f'{path}: TorchScript teacher has no feature_stride attribute; '
                               'pass feature_stride')
        if class_map is None and hasattr(module, 'class_names'):   # cmkd teacher import
            class_map = ClassMap(tuple(module.class_names),
                                 tuple(tuple(c) for c in module.class_colors))
        teacher = ScriptedTeacher(module, int(stride), class_map)
        if class_map is not None and class_map.num_classes != teacher.num_classes:
            raise TeacherError(f'{path}: classifier has {teacher.num_classes} classes, class '
                               f'map {class_map.num_classes}')
        return teacher.to(device).eval()
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise TeacherError(f'{path}: not a teacher file loadable with weights_only=True '
                           f'({exc})') from None
    if isinstance(data, Mapping) and data.get('format') == TEACHER_FORMAT:
        file_cfg = build(TeacherConfig, data['config'])
        if cfg is not None and (cfg.arch, cfg.num_classes, cfg.feature_dim) != (
                file_cfg.arch, file_cfg.num_classes, file_cfg.feature_dim):
            raise TeacherError(f'{path}: holds a {file_cfg.arch} teacher with '
                               f'{file_cfg.num_classes} classes and D={file_cfg.feature_dim}, '
                               f'config asks for {cfg.arch}/{cfg.num_classes}/{cfg.feature_dim}')
        cfg = file_cfg
        if class_map is None and data.get('class_map'):
            class_map = ClassMap.from_dict(data['class_map'])
        state = data['state_dict']
        class_weights = data.get('class_weights')
    else:
        if cfg is None:
            raise TeacherError(f'{path}: a bare state dict needs a TeacherConfig')
        state = _read_state(path)
        class_weights = None
    # a file's own pretrained_path is irrelevant once its weights are loaded
    cfg = build(TeacherConfig, {**to_dict(cfg), 'pretrained_path': None})
    teacher = build_teacher(cfg, class_map)
    state = convert_torchvision_state_dict(state)
    own = teacher.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f'{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}' for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise TeacherError(f'{path}: weights do not fit a {cfg.arch} teacher with '
                           f'{cfg.num_classes} classes: missing {missing[:5]}, unexpected '
                           f'{unexpected[:5]}, shapes {wrong[:3]}')
    teacher.load_state_dict(state)
    teacher.class_weights = None if class_weights is None else _checked_class_weights(
        class_weights, cfg.num_classes, f'{path}: class_weights')
    return teacher.to(device).eval()


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the frozen teacher of distillation."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
