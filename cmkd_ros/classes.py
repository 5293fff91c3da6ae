"""Class maps: the names and display colors of a label set, plus the ignore index.

A checkpoint stores its class map (``to_dict``) so a node can label and color points from the
checkpoint alone. Built-in maps: ``SYNTHETIC`` (the synthetic world of :mod:`cmkd_ros.sim`),
``NUSCENES_LIDARSEG16`` (the nuScenes lidarseg challenge's 16 classes) and ``SEMANTICKITTI19``
(the SemanticKITTI single-scan benchmark's 19 classes), in their standard order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255
# Color of ignored / unknown labels in colorize().
IGNORE_COLOR = (0, 0, 0)


class ClassMapError(ValueError):
    """A class map is malformed (duplicate names, wrong color count, bad ignore index)."""


@dataclass(frozen=True)
class ClassMap:
    """Class names in label order and one RGB color per class.

    ``names`` (K,) strings, label ``i`` is ``names[i]``; ``colors`` (K,) RGB triples of 0..255;
    ``ignore_index`` marks unlabeled points/pixels (must not be a valid class id).
    """

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        object.__setattr__(self, 'names', tuple(str(n) for n in self.names))
        try:
            colors = tuple(tuple(int(v) for v in c) for c in self.colors)
        except (TypeError, ValueError):
            raise ClassMapError('colors must be a list of [r, g, b] integer triples') from None
        object.__setattr__(self, 'colors', colors)
        if not self.names:
            raise ClassMapError('a class map needs at least one class')
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ClassMapError(f'class names must be unique; duplicated: {dup}')
        if len(colors) != len(self.names):
            raise ClassMapError(f'{len(self.names)} class names but {len(colors)} colors')
        for name, color in zip(self.names, colors):
            if len(color) != 3 or not all(0 <= v <= 255 for v in color):
                raise ClassMapError(f'class {name!r}: color {color} is not an RGB triple 0..255')
        if not 0 <= int(self.ignore_index) <= 255 or int(self.ignore_index) < len(self.names):
            raise ClassMapError(f'ignore_index {self.ignore_index} must be in '
                                f'[{len(self.names)}, 255] (outside the class ids)')
        if len(self.names) > 255:
            raise ClassMapError('at most 255 classes fit uint8 labels')

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Label id of class ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ClassMapError(f'no class named {name!r}; have {list(self.names)}') from None

    def palette(self) -> np.ndarray:
        """(256, 3) uint8 lookup table: class colors, then IGNORE_COLOR for every other id."""
        table = np.empty((256, 3), dtype=np.uint8)
        table[:] = IGNORE_COLOR
        table[:len(self.colors)] = np.asarray(self.colors, dtype=np.uint8)
        return table

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Colors of ``labels`` (any shape, integer ids) -> shape + (3,) uint8 RGB.

        Ids outside [0, K) (the ignore index included) get IGNORE_COLOR.
        """
        labels = np.asarray(labels)
        if labels.dtype.kind not in 'iub':
            raise ClassMapError(f'labels must be integers, got dtype {labels.dtype}')
        ids = labels.astype(np.int64)
        ids = np.where((ids >= 0) & (ids < len(self.names)), ids, 255)
        return self.palette()[ids]

    def to_dict(self) -> dict:
        return {'names': list(self.names), 'colors': [list(c) for c in self.colors],
                'ignore_index': int(self.ignore_index)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'ClassMap':
        if not isinstance(data, Mapping) or 'names' not in data or 'colors' not in data:
            raise ClassMapError('a class map needs "names" and "colors"')
        unknown = sorted(set(data) - {'names', 'colors', 'ignore_index'})
        if unknown:
            raise ClassMapError(f'unknown class map field(s) {unknown}')
        return cls(tuple(data['names']), tuple(tuple(c) for c in data['colors']),
                   int(data.get('ignore_index', IGNORE_INDEX)))


def _make(pairs: Sequence[tuple[str, tuple[int, int, int]]]) -> ClassMap:
    return ClassMap(tuple(n for n, _ in pairs), tuple(c for _, c in pairs))


# The synthetic world's classes (cmkd_ros.sim assigns these ids).
SYNTHETIC = _make((
    ('road', (128, 64, 128)),
    ('sidewalk', (244, 35, 232)),
    ('terrain', (152, 251, 152)),
    ('building', (70, 70, 70)),
    ('vegetation', (107, 142, 35)),
    ('car', (0, 0, 142)),
    ('truck', (0, 0, 70)),
    ('pedestrian', (220, 20, 60)),
    ('pole', (153, 153, 153)),
    ('barrier', (255, 120, 50)),
    ('traffic_sign', (220, 220, 0)),
    ('fence', (190, 153, 153)),
))

# nuScenes lidarseg challenge classes (general classes merged to 16), standard order.
NUSCENES_LIDARSEG16 = _make((
    ('barrier', (255, 120, 50)),
    ('bicycle', (255, 192, 203)),
    ('bus', (255, 255, 0)),
    ('car', (0, 150, 245)),
    ('construction_vehicle', (0, 255, 255)),
    ('motorcycle', (255, 127, 0)),
    ('pedestrian', (255, 0, 0)),
    ('traffic_cone', (255, 240, 150)),
    ('trailer', (135, 60, 0)),
    ('truck', (160, 32, 240)),
    ('driveable_surface', (255, 0, 255)),
    ('other_flat', (139, 137, 137)),
    ('sidewalk', (75, 0, 75)),
    ('terrain', (150, 240, 80)),
    ('manmade', (230, 230, 250)),
    ('vegetation', (0, 175, 0)),
))

# SemanticKITTI single-scan benchmark classes (19), standard order.
SEMANTICKITTI19 = _make((
    ('car', (100, 150, 245)),
    ('bicycle', (100, 230, 245)),
    ('motorcycle', (30, 60, 150)),
    ('truck', (80, 30, 180)),
    ('other-vehicle', (100, 80, 250)),
    ('person', (255, 30, 30)),
    ('bicyclist', (255, 40, 200)),
    ('motorcyclist', (150, 30, 90)),
    ('road', (255, 0, 255)),
    ('parking', (255, 150, 255)),
    ('sidewalk', (75, 0, 75)),
    ('other-ground', (175, 0, 75)),
    ('building', (255, 200, 0)),
    ('fence', (255, 120, 50)),
    ('vegetation', (0, 175, 0)),
    ('trunk', (135, 60, 0)),
    ('terrain', (150, 240, 80)),
    ('pole', (255, 240, 150)),
    ('traffic-sign', (255, 0, 0)),
))

BUILTIN = {'synthetic': SYNTHETIC, 'nuscenes_lidarseg16': NUSCENES_LIDARSEG16,
           'semantickitti19': SEMANTICKITTI19}


def get_class_map(name: str) -> ClassMap:
    """Built-in class map by name: ``synthetic``, ``nuscenes_lidarseg16``, ``semantickitti19``."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise ClassMapError(f'unknown class map {name!r}; built-in: {sorted(BUILTIN)}') from None
