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

TRAIN_SEEDS = (21, 22, 23, 24)          # training streets: a bag each, and labeled frames
HELDOUT_SEED = 31
# The sensor setup of the experiments (docs/experiments.md): what 2 cores train well quickly.
SIM = ('lidar.beams=16', 'lidar.horizontal_resolution_deg=1.0', 'cameras.width=256',
       'cameras.height=144')
# (labeled frames per street, sweeps per training bag, held-out sweeps, teacher steps,
#  student steps)
SIZES = {'small': (8, 8, 8, 2000, 1500), 'full': (8, 16, 16, 4000, 2000)}


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
    cmd = [sys.executable, '-m', 'cmkd_ros.tools.cli', *args]
    print('  $ cmkd ' + ' '.join(args), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _cmkd_start(*args: str) -> subprocess.Popen:
    """``cmkd ARGS`` started in the background (two trainings share the two cores)."""
    print('  $ cmkd ' + ' '.join(args) + '  &', flush=True)
    return subprocess.Popen([sys.executable, '-m', 'cmkd_ros.tools.cli', *args])


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
    per_street, n_train, n_test, teacher_steps, student_steps = SIZES[args.size]
    step = Step(6)
    names = ('teacher_images', 'drive_heldout', 'heldout_pairs', 'pairs', 'teacher',
             'student', 'supervised', 'evaluation', 'evaluation_supervised')
    paths = {k: os.path.join(out, k) for k in names}
    train_bags = [os.path.join(out, f'drive_train_{seed}') for seed in TRAIN_SEEDS]
    sim_set = [word for item in SIM for word in ('--set', item)]

    step(f'render synthetic drives ({len(TRAIN_SEEDS)} training streets: a bag each and '
         'labeled camera images along them; a held-out street; LiDAR 16 beams, six 256x144 '
         'cameras, ground truth)')
    if not os.path.exists(paths['teacher_images']):
        # FSKD's setting: labeled images of the streets driven, no 3D label. The frames are
        # spread along each street (consecutive ones teach little); their 3D labels train
        # only the reference student.
        for seed in TRAIN_SEEDS:
            _cmkd('sim', '--format', 'frames', '--frames', str(per_street), '--stride', '6',
                  '--seed', str(seed), '--out', paths['teacher_images'], '--compressed',
                  '--no-progress', *sim_set)
    for path, fmt, seed, frames in ([(b, 'mcap', s, n_train)
                                     for b, s in zip(train_bags, TRAIN_SEEDS)] +
                                    [(paths['drive_heldout'], 'sqlite3', HELDOUT_SEED, n_test),
                                     (paths['heldout_pairs'], 'frames', HELDOUT_SEED, n_test)]):
        if not os.path.exists(path):
            _cmkd('sim', '--format', fmt, '--frames', str(frames), '--seed', str(seed),
                  '--out', path, '--compressed', '--no-progress', *sim_set)

    from cmkd_ros.tools.evaluate_bag import collect_pairs_from_bag, launch_system_available
    launched = launch_system_available()
    print('  the nodes start ' + ('with ros2 launch cmkd_ros collect.launch.py / '
                                  'segment.launch.py, as a user starts them' if launched else
                                  'as processes (ros2 launch is not installed here)'))
    step('collect distillation pairs: replay each training bag through collect_node')
    if not os.path.exists(paths['pairs']):
        os.environ.update(_ros_env())
        for bag in train_bags:          # the node appends to the same pair dataset
            count = collect_pairs_from_bag(bag, paths['pairs'], rate=0.5,
                                           params={'record.fsync': False,
                                                   'overlay.enabled': False},
                                           log=os.path.join(out, 'collect_node.log'))
        print(f'  collect_node wrote {count} pairs of {n_train * len(train_bags)} sweeps to '
              f'{paths["pairs"]}')
        if count == 0:
            print(f'  no pairs were written; see {out}/collect_node.log', file=sys.stderr)
            return 1

    # The settings of the experiments (docs/experiments.md), with fewer steps.
    student = ['student.arch=small', 'student.da_width=32',
               'student.point_features=intensity_height', 'data.voxel_size=0.2',
               'data.batch_size=1', 'optim.lr=0.004', f'steps={student_steps}',
               f'checkpoint_every={student_steps}', 'threads=1']
    step('train the 2D teacher on labeled camera images and, beside it, a reference student '
         'with every 3D label')
    teacher_ckpt = os.path.join(paths['teacher'], 'teacher.pt')
    supervised_ckpt = os.path.join(paths['supervised'], 'student.pt')
    jobs = []
    if not os.path.exists(teacher_ckpt):
        jobs.append(_cmkd_start(
            'train', 'teacher', '--config', 'config/teacher.yaml', '--out', paths['teacher'],
            f'data.train={paths["teacher_images"]}', f'data.val={paths["heldout_pairs"]}',
            f'steps={teacher_steps}', 'data.batch_size=4', 'optim.lr=0.002', 'threads=1',
            'model.width=24', 'data.crop_size=[128,224]', 'loss.class_balance=inverse_sqrt'))
    if not os.path.exists(supervised_ckpt):
        jobs.append(_cmkd_start(
            'train', 'supervised', '--resume', '--config', 'config/supervised.yaml',
            '--out', paths['supervised'], f'data.train={paths["teacher_images"]}', *student))
    for job in jobs:
        if job.wait() != 0:
            raise subprocess.CalledProcessError(job.returncode, job.args)

    step('train the 3D student with FSKD on the collected pairs (no 3D labels)')
    student_ckpt = os.path.join(paths['student'], 'student.pt')
    if not os.path.exists(student_ckpt):
        _cmkd('train', 'fskd', '--resume', '--config', 'config/fskd.yaml', '--out',
              paths['student'],
              f'data.train={paths["pairs"]}', f'teacher.checkpoint={teacher_ckpt}',
              *student[:-1], 'threads=2')

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
          '--out', paths['evaluation'], '--pictures', '1')
    _cmkd('evaluate', '--checkpoint', supervised_ckpt, '--data', paths['heldout_pairs'],
          '--out', paths['evaluation_supervised'])
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
    print(f'3D student (FSKD, zero-shot: no 3D label) mIoU on the held-out bag, through '
          f'segment_node: {report["miou"]:.3f}')
    scores = {}
    for key in ('evaluation', 'evaluation_supervised'):
        path = os.path.join(paths[key], 'eval.json')
        if os.path.exists(path):
            with open(path, encoding='utf-8') as fh:
                scores[key] = json.load(fh)['all']['miou']
    if len(scores) == 2:
        fskd, supervised = scores['evaluation'], scores['evaluation_supervised']
        print(f'the same held-out scans scored offline (cmkd evaluate): FSKD {fskd:.3f}, the '
              f'same student trained with every 3D label {supervised:.3f} '
              f'({fskd / max(supervised, 1e-9):.0%} of it)')
    lat = report.get('latency_ms', {})
    p50, p95 = (lat.get(k) or float('nan') for k in ('p50', 'p95'))
    print(f'segment_node latency p50 {p50:.1f} ms, p95 {p95:.1f} ms; '
          f'{report["frames_published"]} scans '
          f'published, {report["drops"]} dropped')
    pictures = sorted(f for f in os.listdir(paths['evaluation']) if f.startswith('scan0_'))
    print('pictures: ' + ', '.join(os.path.join(paths['evaluation'], f) for f in pictures) +
          " (bird's-eye view of a held-out scan, student beside ground truth; a camera image "
          "with the student's labels)")
    print(f'outputs in {out}: evaluate_bag.json, evaluation/ (confusion matrix, IoU bars), '
          'overlay/ (projected points)')
