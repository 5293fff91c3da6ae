"""``cmkd demo``: the whole collect -> train -> segment -> evaluate loop on synthetic drives.

1. render labeled camera images along four training streets (the 2D teacher's data) and the
   held-out street's sweeps with ground truth;
2. train the 2D teacher on the labeled images, in the background;
3. meanwhile render a drive through each training street (rosbag2, MCAP) and a held-out drive
   (sqlite3);
4. replay each training bag through the real ``collect_node`` (a separate ROS 2 process), which
   synchronizes LiDAR + six cameras, computes correspondences and records a distillation pair
   every half second of the drive;
5. train, side by side, a reference student with every 3D label and, once the teacher is done,
   the 3D student with FSKD on the collected pairs (no 3D labels: zero-shot);
6. replay the held-out bag through the real ``segment_node`` and score it against the bag's
   ground-truth labels (mIoU, latency percentiles, drops); beside it score the same scans
   offline and draw pictures: a bird's-eye view and a camera image of a held-out scan with the
   student's labels, the confusion matrix and per-class IoU.

Every step is a ``cmkd`` subcommand or node run as its own process, exactly as a user would run
them; the demo only chains them (two at a time, one per core) and prints where each output went.
The settings are the experiments' (docs/experiments.md); the budget was chosen on validation
streets the demo never uses, and the held-out street scores the result.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

TRAIN_SEEDS = (21, 22, 23, 24)          # training streets: a bag each, and labeled frames
HELDOUT_SEED = 31                       # the test street: scored once, never used to choose
# The sensor setup of the experiments (docs/experiments.md): what 2 cores train well quickly.
SIM = ('lidar.beams=16', 'lidar.horizontal_resolution_deg=1.0', 'cameras.width=256',
       'cameras.height=144')
SWEEP_S = 0.1                           # the simulated LiDAR spins at 10 Hz


@dataclass(frozen=True)
class Size:
    """How much the demo renders and trains."""

    drive_sweeps: int       # sweeps of each training drive (bag)
    pair_interval_s: float  # collect_node record.min_interval_s: a pair every this much drive
    heldout_sweeps: int     # sweeps of the held-out drive
    teacher_steps: int
    student_steps: int      # FSKD and the supervised reference

    @property
    def pairs_per_street(self) -> int:
        stride = round(self.pair_interval_s / SWEEP_S)
        return (self.drive_sweeps - 1) // stride + 1


SIZES = {'small': Size(40, 0.5, 24, 1500, 1500), 'full': Size(80, 0.5, 48, 4000, 3000)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', default='out/demo', help='output folder (default out/demo)')
    parser.add_argument('--size', choices=sorted(SIZES), default='small',
                        help='small: about 8.5 minutes on a quiet 2-core machine; full: better '
                        'numbers, about 19 minutes (docs/demo.md)')
    parser.add_argument('--heldout-seed', type=int, default=HELDOUT_SEED,
                        help=f'world seed of the held-out street (default {HELDOUT_SEED}, the '
                        'test street; the settings were chosen on streets 41 and 42, '
                        'docs/demo.md)')
    parser.add_argument('--keep', action='store_true',
                        help='reuse outputs of an earlier run instead of starting over')


class Step:
    """Prints numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.index, self.start = total, 0, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, text: str) -> None:
        self.index += 1
        print(f'[{self.index}/{self.total} {self.elapsed():6.0f} s] {text}', flush=True)


def _command(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, '-m', 'cmkd_ros.tools.cli', *args]


def _cmkd(*args: str, env=None) -> None:
    print('  $ cmkd ' + ' '.join(args), flush=True)
    subprocess.run(_command(args), check=True, env=env)


class Job:
    """``cmkd ARGS`` running in the background (the demo keeps both cores busy); with ``log``
    its output goes to that file and is printed once it is done."""

    def __init__(self, name: str, *args: str, log: str | None = None):
        print('  $ cmkd ' + ' '.join(args) + '  &', flush=True)
        env = dict(os.environ)
        # Two programs share the terminal: plain progress lines instead of two live bars.
        env.setdefault('CMKD_PROGRESS', 'lines')
        self.name, self.log, self.start = name, log, time.monotonic()
        sink = None
        if log:
            os.makedirs(os.path.dirname(log), exist_ok=True)
            sink = open(log, 'wb')
        try:
            self.proc = subprocess.Popen(_command(args), env=env, stdout=sink,
                                         stderr=subprocess.STDOUT if sink else None)
        finally:
            if sink is not None:
                sink.close()

    def wait(self) -> None:
        cpu = ''
        if hasattr(os, 'wait4') and self.proc.returncode is None:
            # The job's CPU time beside its wall time: on a busy machine the wall time says
            # little about what the job costs on a quiet one.
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            cpu = f', {usage.ru_utime + usage.ru_stime:.0f} s of CPU'
        code = self.proc.wait()
        if self.log:
            with open(self.log, encoding='utf-8', errors='replace') as fh:
                print(fh.read(), end='', flush=True)
        if code != 0:
            raise subprocess.CalledProcessError(code, self.proc.args)
        print(f'  {self.name} finished ({time.monotonic() - self.start:.0f} s{cpu})', flush=True)


