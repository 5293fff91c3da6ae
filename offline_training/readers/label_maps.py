"""Class maps from 2D label sets onto the LiDAR class sets (nuScenes-16, SemanticKITTI-19).

A teacher for a LiDAR data set must predict that data set's classes, so the labels of the images
it learns from (Cityscapes, nuImages) or the outputs of a pretrained network are mapped onto them
by class name. Built-in mappings (:data:`BUILTIN`) cover Cityscapes' 19 train ids, nuImages'
categories and the 21 Pascal VOC classes of torchvision's pretrained DeepLabV3; a YAML file
overrides them::

    classes: [road, sidewalk, building]   # the source classes in output order (networks only)
    map:                                  # source class -> LiDAR class; unlisted: left out
      road: driveable_surface
      sidewalk: sidewalk
      building: manmade

Left-out source classes become ignored pixels (training) or dropped outputs (an imported
network). LiDAR classes no source maps to are never predicted by such a teacher: e.g. nuImages
annotates objects and the driveable surface only, not sidewalk, terrain, manmade or vegetation.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cmkd_ros.classes import ClassMap
from offline_training.readers.base import ReaderError
from offline_training.readers.images import CITYSCAPES_CLASSES
from offline_training.readers.nuscenes import GENERAL_TO_CHALLENGE

IGNORE = 255

CITYSCAPES = CITYSCAPES_CLASSES     # the 19 evaluated classes in train-id order
# Pascal VOC's 21 outputs, the categories of torchvision's pretrained DeepLabV3 weights.
VOC = ('__background__', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
       'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
       'sheep', 'sofa', 'train', 'tvmonitor')
SOURCE_CLASSES = {'cityscapes': CITYSCAPES, 'voc': VOC}

_CITYSCAPES_TO_NUSCENES = {
    'road': 'driveable_surface', 'sidewalk': 'sidewalk', 'building': 'manmade',
    'wall': 'manmade', 'fence': 'manmade', 'pole': 'manmade', 'traffic_light': 'manmade',
    'traffic_sign': 'manmade', 'vegetation': 'vegetation', 'terrain': 'terrain',
    'person': 'pedestrian',
    'rider': 'bicycle',            # nuScenes boxes a cyclist with the bicycle (most riders)
    'car': 'car', 'truck': 'truck', 'bus': 'bus', 'motorcycle': 'motorcycle',
    'bicycle': 'bicycle',
}                                  # sky (no LiDAR return) and train (no nuScenes class): out
_CITYSCAPES_TO_KITTI = {
    'road': 'road', 'sidewalk': 'sidewalk', 'building': 'building',
    'wall': 'fence',               # SemanticKITTI: fence includes small walls
    'fence': 'fence', 'pole': 'pole', 'traffic_sign': 'traffic-sign',
    'vegetation': 'vegetation', 'terrain': 'terrain', 'person': 'person',
    'rider': 'bicyclist',          # the common rider; Cityscapes does not tell motorcyclists
    'car': 'car', 'truck': 'truck', 'bus': 'other-vehicle', 'train': 'other-vehicle',
    'motorcycle': 'motorcycle', 'bicycle': 'bicycle',
}                                  # sky and traffic_light (no SemanticKITTI class): out
# nuImages uses nuScenes' general categories: merged as the lidarseg challenge merges them.
_NUIMAGES_TO_NUSCENES = GENERAL_TO_CHALLENGE
_NUIMAGES_TO_KITTI = {
    'movable_object.barrier': 'fence', 'vehicle.bicycle': 'bicycle',
    'vehicle.bus.bendy': 'other-vehicle', 'vehicle.bus.rigid': 'other-vehicle',
    'vehicle.car': 'car', 'vehicle.construction': 'other-vehicle',
    'vehicle.motorcycle': 'motorcycle', 'human.pedestrian.adult': 'person',
    'human.pedestrian.child': 'person', 'human.pedestrian.construction_worker': 'person',
    'human.pedestrian.police_officer': 'person', 'vehicle.trailer': 'other-vehicle',
    'vehicle.truck': 'truck', 'flat.driveable_surface': 'road',
}
_VOC_TO_NUSCENES = {'bicycle': 'bicycle', 'bus': 'bus', 'car': 'car', 'motorbike': 'motorcycle',
                    'person': 'pedestrian'}
_VOC_TO_KITTI = {'bicycle': 'bicycle', 'bus': 'other-vehicle', 'car': 'car',
                 'motorbike': 'motorcycle', 'person': 'person', 'train': 'other-vehicle'}

# (source label set, LiDAR class map name) -> {source class: LiDAR class}
BUILTIN = {
    ('cityscapes', 'nuscenes_lidarseg16'): _CITYSCAPES_TO_NUSCENES,
    ('cityscapes', 'semantickitti19'): _CITYSCAPES_TO_KITTI,
    ('nuimages', 'nuscenes_lidarseg16'): _NUIMAGES_TO_NUSCENES,
    ('nuimages', 'semantickitti19'): _NUIMAGES_TO_KITTI,
    ('voc', 'nuscenes_lidarseg16'): _VOC_TO_NUSCENES,
    ('voc', 'semantickitti19'): _VOC_TO_KITTI,
}


def builtin_mapping(source: str, class_map_name: str) -> dict[str, str]:
    """The built-in mapping of label set ``source`` onto class map ``class_map_name`` (it may
    name source classes a data set lacks: :func:`mapping_lut` skips those)."""
    try:
        return dict(BUILTIN[(source, class_map_name)])
    except KeyError:
        known = sorted({s for s, _ in BUILTIN}), sorted({c for _, c in BUILTIN})
        raise ReaderError(f'no built-in mapping from {source!r} onto {class_map_name!r} '
                          f'(built-in: {known[0]} onto {known[1]}); write a YAML mapping '
                          '(offline_training/readers/label_maps.py shows the format)') from None


def read_mapping_file(path: str) -> tuple[tuple[str, ...] | None, dict[str, str]]:
    """(classes or None, map) of a YAML mapping file (format in the module docstring)."""
    from cmkd_ros.config import load_yaml
    data = load_yaml(path)
    if not isinstance(data.get('map'), Mapping):
        raise ReaderError(f'{path}: expected a mapping with a "map" of source class -> LiDAR '
                          'class (and optionally "classes")')
    unknown = sorted(set(data) - {'classes', 'map'})
    if unknown:
        raise ReaderError(f'{path}: unknown key(s) {unknown}; expected classes and map')
    classes = data.get('classes')
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ReaderError(f'{path}: classes must be a list of class names')
        if len(set(classes)) != len(classes):
            raise ReaderError(f'{path}: classes has duplicates')
        classes = tuple(classes)
    mapping = {}
    for src, dst in data['map'].items():
        if not isinstance(dst, str):
            raise ReaderError(f'{path}: map.{src} must name one LiDAR class, got {dst!r}')
        mapping[str(src)] = dst
    return classes, mapping


def check_mapping(source_names: Sequence[str], mapping: Mapping[str, str],
                  class_map: ClassMap, where: str = 'mapping') -> None:
    """Every mapped source class exists in ``source_names``, every target in ``class_map``."""
    unknown = sorted(set(mapping) - set(source_names))
    if unknown:
        raise ReaderError(f'{where}: source class(es) {unknown} not among '
                          f'{list(source_names)[:25]}')
    wrong = sorted({t for t in mapping.values() if t not in class_map.names})
    if wrong:
        raise ReaderError(f'{where}: target class(es) {wrong} not in the LiDAR classes '
                          f'{list(class_map.names)}')
    if not mapping:
        raise ReaderError(f'{where}: maps no class')


def mapping_lut(source_ids: Mapping[str, int], mapping: Mapping[str, str],
                class_map: ClassMap, where: str = 'mapping', strict: bool = True) -> np.ndarray:
    """(256,) uint8 lookup: stored source id -> LiDAR class id (255 where unmapped).

    ``source_ids``: source class name -> the id stored in the label images. ``strict``: a
    mapped source class the data lacks is an error (a user's file); else it is skipped (the
    built-in maps).
    """
    if not strict:
        mapping = {k: v for k, v in mapping.items() if k in source_ids}
    check_mapping(list(source_ids), mapping, class_map, where)
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for name, target in mapping.items():
        lut[int(source_ids[name])] = class_map.index(target)
    return lut


def resolve_mapping(source: str, class_map_name: str, path: str = ''
                    ) -> tuple[dict[str, str], bool]:
    """(mapping, strict): the file at ``path`` when given (strict), else the built-in one."""
    if path:
        return read_mapping_file(path)[1], True
    return builtin_mapping(source, class_map_name), False
