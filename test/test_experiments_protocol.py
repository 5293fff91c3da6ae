"""The experiments' protocol: validation and test worlds, the test stage scored once, the
second rig for the test stage only, the table naming which worlds served for what."""
import json

import pytest

from cmkd_ros.config import ConfigError, build
from offline_training.experiments import (ExperimentsConfig, ExperimentsError, claim_stage,
                                          render_worlds, results_table)


def config(tmp_path, **values):
    return build(ExperimentsConfig, {'out_dir': str(tmp_path), **values})


def test_defaults_keep_train_validation_and_test_worlds_apart(tmp_path):
    cfg = config(tmp_path)
    assert cfg.stage == 'validation' and cfg.eval_worlds == cfg.val_worlds
    assert not set(cfg.test_worlds) & set(cfg.val_worlds + cfg.train_worlds)
    assert {101, 102} <= set(cfg.val_worlds)  # tuned on by runs A-M: no test worlds any more
    assert config(tmp_path, stage='test').eval_worlds == cfg.test_worlds
    assert cfg.rig_sim == cfg.sim
    second = config(tmp_path, stage='test', rig='second')
    assert second.rig_sim == second.second_rig != cfg.sim
    with pytest.raises(ConfigError, match='second rig is for the test stage'):
        config(tmp_path, rig='second')
    with pytest.raises(ConfigError, match=r'shared: \[101\]'):
        config(tmp_path, test_worlds=[101])
    assert cfg.teacher_worlds == ()  # the teacher learns from the training streets alone
    for shared in (1, 101, 301):  # the teacher's own worlds: neither trained nor scored on
        with pytest.raises(ConfigError, match=rf'shared: \[{shared}\]'):
            config(tmp_path, teacher_worlds=[1001, shared])
    with pytest.raises(ConfigError, match='needs teacher_worlds'):
        config(tmp_path, distill_on_teacher_worlds=True)


def test_the_test_stage_runs_once_per_folder_unless_forced(tmp_path):
    validation = config(tmp_path / 'val')
    claim_stage(validation)
    claim_stage(validation)  # a validation stage continues or grows freely
    with pytest.raises(ExperimentsError, match='another stage'):
        claim_stage(config(tmp_path / 'val', stage='test'))
    test = config(tmp_path / 'test', stage='test')
    first = claim_stage(test)
    assert json.loads((tmp_path / 'test' / 'stage.json').read_text()) == first
    assert claim_stage(test) == first  # interrupted before scoring: continues as it started
    with pytest.raises(ExperimentsError, match='other settings'):
        claim_stage(config(tmp_path / 'test', stage='test', repeats=3))
    (tmp_path / 'test' / 'results.json').write_text('{}')
    with pytest.raises(ExperimentsError, match='scored once'):
        claim_stage(test)
    claim_stage(config(tmp_path / 'test', stage='test', force=True))
    with pytest.raises(ExperimentsError, match='another stage'):
        claim_stage(config(tmp_path / 'test', stage='test', rig='second', force=True))


def test_rendered_worlds_are_checked_against_the_request(tmp_path):
    sim = {'lidar': {'beams': 4, 'horizontal_resolution_deg': 4.0},
           'cameras': {'count': 1, 'width': 32, 'height': 24}}
    root = str(tmp_path / 'data')
    render_worlds(root, (7,), 1, 1, sim)
    assert render_worlds(root, (7,), 1, 1, sim) == root  # cached
    with pytest.raises(ExperimentsError, match='other worlds or another rig'):
        render_worlds(root, (7,), 1, 1, {**sim, 'lidar': {'beams': 8}})
    with pytest.raises(ExperimentsError, match='other worlds'):
        render_worlds(root, (8,), 1, 1, sim)


def eval_result(miou):
    return {g: {'miou': miou} for g in ('all', 'seen', 'unseen')}


