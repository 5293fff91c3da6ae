"""The official nuScenes scene splits (those of nuscenes-devkit ``utils/splits.py``).

Scenes are named ``scene-NNNN``; each split is written here as ranges of scene numbers. Every
version has its own splits: ``v1.0-trainval`` has ``train`` (700 scenes) and ``val`` (150, the
lidarseg validation set), ``v1.0-mini`` has ``mini_train`` (8) and ``mini_val`` (2; the mini
scenes are trainval scenes, two of mini_train from its ``val``), ``v1.0-test`` has ``test`` (150,
no labels).
"""
from __future__ import annotations

from typing import Sequence

from offline_training.readers.base import ReaderError

_RANGES = {
    'train': (
        '1-2 4-11 19-34 41-76 120-135 138-139 149-152 154-155 157-168 170-185 187-188 190-196 '
        '199-200 202-204 206-214 218-220 222 224-264 283-306 315-318 321 323-324 328 347-386 '
        '388-403 405-408 410-459 461-465 467-469 471-472 474-480 499-502 504-515 517-518 '
        '525-539 541-546 566 568 570-578 580 582-600 639-679 681 683-689 695-698 700-701 '
        '703-719 726-728 730-731 733-741 744 746-747 749-752 757-765 767-769 786-787 789-792 '
        '803-806 808-813 815-817 819-822 847-856 858 860-866 868-873 875-878 880 882-903 945 '
        '947 949 952-953 955-961 975-984 988-992 994-1025 1044-1058 1074-1102 1104-1110'),
    'val': (
        '3 12-18 35-36 38-39 92-110 221 268-278 329-332 344-346 519-524 552-565 625-627 '
        '629-630 632-638 770-771 775 777-778 780-784 794-800 802 904-917 919-931 962-963 '
        '966-969 971-972 1059-1073'),
    'test': (
        '77-91 111-119 140 142-148 265-266 279-282 307-314 333-343 481-498 547-551 601-604 '
        '606-624 827-831 833-842 844-846 932-933 935-943 1026-1043'),
    'mini_train': '61 553 655 757 796 1077 1094 1100',
    'mini_val': '103 916',
}

# version -> (its training split, its validation split or None)
VERSION_SPLITS = {
    'v1.0-trainval': ('train', 'val'),
    'v1.0-mini': ('mini_train', 'mini_val'),
    'v1.0-test': ('test', None),
}


def _expand(ranges: str) -> tuple[str, ...]:
    names = []
    for part in ranges.split():
        low, _, high = part.partition('-')
        names += [f'scene-{n:04d}' for n in range(int(low), int(high or low) + 1)]
    return tuple(names)


SPLITS: dict[str, tuple[str, ...]] = {name: _expand(text) for name, text in _RANGES.items()}


def split_version(split: str) -> str:
    """The version folder whose scenes make up ``split``."""
    for version, parts in VERSION_SPLITS.items():
        if split in parts:
            return version
    raise ReaderError(f'unknown nuScenes split {split!r}; known: {sorted(SPLITS)}')


def resolve_scenes(version: str, spec: Sequence[str] | str | None, part: str = 'train'
                   ) -> tuple[str, tuple[str, ...]]:
    """(split name, scene names) for ``spec`` in ``version``.

    ``spec``: empty or None = the version's official split for ``part`` ('train' or 'val'); a
    split name (or a one-item list of one); or scene names (the split name is then 'custom').
    A split of another version is refused (e.g. ``train`` in v1.0-mini).
    """
    if isinstance(spec, str):
        spec = (spec,) if spec else ()
    spec = tuple(spec or ())
    if not spec:
        if version not in VERSION_SPLITS:
            raise ReaderError(f'nuScenes version {version!r} has no official split; name the '
                              f'scenes (known versions: {sorted(VERSION_SPLITS)})')
        name = VERSION_SPLITS[version][0 if part == 'train' else 1]
        if name is None:
            raise ReaderError(f'{version} has no {part} split (it has no labels); use a '
                              'version with labels, e.g. v1.0-trainval or v1.0-mini')
        return name, SPLITS[name]
    if len(spec) == 1 and spec[0] in SPLITS:
        name = spec[0]
        if split_version(name) != version:
            raise ReaderError(f'split {name!r} belongs to {split_version(name)}, the data is '
                              f'{version} (its splits: '
                              f'{[s for s in VERSION_SPLITS.get(version, ()) if s]})')
        return name, SPLITS[name]
    bad = [s for s in spec if s in SPLITS]
    if bad:
        raise ReaderError(f'give one split name or scene names, not both: {list(spec)}')
    return 'custom', spec
