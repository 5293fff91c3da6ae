"""Trainer: every method's loss terms, frozen teacher, exact resume, checkpoints, outputs."""
import json
import os

import numpy as np
import pytest
import torch

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.config import ConfigError, build
from cmkd_ros.models.checkpoint import load_checkpoint
from cmkd_ros.models.teacher import build_teacher, load_teacher, save_teacher
from offline_training import trainer as T
from offline_training.config import TrainConfig, load_train_config
from offline_training.experiments import render_worlds

TINY_SIM = {'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
            'cameras': {'count': 2, 'width': 64, 'height': 48}}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """Four synthetic pairs (one street), two held-out pairs (another) and a random teacher."""
    root = tmp_path_factory.mktemp('tiny')
    train = render_worlds(str(root / 'train'), (1,), 4, 3, TINY_SIM)
    val = render_worlds(str(root / 'val'), (2,), 2, 3, TINY_SIM)
    torch.manual_seed(0)
    teacher = build_teacher({'arch': 'small', 'feature_dim': 16, 'width': 8}, SYNTHETIC)
    path = str(root / 'teacher.pt')
    save_teacher(teacher, path)
    return {'train': train, 'val': val, 'teacher': path}


def make_config(tiny, method, out, *extra):
    base = [f'data.train={tiny["train"]}', f'out_dir={out}', 'steps=4', 'checkpoint_every=2',
            'log_every=1', 'student.arch=small', 'data.batch_size=2', 'progress=false',
            'threads=1', 'optim.warmup_steps=0']
    if method in ('udakd', 'fskd'):
        base.append(f'teacher.checkpoint={tiny["teacher"]}')
    else:
        base += ['share_teacher_classifier=false', 'freeze_classifier=false']
    return load_train_config(method, None, base + list(extra))


def state_of(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('method,terms', [('fskd', {'feature', 'semantic'}),
                                          ('udakd', {'infonce'}),
                                          ('supervised', {'ce'})])
@pytest.mark.slow
def test_methods_return_named_terms_and_write_outputs(tiny, tmp_path, method, terms, device):
    """Each method on each device (on CUDA with float16 autocast and grad scaling)."""
    config = make_config(tiny, method, tmp_path / method, f'device={device}')
    summary = T.train(config)
    assert set(summary['losses']) == terms | {'total'}
    assert summary['device'] == device and summary['amp'] == (device == 'cuda')
    assert all(np.isfinite(v) for v in summary['losses'].values())
    out = tmp_path / method
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out / 'tensorboard'))
    # The exported student loads alone, with its class map and the training config.
    student, info = load_checkpoint(out / 'student.pt')
    assert info['class_names'] == list(SYNTHETIC.names)
    assert info['extra']['train_config']['method'] == method
    trained = state_of(summary['checkpoint'])['student']
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, trained[name])


def test_fskd_keeps_teacher_frozen_and_shares_its_classifier(tiny, tmp_path):
    config = make_config(tiny, 'fskd', tmp_path / 'fskd', 'steps=3')
    trainer = T.Trainer(config)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    start = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    weight = trainer.teacher.classifier.weight[:, :, 0, 0]
    assert torch.equal(trainer.student.classifier.weight, weight)
    assert torch.equal(trainer.student.classifier.bias, trainer.teacher.classifier.bias)
    changed = [k for k, v in trainer.student.state_dict().items()
               if k.startswith('backbone.') and not torch.equal(v, start[k])]
    assert changed, 'the student backbone did not train'


