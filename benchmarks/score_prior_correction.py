"""FSKD's prior correction (``TrainConfig.prior_correction``) scored on trained students.

Given a ``cmkd train experiments`` folder (``teacher/``, ``runs/``, ``stage.json``) and the
worlds to score on, renders those worlds with the folder's rig and settings (into
``DIR/data/worlds_<seeds>``, once) and scores every FSKD student of ``runs/`` with its shared
classifier's bias set to the teacher's minus ``f * log(w)`` for each fraction ``f``, where ``w``
are the teacher's training class weights (from its checkpoint, else computed from its training
images as ``cmkd train teacher`` does), and the supervised students as they are. So students
trained before the setting existed are scored with and without it, without training again.

    python benchmarks/score_prior_correction.py DIR --worlds 401,402 [--fractions 0,0.5,1]

Prints per student and fraction the mIoU on all, seen and unseen points, then per fraction the
FSKD mean +- sd over the seeds and its ratio to the supervised mean; ``--json`` writes them.
Figures and the data each served for: docs/experiments.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout
from cmkd_ros.config import build  # noqa: E402
from cmkd_ros.models.checkpoint import load_checkpoint  # noqa: E402
from cmkd_ros.models.teacher import load_teacher  # noqa: E402
from offline_training.datasets import PairDataset  # noqa: E402
from offline_training.evaluate import evaluate_student  # noqa: E402
from offline_training.experiments import ExperimentsConfig, render_worlds  # noqa: E402
from offline_training.readers.images import build_image_dataset  # noqa: E402
from offline_training.train_teacher import class_weights  # noqa: E402


def teacher_class_weights(root: str, teacher) -> torch.Tensor:
    """The teacher's training class weights: saved with it, else from its training images."""
    if teacher.class_weights is not None:
        return teacher.class_weights
    with open(os.path.join(root, 'teacher', 'summary.json'), encoding='utf-8') as fh:
        config = json.load(fh)['config']
    if config['loss']['class_balance'] == 'none':
        return torch.ones(teacher.num_classes)
    images = build_image_dataset(config['data']['format'], config['data']['train'],
                                 config['data']['train_split'], 'train', config['class_map'],
                                 config['data']['label_map'])
    return class_weights(images, teacher.num_classes, config['loss']['class_balance'])


def score(student, info, dataset) -> dict:
    result = evaluate_student(student, dataset, voxel_size=info['voxel_size'],
                              class_names=info['class_names'])
    return {group: round(100 * result[group]['miou'], 2) for group in ('all', 'seen', 'unseen')}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root', help='a cmkd train experiments folder')
    parser.add_argument('--worlds', required=True, help='world seeds to score on, e.g. 401,402')
    parser.add_argument('--fractions', default='0,0.5,1', help='prior_correction values')
    parser.add_argument('--json', help='write the figures here')
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.root, 'stage.json'), encoding='utf-8') as fh:
        stage = json.load(fh)          # the validation stage records no settings: defaults
        cfg = build(ExperimentsConfig, ExperimentsConfig.expand_settings(
            stage.get('settings', {'rig': stage.get('rig', 'main')})))
    worlds = tuple(int(w) for w in args.worlds.split(','))
    used = set(cfg.train_worlds)
    if used & set(worlds):
        parser.error(f'worlds {sorted(used & set(worlds))} are training worlds')
    data = render_worlds(os.path.join(args.root, 'data', 'worlds_' + '_'.join(map(str, worlds))),
                         worlds, cfg.frames_per_world, cfg.frame_stride, cfg.rig_sim)
    teacher = load_teacher(os.path.join(args.root, 'teacher', 'teacher.pt'))
    log_w = torch.log(teacher_class_weights(args.root, teacher))
    fractions = [float(f) for f in args.fractions.split(',')]
    print(f'{args.root}: rig {cfg.rig}, scored on worlds {list(worlds)}; teacher class weights '
          f'{[round(float(w), 2) for w in log_w.exp()]}', flush=True)
    rows, dataset = [], None
    runs = os.path.join(args.root, 'runs')
    for name in sorted(os.listdir(runs)):
        method = name.split('_seed')[0]
        if method not in ('fskd', 'supervised'):
            continue
        student, info = load_checkpoint(os.path.join(runs, name, 'student.pt'))
        if dataset is None:
            dataset = PairDataset(data, label_images=False,
                                  feature_kind=student.config.point_features)
        for fraction in (fractions if method == 'fskd' else [None]):
            if fraction is not None:
                with torch.no_grad():
                    student.classifier.bias.copy_(teacher.classifier.bias - fraction * log_w)
            row = {'run': name, 'method': method, 'fraction': fraction,
                   **score(student, info, dataset)}
            rows.append(row)
            print(f'{name:18s} f={"-" if fraction is None else fraction:<5} all {row["all"]:5.1f}'
                  f' seen {row["seen"]:5.1f} unseen {row["unseen"]:5.1f}', flush=True)
    supervised = [r['all'] for r in rows if r['method'] == 'supervised']
    summary = {}
    for fraction in fractions:
        fskd = [r['all'] for r in rows if r['fraction'] == fraction]
        if not fskd:
            continue
        mean = statistics.mean(fskd)
        sd = statistics.stdev(fskd) if len(fskd) > 1 else 0.0
        ratio = mean / statistics.mean(supervised) if supervised else float('nan')
        summary[fraction] = {'fskd': fskd, 'mean': mean, 'sd': sd, 'ratio': ratio}
        versus = (f', {100 * ratio:.0f} % of supervised {statistics.mean(supervised):.1f}'
                  if supervised else '')
        print(f'prior_correction {fraction}: FSKD {mean:.1f} +- {sd:.1f} (seeds '
              f'{" / ".join(f"{v:.1f}" for v in fskd)}){versus}', flush=True)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as fh:
            json.dump({'root': args.root, 'worlds': worlds, 'rows': rows, 'summary': summary},
                      fh, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
