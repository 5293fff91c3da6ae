"""Teacher throughput on this machine: inference and training images per second.

Prints, for each architecture, ``features()`` inference and one AdamW training step (batch of
``--batch`` crops of ``--size``), as images/s and as a ratio to the small teacher measured in the
same run (absolute figures vary with the machine and its load; the ratios much less).

    python benchmarks/bench_teacher.py [--size 192 320] [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from cmkd_ros.models.teacher import build_teacher  # noqa: E402

ARCHS = (('small', {'arch': 'small'}),
         ('small os8', {'arch': 'small', 'output_stride': 8}),
         ('deeplabv3_resnet18 os8', {'arch': 'deeplabv3_resnet18', 'feature_dim': 256}),
         ('deeplabv3_resnet50 os8', {'arch': 'deeplabv3_resnet50', 'feature_dim': 256}))


def _best_seconds(fn, repeats: int) -> float:
    fn()                                          # warm-up (allocator, kernels)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, nargs=2, default=(192, 320), metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--skip-resnet50', action='store_true')
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, *args.size)
    labels = torch.randint(0, 12, (args.batch, *args.size))
    rows = []
    for name, cfg in ARCHS:
        if args.skip_resnet50 and 'resnet50' in name:
            continue
        teacher = build_teacher({'num_classes': 12, **cfg})
        params = sum(p.numel() for p in teacher.parameters()) / 1e6
        teacher.eval()

        def infer():
            with torch.no_grad():
                teacher.features(images)

        teacher.train()
        optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(teacher(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        teacher.eval()
        t_infer = _best_seconds(infer, args.repeats)
        teacher.train()
        t_train = _best_seconds(step, args.repeats)
        rows.append((name, params, teacher.feature_stride, args.batch / t_infer,
                     args.batch / t_train))
    ref_infer, ref_train = rows[0][3], rows[0][4]
    print(f'{args.batch} images of {args.size[0]}x{args.size[1]}, torch threads '
          f'{torch.get_num_threads()}')
    print(f'{"teacher":<24} {"params M":>8} {"stride":>6} {"infer img/s":>12} {"x small":>8} '
          f'{"train img/s":>12} {"x small":>8}')
    for name, params, stride, infer, train in rows:
        print(f'{name:<24} {params:8.2f} {stride:6d} {infer:12.2f} {infer / ref_infer:8.3f} '
              f'{train:12.2f} {train / ref_train:8.3f}')


if __name__ == '__main__':
    main()
