"""Scan dataset throughput: samples per second of PairDataset and the sparse collate.

Renders ``--frames`` synthetic frames (default sim: 6 cameras 640x360, 32-beam LiDAR) into a
temporary pair dataset, then times building samples (decode, correspondences with occlusion and
motion compensation, features) with and without the occlusion test and with half-size images,
and SparseCollate batches. Ratios are against the default sample in the same run.

    python benchmarks/bench_datasets.py [--frames 4] [--voxel 0.1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from cmkd_ros.pairs import PairWriter  # noqa: E402
from offline_training.datasets import PairDataset, SparseCollate  # noqa: E402


def _rate(fn, count: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=4)
    parser.add_argument('--voxel', type=float, default=0.1)
    args = parser.parse_args()
    from cmkd_ros.sim.simulator import SimWorld
    with tempfile.TemporaryDirectory() as root:
        writer = PairWriter(root, fsync=False)
        for frame in SimWorld({'seed': 0}).frames(args.frames):
            writer.write(frame.to_pair())
        variants = {
            'default (occlusion, motion)': PairDataset(root),
            'no occlusion test': PairDataset(root, occlusion=False),
            'no motion compensation': PairDataset(root, motion_compensation=False),
            'images at 0.5 scale': PairDataset(root, image_scale=0.5),
            'with augmentation': PairDataset(root, augment=True, seed=0),
        }
        sample = variants['default (occlusion, motion)'][0]
        print(f'{args.frames} frames, {sample["xyz"].shape[0]} points, '
              f'{sample["images"].shape[0]} cameras of {tuple(sample["images"].shape[-2:])}')
        ref = None
        for name, ds in variants.items():
            rate = _rate(lambda i, ds=ds: ds[i % len(ds)], args.frames)
            ref = ref or rate
            print(f'{name:<30} {rate:8.2f} samples/s  x{rate / ref:.3f}')
        samples = [variants['default (occlusion, motion)'][i] for i in range(min(2, args.frames))]
        collate = SparseCollate(args.voxel)
        rate = _rate(lambda i: collate(samples), 5)
        print(f'{"SparseCollate batch of 2":<30} {rate:8.2f} batches/s  '
              f'({len(samples) * rate / ref:.1f}x the sample rate)')


if __name__ == '__main__':
    main()
