"""Labeled 2D images for teacher training: pair datasets, Cityscapes and folder layouts.

Every dataset here is a map-style dataset of dicts ``{'image': (H, W, 3) uint8 RGB, 'label':
(H, W) uint8 class ids (255 = ignore), 'name': str}``. ``label_lut`` (256,) uint8 optionally
remaps the stored ids to the teacher's classes (e.g. Cityscapes train ids to another class map).

- :class:`PairImageDataset`: every (pair, camera) image with a label image of a pair dataset
  (the synthetic export writes them).
- :class:`CityscapesDataset`: ``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<x>_gtFine_labelTrainIds.png`` (made by cityscapesScripts'
  createTrainIdLabelImgs); when only ``*_gtFine_labelIds.png`` exist they are mapped to the 19
  train ids here.
- :class:`NuImagesDataset`: nuImages as published (``<version>/*.json`` tables with RLE masks
  of objects and surfaces, ``samples/CAM_*/*.jpg``), the semantic mask drawn from them.
- :class:`FolderImageDataset`: an image folder and a semantic mask folder with the same relative
  file stems (exports, Mapillary-style layouts).

:func:`build_image_dataset` picks one for ``cmkd train teacher`` (``format``), with the labels
mapped onto a LiDAR class set (:mod:`offline_training.readers.label_maps`).
"""
from __future__ import annotations

import base64
import os
from typing import Sequence

import numpy as np

from cmkd_ros.pairs import PairReader
from offline_training.readers.base import ReaderError, read_json_table

