"""How much calibration error distillation survives (issue 18, item 1).

Three parts, all on the synthetic streets of ``cmkd train experiments`` (same SimConfig):

* ``correspondence`` (no training, about a minute): frames of the held-out test worlds; the
  rig's extrinsics perturbed (rotation about random axes, translation in random directions,
  each camera its own draw, ``--draws`` draws per level) and the cameras firing late by a time
  offset the calibration does not know (projected with and without motion compensation).
  Correspondences from :func:`cmkd_ros.projection.compute_correspondences` are scored against
  the renderer's ground truth: ``label agreement`` (the pixel's true label at round(uv) equals
  the point's true label: the best the teacher's labels carried to the points can be) and the
  pixel error against ``gt_uv`` of the correspondences whose point is truly visible there.
* ``train``: one teacher on the training worlds' images, then one FSKD student per level
  (``--levels``) trained on a copy of the training pairs whose stored calibration (or camera
  stamps) carries the error, scored with ``cmkd evaluate`` on the held-out test worlds.
  The stored correspondences are dropped from the perturbed copies (their settings hash does
  not cover the calibration), so the datasets compute them from the wrong calibration.
  Nothing is chosen on the test worlds: the test worlds are only scored.
* ``transfer`` (after ``train``): that teacher's labels carried to the seen test points by
  correspondences computed with each level's error (test pairs perturbed as above), scored
  against the points' true labels (the target FSKD distils).

Usage: ``python benchmarks/calibration_study.py --out runs/calibration_study
[--part correspondence|train|transfer|report ...] [--levels none rot1 ...] [--student-steps 300]
[--seeds 0 1 2]``.
Every training stage is skipped when its result exists, so a run continues where it stopped.
Writes ``study.json``, ``study.md`` and ``calibration_study.png`` into ``--out``.
Figures and their reading: docs/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout

from cmkd_ros.calibration import RigCalibration  # noqa: E402
from cmkd_ros.calibration_check import perturb, with_extrinsic  # noqa: E402

SIM = {'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0},
       'cameras': {'count': 6, 'width': 256, 'height': 144}}   # ExperimentsConfig.sim
TRAIN_WORLDS = (1, 2, 3, 4)
TEST_WORLDS = (101, 102)
STRIDE = 6
ROTATIONS_DEG = (0.0, 0.25, 0.5, 1.0, 2.0)
TRANSLATIONS_CM = (5.0, 10.0, 20.0)
TIME_OFFSETS_MS = (0.0, 10.0, 25.0, 50.0)
# training levels: name -> (rotation deg, translation cm, time offset ms, motion compensation)
LEVELS = {'none': (0.0, 0.0, 0.0, True), 'none_nomc': (0.0, 0.0, 0.0, False),
          'rot0.5': (0.5, 0.0, 0.0, True), 'rot1': (1.0, 0.0, 0.0, True),
          'rot2': (2.0, 0.0, 0.0, True), 'trans5': (0.0, 5.0, 0.0, True),
          'trans20': (0.0, 20.0, 0.0, True), 'time25_mc': (0.0, 0.0, 25.0, True),
          'time50_mc': (0.0, 0.0, 50.0, True), 'time50_nomc': (0.0, 0.0, 50.0, False)}
DEFAULT_LEVELS = ('none', 'rot1', 'rot2', 'trans20', 'time50_mc', 'time50_nomc')


# ---------------------------------------------------------------------------------------------
# Helpers (tested in test/test_calibration_study.py)


def perturb_rig(rig: RigCalibration, rotation_deg: float, translation_m: float,
                rng: np.random.Generator) -> RigCalibration:
    """``rig`` with every camera's ``T_cam_lidar`` moved by a rotation of ``rotation_deg``
    about a random axis and a translation of ``translation_m`` in a random direction (camera
    frame; each camera its own draw)."""
    cams = []
    for cam in rig.cameras:
        axis = rng.normal(size=3)
        direction = rng.normal(size=3)
        move = np.r_[math.radians(rotation_deg) * axis / np.linalg.norm(axis),
                     translation_m * direction / np.linalg.norm(direction)]
        cams.append(with_extrinsic(cam, perturb(cam.T_cam_lidar, move)))
    return RigCalibration(tuple(cams), lidar_frame=rig.lidar_frame)


def label_agreement(corr, label_images, labels: np.ndarray) -> tuple[int, int]:
    """(agreeing, total) correspondences: the label image of the correspondence's camera at
    round(uv) (clipped to the image) equals the point's label."""
    agree = 0
    for c, image in enumerate(label_images):
        sel = corr.camera == c
        if not sel.any():
            continue
        h, w = image.shape[:2]
        u = np.clip(np.rint(corr.uv[sel, 0]).astype(np.int64), 0, w - 1)
        v = np.clip(np.rint(corr.uv[sel, 1]).astype(np.int64), 0, h - 1)
        agree += int((image[v, u] == labels[corr.point[sel]]).sum())
    return agree, int(len(corr.point))