def test_fskd_takes_part_of_the_teachers_class_weighting_out_of_its_classifier(tiny, tmp_path):
    """A teacher trained with class weights w over-predicts the up-weighted classes: the final
    FSKD student's shared classifier bias moves by -prior_correction * log w (0: unchanged)."""
    weights = torch.linspace(0.5, 4.0, SYNTHETIC.num_classes)
    weighted = str(tmp_path / 'weighted_teacher.pt')
    save_teacher(load_teacher(tiny['teacher']), weighted, class_weights=weights.tolist())
    biases = {}
    for fraction in (0.5, 0.0):
        out = tmp_path / f'prior_{fraction}'
        config = make_config(tiny, 'fskd', out, 'steps=2', f'teacher.checkpoint={weighted}',
                             f'prior_correction={fraction}')
        trainer = T.Trainer(config)
        summary = trainer.fit()
        student, _ = load_checkpoint(out / 'student.pt')
        torch.testing.assert_close(student.classifier.bias, trainer.student.classifier.bias)
        biases[fraction] = student.classifier.bias
        expected = None if fraction == 0 else (-fraction * torch.log(weights)).tolist()
        if expected is None:
            assert summary['class_prior_shift'] is None
        else:
            torch.testing.assert_close(torch.tensor(summary['class_prior_shift']),
                                       torch.tensor(expected))
    teacher_bias = load_teacher(weighted).classifier.bias
    torch.testing.assert_close(biases[0.0], teacher_bias)
    torch.testing.assert_close(biases[0.5], teacher_bias - 0.5 * torch.log(weights))


def test_no_distillation_gradient_for_points_without_pixels(tiny, tmp_path):
    config = make_config(tiny, 'fskd', tmp_path / 'grad')
    trainer = T.Trainer(config)
    batch = T.move_to(trainer.collate([trainer.dataset[0], trainer.dataset[1]]), trainer.device)
    outputs = trainer.student(batch['coords'], batch['vfeats'])
    pseudo2d = outputs['pseudo2d'].detach().requires_grad_(True)
    logits = trainer.student.classifier(pseudo2d)
    context = T.LossContext(config, trainer.teacher, torch.Generator().manual_seed(0))
    for terms in (T.fskd_terms({'pseudo2d': pseudo2d, 'logits': logits}, batch, context),
                  T.udakd_terms({'pseudo2d': pseudo2d, 'logits': logits}, batch, context)):
        pseudo2d.grad = None
        sum(terms.values()).backward()
        with_pixels = torch.zeros(len(pseudo2d), dtype=torch.bool)
        with_pixels[batch['inverse'][batch['corr_point']]] = True
        assert (~with_pixels).any() and with_pixels.any()
        assert float(pseudo2d.grad[~with_pixels].abs().max()) == 0.0
        assert float(pseudo2d.grad[with_pixels].abs().sum()) > 0.0


@pytest.mark.parametrize('method', ['fskd', 'udakd', 'supervised'])
@pytest.mark.slow
def test_loss_gradients_are_bitwise_reproducible_with_two_threads(tiny, method):
    """Gathering point rows by advanced indexing had a parallel, atomic backward on CPU: two
    runs with 2 threads differed (the default on 2 cores); index_select's backward does not."""
    gen = torch.Generator().manual_seed(1)
    voxels, points, pairs = 3000, 40000, 30000          # above torch's parallel grain size
    batch = {'inverse': torch.randint(0, voxels, (points,), generator=gen),
             'labels': torch.randint(0, 12, (points,), generator=gen),
             'corr_point': torch.randint(0, points, (pairs,), generator=gen),
             'corr_image': torch.randint(0, 2, (pairs,), generator=gen),
             'corr_uv': torch.rand(pairs, 2, generator=gen) * torch.tensor([63.0, 47.0]),
             'images': torch.randint(0, 255, (2, 3, 48, 64), dtype=torch.uint8, generator=gen)}
    config = make_config(tiny, method, 'unused')
    teacher = load_teacher(tiny['teacher']).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    grads = []
    try:
        for _ in range(5):
            outputs = {'pseudo2d': torch.randn(voxels, 16, generator=torch.Generator(
                ).manual_seed(2)).requires_grad_(True), 'logits': torch.randn(
                    voxels, 12, generator=torch.Generator().manual_seed(3)).requires_grad_(True)}
            context = T.LossContext(config, teacher, torch.Generator().manual_seed(0))
            sum(T.METHOD_LOSSES[method](outputs, batch, context).values()).backward()
            grads.append([v.grad for v in outputs.values() if v.grad is not None])
    finally:
        torch.set_num_threads(threads)
    assert grads[0] and all(float(g.abs().sum()) > 0 for g in grads[0])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.slow
