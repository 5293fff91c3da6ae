"""Student forward latency: pure-PyTorch sparse backend vs MinkowskiEngine, same weights.

Runs the small and the standard student on the real nuScenes scan (34,688 points), prints the
median forward latency after warm-up for each backend in the same run (the torch backend in
float32 and in bfloat16, MinkowskiEngine in float32), the ratio ours / ME, the
convolution work (GFLOP counted from the kernel maps) and the achieved GFLOP/s against a torch
sgemm peak measured in the same run. Other processes share this machine: read the ratios.
The process runs as the segment node does: its OpenMP settings (``--omp-wait node``) and freed
memory kept mapped. MinkowskiEngine multiplies through OpenBLAS, whose workers spin after each
call and would take a core from the torch pass timed next; ``--blas-threads 1`` (the default)
avoids that without slowing MinkowskiEngine (docs/results.md, Student forward).

    python benchmarks/bench_student.py [--threads 2] [--repeats 10] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SCAN = REPO.parent / 'shared' / 'data' / 'nuscenes_sample' / 'LIDAR_TOP.bin'


# torch backend rows; ref*: the same with the compiled kernels off (the pure-PyTorch reference)
PRECISION = {'torch': 'float32', 'torch_bf16': 'bfloat16', 'ref': 'float32',
             'ref_bf16': 'bfloat16'}

# name -> StudentConfig overrides. small: the CPU real-time student with its DA module (teacher
# features D = 64, the default teacher); standard: MinkUNet18 with DA, D = 256 (DeepLabV3).
STUDENTS = {
    'small': dict(arch='small', voxel_size=0.1, feature_dim=64, use_da=True, da_width=32),
    'small_noda': dict(arch='small', voxel_size=0.1, feature_dim=64, use_da=False),
    # the student of the distillation experiments (docs/experiments.md): 0.2 m voxels
    'small_0.2m': dict(arch='small', voxel_size=0.2, feature_dim=64, use_da=True, da_width=32),
    'minkunet14': dict(arch='minkunet14', voxel_size=0.1, feature_dim=256, use_da=False),
    'standard': dict(arch='minkunet18', voxel_size=0.1, feature_dim=256, use_da=True),
    'standard_noda': dict(arch='minkunet18', voxel_size=0.1, feature_dim=256, use_da=False),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scan', default=os.environ.get('CMKD_BENCH_SCAN', str(DEFAULT_SCAN)),
                        help='float32 x, y, z, intensity, ring points (nuScenes .bin)')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (torch and OpenMP)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs first')
    parser.add_argument('--repeats', type=int, default=7, help='timed runs (median reported)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--students', default='small,standard',
                        help='comma list of: ' + ', '.join(STUDENTS))
    parser.add_argument('--backends', default='torch,torch_bf16,ref,ref_bf16,minkowski',
                        help='comma list of: torch, torch_bf16 (bfloat16 arithmetic), ref, '
                        'ref_bf16 (the same with the compiled kernels off), minkowski')
    parser.add_argument('--blas-threads', type=int, default=1,
                        help='OpenBLAS threads (MinkowskiEngine\'s multiplications), unless '
                        'OPENBLAS_NUM_THREADS is set: with more, its spinning workers slow the '
                        'torch pass that follows a MinkowskiEngine pass; 1 measured as fast '
                        'for MinkowskiEngine itself')
    parser.add_argument('--omp-wait', choices=('node', 'env', 'passive', 'active'),
                        default='node',
                        help='OpenMP wait policy for both backends: node = as the nodes run '
                        '(cmkd_ros/openmp.py: spin about 0.1 ms, then sleep, unless '
                        'OMP_WAIT_POLICY is set); env = leave OMP_WAIT_POLICY and GOMP_SPINCOUNT '
                        'as set; passive = sleep at once; active = spin')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.blas_threads < 1:
        raise SystemExit('--blas-threads must be >= 1')
    sys.path.insert(0, str(REPO))
    from cmkd_ros.openmp import openmp_defaults
    # must be set before torch (libgomp) is loaded
    if args.omp_wait == 'node':
        openmp_defaults()
    elif args.omp_wait != 'env':
        os.environ['OMP_WAIT_POLICY'] = args.omp_wait.upper()
        os.environ.pop('GOMP_SPINCOUNT', None)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    os.environ.setdefault('OPENBLAS_NUM_THREADS', str(args.blas_threads))
    import numpy as np
    import torch
    from cmkd_ros.config import build
    from cmkd_ros.models import (StudentConfig, build_student, point_features,
                                 precision_context, voxelize)
    from cmkd_ros.pipelines.segment import keep_freed_memory
    from cmkd_ros.sparse import SparseConv3d, SparseTensor, minkowski_available, native

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # as the segment node runs on the CPU: freed temporaries stay mapped (no page faults)
    kept = device.type == 'cpu' and keep_freed_memory()
    points = np.fromfile(args.scan, dtype=np.float32).reshape(-1, 5)
    backends = [b for b in args.backends.split(',') if b]
    if 'minkowski' in backends and not minkowski_available():
        print('MinkowskiEngine is not importable: timing the torch backend only '
              '(scripts/build_minkowski.sh installs it)')
        backends = [b for b in backends if b != 'minkowski']

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    # 1. The machine's sgemm peak, measured now (same threads, same load).
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    times = []
    for i in range(6):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t)
    peak = 2 * 2048 ** 3 / min(times[1:]) / 1e9
    print(f'device {device}, threads {args.threads}, points {points.shape[0]}, '
          f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "(unset)")}, '
          f'GOMP_SPINCOUNT={os.environ.get("GOMP_SPINCOUNT", "(unset)")}, '
          f'OPENBLAS_NUM_THREADS={os.environ["OPENBLAS_NUM_THREADS"]}, '
          f'freed memory kept {"yes" if kept else "no"}, '
          f'load average {os.getloadavg()[0]:.1f}, sgemm peak {peak:.1f} GFLOP/s\n'
          f'compiled sparse kernels: {native.status()}')

    header = (f'{"student":<14}{"backend":<11}{"voxels":>8}{"median ms":>11}{"min ms":>9}'
              f'{"cpu ms":>9}{"GFLOP":>8}{"GFLOP/s":>9}{"% peak":>8}{"maps ms":>9}'
              f'{"predict ms":>11}{"ours/ME":>11}')
    print(header)
    print('-' * len(header))
    names = [s for s in args.students.split(',') if s]
    unknown = sorted(set(names) - set(STUDENTS))
    if unknown:
        raise SystemExit(f'unknown students {unknown}; known: {sorted(STUDENTS)}')
    for name in names:
        config = build(StudentConfig, STUDENTS[name])
        feats = point_features(points[:, :3], points[:, 3], config.point_features)
        coords, vfeats, _ = voxelize(points[:, :3], feats, config.voxel_size)
        coords = torch.from_numpy(np.concatenate(
            [np.zeros((coords.shape[0], 1), np.int32), coords], 1)).to(device)
        vfeats = torch.from_numpy(vfeats).to(device)
        torch.manual_seed(0)
        student = build_student(config).to(device).eval()

        # 2. Work: 2 * pairs * Cin * Cout per convolution (from the torch backend's maps),
        #    plus the linear layers; and the time to build every kernel map once.
        flops = [0.0]

        def count(module, inputs, output):
            x = inputs[0]
            if module.transposed:
                kmap = x.manager.kernel_map(x.stride // module.stride, module.kernel_size,
                                            module.stride, module.dilation)
            else:
                kmap = x.manager.kernel_map(x.stride, module.kernel_size, module.stride,
                                            module.dilation)
            flops[0] += 2.0 * kmap.num_pairs * module.in_channels * module.out_channels

        hooks = [m.register_forward_hook(count) for m in student.modules()
                 if isinstance(m, SparseConv3d)]
        student.set_backend('torch')
        state = {k: v.clone() for k, v in student.state_dict().items()}
        with torch.no_grad():  # train mode: eval folds batch norm into the conv (no hook call)
            student.train()(coords, vfeats)
        student.load_state_dict(state)
        student.eval()
        for h in hooks:
            h.remove()
        for m in student.modules():
            if isinstance(m, torch.nn.Linear):
                flops[0] += 2.0 * coords.shape[0] * m.in_features * m.out_features
        map_ms = {'torch': _time_maps(student, coords, vfeats, SparseTensor, sync)}
        with native.disabled():
            map_ms['ref'] = _time_maps(student, coords, vfeats, SparseTensor, sync)

        # 3. Backends alternate run by run, so that both see the same background load.
        times = {b: [] for b in backends}
        cpu_times = {b: [] for b in backends}

        requests = {}  # the maps (and products) each torch row's forward passes ask for

        def forward(backend):
            student.set_backend('minkowski' if backend == 'minkowski' else 'torch')
            student.__dict__.pop('_map_requests', None)
            if backend in requests:
                student.__dict__['_map_requests'] = requests[backend]
            off = native.disabled() if backend.startswith('ref') else contextlib.nullcontext()
            with off, precision_context(PRECISION.get(backend, 'float32'), device):
                student(coords, vfeats)
            if '_map_requests' in student.__dict__:
                requests[backend] = student.__dict__['_map_requests']

        with torch.no_grad():
            for backend in backends:
                for _ in range(args.warmup):
                    forward(backend)
            for _ in range(args.repeats):
                for backend in backends:
                    sync()
                    t, c = time.perf_counter(), time.process_time()
                    forward(backend)
                    sync()
                    times[backend].append(time.perf_counter() - t)
                    cpu_times[backend].append(time.process_time() - c)
        # 4. What a node pays per scan: voxelize on the CPU, copy, forward, labels per point.
        predict_ms = {}
        student.set_backend('torch')
        for backend in [b for b in backends if b in ('torch', 'torch_bf16')]:
            student.__dict__['_map_requests'] = requests[backend]
            predict_times = []
            for _ in range(args.warmup + args.repeats):
                sync()
                t = time.perf_counter()
                student.predict(points[:, :3], points[:, 3], precision=PRECISION[backend])
                sync()
                predict_times.append(time.perf_counter() - t)
            predict_ms[backend] = f'{statistics.median(predict_times[args.warmup:]) * 1e3:.1f}'
        gflop = flops[0] / 1e9
        for backend in backends:
            med = statistics.median(times[backend])
            ratio = ''
            if backend in PRECISION and 'minkowski' in times:
                ratio = (f'{med / statistics.median(times["minkowski"]):.2f}/'
                         f'{min(times[backend]) / min(times["minkowski"]):.2f}')
            print(f'{name:<14}{backend:<11}{coords.shape[0]:>8}{med * 1e3:>11.1f}'
                  f'{min(times[backend]) * 1e3:>9.1f}'
                  f'{statistics.median(cpu_times[backend]) * 1e3:>9.1f}'
                  f'{gflop:>8.2f}{gflop / med:>9.1f}{100 * gflop / med / peak:>7.1f}%'
                  f'{(f"{map_ms[backend]:.1f}" if backend in map_ms else ""):>9}'
                  f'{predict_ms.get(backend, ""):>11}{ratio:>11}')
    print('median/min ms: wall time per forward; cpu ms: process CPU time per forward (all '
          'threads); maps ms: time to build all coordinate sets and kernel maps of one forward '
          '(torch backend, included in its latency); predict ms: Student.predict on the raw '
          'points (voxelization, forward, a label per point; torch backend); GFLOP/s and % of '
          'the sgemm peak from the '
          'median; ours/ME: ratio of medians / ratio of minima (< 1: the torch backend is '
          'faster). ref, ref_bf16: the torch backend with its compiled kernels off (pure '
          'PyTorch). torch_bf16: the torch backend under bfloat16 autocast (16-bit GEMMs and '
          'gathers; fast on CPUs with AVX512-BF16 or AMX). Backends alternate run by run.')
    return 0


def _time_maps(student, coords, feats, tensor_cls, sync, repeats=3):
    """Median time to build the coordinate sets and kernel maps one forward pass uses, with
    what its convolutions need from them (Student records these after a forward pass)."""
    import torch
    with torch.no_grad():
        student(coords, feats)  # records the maps and products it asked for
    requests = student.__dict__['_map_requests']
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        tensor_cls(feats, coords).manager.prebuild(requests, feats.dtype)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


if __name__ == '__main__':
    sys.exit(main())
