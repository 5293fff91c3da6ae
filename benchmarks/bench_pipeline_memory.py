"""Resident memory of the segment node's pipeline over many scans, in one process, no ROS.

Runs :class:`cmkd_ros.pipelines.segment.SegmentPipeline` as the node runs it (pipelined: one
thread prepares a scan and builds its kernel maps while the other runs the network on the one
before; ``--no-pipeline``: one thread) on the LiDAR sweeps of ``soak_nodes.py``'s synthetic
drive (seed 11, 32 beams, about 30,000 points) in a loop, with the small random student of
``bench_segment_node.py``. ``--drop`` removes a random fraction (up to it) of each scan's
points, so that every scan has its own size, as on a robot; 0 replays the loop's scans as they
are (the soak). Printed after N scans: resident memory (``VmRSS``) and glibc's heap in use and
free (``mallinfo2``), then the change from the first mark to the last (the soak's goal: 5 %).

Usage: ``python benchmarks/bench_pipeline_memory.py [--scans 1000] [--sweeps 100]
[--drop 0.1] [--precision auto] [--no-pipeline]``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import queue
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cmkd_ros.openmp import openmp_defaults  # noqa: E402
openmp_defaults()                                   # as the nodes do, before torch loads
import numpy as np  # noqa: E402
from bench_segment_node import make_checkpoint  # noqa: E402

from cmkd_ros.config import PRECISION_CHOICES  # noqa: E402


def rss_mb() -> float:
    with open('/proc/self/status', encoding='ascii') as fh:
        for line in fh:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


def heap_text() -> str:
    """glibc's heap in use and free (all arenas), or '' without glibc >= 2.33."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return ''
    return f'heap in use {info.uordblks / 2**20:4.0f} MB, free {info.fordblks / 2**20:4.0f} MB'


def sweeps(count: int) -> list[np.ndarray]:
    """The LiDAR sweeps of soak_nodes.py's drive as the node decodes them (bag layout)."""
    from cmkd_ros.bag import points_array
    from cmkd_ros.config import build
    from cmkd_ros.sim.config import SimConfig
    from cmkd_ros.sim.simulator import SimWorld
    world = SimWorld(build(SimConfig, {'seed': 11, 'cameras': {'count': 3}}))
    out = []
    for i in range(count):  # the LiDAR part of SimWorld.frame(i): same stream, same sweep
        stamp = world.frame_stamp_ns(i)
        sweep = world.lidar.sweep(world.scene, stamp, np.random.default_rng([11, i, 1]))
        out.append(points_array(sweep.xyz, sweep.intensity, sweep.ring, sweep.point_time_ns,
                                stamp))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scans', type=int, default=1000, help='scans to label (1000)')
    parser.add_argument('--sweeps', type=int, default=100, help='distinct sweeps looped (100)')
    parser.add_argument('--drop', type=float, default=0.1,
                        help='drop up to this fraction of each scan\'s points (0.1; 0: none)')
    parser.add_argument('--precision', default='auto', choices=PRECISION_CHOICES)
    parser.add_argument('--no-pipeline', action='store_true', help='one thread')
    args = parser.parse_args()

    from cmkd_ros.pipelines.intake import CountingReport
    from cmkd_ros.pipelines.segment import SegmentNodeConfig, SegmentPipeline
    print(f'rendering {args.sweeps} sweeps ...', flush=True)
    data = sweeps(args.sweeps)
    with tempfile.TemporaryDirectory() as tmp:
        config = SegmentNodeConfig(checkpoint=make_checkpoint(os.path.join(tmp, 'student.pt')),
                                   pipeline=not args.no_pipeline, precision=args.precision)
        pipeline = SegmentPipeline(config, CountingReport())
    marks = [n for n in (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000)
             if n < args.scans] + [args.scans]
    rng = np.random.default_rng(0)
    figures: dict[int, float] = {}
    start = time.perf_counter()

    def scans():
        for i in range(args.scans):
            scan = data[i % len(data)]
            if args.drop > 0:
                scan = scan[rng.random(len(scan)) >= rng.uniform(0, args.drop)]
            yield scan.copy()          # a fresh buffer, as a decoded message

    def labeled(count: int) -> None:
        if count in marks:
            figures[count] = rss_mb()
            print(f'{count:6d} scans: RSS {figures[count]:6.0f} MB  {heap_text()}  '
                  f'({time.perf_counter() - start:.0f} s)', flush=True)

    def infer_loop(jobs: queue.Queue) -> None:
        import torch
        if pipeline.threads > 0:
            torch.set_num_threads(pipeline.threads)
        for count, job in enumerate(iter(jobs.get, None), 1):
            pipeline.infer(job)
            del job
            labeled(count)

    def prepare_loop(jobs: queue.Queue) -> None:
        import torch
        torch.set_num_threads(1)
        for scan in scans():
            job = pipeline.prepare(scan)
            jobs.put(job)
            pipeline.build_maps(job)
        jobs.put(None)

    def single_loop() -> None:
        import torch
        if pipeline.threads > 0:
            torch.set_num_threads(pipeline.threads)
        for count, scan in enumerate(scans(), 1):
            pipeline(scan)
            labeled(count)

    jobs: queue.Queue = queue.Queue(1)
    workers = ([threading.Thread(target=single_loop)] if args.no_pipeline else
               [threading.Thread(target=prepare_loop, args=(jobs,)),
                threading.Thread(target=infer_loop, args=(jobs,))])
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    first, last = min(figures), max(figures)
    print(f'{"pipelined" if not args.no_pipeline else "one thread"}, '
          f'{pipeline.predictor.precision}, drop <= {args.drop:g}: RSS {figures[first]:.0f} MB '
          f'after {first} scans -> {figures[last]:.0f} MB after {last} '
          f'({figures[last] / figures[first] - 1:+.1%}); load average '
          + ' '.join(f'{v:.1f}' for v in os.getloadavg()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
