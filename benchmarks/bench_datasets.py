"""Scan dataset throughput, and whether training is data-bound.

Layouts (``--layouts``, default all):

- ``pairs``: ``--frames`` synthetic frames (default sim: 6 cameras 640x360, 32-beam LiDAR) in a
  pair dataset whose pairs carry their correspondences as the collect node stores them: samples
  per second and CPU milliseconds per sample computing the correspondences, reading the stored
  ones (settings hash matches), without the occlusion test or motion compensation, with
  half-size images and augmentation, and SparseCollate batches (ratios against the default, in
  the same run; on a shared machine compare the CPU times, with ``OMP_NUM_THREADS=1``).
- ``nuscenes``: a v1.0-mini folder of ``--frames`` keyframes of the real nuScenes sample
  (34,688 points, six 1600x900 JPEG cameras), read as ``config/nuscenes_fskd.yaml`` reads it.
- ``semantickitti``: sequence 00 of ``--frames`` scans of the real KITTI frame made a
  120,666-point 360-degree scan (the camera-cropped scan and six rotated copies) with image_2
  and image_3 (1242x375 PNG), read as ``config/semantickitti_fskd.yaml`` reads it.

For the real layouts it prints scans per second with correspondences (file IO, occlusion test,
motion compensation, image resizing, augmentation, features, voxelized batches of the config's
size) through a DataLoader in the main process and with ``--workers`` processes, then the
training step time of the default student of that config (its ``student`` section, D = 256 as a
DeepLabV3 teacher gives, forward + backward + AdamW with a cross-entropy on the 3D labels; the
teacher is left out) on ``--threads`` torch
threads with ``--step-batch`` scans (default 1: the config's batch of 4 needs over 10 GB on the
CPU), and the scans per second that step consumes. Where the loader gives fewer scans per second
than the step consumes, training waits for data.

    python benchmarks/bench_datasets.py [--layouts nuscenes semantickitti] [--frames 4]
        [--workers 2] [--threads 2] [--steps 2] [--step-batch 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(REPO / 'test'))  # the real-layout fixture builders
from cmkd_ros.pairs import PairWriter  # noqa: E402
from offline_training.datasets import (PairDataset, SparseCollate,  # noqa: E402
                                       store_correspondences)

DATA_DIR = Path(os.environ.get('CMKD_DATA_DIR', REPO.parent / 'shared' / 'data'))


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


def bench_pairs(frames: int, voxel: float, repeats: int = 3) -> None:
    from cmkd_ros.sim.simulator import SimWorld
    with tempfile.TemporaryDirectory() as root:
        writer = PairWriter(root, fsync=False)
        for frame in SimWorld({'seed': 0}).frames(frames):
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
        print(f'pairs: {frames} frames, {sample["xyz"].shape[0]} points, '
              f'{sample["images"].shape[0]} cameras of {tuple(sample["images"].shape[-2:])}')
        ref = ref_cpu = None
        for name, ds in variants.items():
            rate, cpu_ms = _rate(lambda i, ds=ds: ds[i % len(ds)], frames, repeats)
            ref, ref_cpu = ref or rate, ref_cpu or cpu_ms
            print(f'  {name:<30} {rate:8.2f} samples/s  x{rate / ref:.3f}   CPU {cpu_ms:6.1f} '
                  f'ms/sample  x{ref_cpu / cpu_ms:.3f}')
        samples = [variants['default (occlusion, motion)'][i] for i in range(min(2, frames))]
        collate = SparseCollate(voxel)
        rate, _ = _rate(lambda i: collate(samples), 5, repeats)
        print(f'  {"SparseCollate batch of 2":<30} {rate:8.2f} batches/s  '
              f'({len(samples) * rate / ref:.1f}x the sample rate)')



def _loader_rate(dataset, collate, workers: int, batch_size: int, scans: int) -> float:
    """Scans per second through a DataLoader with ``workers`` processes (after the first
    batch, so worker start-up is not counted)."""
    import torch
    indices = [i % len(dataset) for i in range(scans + batch_size * max(1, workers))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices,
                                         collate_fn=collate, num_workers=workers)
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    start = time.perf_counter()
    count = 0
    for batch in it:
        count += len(batch['num_points'])
    return count / (time.perf_counter() - start)


def bench_real(layout: str, frames: int, workers: int, threads: int, steps: int,
               step_batch: int) -> None:
    import torch
    from fixtures.real_layouts import build_nuscenes, build_semantickitti
    from offline_training.config import load_train_config
    from offline_training.datasets import build_dataset
    from offline_training.trainer import build_student_for, move_to
    from cmkd_ros.classes import get_class_map
    with tempfile.TemporaryDirectory() as root:
        if layout == 'nuscenes':
            build_nuscenes(root, DATA_DIR, samples=frames)
        else:
            build_semantickitti(root, DATA_DIR, sequence='00', scans=frames, image_3=True,
                                copies=7)
        config = load_train_config('fskd', str(REPO / 'config' / f'{layout}_fskd.yaml'),
                                   [f'data.train={root}', 'teacher.checkpoint=unused.pt'])
        data = config.data
        dataset = build_dataset(data, 'train',
                                feature_kind=config.student.get('point_features', 'height'))
        sample = dataset[0]
        cams = sample['images'].shape[0]
        print(f'{layout}: {len(dataset)} scans of {sample["xyz"].shape[0]} points, {cams} '
              f'cameras {tuple(sample["images"].shape[-2:])} after image_scale '
              f'{data.image_scale}, {len(sample["corr_point"])} correspondences, voxel '
              f'{data.voxel_size} m, batch {data.batch_size}', flush=True)
        torch.set_num_threads(1)
        collate = SparseCollate(data.voxel_size)
        one = _loader_rate(dataset, collate, 0, data.batch_size, 2 * frames)
        print(f'  loader, 1 process:        {one:6.2f} scans/s', flush=True)
        many = _loader_rate(dataset, collate, workers, data.batch_size, 2 * frames)
        print(f'  loader, {workers} workers:        {many:6.2f} scans/s', flush=True)
        # the default student of the config, one optimizer step on a batch of the config's size
        torch.set_num_threads(threads)
        class_map = get_class_map(config.class_map)
        student = build_student_for(config, class_map.num_classes, 256)
        params = sum(p.numel() for p in student.parameters())
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.optim.lr)
        batch = move_to(collate([dataset[i % len(dataset)] for i in range(step_batch)]),
                        torch.device('cpu'))

        def step(_):
            out = student(batch['coords'], batch['vfeats'])
            logits = out['logits'].index_select(0, batch['inverse'])
            loss = torch.nn.functional.cross_entropy(logits, batch['labels'], ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = 1.0 / _rate(step, steps)[0]
        need = step_batch / seconds
        print(f'  student step ({student.config.arch}, {params / 1e6:.1f} M parameters, '
              f'batch {step_batch}, {batch["coords"].shape[0]} voxels, {threads} threads): '
              f'{seconds:6.2f} s = {need:.2f} scans/s consumed', flush=True)
        verdict = ('data-bound' if many < need else 'not data-bound')
        print(f'  -> on this machine training is {verdict}: the loader gives {many:.2f} '
              f'scans/s on {workers} workers, the step consumes {need:.2f}; a step of t '
              f'seconds (e.g. on a GPU) with batch {data.batch_size} needs about '
              f'{data.batch_size / one:.1f} / t loader processes', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layouts', nargs='+', default=['pairs', 'nuscenes', 'semantickitti'],
                        choices=('pairs', 'nuscenes', 'semantickitti'))
    parser.add_argument('--frames', type=int, default=4)
    parser.add_argument('--voxel', type=float, default=0.1, help='pairs: collate voxel size')
    parser.add_argument('--repeats', type=int, default=3, help='pairs: rounds; the best is '
                        'reported')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader processes')
    parser.add_argument('--threads', type=int, default=2, help='torch threads of the step')
    parser.add_argument('--steps', type=int, default=2, help='student steps timed')
    parser.add_argument('--step-batch', type=int, default=1, help='scans per timed step')
    args = parser.parse_args()
    for layout in args.layouts:
        if layout == 'pairs':
            bench_pairs(args.frames, args.voxel, args.repeats)
        else:
            bench_real(layout, args.frames, args.workers, args.threads, args.steps,
                       args.step_batch)


if __name__ == '__main__':
    main()
