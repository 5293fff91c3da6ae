"""``cmkd sim``: render a synthetic drive to a rosbag2 (MCAP / sqlite3) or a pair dataset.

Settings: SimConfig defaults, then ``--config`` YAML, then ``--seed`` / ``--cameras`` /
``--lidar`` (a preset: ``cmkd_ros.sim.config.LIDAR_PRESETS``), then ``--set key=value``
overrides (e.g. ``--set lidar.horizontal_resolution_deg=0.4``).
"""
from __future__ import annotations

import argparse
import os
import sys

from cmkd_ros.sim.config import LIDAR_PRESETS

FORMATS = ('mcap', 'sqlite3', 'frames')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--frames', type=int, default=10, help='number of sweeps (10 Hz)')
    parser.add_argument('--out', required=True, help='output folder (must not exist for bags)')
    parser.add_argument('--format', choices=FORMATS, default='mcap',
                        help='rosbag2 storage (mcap, sqlite3) or the pair dataset (frames)')
    parser.add_argument('--seed', type=int, default=None, help='world seed (overrides config)')
    parser.add_argument('--cameras', type=int, default=None,
                        help='number of cameras (overrides config)')
    parser.add_argument('--lidar', default=None, choices=sorted(LIDAR_PRESETS),
                        help='LiDAR preset from public spec sheets (beam table, azimuth step, '
                             'range; overrides config)')
    parser.add_argument('--config', default=None, help='SimConfig YAML file')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override a setting, e.g. lidar.beams=64')
    parser.add_argument('--compressed', action='store_true',
                        help='JPEG images: CompressedImage topics in bags, JPEG in pair files')
    parser.add_argument('--images', choices=('raw', 'compressed', 'both'), default=None,
                        help='bag image topics (default raw, or compressed with --compressed)')
    parser.add_argument('--start', type=int, default=0, help='index of the first frame')
    parser.add_argument('--stride', type=int, default=1,
                        help='frames format: keep every n-th sweep (spread frames over the drive)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def build_config(args: argparse.Namespace):
    """SimConfig from defaults, --config, --seed/--cameras and --set (in that order)."""
    from cmkd_ros.config import build, load_yaml, merge, parse_overrides
    from cmkd_ros.sim.config import SimConfig
    data = load_yaml(args.config) if args.config else {}
    if args.seed is not None:
        data = merge(data, {'seed': args.seed})
    if args.cameras is not None:
        data = merge(data, {'cameras': {'count': args.cameras}})
    if args.lidar is not None:
        # the preset fills in the LiDAR settings that the config file and --set leave out
        data = merge(data, {'lidar': {'preset': args.lidar}})
    data = merge(data, parse_overrides(args.overrides))
    return build(SimConfig, data)


def run(args: argparse.Namespace) -> int:
    from cmkd_ros.config import ConfigError
    if args.frames < 1 or args.stride < 1:
        print('cmkd sim: --frames and --stride must be >= 1', file=sys.stderr)
        return 2
    if args.stride != 1 and args.format != 'frames':
        print('cmkd sim: --stride needs --format frames (a bag keeps every sweep)',
              file=sys.stderr)
        return 2
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f'cmkd sim: invalid configuration: {exc}', file=sys.stderr)
        return 2
    if args.format != 'frames' and os.path.exists(args.out):
        print(f'cmkd sim: {args.out} already exists; a bag needs a new folder', file=sys.stderr)
        return 2
    from cmkd_ros.progress import progress_bar
    from cmkd_ros.sim.export import export_bag, export_pairs
    from cmkd_ros.sim.simulator import SimWorld
    world = SimWorld(config)
    bar = progress_bar(args.frames, f'cmkd sim -> {args.format}', 'frame',
                       enabled=not args.no_progress)
    try:
        if args.format == 'frames':
            summary = export_pairs(world, args.out, args.frames,
                                   'jpeg' if args.compressed else 'png', args.start,
                                   on_frame=lambda _: bar.update(1), stride=args.stride)
        else:
            images = args.images or ('compressed' if args.compressed else 'raw')
            summary = export_bag(world, args.out, args.frames, args.format, images, args.start,
                                 on_frame=lambda _: bar.update(1))
    finally:
        bar.close()
    print(f'wrote {summary["frames"]} frames ({summary["points"]} points, '
          f'{len(world.calibration)} cameras) to {summary["path"]} as {summary["format"]} in '
          f'{summary["seconds"]:.1f} s; {summary["occluded_fraction_of_in_view"]:.1%} of the '
          f'in-view points are occluded in some camera')
    return 0