def pixel_errors(corr, gt_uv: np.ndarray, gt_visible: np.ndarray) -> np.ndarray:
    """Pixel distance to ``gt_uv`` (C, N, 2) of the correspondences whose point is truly
    visible in their camera (``gt_visible`` (C, N))."""
    ok = gt_visible[corr.camera, corr.point]
    return np.linalg.norm(corr.uv[ok] - gt_uv[corr.camera[ok], corr.point[ok]], axis=1)


def delayed_world(seed: int, delay_ms: float):
    """A SimWorld of ``seed`` whose cameras fire ``delay_ms`` later than their stamps say
    (frame.camera_stamp_ns are the true capture times; subtract the delay for the stamps)."""
    from cmkd_ros.sim.simulator import SimWorld

    class Delayed(SimWorld):
        def camera_stamps_ns(self, index: int) -> np.ndarray:
            return super().camera_stamps_ns(index) + int(round(delay_ms * 1e6))

    return Delayed({**SIM, 'seed': int(seed)}, workers=1)


# ---------------------------------------------------------------------------------------------
# Part 1: correspondence quality


def _score(frame, rig, stamps, motion_compensation: bool) -> dict:
    from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences
    corr = compute_correspondences(
        frame.xyz, rig, point_time_ns=frame.point_time_ns, camera_stamp_ns=stamps,
        trajectory=frame.trajectory(), ring=frame.ring,
        config=CorrespondenceConfig(motion_compensation=motion_compensation))
    agree, total = label_agreement(corr, frame.label_images, frame.labels)
    err = pixel_errors(corr, frame.gt_uv, frame.gt_visible)
    return {'agree': agree, 'total': total, 'err_sum': float(err.sum()), 'err_n': int(err.size),
            'err_over_2px': int((err > 2).sum())}


def _add(acc: dict, key: str, row: dict) -> None:
    into = acc.setdefault(key, {'agree': 0, 'total': 0, 'err_sum': 0.0, 'err_n': 0,
                                'err_over_2px': 0, 'frames': 0})
    for k, v in row.items():
        into[k] += v
    into['frames'] += 1


def correspondence_part(frames: int, draws: int, seed: int) -> dict:
    """{condition: {label_agreement, pixel_error, ...}} over ``frames`` frames per test world."""
    from cmkd_ros.sim.simulator import SimWorld
    rng = np.random.default_rng(seed)
    acc: dict = {}
    start = time.perf_counter()
    for world_seed in TEST_WORLDS:
        world = SimWorld({**SIM, 'seed': int(world_seed)}, workers=1)
        for k in range(frames):
            frame = world.frame(k * STRIDE)
            rig, stamps = frame.calibration, frame.camera_stamp_ns
            for rot in ROTATIONS_DEG:
                for _ in range(draws if rot else 1):
                    _add(acc, f'rotation {rot:g} deg',
                         _score(frame, perturb_rig(rig, rot, 0.0, rng), stamps, True))
            for cm in TRANSLATIONS_CM:
                for _ in range(draws):
                    _add(acc, f'translation {cm:g} cm',
                         _score(frame, perturb_rig(rig, 0.0, cm / 100, rng), stamps, True))
            for ms in TIME_OFFSETS_MS:
                late = frame if not ms else delayed_world(world_seed, ms).frame(k * STRIDE)
                claimed = late.camera_stamp_ns - int(round(ms * 1e6))
                for mc in (True, False):
                    _add(acc, f'time offset {ms:g} ms, motion compensation '
                         f'{"on" if mc else "off"}', _score(late, rig, claimed, mc))
        print(f'[correspondence] world {world_seed} done after '
              f'{time.perf_counter() - start:.0f} s', flush=True)
    out = {}
    for key, a in acc.items():
        out[key] = {'label_agreement': a['agree'] / max(1, a['total']),
                    'pixel_error': a['err_sum'] / max(1, a['err_n']),
                    'over_2px': a['err_over_2px'] / max(1, a['err_n']),
                    'correspondences_per_frame': a['total'] / max(1, a['frames']),
                    'evaluations': a['frames']}
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: FSKD under the errors


