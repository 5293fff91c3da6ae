"""The experiments of the method on the synthetic world, as one command.

``cmkd train experiments --out DIR`` (or ``python -m offline_training.experiments --out DIR``):

1. render training scenes and the scenes it scores on (different world seeds: different
   streets): the validation worlds in the ``validation`` stage (settings are chosen there), the
   test worlds in the ``test`` stage (scored once, at the end: a second test stage on the same
   output is refused unless ``force``); ``rig=second`` renders every world with a second camera
   rig and LiDAR on which no choice is made (test stage only);
2. train the 2D teacher on the training images; score it on the scored images (2D mIoU);
3. train students on the training scans and score them on the scored scans (3D mIoU, all points
   and points no camera sees), ``repeats`` times with consecutive seeds:
   - ``fskd``: FSKD zero-shot (no 3D labels; shared frozen teacher classifier; the project's DA
     module: linear shortcut, pooling rate 2);
   - ``fskd_image_labels``: FSKD that also learns the label images of the training pairs at
     the points' pixels (the labeled images the teacher learned from; still no 3D label);
   - ``fskd_paper_da``: FSKD with the paper's DA module (three self-calibrated layers, pooling
     rate 4, no shortcut);
   - ``udakd_finetune``: UDAKD pre-training, then fine-tuning on ``label_fraction`` of the
     labeled scans;
   - ``finetune_scratch``: the same fine-tuning from random weights (what UDAKD is worth);
   - ``supervised``: every 3D label, the same network (the upper bound);
   - ``fskd_no_da``: FSKD without the DA module (ablation);
   - ``fskd_no_occlusion``: FSKD with correspondences kept for occluded points (ablation);
4. score the zero-shot students also by a linear probe on their frozen features
   (:mod:`offline_training.probe`) and draw the pictures (:mod:`offline_training.pictures`);
5. write ``results.json`` and ``results.md`` (the table of docs/results.md, headed by which
   worlds served for what).

Every stage writes into its own folder and is skipped when its results exist, so an interrupted
run continues where it stopped. Settings: :class:`ExperimentsConfig` (``key=value`` overrides).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

from cmkd_ros.config import ConfigError, PRECISION_CHOICES, build, load, setting, to_dict
from cmkd_ros.sim.config import LIDAR_PRESETS, LidarConfig
from offline_training.config import TEACHER_RENAMED, move_renamed_teacher_settings

RUNS = ('fskd', 'fskd_image_labels', 'fskd_paper_da', 'udakd_finetune', 'finetune_scratch',
        'supervised', 'fskd_no_da', 'fskd_no_occlusion')
STAGES = ('validation', 'test')
RIGS = ('main', 'second')
# Zero-shot runs whose frozen features the linear probe scores (UDAKD: the usual protocol for
# pre-trained features; its shared-classifier score leaves the InfoNCE feature scale free).
PROBE_RUNS = ('udakd', 'fskd', 'fskd_paper_da', 'fskd_no_da')


class ExperimentsError(ValueError):
    """The protocol refuses: a second test stage, another stage's folder, stale data."""


