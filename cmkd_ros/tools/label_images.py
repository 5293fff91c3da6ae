"""``cmkd label-images``: hand a pair dataset's images to annotators and take their labels back.

FSKD can learn the labeled images of its own training pairs directly (``loss.image_label_weight``,
docs/training.md): the labels at each point's pixels, beside the teacher's targets. Images are
cheap to label, LiDAR sweeps are not; this tool is the round trip:

``export``  writes the images of every ``--every``-th pair as ``<id>_<camera>.png`` (``.jpg``
            when stored as JPEG, the bytes as received) into a folder for the labeling tool;
``import``  copies the pair dataset into a new folder, each pair with the label images found
            as ``<id>_<camera>.png`` in ``--labels``: one channel, uint8, the class ids of
            ``--class-map`` (255 = unlabeled), the image's size. Pairs and cameras without a
            label file are copied as they are (their points keep the teacher's targets only),
            or left out with ``--only-labeled``.

The source dataset is never modified (a pair file is written once, crash-safe: see
:mod:`cmkd_ros.pairs`). A label file that does not fit (another size, values outside the class
map, no such pair or camera) is an error naming the file, before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import numpy as np
import yaml

from cmkd_ros.classes import ClassMapError, IGNORE_INDEX, get_class_map
from cmkd_ros.pairs import (PairFormatError, PairReader, PairWriter, decode_png_or_jpeg,
                            encode_png)

LABEL_NAME = re.compile(r'^(\d+)_(.+)\.png$')


class LabelImageError(ValueError):
    """A label file does not fit its pair (name, size, values)."""


def export_images(pairs_dir: str, out_dir: str, every: int = 1,
                  cameras: list[str] | None = None) -> list[str]:
    """Write the images of every ``every``-th pair into ``out_dir``; returns the file names."""
    reader = PairReader(pairs_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for position, entry in enumerate(reader.entries):
        if position % every:
            continue
        pair = reader[position]
        for name in pair.camera_names:
            if cameras and name not in cameras:
                continue
            ext = 'jpg' if pair.image_formats.get(name) == 'jpeg' else 'png'
            file = f'{int(entry["id"]):06d}_{name}.{ext}'
            with open(os.path.join(out_dir, file), 'wb') as fh:
                fh.write(pair.images[name])
            written.append(file)
    return written


def _label_files(labels_dir: str) -> dict[tuple[int, str], str]:
    found = {}
    for file in sorted(os.listdir(labels_dir)):
        match = LABEL_NAME.match(file)
        if match:
            found[int(match.group(1)), match.group(2)] = os.path.join(labels_dir, file)
    return found


def _check_label(path: str, label: np.ndarray, shape: tuple[int, int],
                 num_classes: int) -> None:
    if label.ndim != 2 or label.dtype != np.uint8:
        raise LabelImageError(f'{path}: need a one-channel 8-bit PNG of class ids, got '
                              f'shape {label.shape} {label.dtype}')
    if label.shape != shape:
        raise LabelImageError(f'{path}: {label.shape[1]}x{label.shape[0]} pixels, the image '
                              f'is {shape[1]}x{shape[0]}')
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise LabelImageError(f'{path}: {int(bad.sum())} pixels hold ids outside the class '
                              f'map (0..{num_classes - 1}, 255 unlabeled), e.g. '
                              f'{sorted(set(label[bad].tolist()))[:5]}')


def import_labels(pairs_dir: str, labels_dir: str, out_dir: str,
                  class_map: str = 'synthetic', only_labeled: bool = False) -> dict:
    """Copy ``pairs_dir`` into ``out_dir`` with the label images of ``labels_dir`` attached
    (``only_labeled``: only the pairs that get one).

    Returns counts: pairs copied, pairs and images that got labels. Every label file is
    checked (and matched to a pair and camera) before the first pair is written.
    """
    num_classes = get_class_map(class_map).num_classes
    if os.path.exists(os.path.join(out_dir, 'index.jsonl')):
        raise LabelImageError(f'{out_dir}: already a pair dataset; give a new folder')
    reader = PairReader(pairs_dir)
    files = _label_files(labels_dir)
    if not files:
        raise LabelImageError(f'{labels_dir}: no label files named <id>_<camera>.png')
    ids = {int(e['id']): i for i, e in enumerate(reader.entries)}
    by_pair: dict[int, dict[str, bytes]] = {}
    for (pair_id, camera), path in files.items():
        if pair_id not in ids:
            raise LabelImageError(f'{path}: no pair {pair_id} in {pairs_dir}')
        pair = reader[ids[pair_id]]
        if camera not in pair.camera_names:
            raise LabelImageError(f'{path}: pair {pair_id} has no camera {camera!r} '
                                  f'({pair.camera_names})')
        with open(path, 'rb') as fh:
            data = fh.read()
        try:
            label = decode_png_or_jpeg(data, color=False)
        except PairFormatError:
            raise LabelImageError(f'{path}: not a readable PNG') from None
        _check_label(path, label, pair.image(camera).shape[:2], num_classes)
        by_pair.setdefault(pair_id, {})[camera] = encode_png(label)
    with open(os.path.join(pairs_dir, 'dataset.yaml'), encoding='utf-8') as fh:
        metadata = yaml.safe_load(fh) or {}
    metadata.pop('format_version', None)          # the copy is written in the current format
    metadata.update(labels_from=os.path.abspath(labels_dir), class_map=class_map,
                    copied_from=os.path.abspath(pairs_dir))
    writer = PairWriter(out_dir, metadata=metadata)
    for position, entry in enumerate(reader.entries):
        pair = reader[position]
        extra = by_pair.get(int(entry['id']))
        if extra:
            pair = dataclasses.replace(pair, label_images={**pair.label_images, **extra})
        elif only_labeled:
            continue
        writer.write(pair)
    return {'pairs': writer.count, 'labeled_pairs': len(by_pair),
            'label_images': sum(len(v) for v in by_pair.values())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', required=True)
    export = sub.add_parser('export', help="write the pairs' images for a labeling tool")
    export.add_argument('--pairs', required=True, help='pair dataset folder')
    export.add_argument('--out', required=True, help='folder for <id>_<camera>.png|jpg')
    export.add_argument('--every', type=int, default=1, help='every n-th pair (default 1)')
    export.add_argument('--cameras', nargs='+', default=None, help='only these cameras')
    imp = sub.add_parser('import', help='a copy of the pairs with the label images attached')
    imp.add_argument('--pairs', required=True, help='pair dataset folder (left unchanged)')
    imp.add_argument('--labels', required=True,
                     help='folder of <id>_<camera>.png: class ids, 255 unlabeled')
    imp.add_argument('--out', required=True, help='new pair dataset folder')
    imp.add_argument('--only-labeled', action='store_true',
                     help='copy only the pairs that get a label image')
    imp.add_argument('--class-map', default='synthetic',
                     help="the training's class map (cmkd_ros.classes; default synthetic)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == 'export':
            if args.every < 1:
                raise LabelImageError('--every: must be >= 1')
            files = export_images(args.pairs, args.out, args.every, args.cameras)
            print(f'{len(files)} images written to {args.out}')
        else:
            counts = import_labels(args.pairs, args.labels, args.out, args.class_map,
                                   args.only_labeled)
            print(f'pairs written to {args.out}: {counts["pairs"]}, '
                  f'{counts["labeled_pairs"]} of them with label images ({counts["label_images"]})')
    except (LabelImageError, PairFormatError, ClassMapError) as exc:
        print(f'cmkd label-images: {exc}', file=sys.stderr)
        return 2
    return 0