def test_class_balance_weights_the_semantic_and_ce_terms(tiny, tmp_path):
    """inverse_sqrt (the default) weights each point by its class (the teacher's label for the
    KL, the 3D label for the cross-entropy); none is the plain mean; the feature term is
    unweighted either way."""
    from offline_training.losses import semantic_kl_loss, supervised_ce_loss
    terms = {}
    for balance in ('none', 'inverse_sqrt'):
        for method in ('fskd', 'supervised'):
            config = make_config(tiny, method, tmp_path / f'{method}_{balance}',
                                 f'loss.class_balance={balance}')
            trainer = T.Trainer(config)
            batch = T.move_to(trainer.collate([trainer.dataset[0], trainer.dataset[1]]),
                              trainer.device)
            with torch.no_grad():
                if trainer.teacher is not None:  # a random teacher labels nearly all alike
                    trainer.teacher.classifier.weight.mul_(100.0)
                outputs = trainer.student(batch['coords'], batch['vfeats'])
                context = T.LossContext(config, trainer.teacher, torch.Generator().manual_seed(0))
                terms[method, balance] = T.METHOD_LOSSES[method](outputs, batch, context)
            if method == 'supervised':
                labels = batch['labels']
                plain = supervised_ce_loss(outputs['logits'][batch['inverse']], labels)
                assert len(torch.unique(labels[labels != 255])) > 2
            else:
                rows, _, teacher = T.correspondence_features(outputs, batch, context)
                logits_2d = teacher @ trainer.teacher.classifier.weight.flatten(1).T + \
                    trainer.teacher.classifier.bias
                plain = semantic_kl_loss(outputs['logits'][rows], logits_2d)
                assert len(torch.unique(logits_2d.argmax(1))) > 2
            key = 'ce' if method == 'supervised' else 'semantic'
            if balance == 'none':
                assert terms[method, balance][key].item() == pytest.approx(plain.item(), rel=1e-5)
            else:
                assert abs(terms[method, balance][key].item() - plain.item()) > 1e-4
    assert terms['fskd', 'none']['feature'].item() == pytest.approx(
        terms['fskd', 'inverse_sqrt']['feature'].item(), rel=1e-6)


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, tmp_path):
    full = T.train(make_config(tiny, 'fskd', tmp_path / 'full', 'steps=5'))
    cut = make_config(tiny, 'fskd', tmp_path / 'cut', 'steps=5')
    T.train(cut)
    # Drop the final checkpoint as if the process had died after step 4.
    steps = T.list_checkpoints(str(tmp_path / 'cut'))
    assert [s for s, _ in steps] == [4, 5]
    os.remove(steps[-1][1])
    trainer = T.Trainer(cut, resume=True)
    assert trainer.step == 4
    resumed = trainer.fit()
    a = state_of(full['checkpoint'])['student']
    b = state_of(resumed['checkpoint'])['student']
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_rerun_without_resume_is_refused_and_overwrite_starts_over(tiny, tmp_path, capsys,
                                                                    caplog):
    from cmkd_ros.tools import cli
    out = tmp_path / 'run'
    config = make_config(tiny, 'supervised', out)
    T.train(config)
    checkpoints = {path: open(path, 'rb').read() for _, path in T.list_checkpoints(str(out))}
    args = ['train', 'supervised', f'data.train={tiny["train"]}', f'out_dir={out}', 'steps=4',
            'checkpoint_every=2', 'log_every=1', 'student.arch=small', 'data.batch_size=2',
            'progress=false', 'threads=1', 'optim.warmup_steps=0',
            'share_teacher_classifier=false', 'freeze_classifier=false']
    assert cli.main(args) == 2                     # was: restarted at step 0, checkpoints gone
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds an earlier run (checkpoints up to step 4' in err[0]
    assert '--resume to continue it, or --overwrite to start over' in err[0]
    assert {p: open(p, 'rb').read() for _, p in T.list_checkpoints(str(out))} == checkpoints
    assert cli.main(args + ['--resume', '--overwrite']) == 2
    # --overwrite: the earlier run is deleted (saying so) and a new one starts at step 0
    with caplog.at_level('WARNING', logger='cmkd_ros.train'):
        summary = T.train(config, overwrite=True)
    assert summary['start_step'] == 0 and 'deleted the earlier run' in caplog.text
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint_and_cleans_up(tiny, tmp_path, caplog):
    out = tmp_path / 'run'
    full = T.train(make_config(tiny, 'supervised', tmp_path / 'full', 'steps=6'))
    cut = make_config(tiny, 'supervised', out, 'steps=6', 'keep_checkpoints=3')
    T.train(cut)
    steps = T.list_checkpoints(str(out))
    assert [s for s, _ in steps] == [2, 4, 6]
    with open(steps[-1][1], 'r+b') as fh:         # the newest checkpoint torn by a crash
        fh.truncate(os.path.getsize(steps[-1][1]) // 2)
    stale = out / 'checkpoints' / 'step_00000008.pt.tmp.4242'    # a killed save's leftover
    stale.write_bytes(b'partial')
    with caplog.at_level('WARNING', logger='cmkd_ros.train'):
        trainer = T.Trainer(cut, resume=True)
    assert trainer.step == 4
    assert 'unreadable checkpoint(s)' in caplog.text and 'step_00000006.pt' in caplog.text
    assert 'resuming from' in caplog.text and 'step_00000004.pt (step 4)' in caplog.text
    resumed = trainer.fit()
    assert not stale.exists()
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]        # no step logged twice
    a, b = state_of(full['checkpoint'])['student'], state_of(resumed['checkpoint'])['student']
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny, tmp_path):
    T.train(make_config(tiny, 'supervised', tmp_path / 'run', 'steps=2'))
    with pytest.raises(T.TrainingError, match='optim.lr'):
        T.Trainer(make_config(tiny, 'supervised', tmp_path / 'run', 'steps=2',
                              'optim.lr=0.5'), resume=True)


