"""Teacher data and pretrained networks for the real data sets: nuImages and Cityscapes layouts
with their classes mapped onto nuScenes-16 / SemanticKITTI-19 (`cmkd train teacher`), and
`cmkd teacher import` of a torchvision DeepLabV3 state dict or a TorchScript network."""
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from fixtures.real_layouts import (NUIMAGES_CATEGORIES, build_cityscapes, build_nuimages,
                                   encode_coco_rle)
from cmkd_ros.classes import NUSCENES_LIDARSEG16, SEMANTICKITTI19
from cmkd_ros.models.teacher import build_teacher, load_teacher
from cmkd_ros.tools.cli import main as cmkd
from offline_training.readers.base import ReaderError
from offline_training.readers.images import (NuImagesDataset, build_image_dataset,
                                             decode_coco_rle)
from offline_training.readers.label_maps import CITYSCAPES, VOC
from offline_training.teacher_import import ABSENT_LOGIT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'config')
QUICK = ['steps=2', 'data.batch_size=2', 'threads=1', 'progress=false', 'model.arch=small',
         'model.width=8', 'model.feature_dim=8', 'model.output_stride=4',
         'model.pretrained_path=null', 'precision=float32', 'data.crop_size=[48, 64]',
         'data.cache_mb=0']


def test_coco_rle_decodes_the_compressed_strings():
    # worked by hand from pycocotools' format: runs 3, 2, 4, 1 -> '3', '2', '4', then
    # 1 - 2 = -1 stored as 31 (sign bit set, no continuation) -> chr(31 + 48) = 'O'
    mask = decode_coco_rle({'size': [2, 5], 'counts': '324O'})
    column_major = [0, 0, 0, 1, 1, 0, 0, 0, 0, 1]
    np.testing.assert_array_equal(mask, np.array(column_major, bool).reshape(5, 2).T)
    np.testing.assert_array_equal(decode_coco_rle({'size': [2, 5], 'counts': [3, 2, 4, 1]}),
                                  mask)
    rng = np.random.default_rng(0)
    for _ in range(5):                          # long runs need several 5-bit groups
        m = rng.random((40, 70)) < 0.5
        m[5:35, 10:60] = True
        import base64
        counts = base64.b64decode(encode_coco_rle(m)['counts'])
        np.testing.assert_array_equal(decode_coco_rle({'size': [40, 70], 'counts': counts}), m)
    with pytest.raises(ReaderError, match='runs sum to 9'):
        decode_coco_rle({'size': [2, 5], 'counts': [3, 2, 4]})


