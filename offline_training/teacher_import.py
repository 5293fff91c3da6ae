"""``cmkd teacher import``: a pretrained 2D network a user already has, as a teacher of the LiDAR
classes.

    cmkd teacher import --weights deeplabv3_resnet50_coco.pth --classes voc \
        --class-map nuscenes_lidarseg16 --out teacher.pt
    cmkd teacher import --weights my_cityscapes_net.pt --classes cityscapes \
        --class-map semantickitti19 --map my_map.yaml --out teacher.pt

Accepted networks:

- a torchvision DeepLabV3 state dict (``deeplabv3_resnet50``, or the same layout on ResNet-18),
  loaded into the project's own DeepLabV3 (torchvision is not needed); the result is a saved
  teacher (:func:`cmkd_ros.models.teacher.save_teacher`);
- a TorchScript file, either with a ``features(images)`` method and a 1x1 ``classifier`` (the
  project's contract, images RGB in [0, 1]) or a scripted torchvision-style segmentation model
  (``backbone(x)['out']`` then a ``classifier`` sequence ending in a 1x1 convolution, inputs
  normalised with ``--mean``/``--std``); the result is a TorchScript teacher.

The network's classes (``--classes``: ``voc``, ``cityscapes``, or the ``classes`` list of the
``--map`` file, in output order) are mapped onto the LiDAR class map by name (``--map`` YAML,
format in :mod:`offline_training.readers.label_maps`; built-in maps for voc and cityscapes).
The imported classifier is the 1x1 convolution the student shares: a LiDAR class fed by one
source class keeps that class's weights exactly; one fed by several gets their mean weights and
bias plus log(n) (a linear layer cannot add probabilities; this is exact where the members'
logits agree); a LiDAR class no source class maps to gets zero weights and a bias of
:data:`ABSENT_LOGIT`, so neither teacher nor student ever predicts it. Fine-tune the result on
labeled images to refit the classifier (state-dict imports): ``cmkd train teacher
model.pretrained_path=teacher.pt``.
"""

import argparse
import math
import os
import sys
from typing import List, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cmkd_ros.classes import ClassMap

ABSENT_LOGIT = -1000.0


class TeacherImportError(ValueError):
    """The network, its class list or the mapping cannot be imported."""


def merged_classifier(weight: torch.Tensor, bias: torch.Tensor | None,
                      source_names: Sequence[str], mapping: dict[str, str],
                      class_map: ClassMap) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(K, D, 1, 1) weight and (K,) bias over ``class_map`` from a (S, D, 1, 1) classifier over
    ``source_names``, and ``{LiDAR class: [source classes]}`` (see the module docstring)."""
    if weight.dim() != 4 or weight.shape[-2:] != (1, 1):
        raise TeacherImportError(f'the classifier must be a 1x1 convolution, weight shape '
                                 f'{tuple(weight.shape)}')
    if weight.shape[0] != len(source_names):
        raise TeacherImportError(f'the network has {weight.shape[0]} outputs, the class list '
                                 f'{len(source_names)} names')
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
    weight = weight.detach().float()
    out_w = torch.zeros((class_map.num_classes,) + tuple(weight.shape[1:]))
    out_b = torch.full((class_map.num_classes,), ABSENT_LOGIT)
    members = {}
    for c, target in enumerate(class_map.names):
        rows = [i for i, n in enumerate(source_names) if mapping.get(n) == target]
        members[target] = [source_names[i] for i in rows]
        if rows:
            out_w[c] = weight[rows].mean(0)
            out_b[c] = bias[rows].mean() + math.log(len(rows))
    return out_w, out_b, members


# ---------------------------------------------------------------------------------------------
# TorchScript wrappers: the Teacher interface (features, classifier, feature_stride) + classes


class _FeaturesMethod(nn.Module):
    """A scripted network's ``features()`` as ``forward`` (the project's contract)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class _BackboneHead(nn.Module):
    """torchvision style: ``head(backbone(x)['out'])``."""

    def __init__(self, backbone, head: nn.Sequential):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)['out'])


