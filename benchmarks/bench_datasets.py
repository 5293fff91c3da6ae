"""Scan dataset throughput: samples per second of PairDataset and the sparse collate.

Renders ``--frames`` synthetic frames (default sim: 6 cameras 640x360, 32-beam LiDAR) into a
temporary pair dataset whose pairs carry their correspondences as the collect node stores them,
then times building samples (decode, correspondences with occlusion and motion compensation,
features) computing the correspondences, reading the stored ones (settings hash matches),
without the occlusion test and with half-size images, and SparseCollate batches. Ratios are
against the default sample (correspondences computed) in the same run; run it with
``OMP_NUM_THREADS=1`` and compare the CPU times on a shared machine.

    OMP_NUM_THREADS=1 python benchmarks/bench_datasets.py [--frames 4] [--voxel 0.1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from cmkd_ros.pairs import PairWriter  # noqa: E402
from offline_training.datasets import (PairDataset, SparseCollate,  # noqa: E402
                                       store_correspondences)


def _rate(fn, count: int, repeats: int = 1) -> tuple[float, float]:
    """(calls per second, CPU milliseconds per call) of ``fn(0..count-1)``, each the best of
    ``repeats`` rounds: a busy machine only ever slows a round down, and CPU time (the figure
    to compare on a shared machine) counts this process's work alone."""
    fn(0)
    rate, cpu_ms = 0.0, float('inf')
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            fn(i)
        rate = max(rate, count / (time.perf_counter() - start))
        cpu_ms = min(cpu_ms, (time.process_time() - cpu) / count * 1e3)
    return rate, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=4)
    parser.add_argument('--voxel', type=float, default=0.1)
    parser.add_argument('--repeats', type=int, default=3, help='rounds; the best is reported')
    args = parser.parse_args()
    from cmkd_ros.sim.simulator import SimWorld
    with tempfile.TemporaryDirectory() as root:
        writer = PairWriter(root, fsync=False)
        for frame in SimWorld({'seed': 0}).frames(args.frames):
            writer.write(store_correspondences(frame.to_pair()))
        computed = {'stored_correspondences': False}
        variants = {
            'default (occlusion, motion)': PairDataset(root, **computed),
            'stored correspondences': PairDataset(root),
            'no occlusion test': PairDataset(root, occlusion=False),
            'no motion compensation': PairDataset(root, motion_compensation=False),
            'images at 0.5 scale': PairDataset(root, image_scale=0.5, **computed),
            'with augmentation': PairDataset(root, augment=True, seed=0, **computed),
        }
        sample = variants['default (occlusion, motion)'][0]
        print(f'{args.frames} frames, {sample["xyz"].shape[0]} points, '
              f'{sample["images"].shape[0]} cameras of {tuple(sample["images"].shape[-2:])}')
        ref = ref_cpu = None
        for name, ds in variants.items():
            rate, cpu_ms = _rate(lambda i, ds=ds: ds[i % len(ds)], args.frames, args.repeats)
            ref, ref_cpu = ref or rate, ref_cpu or cpu_ms
            print(f'{name:<30} {rate:8.2f} samples/s  x{rate / ref:.3f}   CPU {cpu_ms:6.1f} '
                  f'ms/sample  x{ref_cpu / cpu_ms:.3f}')
        samples = [variants['default (occlusion, motion)'][i] for i in range(min(2, args.frames))]
        collate = SparseCollate(args.voxel)
        rate, _ = _rate(lambda i: collate(samples), 5, args.repeats)
        print(f'{"SparseCollate batch of 2":<30} {rate:8.2f} batches/s  '
              f'({len(samples) * rate / ref:.1f}x the sample rate)')


if __name__ == '__main__':
    main()