class Jobs:
    """Starts :class:`Job` s and, on leaving its ``with`` block, stops those still running (a
    failed or interrupted demo leaves no training behind)."""

    def __init__(self):
        self.started: list[Job] = []

    def start(self, name: str, *args: str, log: str | None = None) -> Job:
        self.started.append(Job(name, *args, log=log))
        return self.started[-1]

    def __enter__(self) -> 'Jobs':
        return self

    def __exit__(self, *exc) -> None:
        for job in self.started:
            if job.proc.poll() is None:
                job.proc.terminate()
                job.proc.wait()


def _parallel(jobs: Jobs, commands: list[tuple[str, ...]], slots: int = 2) -> None:
    """Run ``cmkd`` commands as :class:`Job` s, ``slots`` at a time (stopped with the demo when
    one fails); each is named after its ``--out`` folder."""
    running: list[Job] = []
    for args in commands:
        if len(running) == slots:
            running.pop(0).wait()
        running.append(jobs.start(os.path.basename(args[args.index('--out') + 1]), *args))
    for job in running:
        job.wait()


def _ros_env() -> dict:
    """An isolated ROS 2 graph for the demo's processes (own domain, localhost discovery)."""
    from cmkd_ros.openmp import openmp_defaults
    env = dict(os.environ)
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    openmp_defaults(env)
    env['ROS_DOMAIN_ID'] = str(os.getpid() % 90 + 5)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    return env


def _config(name: str) -> str:
    """config/<name> of the source tree, else of the installed package's share folder."""
    here = os.path.join(os.path.dirname(__file__), '..', '..', 'config', name)
    if os.path.isfile(here):
        return os.path.normpath(here)
    try:
        from ament_index_python.packages import get_package_share_directory
        return os.path.join(get_package_share_directory('cmkd_ros'), 'config', name)
    except (ImportError, LookupError, ValueError):
        return here


def run(args: argparse.Namespace) -> int:
    with Jobs() as jobs:
        return _run(args, jobs)