def _render(root: str, worlds, frames: int, delay_ms: float = 0.0) -> str:
    """Training/test pairs (stored correspondences as the experiments store them); with
    ``delay_ms`` the cameras fire that late and the pairs carry the stamps they claimed."""
    from cmkd_ros.pairs import PairReader, PairWriter
    from offline_training.datasets import store_correspondences
    if os.path.exists(os.path.join(root, 'COMPLETE')):
        return root
    writer = PairWriter(root, metadata={'source': 'calibration_study', 'worlds': list(worlds),
                                        'camera_delay_ms': delay_ms}, fsync=False)
    for world_seed in worlds:
        world = delayed_world(world_seed, delay_ms)
        for k in range(frames):
            pair = world.frame(k * STRIDE).to_pair()
            if delay_ms:   # the stamps the driver wrote; no correspondences stored
                pair.camera_stamp_ns = pair.camera_stamp_ns - int(round(delay_ms * 1e6))
                writer.write(pair)
            else:
                writer.write(store_correspondences(pair))
    assert len(PairReader(root)) == len(worlds) * frames
    open(os.path.join(root, 'COMPLETE'), 'w').close()
    return root


def perturbed_copy(source: str, root: str, rotation_deg: float, translation_m: float,
                   seed: int) -> str:
    """Copy of the pair dataset ``source`` with each pair's calibration perturbed (one draw per
    camera for the whole dataset: a rig that is off, not noise) and no stored
    correspondences."""
    from cmkd_ros.pairs import PairReader, PairWriter
    if os.path.exists(os.path.join(root, 'COMPLETE')):
        return root
    reader = PairReader(source)
    rig = perturb_rig(reader[0].calibration, rotation_deg, translation_m,
                      np.random.default_rng(seed))
    writer = PairWriter(root, metadata={'source': source, 'rotation_deg': rotation_deg,
                                        'translation_m': translation_m, 'seed': seed},
                        fsync=False)
    for pair in reader:
        pair.calibration = rig
        pair.correspondences = None
        pair.correspondence_settings = None
        writer.write(pair)
    open(os.path.join(root, 'COMPLETE'), 'w').close()
    return root


def _nice_init() -> None:
    os.nice(max(0, 10 - os.nice(0)))   # trainings at niceness 10 (shared machine)


def _teacher(out: str, train: str, steps: int) -> dict:
    from offline_training.experiments import ExperimentsConfig, _merge, _teacher_job
    cfg = ExperimentsConfig()
    return _teacher_job(_merge({
        'out_dir': out, 'seed': 0, 'steps': steps,
        'data': {'train': train, 'batch_size': cfg.teacher_batch_size},
        'optim': {'lr': cfg.teacher_lr}, 'model': dict(cfg.teacher_model), 'device': 'cpu',
        'precision': cfg.teacher_precision, 'threads': 1, 'progress': False},
        dict(cfg.teacher_options)))


def _student(out: str, train: str, teacher: str, steps: int, mc: bool, seed: int) -> dict:
    from offline_training.experiments import (ExperimentsConfig, _merge, _student_job,
                                              _student_runs)
    cfg = ExperimentsConfig(student_steps=steps, seed=seed)
    method, values = _student_runs(cfg, train, '', teacher)['fskd']
    values = _merge(values, {'data': {'val': '', 'motion_compensation': mc}})
    return _student_job({**values, 'method': method, 'device': 'cpu', 'out_dir': out},
                        resume=True)


