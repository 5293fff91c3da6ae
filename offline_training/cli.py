"""``cmkd train``: train a student (fskd, udakd, finetune, supervised), a teacher, or run the
experiments.

Examples::

    cmkd train fskd --config config/fskd.yaml data.train=pairs/train teacher.checkpoint=t.pt
    cmkd train fskd --config config/fskd.yaml out_dir=runs/fskd --resume   # after a crash
    cmkd train fskd --config config/fskd.yaml out_dir=runs/fskd --overwrite  # start over
    torchrun --nproc_per_node=2 -m offline_training.cli fskd --config config/fskd.yaml ...
    cmkd train teacher --config config/teacher.yaml data.train=pairs/train
    cmkd train experiments --out runs/experiments

Settings: defaults in :mod:`offline_training.config`, then ``--config`` YAML, then ``key=value``
overrides (dotted keys, YAML values); ``--print-config`` shows the result and exits.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from cmkd_ros.config import to_dict
from offline_training.trainer import TrainingError, distributed_env

WHAT = ('fskd', 'udakd', 'finetune', 'supervised', 'teacher', 'experiments')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('what', choices=WHAT, help='method to train, teacher, or experiments')
    parser.add_argument('--config', default=None, help='YAML file overriding the defaults')
    parser.add_argument('--resume', action='store_true',
                        help='continue from the newest checkpoint in out_dir (if any)')
    parser.add_argument('--overwrite', action='store_true',
                        help='start over in an out_dir that holds an earlier run, deleting its '
                             'checkpoints and outputs (without it or --resume such a run is '
                             'refused)')
    parser.add_argument('--out', default=None,
                        help='output folder (same as out_dir=...; experiments: its root)')
    parser.add_argument('--print-config', action='store_true',
                        help='print the resolved configuration and exit')
    parser.add_argument('overrides', nargs='*', metavar='key=value',
                        help='dotted settings overriding the YAML, e.g. optim.lr=0.002')
    # `what --config X a=1 b=2`: plain parse_args would leave a=1 b=2 unrecognised because the
    # positionals were already consumed before --config; intermixed parsing collects them all.
    parser.parse_args = parser.parse_intermixed_args


def _overrides(args: argparse.Namespace) -> list[str]:
    items = list(args.overrides)
    if args.out is not None:
        items.append(f'out_dir={args.out}')
    return items


def run(args: argparse.Namespace) -> int:
    try:
        if args.what == 'experiments':
            from offline_training.experiments import ExperimentsConfig, run_experiments
            from cmkd_ros.config import load
            config = load(ExperimentsConfig, args.config, _overrides(args))
            if args.print_config:
                print(yaml.safe_dump(to_dict(config), sort_keys=False))
                return 0
            run_experiments(config, resume=args.resume, overwrite=args.overwrite)
            return 0
        if args.what == 'teacher':
            from offline_training.config import load_teacher_config
            config = load_teacher_config(args.config, _overrides(args))
            if args.print_config:
                print(yaml.safe_dump(to_dict(config), sort_keys=False))
                return 0
            from offline_training.train_teacher import train_teacher_from_config
            summary = train_teacher_from_config(config)
        else:
            from offline_training.config import load_train_config
            config = load_train_config(args.what, args.config, _overrides(args))
            if args.print_config:
                print(yaml.safe_dump(to_dict(config), sort_keys=False))
                return 0
            from offline_training.trainer import train
            summary = train(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, TrainingError, FileNotFoundError) as exc:
        print(f'cmkd train {args.what}: {exc}', file=sys.stderr)
        return 2
    if distributed_env()[0] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != 'eval'} |
                         ({'miou': _miou(summary['eval'])} if summary.get('eval') else {}),
                         default=str))
    return 0


def _miou(result: dict):
    """mIoU of an evaluation result: 3D (``all`` group) or 2D (top level)."""
    return result['all']['miou'] if 'all' in result else result.get('miou')


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m offline_training.cli`` (used with torchrun)."""
    parser = argparse.ArgumentParser(prog='cmkd train', description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
