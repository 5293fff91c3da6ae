"""``cmkd demo``: the whole collect -> train -> segment -> evaluate loop on synthetic drives.

1. render three synthetic drives: labeled camera images for the 2D teacher (a pair dataset), a
   training drive and a held-out drive (rosbag2, MCAP and sqlite3);
2. replay the training bag through the real ``collect_node`` (a separate ROS 2 process), which
   synchronizes LiDAR + six cameras, computes correspondences and writes distillation pairs;
3. train the 2D teacher on the labeled images;
4. train the 3D student with FSKD on the collected pairs: no 3D labels (zero-shot);
5. replay the held-out bag through the real ``segment_node`` and score it against the bag's
   ground-truth labels (mIoU, latency percentiles, drops);
6. write pictures: projected points over a camera image, the confusion matrix and per-class IoU.

Every step is a ``cmkd`` subcommand or node run as its own process, exactly as a user would run
them; the demo only chains them and prints where each output went.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

TEACHER_SEEDS = (11, 12, 13, 14, 15, 16)
# (teacher image frames, training drive frames, held-out frames, teacher steps, student steps)
SIZES = {'small': (24, 24, 8, 300, 300), 'full': (60, 60, 20, 1200, 1500)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', default='out/demo', help='output folder (default out/demo)')
    parser.add_argument('--size', choices=sorted(SIZES), default='small',
                        help='small: about 10 minutes on 2 cores; full: better numbers')
    parser.add_argument('--keep', action='store_true',
                        help='reuse outputs of an earlier run instead of starting over')


class Step:
    """Prints numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.index, self.start = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.index += 1
        print(f'[{self.index}/{self.total} {time.monotonic() - self.start:6.0f} s] {text}',
              flush=True)


def _cmkd(*args: str, env=None) -> None:
    cmd = [sys.executable, '-m', 'cmkd_ros.cli', *args]
    print('  $ cmkd ' + ' '.join(args), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _ros_env() -> dict:
    """An isolated ROS 2 graph for the demo's processes (own domain, localhost discovery)."""
    env = dict(os.environ)
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env['ROS_DOMAIN_ID'] = str(os.getpid() % 90 + 5)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    return env


def run(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.keep:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    n_teacher, n_train, n_test, teacher_steps, student_steps = SIZES[args.size]
    step = Step(6)
    names = ('teacher_images', 'drive_train', 'drive_heldout', 'heldout_pairs', 'pairs',
             'teacher', 'student', 'evaluation')
    paths = {k: os.path.join(out, k) for k in names}

    step('render synthetic drives (LiDAR 32 beams, six 640x360 cameras, ground truth)')
    if not os.path.exists(paths['teacher_images']):
        # Labeled images for the teacher, spread over several streets (consecutive frames of
        # one street teach a 2D network little).
        per_seed = max(1, n_teacher // len(TEACHER_SEEDS))
        for seed in TEACHER_SEEDS:
            _cmkd('sim', '--format', 'frames', '--frames', str(per_seed), '--stride', '8',
                  '--seed', str(seed), '--out', paths['teacher_images'], '--compressed',
                  '--no-progress')
    for key, fmt, seed, frames in (('drive_train', 'mcap', 21, n_train),
                                   ('drive_heldout', 'sqlite3', 31, n_test),
                                   ('heldout_pairs', 'frames', 31, n_test)):
        if not os.path.exists(paths[key]):
            _cmkd('sim', '--format', fmt, '--frames', str(frames), '--seed', str(seed),
                  '--out', paths[key], '--compressed')

    step('collect distillation pairs: replay the training bag through collect_node')
    if not os.path.exists(paths['pairs']):
        from cmkd_ros.evaluate_bag import collect_pairs_from_bag
        os.environ.update(_ros_env())
        count = collect_pairs_from_bag(paths['drive_train'], paths['pairs'], rate=0.5,
                                       params={'record.fsync': False, 'overlay.enabled': False},
                                       log=os.path.join(out, 'collect_node.log'))
        print(f'  collect_node wrote {count} pairs of {n_train} sweeps to {paths["pairs"]}')
        if count == 0:
            print(f'  no pairs were written; see {out}/collect_node.log', file=sys.stderr)
            return 1

    step('train the 2D teacher on labeled camera images')
    teacher_ckpt = os.path.join(paths['teacher'], 'teacher.pt')
    if not os.path.exists(teacher_ckpt):
        _cmkd('train', 'teacher', '--config', 'config/teacher.yaml', '--out', paths['teacher'],
              f'train={paths["teacher_images"]}', f'val={paths["heldout_pairs"]}',
              f'steps={teacher_steps}', 'batch_size=4', 'lr=0.002',
              'options.class_weighting=inverse_sqrt', 'options.val_image_scale=0.5')

    step('train the 3D student with FSKD on the collected pairs (no 3D labels)')
    student_ckpt = os.path.join(paths['student'], 'student.pt')
    if not os.path.exists(student_ckpt):
        _cmkd('train', 'fskd', '--resume', '--config', 'config/fskd.yaml', '--out',
              paths['student'],
              f'data.train={paths["pairs"]}', f'teacher.checkpoint={teacher_ckpt}',
              f'steps={student_steps}', 'student.arch=small', 'student.da_width=32',
              'data.voxel_size=0.2', 'data.batch_size=1',
              'data.image_scale=0.5', f'checkpoint_every={student_steps}')

    step('segment the held-out bag through segment_node and score it')
    report_path = os.path.join(out, 'evaluate_bag.json')
    # Replayed at a quarter of real time so that every scan is scored on a busy 2-core machine;
    # the node still drops stale scans instead of queueing (benchmarks/bench_segment_node.py
    # measures it at full rate).
    _cmkd('evaluate-bag', paths['drive_heldout'], '--checkpoint', student_ckpt, '--rate', '0.25',
          '--json', report_path, '--log', os.path.join(out, 'segment_node.log'), env=_ros_env())

    step('pictures: projected points, confusion matrix, per-class IoU')
    _cmkd('overlay', paths['heldout_pairs'], '--out', os.path.join(out, 'overlay'),
          '--max-frames', '1', '--color', 'label')
    _cmkd('evaluate', '--checkpoint', student_ckpt, '--data', paths['heldout_pairs'],
          '--out', paths['evaluation'])
    _summary(out, report_path, paths)
    return 0


def _summary(out: str, report_path: str, paths: dict) -> None:
    with open(report_path, encoding='utf-8') as fh:
        report = json.load(fh)
    teacher_summary = os.path.join(paths['teacher'], 'summary.json')
    print('\n=== cmkd demo summary ===')
    if os.path.exists(teacher_summary):
        with open(teacher_summary, encoding='utf-8') as fh:
            teacher_eval = json.load(fh).get('eval') or {}
        if 'miou' in teacher_eval:
            print(f'2D teacher mIoU on the held-out images: {teacher_eval["miou"]:.3f}')
    print(f'3D student (FSKD, zero-shot) mIoU on the held-out bag: {report["miou"]:.3f}')
    lat = report.get('latency_ms', {})
    p50, p95 = (lat.get(k) or float('nan') for k in ('p50', 'p95'))
    print(f'segment_node latency p50 {p50:.1f} ms, p95 {p95:.1f} ms; '
          f'{report["frames_published"]} scans '
          f'published, {report["drops"]} dropped')
    print(f'outputs in {out}: evaluate_bag.json, evaluation/ (confusion matrix, IoU bars), '
          'overlay/ (projected points)')