def _evaluate(student: str, test: str, out: str) -> dict:
    path = os.path.join(out, 'eval.json')
    if not os.path.exists(path):
        subprocess.run(['nice', '-n', '10', sys.executable, '-m', 'cmkd_ros.tools.cli',
                        'evaluate', '--checkpoint', student, '--data', test, '--out', out],
                       check=True, env={**os.environ, 'PYTHONPATH': str(ROOT)},
                       stdout=subprocess.DEVNULL)
    with open(path, encoding='utf-8') as fh:
        return json.load(fh)


def _run_name(level: str, seed: int) -> str:
    return level if seed == 0 else f'{level}_seed{seed}'


def train_part(out: str, levels, frames: int, teacher_steps: int, student_steps: int,
               parallel: int, seed: int, seeds=(0,)) -> dict:
    """{level: {'miou_all', 'miou_seen', 'miou_unseen' (means over ``seeds``, the students'
    training seeds), '*_std' (sample standard deviation, None for one seed), 'seeds'}}."""
    import concurrent.futures
    import multiprocessing
    data = os.path.join(out, 'data')
    train = _render(os.path.join(data, 'train'), TRAIN_WORLDS, frames)
    test = _render(os.path.join(data, 'test'), TEST_WORLDS, frames)
    sets = {}
    for name in levels:
        rot, cm, ms, _ = LEVELS[name]
        if ms:
            sets[name] = _render(os.path.join(data, f'train_late{ms:g}ms'), TRAIN_WORLDS, frames,
                                 ms)
        elif rot or cm:
            sets[name] = perturbed_copy(train, os.path.join(data, f'train_{name}'), rot,
                                        cm / 100, seed)
        else:
            sets[name] = train
    teacher = os.path.join(out, 'teacher', 'teacher.pt')
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context,
                                                initializer=_nice_init) as pool:
        if not os.path.exists(os.path.join(os.path.dirname(teacher), 'summary.json')):
            print(f'[train] teacher ({teacher_steps} steps)', flush=True)
            pool.submit(_teacher, os.path.dirname(teacher), train, teacher_steps).result()
        jobs = {pool.submit(_student, os.path.join(out, 'runs', _run_name(name, s)),
                            sets[name], teacher, student_steps, LEVELS[name][3], s):
                _run_name(name, s) for s in seeds for name in levels}
        for future in concurrent.futures.as_completed(jobs):
            future.result()
            print(f'[train] {jobs[future]} trained', flush=True)
    results = {}
    for name in levels:
        per_seed = {}
        for s in seeds:
            run = os.path.join(out, 'runs', _run_name(name, s))
            with open(os.path.join(run, 'summary.json'), encoding='utf-8') as fh:
                summary = json.load(fh)
            ev = _evaluate(os.path.join(run, 'student.pt'), test, os.path.join(run, 'test_eval'))
            per_seed[s] = {'miou_all': ev['all']['miou'], 'miou_seen': ev['seen']['miou'],
                           'miou_unseen': ev['unseen']['miou'],
                           'seconds': summary.get('seconds'), 'steps': summary.get('steps')}
            print(f'[train] {name} seed {s}: mIoU all {100 * ev["all"]["miou"]:.1f}',
                  flush=True)
        entry = {'seeds': per_seed, 'seconds': sum(r['seconds'] or 0 for r in per_seed.values())
                 / len(per_seed)}
        for key in ('miou_all', 'miou_seen', 'miou_unseen'):
            values = np.array([r[key] for r in per_seed.values()], float)
            entry[key] = float(values.mean())
            entry[key + '_std'] = float(values.std(ddof=1)) if len(values) > 1 else None
        results[name] = entry
    return results