@pytest.mark.slow
def test_checkpoint_contents_and_pruning(tiny, tmp_path):
    summary = T.train(make_config(tiny, 'supervised', tmp_path / 'ck', 'steps=6',
                                  'keep_checkpoints=2'))
    found = T.list_checkpoints(str(tmp_path / 'ck'))
    assert [s for s, _ in found] == [4, 6]
    assert not [n for n in os.listdir(tmp_path / 'ck' / 'checkpoints') if 'tmp' in n]
    state = state_of(summary['checkpoint'])
    assert state['step'] == 6 and state['format'] == T.CHECKPOINT_FORMAT
    assert {'student', 'optimizer', 'scheduler', 'scaler', 'rng', 'config'} <= set(state)
    assert build(TrainConfig, state['config']).method == 'supervised'


def test_label_fraction_scans_and_points(tiny, tmp_path):
    assert T.labeled_scan_indices(10, 0.3, 0) == T.labeled_scan_indices(10, 0.3, 0)
    assert len(T.labeled_scan_indices(10, 0.3, 0)) == 3
    assert len(T.labeled_scan_indices(10, 0.01, 0)) == 1
    scans = T.Trainer(make_config(tiny, 'finetune', tmp_path / 's', 'data.label_fraction=0.5'))
    assert len(scans.dataset) == 2
    points = T.Trainer(make_config(tiny, 'finetune', tmp_path / 'p', 'data.label_fraction=0.25',
                                   'data.label_unit=points'))
    full = T.Trainer(make_config(tiny, 'finetune', tmp_path / 'f'))
    kept = points.dataset[0]['labels'] != 255
    labeled = full.dataset[0]['labels'] != 255
    assert (kept <= labeled).all()
    assert 0.15 < kept.sum() / labeled.sum() < 0.35
    assert torch.equal(points.dataset[0]['labels'] != 255, kept)   # same points every time


def test_config_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(ConfigError, match='teacher.checkpoint'):
        load_train_config('fskd', None, [f'data.train={tiny["train"]}'])
    with pytest.raises(ConfigError, match='freeze_classifier'):
        load_train_config('supervised', None, ['share_teacher_classifier=false'])
    with pytest.raises(ConfigError, match='student.feature_dim'):
        T.Trainer(make_config(tiny, 'fskd', tmp_path / 'x', 'student.feature_dim=8'))
    with pytest.raises(ConfigError, match='unknown setting'):
        make_config(tiny, 'fskd', tmp_path / 'x', 'loss.nope=1')