def _run(args: argparse.Namespace, jobs: Jobs) -> int:
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.keep:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    size = SIZES[args.size]
    stride = round(size.pair_interval_s / SWEEP_S)
    step = Step(6)
    names = ('labeled_images', 'drive_heldout', 'heldout_pairs', 'pairs', 'teacher',
             'student', 'supervised', 'evaluation', 'evaluation_supervised')
    paths = {k: os.path.join(out, k) for k in names}
    train_bags = [os.path.join(out, f'drive_train_{seed}') for seed in TRAIN_SEEDS]
    sim_set = [word for item in SIM for word in ('--set', item)]
    common = ('--compressed', '--no-progress', *sim_set)

    step(f'render labeled camera images along {len(TRAIN_SEEDS)} training streets and along a '
         'held-out street (LiDAR 16 beams, six 256x144 cameras, ground truth)')
    # FSKD's setting: labeled images of the streets driven, no 3D label (the frames' 3D labels
    # train only the reference student). Spread along each street like the pairs collect_node
    # will record; one street per folder, rendered two at a time, then joined.
    parts = {seed: os.path.join(out, 'labeled_images_parts', str(seed)) for seed in TRAIN_SEEDS}
    renders = [] if os.path.exists(paths['labeled_images']) else [
        ('sim', '--format', 'frames', '--frames', str(size.pairs_per_street), '--stride',
         str(stride), '--seed', str(seed), '--out', part, *common)
        for seed, part in parts.items() if not os.path.exists(part)]
    if not os.path.exists(paths['heldout_pairs']):
        # The held-out drive's sweeps with ground truth, scored offline (cmkd evaluate); the
        # longest render goes first.
        renders.insert(0, ('sim', '--format', 'frames', '--frames',
                           str(size.heldout_sweeps), '--seed', str(args.heldout_seed),
                           '--out', paths['heldout_pairs'], *common))
    _parallel(jobs, renders)
    if not os.path.exists(paths['labeled_images']):
        _join_pairs(list(parts.values()), paths['labeled_images'])
        shutil.rmtree(os.path.join(out, 'labeled_images_parts'))

    step('train the 2D teacher on the labeled images (in the background, one core)')
    teacher_ckpt = os.path.join(paths['teacher'], 'teacher.pt')
    teacher = None
    if not os.path.exists(teacher_ckpt):
        teacher = jobs.start('teacher', 'train', 'teacher', '--config',
                             _config('demo_teacher.yaml'), '--out', paths['teacher'],
                             f'data.train={paths["labeled_images"]}',
                             f'data.val={paths["heldout_pairs"]}', f'steps={size.teacher_steps}')

    step(f'render drives of {size.drive_sweeps * SWEEP_S:.0f} s through each training street '
         f'(MCAP bags) and of {size.heldout_sweeps * SWEEP_S:.1f} s through the held-out '
         'street (sqlite3 bag)')
    for path, fmt, seed, frames in ([(b, 'mcap', s, size.drive_sweeps)
                                     for b, s in zip(train_bags, TRAIN_SEEDS)] +
                                    [(paths['drive_heldout'], 'sqlite3', args.heldout_seed,
                                      size.heldout_sweeps)]):
        if not os.path.exists(path):
            _cmkd('sim', '--format', fmt, '--frames', str(frames), '--seed', str(seed),
                  '--out', path, *common)

    from cmkd_ros.tools.evaluate_bag import collect_pairs_from_bag, launch_system_available
    launched = launch_system_available()
    print('  the nodes start ' + ('with ros2 launch cmkd_ros collect.launch.py / '
                                  'segment.launch.py, as a user starts them' if launched else
                                  'as processes (ros2 launch is not installed here)'))
    step(f'collect distillation pairs: replay each training bag through collect_node, which '
         f'records a pair every {size.pair_interval_s} s of the drive '
         f'(record.min_interval_s; consecutive sweeps teach little)')
    if not os.path.exists(paths['pairs']):
        os.environ.update(_ros_env())
        for bag in train_bags:          # the node appends to the same pair dataset
            count = collect_pairs_from_bag(bag, paths['pairs'], rate=0.5,
                                           params={'record.fsync': False,
                                                   'record.min_interval_s':
                                                       size.pair_interval_s,
                                                   'overlay.enabled': False},
                                           log=os.path.join(out, 'collect_node.log'))
        print(f'  collect_node wrote {count} pairs from {size.drive_sweeps * len(train_bags)} '
              f'sweeps to {paths["pairs"]}')
        if count == 0:
            print(f'  no pairs were written; see {out}/collect_node.log', file=sys.stderr)
            return 1

    step('train, side by side, a reference student with every 3D label of the training '
         'streets and, once the teacher is done, the 3D student with FSKD on the collected '
         'pairs (no 3D label)')
    supervised_ckpt = os.path.join(paths['supervised'], 'student.pt')
    student_ckpt = os.path.join(paths['student'], 'student.pt')
    supervised = None
    if not os.path.exists(supervised_ckpt):
        supervised = jobs.start('supervised reference', 'train', 'supervised', '--resume',
                                '--config', _config('demo_supervised.yaml'),
                                '--out', paths['supervised'],
                                f'data.train={paths["labeled_images"]}',
                                f'steps={size.student_steps}')
    if teacher is not None:
        teacher.wait()
    fskd = None
    if not os.path.exists(student_ckpt):
        fskd = jobs.start('FSKD', 'train', 'fskd', '--resume', '--config',
                          _config('demo_fskd.yaml'), '--out', paths['student'],
                          f'data.train={paths["pairs"]}', f'teacher.checkpoint={teacher_ckpt}',
                          f'steps={size.student_steps}')
    if supervised is not None:
        supervised.wait()
    # While FSKD trains: the reference student's scores and the projected-points picture.
    _cmkd('evaluate', '--checkpoint', supervised_ckpt, '--data', paths['heldout_pairs'],
          '--out', paths['evaluation_supervised'])
    _cmkd('overlay', paths['heldout_pairs'], '--out', os.path.join(out, 'overlay'),
          '--max-frames', '1', '--color', 'label')
    if fskd is not None:
        fskd.wait()

    step("segment the held-out bag through segment_node and score it; beside it, the same "
         "scans scored offline, with pictures: a bird's-eye view and a camera image of a "
         "held-out scan, the confusion matrix and per-class IoU")
    offline = jobs.start('offline scoring', 'evaluate', '--checkpoint', student_ckpt, '--data',
                         paths['heldout_pairs'], '--out', paths['evaluation'], '--pictures',
                         '1', log=os.path.join(paths['evaluation'], 'evaluate.log'))
    report_path = os.path.join(out, 'evaluate_bag.json')
    # Replayed at a quarter of real time so that every scan is scored on a busy 2-core machine;
    # the node still drops stale scans instead of queueing (benchmarks/bench_segment_node.py
    # measures it at full rate).
    _cmkd('evaluate-bag', paths['drive_heldout'], '--checkpoint', student_ckpt, '--rate', '0.25',
          '--json', report_path, '--log', os.path.join(out, 'segment_node.log'), env=_ros_env())
    offline.wait()
    _summary(out, report_path, paths, step.elapsed())
    return 0


def _join_pairs(parts: list[str], root: str) -> None:
    """Copy the pairs of the datasets ``parts``, in order, into the new dataset ``root``."""
    from cmkd_ros.pairs import PairReader, PairWriter
    tmp = root + '.tmp'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    writer = PairWriter(tmp, metadata={'source': 'cmkd demo', 'parts': parts}, fsync=False)
    for part in parts:
        for pair in PairReader(part):
            writer.write(pair)
    os.replace(tmp, root)


def _summary(out: str, report_path: str, paths: dict, seconds: float) -> None:
    with open(report_path, encoding='utf-8') as fh:
        report = json.load(fh)
    teacher_summary = os.path.join(paths['teacher'], 'summary.json')
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(f'\n=== cmkd demo summary ({seconds / 60:.1f} min, {cpu / 60:.1f} min of CPU) ===')
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