def transfer_part(out: str, levels, frames: int, seed: int) -> dict:
    """{level: mIoU and accuracy of the trained teacher's labels carried to the seen test
    points by correspondences from a calibration with the level's error} (the target FSKD
    distils; scored against the points' true labels)."""
    import torch
    from cmkd_ros.models.teacher import load_teacher
    from offline_training.datasets import PairDataset
    from offline_training.evaluate import evaluate_label_transfer
    torch.set_num_threads(1)
    teacher = load_teacher(os.path.join(out, 'teacher', 'teacher.pt'))
    data = os.path.join(out, 'data')
    test = _render(os.path.join(data, 'test'), TEST_WORLDS, frames)
    results = {}
    for name in levels:
        rot, cm, ms, mc = LEVELS[name]
        if ms:
            root = _render(os.path.join(data, f'test_late{ms:g}ms'), TEST_WORLDS, frames, ms)
        elif rot or cm:
            root = perturbed_copy(test, os.path.join(data, f'test_{name}'), rot, cm / 100, seed)
        else:
            root = test
        seen = evaluate_label_transfer(
            teacher, PairDataset(root, label_images=False, motion_compensation=mc),
            class_names=teacher.class_map.names)['seen']
        results[name] = {'miou': seen['miou'], 'accuracy': seen['accuracy']}
        print(f'[transfer] {name}: mIoU {100 * seen["miou"]:.1f}', flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Report


def _level_text(name: str) -> str:
    rot, cm, ms, mc = LEVELS[name]
    return ', '.join(p for p in (f'rotation {rot:g} deg' if rot else '',
                                 f'translation {cm:g} cm' if cm else '',
                                 f'time offset {ms:g} ms' if ms else '',
                                 '' if mc else 'no motion compensation') if p) or 'no error'


def report(study: dict) -> str:
    rows = []
    corr = study.get('correspondence')
    if corr:
        rows += ['| error of the calibration | label agreement | pixel error (visible) | '
                 '> 2 px | correspondences / frame |', '|---|---|---|---|---|']
        for key, r in corr.items():
            rows.append(f'| {key} | {100 * r["label_agreement"]:.1f}% | '
                        f'{r["pixel_error"]:.2f} px | {100 * r["over_2px"]:.1f}% | '
                        f'{r["correspondences_per_frame"]:.0f} |')
        rows.append('')
    transfer = study.get('transfer')
    if transfer:
        rows += ['| calibration of the test pairs | teacher labels carried: mIoU (seen points) | '
                 'accuracy |', '|---|---|---|']
        for name, r in transfer.items():
            rows.append(f'| {_level_text(name)} | {100 * r["miou"]:.1f} | '
                        f'{100 * r["accuracy"]:.1f} |')
        rows.append('')
    train = study.get('train')
    if train:
        base = (train.get('none') or {}).get('miou_all')
        base_seeds = (train.get('none') or {}).get('seeds') or {}
        rows += ['| training pairs | seeds | FSKD mIoU all | seen | unseen | vs. no error | '
                 'vs. no error, per seed | training s |', '|---|---|---|---|---|---|---|---|']
        for name, r in train.items():
            what = _level_text(name)
            delta = '-' if base is None or name == 'none' else \
                f'{100 * (r["miou_all"] - base):+.1f}'
            cells = ' | '.join(_pct(r[k], r.get(k + '_std'))
                               for k in ('miou_all', 'miou_seen', 'miou_unseen'))
            paired = '-' if name == 'none' else ' / '.join(
                f'{100 * (v["miou_all"] - base_seeds[k]["miou_all"]):+.1f}'
                for k, v in (r.get('seeds') or {}).items() if k in base_seeds) or '-'
            rows.append(f'| {what} | {len(r.get("seeds") or [0])} | {cells} | {delta} | '
                        f'{paired} | {r["seconds"]:.0f} |')
    return '\n'.join(rows) + '\n'


def _pct(value: float, std: float | None = None) -> str:
    return f'{100 * value:.1f}' + ('' if std is None else f' ± {100 * std:.1f}')


def plot(study: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    corr = study.get('correspondence') or {}
    train = study.get('train') or {}
    fig, axes = plt.subplots(1, 3 if train else 2, figsize=(15 if train else 10, 4))
    series = {'rotation (deg)': [(v, f'rotation {v:g} deg') for v in ROTATIONS_DEG],
              'translation (cm / 10)': [(0.0, 'rotation 0 deg')] +
              [(v / 10, f'translation {v:g} cm') for v in TRANSLATIONS_CM],
              'time offset (ms / 25), comp. on': [
                  (v / 25, f'time offset {v:g} ms, motion compensation on')
                  for v in TIME_OFFSETS_MS],
              'time offset (ms / 25), comp. off': [
                  (v / 25, f'time offset {v:g} ms, motion compensation off')
                  for v in TIME_OFFSETS_MS]}
    for label, pts in series.items():
        pts = [(x, corr[k]) for x, k in pts if k in corr]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        axes[0].plot(xs, [100 * r['label_agreement'] for _, r in pts], 'o-', label=label)
        axes[1].plot(xs, [r['pixel_error'] for _, r in pts], 'o-', label=label)
    axes[0].set(title='label agreement of the correspondences (held-out worlds)',
                xlabel='error (rotation deg; translation dm; time offset x 25 ms)',
                ylabel='%')
    axes[1].set(title='pixel error of truly visible points', xlabel=axes[0].get_xlabel(),
                ylabel='px', yscale='log')
    if corr:
        axes[0].legend(fontsize=8)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    if train:
        names = list(train)
        stds = [train[n].get('miou_all_std') for n in names]
        axes[2].bar(range(len(names)), [100 * train[n]['miou_all'] for n in names],
                    yerr=[100 * (v or 0) for v in stds], capsize=3)
        values = [100 * train[n]['miou_all'] for n in names]
        axes[2].set_ylim(max(0.0, min(values) - 4), max(values) + 2)
        axes[2].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        seeds = max(len(train[n].get('seeds') or [0]) for n in names)
        axes[2].set(title=f'FSKD zero-shot mIoU (held-out worlds, {seeds} seed(s))',
                    ylabel='mIoU %')
        axes[2].grid(alpha=0.3, axis='y')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='runs/calibration_study', help='output folder')
    parser.add_argument('--part', nargs='+', default=['correspondence', 'train', 'transfer'],
                        choices=('correspondence', 'train', 'transfer', 'report'),
                        help='transfer: the trained teacher\'s labels carried to the test '
                        'points under each level\'s error; report: table and plot from '
                        'study.json only')
    parser.add_argument('--frames', type=int, default=2,
                        help='frames per test world of the correspondence part')
    parser.add_argument('--draws', type=int, default=4,
                        help='random draws per extrinsic error level')
    parser.add_argument('--levels', nargs='+', default=list(DEFAULT_LEVELS),
                        choices=list(LEVELS), help='training levels (training pairs with '
                        'that error; none: the true calibration)')
    parser.add_argument('--train-frames', type=int, default=8, help='frames per world of the '
                        'training and test pairs (the experiments: 8)')
    parser.add_argument('--teacher-steps', type=int, default=600)
    parser.add_argument('--student-steps', type=int, default=300)
    parser.add_argument('--parallel', type=int, default=2, help='trainings at a time')
    parser.add_argument('--seed', type=int, default=0, help='seed of the perturbation draws')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                        help='training seeds of every student (more than one: mean ± std)')
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'study.json')
    study = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            study = json.load(fh)
    if 'correspondence' in args.part:
        study['correspondence'] = correspondence_part(args.frames, args.draws, args.seed)
        study['correspondence_settings'] = {'frames_per_world': args.frames,
                                            'draws': args.draws, 'seed': args.seed,
                                            'worlds': list(TEST_WORLDS)}
    if 'train' in args.part:
        study.setdefault('train', {}).update(train_part(
            args.out, args.levels, args.train_frames, args.teacher_steps, args.student_steps,
            args.parallel, args.seed, args.seeds))
        study['train_settings'] = {'teacher_steps': args.teacher_steps,
                                   'student_steps': args.student_steps,
                                   'frames_per_world': args.train_frames,
                                   'train_worlds': list(TRAIN_WORLDS),
                                   'test_worlds': list(TEST_WORLDS), 'seeds': args.seeds}
    if 'transfer' in args.part:
        wanted = set(args.levels) | ({'rot0.5'} if 'none' in args.levels else set())
        study['transfer'] = transfer_part(args.out, [k for k in LEVELS if k in wanted],
                                          args.train_frames, args.seed)
    with open(path, 'w', encoding='utf-8') as fh:
        json.dump(study, fh, indent=2)
    table = report(study)
    with open(os.path.join(args.out, 'study.md'), 'w', encoding='utf-8') as fh:
        fh.write(table)
    plot(study, os.path.join(args.out, 'calibration_study.png'))
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