def test_teacher_feature_cache_returns_the_same_features(tiny):
    teacher = load_teacher(tiny['teacher'])
    images = torch.randint(0, 255, (3, 3, 48, 64), dtype=torch.uint8)
    cache = T.TeacherFeatureCache(teacher, 2 ** 30)
    first = cache(images)
    again = cache(images[[2, 0]])
    assert cache.hits == 2 and cache.misses == 3
    torch.testing.assert_close(again, first[[2, 0]])
    with torch.no_grad():
        direct = teacher.features(images.float() / 255)
    torch.testing.assert_close(first, direct, rtol=1e-2, atol=1e-2)


def test_teacher_targets_averaged_over_scales_and_mirror_images(tiny, tmp_path):
    """teacher.scales / teacher.flip: the targets are the mean of the teacher's features over
    the enlarged images (resized back to the first map) and their mirror images (mirrored
    back): a mirror-symmetric image gets mirror-symmetric targets; the defaults change
    nothing; the trainer's cache uses the settings."""
    import torch.nn.functional as F
    teacher = load_teacher(tiny['teacher'])
    images = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        plain = teacher.features(images)
        torch.testing.assert_close(T.averaged_features(teacher, images), plain)
        both = T.averaged_features(teacher, images, (1.0, 2.0))
        big = F.interpolate(teacher.features(F.interpolate(images, scale_factor=2.0,
                                                           mode='bilinear')),
                            size=plain.shape[-2:], mode='bilinear')
        torch.testing.assert_close(both, 0.5 * (plain + big))
        symmetric = torch.cat([images[..., :32], images[..., :32].flip(-1)], -1)
        mirrored = T.averaged_features(teacher, symmetric, (1.0, 1.5), flip=True)
        assert mirrored.shape == plain.shape
        torch.testing.assert_close(mirrored, mirrored.flip(-1))
        assert not torch.allclose(teacher.features(symmetric),
                                  teacher.features(symmetric).flip(-1), atol=1e-3)
    trainer = T.Trainer(make_config(tiny, 'fskd', tmp_path / 'run', 'teacher.scales=[1.0,1.5]',
                                    'teacher.flip=true'))
    assert trainer.teacher_cache.scales == (1.0, 1.5) and trainer.teacher_cache.flip
    uint8 = (images * 255).to(torch.uint8)
    torch.testing.assert_close(
        trainer.teacher_cache(uint8),
        T.averaged_features(trainer.teacher, uint8.float() / 255, (1.0, 1.5), True),
        rtol=1e-2, atol=1e-2)


def test_one_device_rule_for_training_evaluation_and_inference(tiny, tmp_path):
    """cmkd_ros.models.resolve_device: auto is CUDA where present; a GPU asked for and absent
    is a ConfigError naming the device, the same in the trainer and the evaluation."""
    from cmkd_ros.models import resolve_device
    from offline_training.datasets import PairDataset
    from offline_training.evaluate import evaluate_student
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(ConfigError, match="'tpu' is not auto, cpu, cuda or cuda:N"):
        resolve_device('tpu')
    if torch.cuda.is_available():
        assert resolve_device('cuda', 0) == torch.device('cuda', 0)
        with pytest.raises(ConfigError, match='CUDA device'):
            resolve_device(f'cuda:{torch.cuda.device_count()}')
        return
    for name in ('cuda', 'cuda:1'):
        with pytest.raises(ConfigError, match=f"device: '{name}' requested but CUDA is not"):
            resolve_device(name)
    with pytest.raises(ConfigError, match='CUDA is not available'):
        T.Trainer(make_config(tiny, 'supervised', tmp_path / 'run', 'device=cuda'))
    student = T.build_student_for(make_config(tiny, 'supervised', tmp_path / 'x'),
                                  SYNTHETIC.num_classes, None)
    with pytest.raises(ConfigError, match='CUDA is not available'):
        evaluate_student(student, PairDataset(tiny['val']), device='cuda')