@dataclass(frozen=True)
class ExperimentsConfig:
    """Budget and settings of the synthetic experiments (defaults: about 25 min on 2 cores)."""

    out_dir: str = setting('runs/experiments', 'output folder (data, runs, results.md)')
    seed: int = setting(0, 'training seed of the teacher and of every student run', ge=0)
    repeats: int = setting(1, 'train every student run this many times, seeds seed, seed+1, ...;'
                           ' the table gives mean and standard deviation', ge=1)
    stage: str = setting('validation', 'validation: score on val_worlds (settings are chosen '
                         'there); test: score on test_worlds, once (refused a second time in '
                         'the same out_dir unless force)', choices=STAGES)
    force: bool = setting(False, 'run the test stage again in an out_dir where it already ran')
    train_worlds: tuple[int, ...] = setting((1, 2, 3, 4), 'world seeds of the training streets')
    val_worlds: tuple[int, ...] = setting(
        (101, 102, 201, 202), 'world seeds of the validation streets (runs A-M were tuned on '
        '101, 102 and 201, 202)')
    test_worlds: tuple[int, ...] = setting(
        (301, 302), 'world seeds of the test streets, scored once by the test stage (fresh on '
        '2026-12-06: no run before has seen them)')
    teacher_worlds: tuple[int, ...] = setting(
        (), 'world seeds whose labeled images train only the teacher, beside the training '
        'streets\' (images are cheap to label: a 2D teacher learns from more of them than the '
        'LiDAR drives give); their scans only with distill_on_teacher_worlds')
    distill_on_teacher_worlds: bool = setting(
        False, 'FSKD and UDAKD distil from the teacher worlds\' pairs too (unlabeled scans and '
        'images: no 3D label is used); supervised and fine-tuning keep to the training '
        'streets\' 3D labels')
    rig: str = setting('main', 'sensors of every world: main (sim) or second (second_rig; test '
                       'stage only, no choice is made on it)', choices=RIGS)
    frames_per_world: int = setting(8, 'frames rendered per street', ge=1)
    frame_stride: int = setting(6, 'keep every n-th sweep of the drive (10 Hz LiDAR)', ge=1)
    sim: dict[str, Any] = setting(
        default_factory=lambda: {'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0},
                                 'cameras': {'count': 6, 'width': 256, 'height': 144}},
        help='SimConfig overrides (cmkd_ros.sim.config) of the main rig, shared by every world '
        '(sim=... merges into this mapping; a lidar.preset given there brings its own beams and '
        'azimuth step unless those are given too)')
    second_rig: dict[str, Any] = setting(
        default_factory=lambda: {
            'lidar': {'preset': 'vlp32c', 'horizontal_resolution_deg': 2.0, 'height_m': 1.95},
            'cameras': {'count': 5, 'width': 224, 'height': 160, 'horizontal_fov_deg': 85.0,
                        'mount_forward_m': 0.9, 'mount_side_m': 0.8,
                        'mount_below_lidar_m': 0.5, 'pitch_deg': 4.0}},
        help='SimConfig overrides of the second rig (rig=second), used instead of sim: another '
        'LiDAR (beam table, range) and another camera layout, resolution and field of view')
    threads: int = setting(1, 'torch intra-op threads per training process', ge=1)
    parallel: int = setting(2, 'trainings run at the same time (one process each)', ge=1)
    teacher_steps: int = setting(4000, 'teacher optimizer steps', ge=1)
    teacher_batch_size: int = setting(4, 'teacher images per step', ge=1)
    teacher_lr: float = setting(2e-3, 'teacher learning rate', gt=0)
    teacher_precision: str = setting('auto', 'teacher training arithmetic (auto: bfloat16 '
                                     'autocast where the CPU has bfloat16 instructions)',
                                     choices=PRECISION_CHOICES)
    teacher_model: dict[str, Any] = setting(
        default_factory=lambda: {'arch': 'small', 'feature_dim': 64, 'output_stride': 4,
                                 'width': 24},
        help='TeacherConfig keys')
    teacher_options: dict[str, Any] = setting(
        default_factory=lambda: {'data': {'crop_size': [128, 224]},
                                 'loss': {'class_balance': 'inverse_sqrt'}},
        help='more TeacherTrainConfig settings (data.crop_size, loss.class_balance, ...); the '
        'old train_teacher names (crop_size, class_weighting) still work')
    student_steps: int = setting(2000, 'optimizer steps of fskd, udakd and supervised', ge=1)
    finetune_steps: int = setting(300, 'optimizer steps of the few-shot fine-tuning', ge=1)
    label_fraction: float = setting(0.1, 'fraction of labeled training scans for few-shot',
                                    gt=0, le=1)
    batch_size: int = setting(1, 'scans per step', ge=1)
    voxel_size: float = setting(0.2, 'student voxel size, metres', gt=0)
    lr: float = setting(4e-3, 'student learning rate (the few-shot fine-tuning uses half)',
                        gt=0)
    student: dict[str, Any] = setting(
        default_factory=lambda: {'arch': 'small', 'da_width': 32,
                                 'point_features': 'intensity_height'},
        help='StudentConfig overrides (same network for every run)')
    data: dict[str, Any] = setting(default_factory=dict,
                                   help='extra data keys of every student run (TrainConfig.data)')
    loss: dict[str, Any] = setting(default_factory=dict,
                                   help='loss keys of the distillation runs (TrainConfig.loss)')
    teacher_targets: dict[str, Any] = setting(
        default_factory=dict, help='teacher keys of the distillation runs (TrainConfig.teacher: '
        'scales, flip; e.g. {scales: [1.0, 1.5], flip: true}: measured in docs/history.md)')
    image_label_weight: float = setting(
        3.0, 'loss.image_label_weight of the fskd_image_labels run: the cross-entropy on the '
        "training images' labels at the points' pixels beside the distillation terms", gt=0.0)
    runs: tuple[str, ...] = setting(RUNS, 'which student runs to do (udakd: the UDAKD '
                                    'pre-training alone, which udakd_finetune includes)',
                                    choices=RUNS + ('udakd',))
    probe_steps: int = setting(200, 'L-BFGS iterations of the linear probe on frozen features '
                               '(0: no probe)', ge=0)
    pictures: bool = setting(True, 'draw the feature embeddings (with and without DA) and the '
                             'teacher-student agreement per class')

    def validate(self) -> None:
        if self.rig == 'second' and self.stage != 'test':
            raise ConfigError('rig: the second rig is for the test stage only (no choice is '
                              'made on it); set stage=test')
        if self.distill_on_teacher_worlds and not self.teacher_worlds:
            raise ConfigError('distill_on_teacher_worlds needs teacher_worlds')
        roles = (self.train_worlds, self.teacher_worlds, self.val_worlds, self.test_worlds)
        uses = collections.Counter(w for worlds in roles for w in set(worlds))
        shared = {w for w, n in uses.items() if n > 1}  # a world in two roles
        if shared:
            raise ConfigError(f'train_worlds, teacher_worlds, val_worlds and test_worlds must '
                              f'not share a world (shared: {sorted(shared)})')

    @property
    def eval_worlds(self) -> tuple[int, ...]:
        """The worlds this stage scores on."""
        return self.test_worlds if self.stage == 'test' else self.val_worlds

    @property
    def rig_sim(self) -> dict:
        """SimConfig overrides of this run's rig."""
        return dict(self.second_rig if self.rig == 'second' else self.sim)

    @classmethod
    def expand_settings(cls, data: Mapping[str, Any]) -> dict:
        """Old train_teacher names in ``teacher_options`` move to their sections; a LiDAR preset
        named in ``sim`` keeps its beams and azimuth step against the main rig's defaults."""
        data = dict(data)
        lidar = data.get('sim', {}).get('lidar') if isinstance(data.get('sim'), Mapping) else None
        if isinstance(lidar, Mapping) and lidar.get('preset') in LIDAR_PRESETS:
            preset = LidarConfig.expand_settings({'preset': lidar['preset']})
            own = {key: preset.get(key, getattr(LidarConfig(), key))
                   for key in ('beams', 'horizontal_resolution_deg')}
            data['sim'] = {**data['sim'], 'lidar': {**own, **lidar}}
        options = data.get('teacher_options')
        if not isinstance(options, Mapping):
            return data
        old = {k: v for k, v in options.items() if f'options.{k}' in TEACHER_RENAMED}
        rest = {k: v for k, v in options.items() if k not in old}
        return {**data, 'teacher_options': move_renamed_teacher_settings(
            {**rest, 'options': old}) if old else rest}