@pytest.fixture(scope='module')
def nuimages(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp('nuimages')
    return root, build_nuimages(root, data_dir)


@pytest.fixture(scope='module')
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('cityscapes')
    return root, build_cityscapes(root)


def test_nuimages_masks_from_annotations_and_mapping(nuimages):
    root, facts = nuimages
    raw = NuImagesDataset(str(root), 'v1.0-train')
    assert len(raw) == 2                                         # keyframes, not the sweeps
    assert raw.category_ids == {n: i for i, n in enumerate(NUIMAGES_CATEGORIES)}
    item = raw[0]
    assert item['image'].shape == (900, 1600, 3)
    np.testing.assert_array_equal(item['label'], facts['expected'])
    mapped = build_image_dataset('nuimages', str(root), '', 'val', 'nuscenes_lidarseg16')
    assert len(mapped) == 1                                      # v1.0-val
    label = mapped[0]['label']
    expect = np.full_like(label, 255)
    cats = facts['categories']
    for source, target in (('flat.driveable_surface', 'driveable_surface'),
                           ('vehicle.car', 'car'), ('human.pedestrian.adult', 'pedestrian')):
        expect[facts['expected'] == cats[source]] = NUSCENES_LIDARSEG16.index(target)
    np.testing.assert_array_equal(label, expect)
    kitti = build_image_dataset('nuimages', str(root), '', 'val', 'semantickitti19')[0]['label']
    assert set(np.unique(kitti)) == {SEMANTICKITTI19.index(n) for n in ('road', 'car',
                                                                        'person')} | {255}
    with pytest.raises(ReaderError, match=r"versions in .*\['v1.0-train', 'v1.0-val'\]"):
        NuImagesDataset(str(root), 'v1.0-mini')


def test_cityscapes_mapped_onto_lidar_classes_and_user_maps(cityscapes, tmp_path):
    root, facts = cityscapes
    ids = facts['label_ids']
    kitti = build_image_dataset('cityscapes', str(root), '', 'train', 'semantickitti19')
    assert len(kitti) == 2
    label = kitti[0]['label']
    for raw_id, name in ((7, 'road'), (8, 'sidewalk'), (11, 'building'), (21, 'vegetation'),
                         (26, 'car')):
        assert set(np.unique(label[ids == raw_id])) == {SEMANTICKITTI19.index(name)}
    assert set(np.unique(label[ids == 23])) == {255}                       # sky: no LiDAR class
    nus = build_image_dataset('cityscapes', str(root), 'val', 'val', 'nuscenes_lidarseg16')
    assert set(np.unique(nus[0]['label'][ids == 11])) == {NUSCENES_LIDARSEG16.index('manmade')}
    # a user's mapping file: only what it names is kept
    mine = tmp_path / 'map.yaml'
    mine.write_text(yaml.safe_dump({'map': {'road': 'driveable_surface', 'car': 'car'}}))
    only = build_image_dataset('cityscapes', str(root), '', 'train', 'nuscenes_lidarseg16',
                               str(mine))[0]['label']
    assert set(np.unique(only)) == {NUSCENES_LIDARSEG16.index('driveable_surface'),
                                    NUSCENES_LIDARSEG16.index('car'), 255}
    mine.write_text(yaml.safe_dump({'map': {'road': 'road'}}))
    with pytest.raises(ReaderError, match=r"target class\(es\) \['road'\] not in the LiDAR"):
        build_image_dataset('cityscapes', str(root), '', 'train', 'nuscenes_lidarseg16',
                            str(mine))
    mine.write_text(yaml.safe_dump({'map': {'street': 'car'}}))
    with pytest.raises(ReaderError, match=r"source class\(es\) \['street'\]"):
        build_image_dataset('cityscapes', str(root), '', 'train', 'semantickitti19', str(mine))
    with pytest.raises(ReaderError, match='no built-in mapping'):
        build_image_dataset('cityscapes', str(root), '', 'train', 'synthetic')


@pytest.mark.parametrize('config,data,class_map', [
    ('cityscapes_teacher.yaml', 'cityscapes', SEMANTICKITTI19),
    ('nuimages_teacher.yaml', 'nuimages', NUSCENES_LIDARSEG16)])
def test_train_teacher_on_real_layouts(request, tmp_path, capsys, config, data, class_map):
    root, _ = request.getfixturevalue(data)
    out = tmp_path / 'teacher'
    code = cmkd(['train', 'teacher', '--config', os.path.join(CONFIG, config), f'data.train={root}',
                 f'data.val={root}', f'out_dir={out}', *QUICK])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert 0.0 <= json.loads(printed.out.strip().splitlines()[-1])['miou'] <= 1.0
    teacher = load_teacher(str(out / 'teacher.pt'))
    assert teacher.class_map.names == class_map.names


def torchvision_layout(state):
    """Our DeepLabV3 keys renamed as torchvision's deeplabv3 state dict names them."""
    out = {}
    for key, value in state.items():
        if key.startswith('head.'):
            key = 'classifier.' + key[len('head.'):]
        elif key.startswith('classifier.'):
            key = 'classifier.4.' + key[len('classifier.'):]
        out[key] = value
    out['aux_classifier.4.weight'] = torch.zeros(21, 8, 1, 1)       # dropped on import
    return out


def test_import_torchvision_deeplabv3_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_teacher({'arch': 'deeplabv3_resnet18', 'num_classes': len(VOC),
                            'feature_dim': 16}).eval()
    with torch.no_grad():                       # distinct biases make the checks meaningful
        source.classifier.bias.copy_(torch.linspace(-1, 1, len(VOC)))
    weights = tmp_path / 'deeplabv3_voc.pth'
    torch.save(torchvision_layout(source.state_dict()), weights)
    out = tmp_path / 'teacher.pt'
    code = cmkd(['teacher', 'import', '--weights', str(weights), '--classes', 'voc',
                 '--class-map', 'nuscenes_lidarseg16', '--out', str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'motorcycle             <- motorbike' in printed
    assert 'never predicted (no source class): barrier' in printed
    teacher = load_teacher(str(out))
    assert teacher.arch == 'deeplabv3_resnet18' and teacher.feature_dim == 16
    assert teacher.class_map.names == NUSCENES_LIDARSEG16.names
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        feats = source.features(images)
        torch.testing.assert_close(teacher.features(images), feats)
        src_logits = source.classifier(feats)
        logits = teacher.classifier(feats)
    for voc, lidar in (('car', 'car'), ('motorbike', 'motorcycle'), ('person', 'pedestrian')):
        torch.testing.assert_close(logits[:, NUSCENES_LIDARSEG16.index(lidar)],
                                   src_logits[:, VOC.index(voc)])
    assert torch.all(logits[:, NUSCENES_LIDARSEG16.index('barrier')] == ABSENT_LOGIT)


def test_import_torchscript_and_distil_through_its_classifier(tmp_path, capsys, data_dir):
    torch.manual_seed(1)
    source = build_teacher({'arch': 'small', 'num_classes': len(CITYSCAPES), 'feature_dim': 8,
                            'width': 8}).eval()
    scripted = tmp_path / 'net.ts'
    module = torch.jit.script(source)
    torch.jit.save(module, str(scripted))
    out = tmp_path / 'teacher.ts'
    code = cmkd(['teacher', 'import', '--weights', str(scripted), '--classes', 'cityscapes',
                 '--class-map', 'semantickitti19', '--out', str(out)])
    assert code == 0, capsys.readouterr().err
    teacher = load_teacher(str(out))
    assert teacher.class_map.names == SEMANTICKITTI19.names and teacher.feature_stride == 4
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        feats = source.features(images)
        torch.testing.assert_close(teacher.features(images), feats)
        src, got = source.classifier(feats), teacher.classifier(feats)
    torch.testing.assert_close(got[:, SEMANTICKITTI19.index('car')],
                               src[:, CITYSCAPES.index('car')])
    # fence <- wall and fence: mean weights and bias, plus log 2
    pair = [CITYSCAPES.index('wall'), CITYSCAPES.index('fence')]
    w = source.classifier.weight[pair].mean(0, keepdim=True)
    b = source.classifier.bias[pair].mean() + math.log(2)
    want = torch.nn.functional.conv2d(feats, w)[:, 0] + b
    torch.testing.assert_close(got[:, SEMANTICKITTI19.index('fence')], want)
    # FSKD on SemanticKITTI through the imported classifier (shared and frozen)
    from fixtures.real_layouts import build_semantickitti
    root = tmp_path / 'kitti'
    build_semantickitti(root, data_dir, sequence='00', scans=1, points=3000)
    code = cmkd(['train', 'fskd', '--config', os.path.join(CONFIG, 'semantickitti_fskd.yaml'),
                 f'data.train={root}', f'teacher.checkpoint={out}', f'out_dir={tmp_path / "s"}',
                 'steps=1', 'student.arch=small', 'student.widths=[8,8,8,8,8,8,8,8,8]',
                 'student.da_layers=1', 'data.batch_size=1', 'threads=1', 'progress=false',
                 'data.num_workers=0'])
    assert code == 0, capsys.readouterr().err
    from cmkd_ros.models.checkpoint import load_checkpoint
    student, _ = load_checkpoint(tmp_path / 's' / 'student.pt')
    torch.testing.assert_close(student.classifier.weight.flatten(1),
                               teacher.classifier.weight.flatten(1))


class _TorchvisionStyle(torch.nn.Module):
    """A torchvision-style segmentation model: backbone(x)['out'], classifier sequence."""

    def __init__(self, classes: int):
        super().__init__()
        self.backbone = _Backbone()
        self.classifier = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1),
                                              torch.nn.ReLU(), torch.nn.Conv2d(6, classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {'out': self.classifier(self.backbone(x)['out'])}


class _Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {'out': self.conv(x)}


def test_import_torchvision_style_torchscript_and_errors(tmp_path, capsys):
    torch.manual_seed(2)
    net = _TorchvisionStyle(3).eval()
    scripted = tmp_path / 'tv.ts'
    torch.jit.save(torch.jit.script(net), str(scripted))
    mapping = tmp_path / 'map.yaml'
    mapping.write_text(yaml.safe_dump({'classes': ['road', 'car', 'sky'],
                                       'map': {'road': 'driveable_surface', 'car': 'car'}}))
    out = tmp_path / 'teacher.ts'
    code = cmkd(['teacher', 'import', '--weights', str(scripted), '--map', str(mapping),
                 '--class-map', 'nuscenes_lidarseg16', '--feature-stride', '2',
                 '--out', str(out)])
    assert code == 0, capsys.readouterr().err
    teacher = load_teacher(str(out))
    images = torch.rand(1, 3, 16, 20)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net.classifier[:2](net.backbone((images - mean) / std)['out'])
        torch.testing.assert_close(teacher.features(images), want)
        src = net.classifier[2](want)
        got = teacher.classifier(want)
    torch.testing.assert_close(got[:, NUSCENES_LIDARSEG16.index('car')], src[:, 1])
    assert teacher.feature_stride == 2
    # errors: a class list that does not fit the outputs, unknown names, no class list
    mapping.write_text(yaml.safe_dump({'classes': ['road', 'car'], 'map': {'car': 'car'}}))
    code = cmkd(['teacher', 'import', '--weights', str(scripted), '--map', str(mapping),
                 '--class-map', 'nuscenes_lidarseg16', '--out', str(out)])
    assert code == 2 and 'the network has 3 outputs, the class list 2' in capsys.readouterr().err
    code = cmkd(['teacher', 'import', '--weights', str(scripted), '--classes', 'ade20k',
                 '--class-map', 'nuscenes_lidarseg16', '--out', str(out)])
    assert code == 2 and "unknown class list 'ade20k'" in capsys.readouterr().err
    code = cmkd(['teacher', 'import', '--weights', str(scripted),
                 '--class-map', 'nuscenes_lidarseg16', '--out', str(out)])
    assert code == 2 and "name the network's classes" in capsys.readouterr().err