class _ImportedTeacher(nn.Module):
    """``features`` = body((images - mean) / std), the merged classifier, the LiDAR classes."""

    feature_stride: int
    class_names: List[str]
    class_colors: List[List[int]]

    def __init__(self, body: nn.Module, classifier: nn.Conv2d, stride: int,
                 mean: Sequence[float], std: Sequence[float], class_map: ClassMap):
        super().__init__()
        self.body = body
        self.classifier = classifier
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.feature_stride = int(stride)
        self.class_names = list(class_map.names)
        self.class_colors = [list(c) for c in class_map.colors]

    @torch.jit.export
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.body((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(images))
        return F.interpolate(logits, size=[images.shape[-2], images.shape[-1]],
                             mode='bilinear', align_corners=False)


def _conv1x1(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


# ---------------------------------------------------------------------------------------------
# Import


def _arch_of(state: dict) -> str:
    """deeplabv3_resnet50 or deeplabv3_resnet18 from the backbone's keys."""
    blocks = {int(k.split('.')[2]) for k in state if k.startswith('backbone.layer3.')}
    bottleneck = 'backbone.layer1.0.conv3.weight' in state
    if bottleneck and len(blocks) == 6:
        return 'deeplabv3_resnet50'
    if not bottleneck and len(blocks) == 2:
        return 'deeplabv3_resnet18'
    raise TeacherImportError(f'the backbone is neither ResNet-50 nor ResNet-18 ({len(blocks)} '
                             'blocks in layer3); supported: deeplabv3_resnet50, '
                             'deeplabv3_resnet18')


def import_state_dict(path: str, source_names: Sequence[str], mapping: dict[str, str],
                      class_map: ClassMap, out: str, output_stride: int = 8) -> dict:
    """A torchvision DeepLabV3 state dict as a saved teacher of ``class_map`` at ``out``."""
    from cmkd_ros.config import build
    from cmkd_ros.models.teacher import (TeacherConfig, build_teacher,
                                         convert_torchvision_state_dict, save_teacher)
    try:
        raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:                 # unpickling errors come in several types
        raise TeacherImportError(f'{path}: not a state dict loadable with weights_only=True '
                                 f'({exc})') from None
    for key in ('model', 'state_dict'):      # torchvision's reference scripts save {'model': }
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor)
                                               for v in raw.values()):
        raise TeacherImportError(f'{path}: expected a state dict (name -> tensor)')
    state = convert_torchvision_state_dict(raw)
    if 'classifier.weight' not in state:
        raise TeacherImportError(f'{path}: no DeepLabV3 classifier (classifier.4.weight) in the '
                                 f'state dict (first keys: {list(state)[:4]})')
    weight, bias = state.pop('classifier.weight'), state.pop('classifier.bias', None)
    arch = _arch_of(state)
    cfg = build(TeacherConfig, {'arch': arch, 'num_classes': class_map.num_classes,
                                'feature_dim': int(weight.shape[1]),
                                'output_stride': output_stride})
    teacher = build_teacher(cfg, class_map)
    own = {k for k in teacher.state_dict() if not k.startswith('classifier.')}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    wrong = [k for k in own & set(state)
             if tuple(state[k].shape) != tuple(teacher.state_dict()[k].shape)]
    if missing or unexpected or wrong:
        raise TeacherImportError(f'{path}: does not fit {arch}: missing {missing[:4]}, unexpected '
                                 f'{unexpected[:4]}, shapes differ for {wrong[:4]}')
    w, b, members = merged_classifier(weight, bias, source_names, mapping, class_map)
    state['classifier.weight'], state['classifier.bias'] = w, b
    teacher.load_state_dict(state)
    save_teacher(teacher.eval(), out, class_map)
    return {'kind': 'state_dict', 'arch': arch, 'members': members,
            'feature_dim': int(weight.shape[1])}


def import_torchscript(path: str, source_names: Sequence[str], mapping: dict[str, str],
                       class_map: ClassMap, out: str, feature_stride: int | None = None,
                       mean: Sequence[float] = (0.485, 0.456, 0.406),
                       std: Sequence[float] = (0.229, 0.224, 0.225)) -> dict:
    """A TorchScript network as a TorchScript teacher of ``class_map`` at ``out``."""
    net = torch.jit.load(path, map_location='cpu')
    if not hasattr(net, 'classifier'):
        raise TeacherImportError(f'{path}: the TorchScript module has no classifier submodule')
    if hasattr(net, 'features'):
        last = net.classifier
        style = 'features'
    elif hasattr(net, 'backbone'):
        children = list(net.classifier.children())
        if not children:
            raise TeacherImportError(f'{path}: classifier is not a sequence of layers')
        last, head = children[-1], nn.Sequential(*children[:-1])
        style = 'backbone'
    else:
        raise TeacherImportError(f'{path}: expected a features() method or a backbone submodule '
                                 'next to the classifier')
    if not hasattr(last, 'weight'):
        raise TeacherImportError(f'{path}: the last classifier layer has no weight')
    stride = feature_stride or getattr(net, 'feature_stride', None) or 8
    w, b, members = merged_classifier(last.weight, getattr(last, 'bias', None), source_names,
                                      mapping, class_map)
    classifier = _conv1x1(w.flatten(1)[:, :, None, None], b)
    if style == 'features':                  # images in [0, 1], no normalisation here
        wrapper = _ImportedTeacher(_FeaturesMethod(net), classifier, stride, (0.0, 0.0, 0.0),
                                   (1.0, 1.0, 1.0), class_map)
    else:
        wrapper = _ImportedTeacher(_BackboneHead(net.backbone, head), classifier, stride, mean,
                                   std, class_map)
    scripted = torch.jit.script(wrapper.eval())
    tmp = f'{out}.tmp.{os.getpid()}'
    torch.jit.save(scripted, tmp)
    os.replace(tmp, out)
    return {'kind': f'torchscript ({style})', 'members': members,
            'feature_dim': int(w.shape[1]), 'feature_stride': int(stride)}