# ---------------------------------------------------------------------------------------------
# Stages


def render_worlds(root: str, worlds: tuple[int, ...], frames: int, stride: int,
                  sim: dict) -> str:
    """Render ``frames`` sweeps of each world seed into the pair dataset ``root``, with their
    correspondences stored as the collect node stores them (default settings: training with
    those reads them instead of computing them, 1.6x fewer CPU seconds per sample)."""
    from cmkd_ros.pairs import PairReader, PairWriter
    from cmkd_ros.sim.simulator import SimWorld
    from offline_training.datasets import store_correspondences
    done = os.path.join(root, 'COMPLETE')
    what = json.dumps({'worlds': list(worlds), 'frames': frames, 'stride': stride, 'sim': sim},
                      sort_keys=True)
    if os.path.exists(done):
        with open(done, encoding='utf-8') as fh:
            held = fh.read()
        if held and held != what:  # (folders written before this check hold an empty file)
            raise ExperimentsError(f'{root} holds other worlds or another rig ({held}); use '
                                   'another out_dir')
        return root
    if os.path.isdir(root):
        import shutil
        shutil.rmtree(root)
    writer = PairWriter(root, metadata={'source': 'cmkd_ros.sim', 'worlds': list(worlds)},
                        fsync=False)
    for world_seed in worlds:
        world = SimWorld({**sim, 'seed': int(world_seed)})
        for k in range(frames):
            writer.write(store_correspondences(world.frame(k * stride).to_pair()))
    if len(PairReader(root)) != len(worlds) * frames:
        raise RuntimeError(f'{root}: expected {len(worlds) * frames} pairs')
    with open(done, 'w', encoding='utf-8') as fh:
        fh.write(what)
    return root