@pytest.mark.slow
def test_fskd_learns_the_label_images_at_the_points_pixels(tiny, tmp_path):
    """loss.image_label_weight: a cross-entropy on the label image's class at each corresponded
    pixel (the labels the teacher learned from, used where a pair carries them)."""
    from offline_training.losses import class_balance_weights, supervised_ce_loss
    config = make_config(tiny, 'fskd', tmp_path / 'labels', 'loss.image_label_weight=1.0',
                         'loss.feature_weight=0', 'loss.semantic_weight=0', 'steps=10',
                         'optim.lr=0.01')
    trainer = T.Trainer(config)
    batch = T.move_to(trainer.collate([trainer.dataset[0], trainer.dataset[1]]), trainer.device)
    # The pixel labels, looked up here from the pairs' PNGs and the correspondences by hand.
    images = [trainer.dataset[i]['label_images'] for i in (0, 1)]
    stacked = np.concatenate([np.asarray(x) for x in images])
    uv = np.rint(batch['corr_uv'].numpy()).astype(int)
    expected = stacked[batch['corr_image'].numpy(), uv[:, 1], uv[:, 0]]
    expected = np.where(expected < SYNTHETIC.num_classes, expected, 255)
    assert len(np.unique(expected[expected != 255])) > 2

    def agreement():
        with torch.no_grad():
            outputs = trainer.student(batch['coords'], batch['vfeats'])
        predicted = outputs['logits'][batch['inverse'][batch['corr_point']]].argmax(1).numpy()
        return float((predicted == expected)[expected != 255].mean()), outputs

    before, outputs = agreement()
    context = T.LossContext(config, trainer.teacher, torch.Generator().manual_seed(0))
    terms = T.fskd_terms(outputs, batch, context)
    logits = outputs['logits'][batch['inverse'][batch['corr_point']]]
    labels = torch.from_numpy(expected).long()
    reference = supervised_ce_loss(logits, labels,
                                   point_weights=class_balance_weights(labels, logits.shape[1]))
    assert terms['image_ce'].item() == pytest.approx(reference.item(), rel=1e-5)
    # With image_labels_replace_kl the teacher's soft labels count only where no label is.
    from offline_training.losses import semantic_kl_loss
    replace = make_config(tiny, 'fskd', tmp_path / 'replace', 'loss.image_label_weight=1.0',
                          'loss.image_labels_replace_kl=true', 'loss.class_balance=none')
    kl = T.fskd_terms(outputs, batch, T.LossContext(replace, trainer.teacher,
                                                    torch.Generator()))['semantic']
    teacher = T.correspondence_features(outputs, batch, context)[2]
    logits_2d = teacher @ trainer.teacher.classifier.weight.flatten(1).T + \
        trainer.teacher.classifier.bias
    unlabeled = torch.from_numpy(expected == 255)
    assert 0 < int(unlabeled.sum()) < len(unlabeled)
    manual = semantic_kl_loss(logits[unlabeled], logits_2d[unlabeled])
    assert kl.item() == pytest.approx(manual.item(), rel=1e-5)
    # With image_labels_drop_wrong_kl they count also where the teacher's class is the label.
    drop = make_config(tiny, 'fskd', tmp_path / 'drop', 'loss.image_label_weight=1.0',
                       'loss.image_labels_drop_wrong_kl=true', 'loss.class_balance=none')
    kl = T.fskd_terms(outputs, batch, T.LossContext(drop, trainer.teacher,
                                                    torch.Generator()))['semantic']
    agree = unlabeled | (torch.from_numpy(expected) == logits_2d.argmax(1))
    assert int(unlabeled.sum()) < int(agree.sum()) < len(agree)
    manual = semantic_kl_loss(logits[agree], logits_2d[agree])
    assert kl.item() == pytest.approx(manual.item(), rel=1e-5)
    with pytest.raises(ConfigError, match='choose one'):
        make_config(tiny, 'fskd', tmp_path / 'both', 'loss.image_label_weight=1.0',
                    'loss.image_labels_drop_wrong_kl=true', 'loss.image_labels_replace_kl=true')
    summary = trainer.fit()
    after, _ = agreement()
    assert set(summary['losses']) == {'feature', 'semantic', 'image_ce', 'total'}
    assert after > before + 0.4, (before, after)   # measured 0.03 -> 0.74
    # Only FSKD on pairs (the other formats carry no label images).
    with pytest.raises(ConfigError, match='image_label_weight'):
        make_config(tiny, 'udakd', tmp_path / 'x', 'loss.image_label_weight=1.0')