def resolve_classes(classes: str, map_path: str, class_map_name: str
                    ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(source class names in output order, mapping) from the command-line options."""
    from offline_training.readers import label_maps
    file_classes, mapping = (label_maps.read_mapping_file(map_path) if map_path
                             else (None, None))
    if classes:
        if classes not in label_maps.SOURCE_CLASSES:
            raise TeacherImportError(f'--classes: unknown class list {classes!r}; built-in: '
                                     f'{sorted(label_maps.SOURCE_CLASSES)} (or give them in the '
                                     '--map file under "classes")')
        names = label_maps.SOURCE_CLASSES[classes]
        if file_classes is not None and tuple(file_classes) != names:
            raise TeacherImportError(f'--classes {classes} and the classes of {map_path} differ')
    elif file_classes is not None:
        names = file_classes
    else:
        raise TeacherImportError('name the network\'s classes: --classes voc|cityscapes, or a '
                                 '"classes" list in the --map file')
    if mapping is None:
        mapping = label_maps.builtin_mapping(classes, class_map_name)
        mapping = {k: v for k, v in mapping.items() if k in names}
    return names, mapping


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument('action', choices=('import',), help='import a pretrained network')
    parser.add_argument('--weights', required=True,
                        help='torchvision DeepLabV3 state dict (.pth) or TorchScript file')
    parser.add_argument('--class-map', required=True,
                        help='LiDAR class map: nuscenes_lidarseg16 or semantickitti19')
    parser.add_argument('--classes', default='',
                        help="the network's classes: voc (torchvision's pretrained DeepLabV3), "
                        'cityscapes (19 train ids); default: the "classes" of --map')
    parser.add_argument('--map', default='',
                        help='YAML mapping of the network\'s classes onto the LiDAR classes '
                        '(default: the built-in one for --classes)')
    parser.add_argument('--out', required=True, help='teacher file to write')
    parser.add_argument('--output-stride', type=int, default=8, choices=(8, 16),
                        help='DeepLabV3 state dicts: the dilation setting it was trained with '
                        '(torchvision: 8)')
    parser.add_argument('--feature-stride', type=int, default=None,
                        help='TorchScript: the stride of its features (default: its '
                        'feature_stride attribute, else 8)')
    parser.add_argument('--mean', type=float, nargs=3, default=(0.485, 0.456, 0.406),
                        help='torchvision-style TorchScript: RGB mean of its input '
                        'normalisation (default ImageNet)')
    parser.add_argument('--std', type=float, nargs=3, default=(0.229, 0.224, 0.225),
                        help='torchvision-style TorchScript: RGB std (default ImageNet)')


def run(args: argparse.Namespace) -> int:
    from cmkd_ros.classes import get_class_map
    from cmkd_ros.models.teacher import _is_torchscript, load_teacher
    try:
        class_map = get_class_map(args.class_map)
        names, mapping = resolve_classes(args.classes, args.map, args.class_map)
        from offline_training.readers.label_maps import check_mapping
        check_mapping(names, mapping, class_map, args.map or f'built-in {args.classes} map')
        if not os.path.isfile(args.weights):
            raise TeacherImportError(f'weights file not found: {args.weights}')
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if _is_torchscript(args.weights):
            info = import_torchscript(args.weights, names, mapping, class_map, args.out,
                                      args.feature_stride, args.mean, args.std)
        else:
            info = import_state_dict(args.weights, names, mapping, class_map, args.out,
                                     args.output_stride)
        teacher = load_teacher(args.out)                   # what training will load
    except (ValueError, RuntimeError) as exc:
        print(f'cmkd teacher import: {exc}', file=sys.stderr)
        return 2
    print(f'wrote {args.out}: {info["kind"]} teacher, D={info["feature_dim"]}, '
          f'{teacher.num_classes} classes of {args.class_map}')
    absent = [c for c, m in info['members'].items() if not m]
    for target, sources in info['members'].items():
        if sources:
            print(f'  {target:<22} <- {", ".join(sources)}')
    if absent:
        print(f'  never predicted (no source class): {", ".join(absent)}')
    return 0