def claim_stage(cfg: ExperimentsConfig) -> dict:
    """Record this run's stage in ``out_dir/stage.json``; refuse another stage's folder and a
    second test stage (the test worlds are scored once) unless ``cfg.force``.

    An interrupted test stage (no ``results.json`` yet) continues, with exactly the settings it
    started with: any other setting would be a second scoring."""
    path = os.path.join(cfg.out_dir, 'stage.json')
    settings = json.loads(json.dumps({k: v for k, v in to_dict(cfg).items()
                                      if k not in ('force', 'out_dir')}))  # as stored
    claim = {'stage': cfg.stage, 'rig': cfg.rig, 'train_worlds': list(cfg.train_worlds),
             'eval_worlds': list(cfg.eval_worlds)}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            held = json.load(fh)
        if {k: held.get(k) for k in claim} != claim:
            raise ExperimentsError(f'{cfg.out_dir} holds another stage ({held}); use another '
                                   'out_dir')
        if cfg.stage == 'test' and not cfg.force:
            scored = os.path.exists(os.path.join(cfg.out_dir, 'results.json'))
            if scored or held.get('settings') != settings:
                raise ExperimentsError(
                    f'the test stage already ran in {cfg.out_dir} (started {held.get("started")}'
                    f'{"" if scored else ", unfinished, with other settings"}): the test worlds '
                    'are scored once; force=true runs it again')
            return held  # continue the interrupted test stage
    claim['started'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    claim['settings'] = settings
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as fh:
        json.dump(claim, fh, indent=2)
    return claim


def _student_runs(cfg: ExperimentsConfig, train: str, test: str, teacher: str,
                  distill_train: str | None = None) -> dict:
    """name -> (method, overrides) of every student run, in dependency order; FSKD and UDAKD
    distil from ``distill_train`` (default: ``train``)."""
    common = {'seed': cfg.seed, 'progress': False, 'checkpoint_every': 100,
              'threads': cfg.threads,
              'log_every': 10,
              # the horizontal scaling was chosen on these streets (run H, docs/experiments.md)
              'data': {'augment_scale_xy': [0.5, 1.0], **cfg.data, 'train': train, 'val': test,
                       'voxel_size': cfg.voxel_size,
                       'batch_size': cfg.batch_size},
              'optim': {'lr': cfg.lr, 'warmup_steps': 20},
              'student': dict(cfg.student)}
    distill = {**common, 'steps': cfg.student_steps,
               'data': {**common['data'], 'train': distill_train or train},
               'teacher': {**cfg.teacher_targets, 'checkpoint': teacher},
               'loss': dict(cfg.loss),
               'share_teacher_classifier': True, 'freeze_classifier': True}
    few = {'data': {'label_fraction': cfg.label_fraction, 'label_unit': 'scans'},
           'steps': cfg.finetune_steps, 'share_teacher_classifier': False,
           'freeze_classifier': False, 'optim': {'lr': cfg.lr / 2, 'warmup_steps': 10}}
    return {
        'fskd': ('fskd', distill),
        'udakd': ('udakd', distill),
        'udakd_finetune': ('finetune', _merge(common, few, {'init_from': '@udakd'})),
        'finetune_scratch': ('finetune', _merge(common, few)),
        'supervised': ('supervised', {**common, 'steps': cfg.student_steps,
                                      'share_teacher_classifier': False,
                                      'freeze_classifier': False}),
        'fskd_image_labels': ('fskd', _merge(distill, {'loss': {
            'image_label_weight': cfg.image_label_weight}})),
        'fskd_paper_da': ('fskd', _merge(distill, {'student': {
            'use_da': True, 'da_layers': 3, 'da_pool': 4, 'da_residual': False}})),
        'fskd_no_da': ('fskd', _merge(distill, {'student': {'use_da': False}})),
        'fskd_no_occlusion': ('fskd', _merge(distill, {'data': {'occlusion': False}})),
    }


def _merge(*parts: dict) -> dict:
    from cmkd_ros.config import merge
    out: dict = {}
    for part in parts:
        out = merge(out, part)
    return out


def _teacher_job(values: dict) -> dict:
    """Train and score the teacher (runs in a worker process)."""
    import torch
    from offline_training.config import TeacherTrainConfig
    from offline_training.train_teacher import train_teacher_from_config
    torch.set_num_threads(values['threads'])
    return _cached(values['out_dir'],
                   lambda: train_teacher_from_config(build(TeacherTrainConfig, values)))


def _student_job(values: dict, resume: bool, overwrite: bool = False) -> dict:
    """Train and score one student (runs in a worker process)."""
    import torch
    from offline_training.config import TrainConfig
    from offline_training.trainer import train
    torch.set_num_threads(values['threads'])
    return _cached(values['out_dir'], lambda: train(build(TrainConfig, values), resume=resume,
                                                    overwrite=overwrite))


def run_experiments(cfg: ExperimentsConfig, resume: bool = True, overwrite: bool = False) -> dict:
    """Run every stage (skipping finished ones) and write results.json / results.md.

    An unfinished student run is continued with ``resume``, started over with ``overwrite``,
    else refused (:class:`~offline_training.trainer.TrainingError`).

    Independent trainings run ``cfg.parallel`` at a time in worker processes: the teacher-free
    runs (supervised, fine-tuning from scratch) beside the teacher, then the distillation runs,
    then the fine-tuning of the UDAKD student.
    """
    import concurrent.futures
    import multiprocessing
    root = cfg.out_dir
    os.makedirs(root, exist_ok=True)
    claim = claim_stage(cfg)
    timings: dict[str, float] = {}
    start = time.monotonic()
    # 1. Data: training streets and the streets this stage scores on.
    train_dir = render_worlds(os.path.join(root, 'data', 'train'), cfg.train_worlds,
                              cfg.frames_per_world, cfg.frame_stride, cfg.rig_sim)
    eval_dir = render_worlds(os.path.join(root, 'data', 'val' if cfg.stage == 'validation'
                                          else 'test'), cfg.eval_worlds,
                             cfg.frames_per_world, cfg.frame_stride, cfg.rig_sim)
    teacher_dir = train_dir
    if cfg.teacher_worlds:  # the teacher's images: the training streets' and its own worlds'
        teacher_dir = render_worlds(os.path.join(root, 'data', 'teacher'),
                                    cfg.train_worlds + cfg.teacher_worlds, cfg.frames_per_world,
                                    cfg.frame_stride, cfg.rig_sim)
    timings['data'] = time.monotonic() - start
    # 2. Jobs: name -> (what it waits for, function, arguments).
    teacher_path = os.path.join(root, 'teacher', 'teacher.pt')
    specs = _student_runs(cfg, train_dir, eval_dir, teacher_path,
                          teacher_dir if cfg.distill_on_teacher_worlds else None)
    wanted = []
    for name in cfg.runs:
        if name == 'udakd_finetune':
            wanted.append('udakd')
        wanted.append(name)
    jobs = {'teacher': ((), _teacher_job, _merge({
        'out_dir': os.path.join(root, 'teacher'), 'seed': cfg.seed, 'steps': cfg.teacher_steps,
        'data': {'train': teacher_dir, 'val': eval_dir, 'batch_size': cfg.teacher_batch_size},
        'optim': {'lr': cfg.teacher_lr}, 'model': dict(cfg.teacher_model), 'device': 'cpu',
        'precision': cfg.teacher_precision, 'threads': cfg.threads, 'progress': False},
        dict(cfg.teacher_options)))}
    seeds = {}  # job name -> (run name, seed); the first seed keeps the plain run name
    for repeat in range(cfg.repeats):
        seed = cfg.seed + repeat
        suffix = f'_seed{seed}' if repeat else ''
        for name in dict.fromkeys(wanted):
            method, values = specs[name]
            values = {**values, 'seed': seed}
            needs = ('teacher',) if method in ('fskd', 'udakd') else ()
            if str(values.get('init_from', '')).startswith('@'):
                values['init_from'] += suffix
                needs = needs + (values['init_from'][1:],)
            seeds[name + suffix] = (name, seed)
            jobs[name + suffix] = (needs, _student_job, {
                **values, 'method': method, 'device': 'cpu',
                'out_dir': os.path.join(root, 'runs', name + suffix)})
    # 3. Run them as their inputs become ready.
    results: dict[str, dict] = {}
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(cfg.parallel, mp_context=context) as pool:
        running: dict = {}
        while len(results) < len(jobs):
            for name, (needs, function, values) in jobs.items():
                if name in results or name in running.values() or \
                        not all(n in results for n in needs):
                    continue
                if str(values.get('init_from', '')).startswith('@'):
                    values = {**values, 'init_from': results[values['init_from'][1:]]['student']}
                if os.path.exists(os.path.join(values['out_dir'], 'summary.json')):
                    results[name] = _cached(values['out_dir'], None)
                    timings[name] = time.monotonic() - start
                    continue
                args = (values,) if function is _teacher_job else (values, resume, overwrite)
                running[pool.submit(function, *args)] = name
            if not running:
                continue
            done, _ = concurrent.futures.wait(running, return_when='FIRST_COMPLETED')
            for future in done:
                name = running.pop(future)
                results[name] = future.result()
                timings[name] = time.monotonic() - start
                print(f'[experiments] {name} done after {timings[name]:.0f} s '
                      f'({results[name].get("seconds", 0):.0f} s of training)', flush=True)
    teacher_summary = dict(results.pop('teacher'))
    teacher_summary['transfer'] = _label_transfer(teacher_path, eval_dir, cfg.threads,
                                                   train_dir)
    students: dict[str, dict] = {}
    for job, result in results.items():  # the first seed's result; every seed's under 'seeds'
        name, seed = seeds[job]
        entry = students.setdefault(name, {'method': jobs[job][2]['method'], 'seconds': 0.0,
                                           'seeds': {}})
        entry['seeds'][seed] = result.get('eval')
        entry['seconds'] += result.get('seconds') or 0.0
        if job == name:
            entry['eval'] = result.get('eval')
    # 4. The linear probe on frozen features and the pictures (each cached in its folder).
    for job in results:
        name, seed = seeds[job]
        if name in PROBE_RUNS and cfg.probe_steps:
            probe = _probe(jobs[job][2]['out_dir'], train_dir, eval_dir, cfg)
            students[name].setdefault('probe_seeds', {})[seed] = probe
            if job == name:
                students[name]['probe'] = probe
    timings['probe'] = time.monotonic() - start
    pictures = None
    if cfg.pictures:
        pictures = _pictures(root, teacher_path, eval_dir, cfg)
        timings['pictures'] = time.monotonic() - start
    # CPU seconds of this process and its finished workers: the budget on a shared machine.
    usage = [resource.getrusage(resource.RUSAGE_SELF),
             resource.getrusage(resource.RUSAGE_CHILDREN)]
    protocol = {'stage': cfg.stage, 'rig': cfg.rig, 'sim': cfg.rig_sim,
                'train_worlds': list(cfg.train_worlds), 'eval_worlds': list(cfg.eval_worlds),
                'teacher_worlds': list(cfg.teacher_worlds), 'started': claim['started']}
    summary = {'config': to_dict(cfg), 'protocol': protocol, 'teacher': teacher_summary,
               'students': students, 'pictures': pictures,
               'done_after_s': timings, 'total_s': time.monotonic() - start,
               'cpu_s': sum(u.ru_utime + u.ru_stime for u in usage)}
    with open(os.path.join(root, 'results.json'), 'w', encoding='utf-8') as fh:
        json.dump(summary, fh, indent=2, default=float)
    table = results_table(summary)
    with open(os.path.join(root, 'results.md'), 'w', encoding='utf-8') as fh:
        fh.write(table)
    print(table)
    return summary


TRANSFER_KEYS = ('seen', 'images', 'train_teacher', 'train_images')


def _label_transfer(teacher_path: str, eval_dir: str, threads: int,
                    train_dir: str | None = None) -> dict:
    """2D labels carried to the seen points (cached in ``teacher/transfer.json``): the
    teacher's on the scored worlds (``seen``: the ceiling of copying it) and the label images'
    (``images``: the ceiling the correspondences set); with ``train_dir``, the same two on the
    training scans (``train_teacher``: FSKD's targets, ``train_images``)."""
    path = os.path.join(os.path.dirname(teacher_path), 'transfer.json')
    cached = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            cached = json.load(fh)
    wanted = TRANSFER_KEYS if train_dir else TRANSFER_KEYS[:2]
    if all(key in cached for key in wanted):
        return cached
    import torch
    from cmkd_ros.models.teacher import load_teacher
    from offline_training.datasets import PairDataset
    from offline_training.evaluate import evaluate_label_transfer
    torch.set_num_threads(threads)
    teacher = load_teacher(teacher_path)
    names = teacher.class_map.names
    result = dict(cached)
    for key, source, folder in (('seen', teacher, eval_dir), ('images', None, eval_dir),
                                ('train_teacher', teacher, train_dir),
                                ('train_images', None, train_dir)):
        if key in wanted and key not in result:
            done = evaluate_label_transfer(source, PairDataset(folder, label_images=source is None),
                                           class_names=names)
            result[key] = done['seen']
            result.setdefault('num_scans', done['num_scans'])
    with open(path + '.tmp', 'w', encoding='utf-8') as fh:
        json.dump(result, fh, indent=2, default=float)
    os.replace(path + '.tmp', path)
    return result


def _probe(run_dir: str, train_dir: str, eval_dir: str, cfg: ExperimentsConfig) -> dict:
    """Linear probe on the run's frozen pseudo-2D features (cached in ``probe.json``)."""
    path = os.path.join(run_dir, 'probe.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            return json.load(fh)
    import torch
    from offline_training.probe import probe_checkpoint
    torch.set_num_threads(cfg.threads * cfg.parallel)
    result = probe_checkpoint(os.path.join(run_dir, 'student.pt'), train_dir, eval_dir,
                              steps=cfg.probe_steps, seed=cfg.seed)
    with open(path + '.tmp', 'w', encoding='utf-8') as fh:
        json.dump(result, fh, indent=2, default=float)
    os.replace(path + '.tmp', path)
    return result


def _pictures(root: str, teacher_path: str, eval_dir: str, cfg: ExperimentsConfig) -> dict:
    """Feature embeddings with and without DA, teacher-student agreement per class (first
    seed; ``pictures/``)."""
    import torch
    from offline_training.pictures import experiment_pictures
    torch.set_num_threads(cfg.threads * cfg.parallel)
    wanted = [n for n in ('fskd', 'fskd_paper_da', 'fskd_no_da', 'supervised') if n in cfg.runs]
    checkpoints = {n: os.path.join(root, 'runs', n, 'student.pt') for n in wanted}
    if not checkpoints:
        return {}
    return experiment_pictures(os.path.join(root, 'pictures'), teacher_path, eval_dir,
                               checkpoints, embed_runs=('fskd', 'fskd_paper_da', 'fskd_no_da'),
                               seed=cfg.seed)


def _cached(folder: str, make) -> dict:
    """``folder/summary.json`` when a finished stage left one, else run ``make()``."""
    path = os.path.join(folder, 'summary.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            return json.load(fh)
    return make()


def _seed_mious(student: dict, group: str) -> list[float]:
    """The student's mIoU for ``group`` of every seed (one value for a single-seed summary)."""
    evals = list((student.get('seeds') or {}).values()) or [student.get('eval')]
    return [v for v in (_miou(e, group) for e in evals) if v is not None]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than 2 values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _miou(result: dict | None, group: str | None = None) -> float | None:
    """mIoU of a 2D result (``group`` None) or of a 3D result's group ('all', 'unseen')."""
    if not result:
        return None
    if group is not None:
        result = result.get(group) or {}
    value = result.get('miou')
    return None if value is None else float(value)


def describe_protocol(protocol: dict | None) -> str:
    """Which worlds served for what and which rig rendered them (the line above the table)."""
    if not protocol:
        return ''
    worlds = ', '.join(str(w) for w in protocol['eval_worlds'])
    kind = 'test worlds (scored once)' if protocol['stage'] == 'test' else 'validation worlds'
    extra = protocol.get('teacher_worlds')
    teacher = (f' (the teacher also on the images of worlds {", ".join(map(str, extra))})'
               if extra else '')
    return (f'Stage {protocol["stage"]}: trained on worlds '
            f'{", ".join(str(w) for w in protocol["train_worlds"])}{teacher}, scored on the {kind} '
            f'{worlds}; rig {protocol["rig"]} (SimConfig overrides '
            f'`{json.dumps(protocol["sim"], sort_keys=True)}`).\n\n')


ROW_NAMES = {'fskd': 'FSKD (DA: shortcut, pool 2)', 'udakd': 'UDAKD (shared classifier)',
             'fskd_image_labels': 'FSKD + the image labels at the pixels',
             'fskd_paper_da': "FSKD, the paper's DA (pool 4, no shortcut)",
             'udakd_finetune': 'UDAKD + fine-tune', 'finetune_scratch': 'fine-tune from scratch',
             'supervised': 'supervised (upper bound)', 'fskd_no_da': 'FSKD without DA',
             'fskd_no_occlusion': 'FSKD without occlusion test'}


def results_table(summary: dict) -> str:
    """Markdown table of the experiments (mIoU in %, ratio to the supervised upper bound),
    headed by :func:`describe_protocol`; the last column is the linear probe on the frozen
    pseudo-2D features (:mod:`offline_training.probe`), all points.

    With several seeds a cell is ``mean ± std`` over the seeds and the ratio is of the means.
    """
    rows = ['| model | 3D labels used | mIoU all points | mIoU seen points | '
            'mIoU unseen points | % of supervised | linear probe, all points |',
            '|---|---|---|---|---|---|---|']
    teacher = summary['teacher'].get('eval', {})
    rows.append(f'| teacher (2D, scored images) | - | {_pct(_miou(teacher))} | - | - | - | - |')
    transfer = summary['teacher'].get('transfer')
    rows.append(f'| teacher labels carried to the seen points | - | - | '
                f'{_pct(_miou(transfer, "seen"))} | - | - | - |')
    images = _miou(transfer, 'images')
    if images is not None:
        rows.append(f'| label images carried to the seen points (what the correspondences '
                    f'allow) | - | - | {_pct(images)} | - | - | - |')
    students = summary['students']
    upper = _mean_std(_seed_mious(students.get('supervised', {}), 'all'))[0]
    labels = {'udakd_finetune': 'few-shot', 'finetune_scratch': 'few-shot', 'supervised': 'all'}
    order = ('fskd', 'fskd_image_labels', 'fskd_paper_da', 'udakd', 'udakd_finetune',
             'finetune_scratch', 'supervised', 'fskd_no_da', 'fskd_no_occlusion')
    for key in sorted(students, key=lambda k: order.index(k) if k in order else len(order)):
        miou = _mean_std(_seed_mious(students[key], 'all'))[0]
        cells = [_pct(*_mean_std(_seed_mious(students[key], group)))
                 for group in ('all', 'seen', 'unseen')]
        ratio = '-' if upper in (None, 0) or miou is None else f'{100 * miou / upper:.0f}%'
        probes = list((students[key].get('probe_seeds') or {}).values())
        probe = _pct(*_mean_std([v for v in (_miou(p.get('eval'), 'all') for p in probes)
                                 if v is not None]))
        rows.append(f'| {ROW_NAMES.get(key, key)} | {labels.get(key, "none (zero-shot)")} | '
                    f'{" | ".join(cells)} | {ratio} | {probe} |')
    text = describe_protocol(summary.get('protocol')) + '\n'.join(rows) + '\n'
    targets, ceiling = _miou(transfer, 'train_teacher'), _miou(transfer, 'train_images')
    if targets is not None and ceiling is not None:
        text += (f'\nOn the training scans, FSKD\'s targets (the teacher\'s labels carried to the '
                 f'seen points) score {_pct(targets)} mIoU, the label images carried '
                 f'{_pct(ceiling)}.\n')
    return text


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return '-'
    return f'{100 * value:.1f}' + ('' if std is None else f' ± {100 * std:.1f}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m offline_training.experiments',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=None, help='output folder')
    parser.add_argument('--config', default=None, help='YAML overriding ExperimentsConfig')
    parser.add_argument('overrides', nargs='*', metavar='key=value')
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f'out_dir={args.out}'] if args.out else [])
    try:
        run_experiments(load(ExperimentsConfig, args.config, overrides))
    except (ConfigError, ExperimentsError) as exc:
        print(f'experiments: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