IGNORE = 255
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Cityscapes label id -> train id (19 evaluated classes; every other id is ignored).
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                            23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17,
                            33: 18}
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic_light',
                      'traffic_sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
                      'truck', 'bus', 'train', 'motorcycle', 'bicycle')


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """(256,) uint8 lookup table from ``{stored id: class id}``; other ids map to 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for src, dst in mapping.items():
        if not (0 <= int(src) <= 255 and 0 <= int(dst) <= 255):
            raise ReaderError(f'label mapping {src} -> {dst} is outside 0..255')
        lut[int(src)] = int(dst)
    return lut


def _read_rgb(path: str) -> np.ndarray:
    import cv2
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ReaderError(f'not a readable image: {path}')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _read_mask(path: str) -> np.ndarray:
    import cv2
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ReaderError(f'not a readable mask: {path}')
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ReaderError(f'{path}: a semantic mask must be single-channel 8-bit, got shape '
                          f'{mask.shape} {mask.dtype}')
    return mask


class _LabeledImages:
    label_lut: np.ndarray | None = None
    items: list

    def __len__(self) -> int:
        return len(self.items)

    def _finish(self, image: np.ndarray, label: np.ndarray, name: str) -> dict:
        if image.shape[:2] != label.shape:
            raise ReaderError(f'{name}: image {image.shape[:2]} and label {label.shape} sizes '
                              'differ')
        if self.label_lut is not None:
            label = self.label_lut[label]
        return {'image': image, 'label': label, 'name': name}


class PairImageDataset(_LabeledImages):
    """(pair, camera) images with label images from a pair dataset (``cmkd_ros.pairs``)."""

    def __init__(self, root: str, cameras: Sequence[str] | None = None,
                 label_lut: np.ndarray | None = None):
        self.reader = PairReader(root)
        self.cameras = tuple(cameras) if cameras else None
        self.label_lut = label_lut
        self.items: list[tuple[int, str]] = []
        self.refresh()
        if not self.items:
            raise ReaderError(f'{root}: no pair with camera images')

    def refresh(self) -> int:
        """Pick up pairs written since the last call; returns how many images were added."""
        self.reader.refresh()
        done = {i for i, _ in self.items}
        before = len(self.items)
        for index, entry in enumerate(self.reader.entries):
            if index in done:
                continue
            for cam in entry.get('cameras', []):
                if self.cameras is None or cam in self.cameras:
                    self.items.append((index, cam))
        return len(self.items) - before

    def __getitem__(self, i: int) -> dict:
        index, cam = self.items[i]
        pair = self.reader[index]
        if cam not in pair.label_images:
            raise ReaderError(f'{self.reader.root} pair {index}: camera {cam!r} has no label '
                              'image (teacher training needs labeled images)')
        return self._finish(pair.image(cam), pair.label_image(cam), f'{index}/{cam}')


class CityscapesDataset(_LabeledImages):
    """Cityscapes fine annotations of one split as 19 train ids (255 ignore)."""

    def __init__(self, root: str, split: str = 'train', label_lut: np.ndarray | None = None):
        image_root = os.path.join(root, 'leftImg8bit', split)
        label_root = os.path.join(root, 'gtFine', split)
        for folder in (image_root, label_root):
            if not os.path.isdir(folder):
                raise ReaderError(f'Cityscapes folder not found: {folder}')
        self.label_lut = label_lut
        self.items: list[tuple[str, str, bool]] = []
        for city in sorted(os.listdir(image_root)):
            for name in sorted(os.listdir(os.path.join(image_root, city))):
                if not name.endswith('_leftImg8bit.png'):
                    continue
                stem = name[:-len('_leftImg8bit.png')]
                train_ids = os.path.join(label_root, city, f'{stem}_gtFine_labelTrainIds.png')
                label_ids = os.path.join(label_root, city, f'{stem}_gtFine_labelIds.png')
                if os.path.exists(train_ids):
                    self.items.append((os.path.join(image_root, city, name), train_ids, False))
                elif os.path.exists(label_ids):
                    self.items.append((os.path.join(image_root, city, name), label_ids, True))
                else:
                    raise ReaderError(f'no gtFine label for {city}/{name}')
        if not self.items:
            raise ReaderError(f'no *_leftImg8bit.png images under {image_root}')
        self._id_lut = make_lut(CITYSCAPES_ID_TO_TRAINID)

    def __getitem__(self, i: int) -> dict:
        image_path, label_path, from_ids = self.items[i]
        label = _read_mask(label_path)
        if from_ids:
            label = self._id_lut[label]
        name = os.path.basename(image_path)[:-len('_leftImg8bit.png')]
        return self._finish(_read_rgb(image_path), label, name)


class FolderImageDataset(_LabeledImages):
    """Images under ``image_dir`` paired with single-channel PNG masks under ``mask_dir``.

    Files are matched by relative path without extension (``a/b.jpg`` <-> ``a/b.png``);
    ``mask_suffix`` is appended to the stem of mask names (e.g. ``'_mask'``).
    """

    def __init__(self, image_dir: str, mask_dir: str, mask_suffix: str = '',
                 label_lut: np.ndarray | None = None):
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise ReaderError(f'folder not found: {folder}')
        self.label_lut = label_lut
        self.items: list[tuple[str, str]] = []
        missing = []
        for dirpath, _, files in os.walk(image_dir):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, stem), image_dir)
                mask = os.path.join(mask_dir, rel + mask_suffix + '.png')
                if os.path.exists(mask):
                    self.items.append((os.path.join(dirpath, name), mask))
                else:
                    missing.append(rel)
        self.items.sort()
        if missing:
            raise ReaderError(f'{len(missing)} image(s) without a mask in {mask_dir}, e.g. '
                              f'{missing[:3]}')
        if not self.items:
            raise ReaderError(f'no images under {image_dir}')

    def __getitem__(self, i: int) -> dict:
        image_path, mask_path = self.items[i]
        return self._finish(_read_rgb(image_path), _read_mask(mask_path),
                            os.path.basename(image_path))


def decode_coco_rle(mask: dict) -> np.ndarray:
    """(H, W) bool of a COCO run-length mask ``{'size': [H, W], 'counts': ...}``.

    ``counts`` is the compressed string of pycocotools (as str or bytes; nuImages stores it
    base64-encoded, which :class:`NuImagesDataset` undoes) or a list of run lengths. Runs
    alternate 0 and 1 starting with 0, in column-major order.
    """
    h, w = (int(v) for v in mask['size'])
    counts = mask['counts']
    if isinstance(counts, (str, bytes)):
        data = counts.encode('ascii') if isinstance(counts, str) else counts
        runs, p = [], 0
        while p < len(data):
            value, shift, more = 0, 0, True
            while more:
                c = data[p] - 48
                value |= (c & 0x1F) << shift
                more = bool(c & 0x20)
                p += 1
                shift += 5
                if not more and c & 0x10:
                    value |= -1 << shift           # negative: sign-extend
            if len(runs) > 2:
                value += runs[-2]                  # stored as a difference to two runs back
            runs.append(value)
    else:
        runs = [int(v) for v in counts]
    runs = np.asarray(runs, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise ReaderError(f'RLE mask: runs sum to {int(runs.sum())} for a {h}x{w} mask')
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(w, h).T


class NuImagesDataset(_LabeledImages):
    """nuImages keyframes (``root/<version>/``: sample_data, object_ann, surface_ann, category
    tables; images under ``root/samples/``) with a semantic mask drawn from their annotations:
    surfaces first, then objects over them; unannotated pixels are 255 (nuImages labels objects
    and the driveable surface only). Label ids are category indices in the category table
    (``category_ids``: name -> id); ``label_lut`` maps them on.
    """

    def __init__(self, root: str, version: str = 'v1.0-train',
                 label_lut: np.ndarray | None = None):
        folder = os.path.join(root, version)
        if not os.path.isdir(folder):
            found = sorted(n for n in os.listdir(root) if n.startswith('v1.0')) \
                if os.path.isdir(root) else []
            raise ReaderError(f'nuImages table folder not found: {folder} (versions in {root}: '
                              f'{found or "none"})')
        self.root = root
        self.label_lut = label_lut
        tables = {name: read_json_table(os.path.join(folder, f'{name}.json'), 'nuImages')
                  for name in ('sample_data', 'object_ann', 'surface_ann', 'category')}
        if len(tables['category']) > 255:
            raise ReaderError(f'{folder}: {len(tables["category"])} categories do not fit uint8')
        self.category_ids = {c['name']: i for i, c in enumerate(tables['category'])}
        by_token = {c['token']: i for i, c in enumerate(tables['category'])}
        self.annotations: dict[str, list[tuple[int, dict]]] = {}
        for table in ('surface_ann', 'object_ann'):          # objects are drawn last, on top
            for ann in tables[table]:
                if ann.get('mask') is None:
                    continue
                if ann['category_token'] not in by_token:
                    raise ReaderError(f'{table} {ann.get("token")}: unknown category')
                self.annotations.setdefault(ann['sample_data_token'], []).append(
                    (by_token[ann['category_token']], ann['mask']))
        self.items = sorted((sd['filename'], sd['token']) for sd in tables['sample_data']
                            if sd.get('is_key_frame', False))
        if not self.items:
            raise ReaderError(f'no keyframe in {folder}/sample_data.json')

    def __getitem__(self, i: int) -> dict:
        filename, token = self.items[i]
        path = os.path.join(self.root, filename)
        if not os.path.exists(path):
            raise ReaderError(f'nuImages file missing: {path}')
        image = _read_rgb(path)
        label = np.full(image.shape[:2], IGNORE, dtype=np.uint8)
        for category, mask in self.annotations.get(token, []):
            counts = mask['counts']
            if isinstance(counts, str):                     # nuImages: base64 of the RLE
                counts = base64.b64decode(counts)
            pixels = decode_coco_rle({'size': mask['size'], 'counts': counts})
            if pixels.shape != label.shape:
                raise ReaderError(f'{filename}: mask {pixels.shape} differs from the image '
                                  f'{label.shape}')
            label[pixels] = category
        return self._finish(image, label, os.path.basename(filename))


IMAGE_FORMATS = ('pairs', 'cityscapes', 'nuimages')


def build_image_dataset(fmt: str, root: str, split: str, part: str, class_map_name: str,
                        label_map: str = ''):
    """The labeled images of ``root`` for the teacher, labels in class map ``class_map_name``.

    ``fmt``: pairs (labels already in the class map), cityscapes (``split`` folder, default
    ``part``: train or val) or nuimages (``split`` = version folder, default
    ``v1.0-<part>``). ``label_map``: a YAML mapping file of the source classes onto the class
    map (:mod:`.label_maps`); empty: the built-in one for (fmt, class map).
    """
    from cmkd_ros.classes import get_class_map
    from offline_training.readers import label_maps
    if fmt == 'pairs':
        if label_map or split:
            raise ReaderError('label_map and the split keys are for the cityscapes and '
                              'nuimages formats (pair labels are already in the class map)')
        return PairImageDataset(root)
    if fmt not in IMAGE_FORMATS:
        raise ReaderError(f'unknown image format {fmt!r}; known: {list(IMAGE_FORMATS)}')
    class_map = get_class_map(class_map_name)
    mapping, strict = label_maps.resolve_mapping(fmt, class_map_name, label_map)
    where = label_map or f'built-in {fmt} -> {class_map_name} mapping'
    if fmt == 'cityscapes':
        ids = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}
        lut = label_maps.mapping_lut(ids, mapping, class_map, where, strict)
        return CityscapesDataset(root, split or part, label_lut=lut)
    dataset = NuImagesDataset(root, split or f'v1.0-{part}')
    dataset.label_lut = label_maps.mapping_lut(dataset.category_ids, mapping, class_map, where,
                                               strict)
    return dataset