def test_table_names_the_worlds_and_shows_the_probe():
    summary = {
        'protocol': {'stage': 'test', 'rig': 'second', 'sim': {'lidar': {'preset': 'vlp32c'}},
                     'train_worlds': [1, 2], 'eval_worlds': [301, 302]},
        'teacher': {'eval': {'miou': 0.5}, 'transfer': {'seen': {'miou': 0.4}}},
        'students': {
            'supervised': {'seeds': {0: eval_result(0.8)}},
            'udakd': {'seeds': {0: eval_result(0.3), 1: eval_result(0.4)},
                      'probe_seeds': {0: {'eval': eval_result(0.5)},
                                      1: {'eval': eval_result(0.7)}}},
            'fskd_paper_da': {'seeds': {0: eval_result(0.6)}}}}
    table = results_table(summary)
    head, rows = table.split('\n\n')
    assert 'Stage test' in head and 'worlds 1, 2' in head and '301, 302' in head
    assert 'scored once' in head and 'rig second' in head and 'vlp32c' in head
    assert 'teacher also' not in head
    summary['protocol']['teacher_worlds'] = [1001, 1002]
    assert ('worlds 1, 2 (the teacher also on the images of worlds 1001, 1002), scored'
            in results_table(summary))
    rows = rows.splitlines()
    assert rows[0].endswith('| linear probe, all points |')
    paper = next(r for r in rows if r.startswith("| FSKD, the paper's DA"))
    assert paper.endswith('| 75% | - |')
    udakd = next(r for r in rows if r.startswith('| UDAKD (shared classifier)'))
    assert udakd.endswith('| 60.0 ± 14.1 |') and '| 35.0 ± 7.1 |' in udakd
    assert [r.split('|')[1].strip() for r in rows[4:]] == [
        "FSKD, the paper's DA (pool 4, no shortcut)", 'UDAKD (shared classifier)',
        'supervised (upper bound)']


def test_table_shows_what_the_correspondences_and_the_targets_allow():
    summary = {
        'teacher': {'eval': {'miou': 0.5}, 'transfer': {
            'seen': {'miou': 0.4}, 'images': {'miou': 0.9}, 'train_teacher': {'miou': 0.7},
            'train_images': {'miou': 0.95}}},
        'students': {'supervised': {'seeds': {0: eval_result(0.8)}}}}
    table = results_table(summary)
    row = next(r for r in table.splitlines() if r.startswith('| label images carried'))
    assert '| 90.0 |' in row
    assert "FSKD's targets" in table and 'score 70.0 mIoU, the label images carried 95.0' in table
    del summary['teacher']['transfer']['images']
    del summary['teacher']['transfer']['train_images']
    table = results_table(summary)
    assert 'label images carried' not in table      # older results: no such rows


def test_a_lidar_preset_in_sim_keeps_its_own_beams_and_azimuth_step():
    """sim=... merges into the main rig's overrides (16 beams, 1 degree): a preset named there
    brings its own beams and step, unless they are given too; the SimWorld renders them."""
    from cmkd_ros.sim.simulator import SimWorld

    def lidar(sim):
        return build(ExperimentsConfig, {'sim': sim}).rig_sim['lidar']

    assert lidar({'cameras': {'count': 3}}) == {'beams': 16, 'horizontal_resolution_deg': 1.0}
    assert lidar({'lidar': {'preset': 'hdl32e'}}) == {
        'preset': 'hdl32e', 'beams': 32, 'horizontal_resolution_deg': 0.16}
    assert lidar({'lidar': {'preset': 'pandar64', 'horizontal_resolution_deg': 2.0}}) == {
        'preset': 'pandar64', 'beams': 64, 'horizontal_resolution_deg': 2.0}
    assert lidar({'lidar': {'preset': 'hdl32e', 'beams': 16}})['beams'] == 16
    sweep = SimWorld({**build(ExperimentsConfig, {'sim': {'lidar': {
        'preset': 'vlp32c', 'horizontal_resolution_deg': 4.0}}}).rig_sim, 'seed': 1}).frame(0)
    assert len(set(sweep.ring.tolist())) > 16
