"""The ``cmkd`` command-line tool: one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``cmkd --help``
stays fast and a missing optional dependency only affects the subcommand that needs it. An
OSError out of a subcommand (a bad path, a full disk) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    'sim': ('cmkd_ros.sim.cli', 'render a synthetic drive to a rosbag2 or a pair dataset'),
    'rig': ('cmkd_ros.rig', 'rig calibration YAML from a bag\'s /tf_static and CameraInfo'),
    'overlay': ('cmkd_ros.tools.overlay', 'draw projected LiDAR points over camera images (PNG)'),
    'calibrate': ('cmkd_ros.tools.calibrate',
                  'refine camera extrinsics and time offsets from the data (LiDAR silhouettes '
                  'on image edges)'),
    'label-images': ('cmkd_ros.tools.label_images',
                     "export pair images for labeling; attach the labels to a copy of the pairs"),
    'train': ('offline_training.cli', 'train a teacher or student (fskd, udakd, finetune, ...)'),
    'teacher': ('offline_training.teacher_import', 'import a pretrained 2D network as a teacher'),
    'evaluate': ('offline_training.evaluate', 'score a student (pairs, nuScenes, SemanticKITTI)'),
    'replay': ('cmkd_ros.tools.replay', 'publish a rosbag2 (MCAP or sqlite3) with its timing'),
    'evaluate-bag': ('cmkd_ros.tools.evaluate_bag', 'run the segment node over a bag and score it'),
    'demo': ('cmkd_ros.tools.demo', 'the whole collect-train-segment-evaluate loop on synthetic data'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='cmkd', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ['--help'])
        return 2
    name = argv[0]
    module_name, text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f'cmkd {name}: cannot import {module_name}: {exc}', file=sys.stderr)
        return 2
    sub = argparse.ArgumentParser(prog=f'cmkd {name}', description=text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except OSError as exc:    # a path the user gave: missing, not writable, disk full
        print(f'cmkd {name}: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
