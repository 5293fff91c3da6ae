"""``cmkd sim`` writes readable output in every format."""
import subprocess
import sys

import numpy as np
import pytest

from cmkd_ros import bag
from cmkd_ros.pairs import PairReader

pytestmark = pytest.mark.process

SMALL = ['--set', 'cameras.width=96', '--set', 'cameras.height=64', '--set', 'lidar.beams=8',
         '--set', 'lidar.horizontal_resolution_deg=2.0']


def _cmkd(*args):
    return subprocess.run([sys.executable, '-m', 'cmkd_ros.tools.cli', 'sim', *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('fmt', ['mcap', 'sqlite3', 'frames'])
def test_cmkd_sim_writes_readable_output(tmp_path, fmt):
    out = tmp_path / 'out'
    extra = ['--compressed'] if fmt == 'sqlite3' else []
    res = _cmkd('--frames', '2', '--out', str(out), '--format', fmt, '--seed', '3',
                '--cameras', '2', *SMALL, *extra)
    assert res.returncode == 0, res.stderr
    assert 'wrote 2 frames' in res.stdout
    assert 'frame' in res.stderr                  # the progress bar
    if fmt == 'frames':
        reader = PairReader(str(out))
        assert len(reader) == 2
        pair = reader[1]
        assert pair.camera_names == ['front', 'front_left']
        assert pair.image('front').shape == (64, 96, 3)
        assert len(pair.labels) == len(pair.xyz) > 100
    else:
        topics = bag.bag_topics(out)
        assert topics[bag.POINTS_TOPIC][1] == 2
        key = 'compressed' if extra else 'image'
        assert topics[bag.camera_topics('front_left')[key]][1] == 2
        assert bag.load_calibration(out).names == ['front', 'front_left']
        raw = next(bag.read_messages(out, [bag.LABELS_TOPIC]))[3]
        labels = np.frombuffer(bytes(bag.deserialize(raw, bag.POINTCLOUD2).data), np.uint8)
        assert len(labels) > 100 and labels.max() < 12


def test_cmkd_sim_rejects_bad_settings_naming_the_field(tmp_path):
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'x'), '--set', 'lidar.beams=-2')
    assert res.returncode == 2 and 'lidar.beams' in res.stderr
    (tmp_path / 'cfg.yaml').write_text('cameras:\n  height: 3\n')
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'y'), '--config',
                str(tmp_path / 'cfg.yaml'))
    assert res.returncode == 2 and 'cameras.height' in res.stderr
    (tmp_path / 'exists').mkdir()
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'exists'))
    assert res.returncode == 2 and 'already exists' in res.stderr
    (tmp_path / 'file').write_text('')                   # an output path below a file
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'file' / 'out'), '--format', 'frames',
                '--no-progress', *SMALL)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines() == [f"cmkd sim: [Errno 20] Not a directory: "
                                               f"'{tmp_path / 'file' / 'out'}'"]


def test_cmkd_sim_stride_spreads_frames_over_the_drive(tmp_path):
    res = _cmkd('--frames', '2', '--stride', '5', '--out', str(tmp_path / 'p'), '--format',
                'frames', '--seed', '3', '--cameras', '1', *SMALL)
    assert res.returncode == 0, res.stderr
    stamps = [p.lidar_stamp_ns for p in PairReader(str(tmp_path / 'p'))]
    assert stamps[1] - stamps[0] == 5 * 100_000_000      # sweeps 0 and 5 of a 10 Hz LiDAR
    res = _cmkd('--frames', '2', '--stride', '5', '--out', str(tmp_path / 'b'), '--format',
                'mcap')
    assert res.returncode == 2 and '--stride' in res.stderr


def test_cmkd_sim_lidar_preset_sets_the_beam_table(tmp_path):
    # Pandar64: 64 rings, 0.167 deg apart from -6 to +2 deg, coarser above and below
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'p'), '--format', 'frames',
                '--cameras', '1', '--lidar', 'pandar64', '--set', 'cameras.width=96',
                '--set', 'cameras.height=64', '--set', 'lidar.horizontal_resolution_deg=2.0')
    assert res.returncode == 0, res.stderr
    pair = PairReader(str(tmp_path / 'p'))[0]
    xyz, ring = pair.xyz, pair.ring.astype(int)
    assert ring.max() == 63 and len(np.unique(ring)) > 40
    elev = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
    table = np.array([np.median(elev[ring == r]) for r in np.unique(ring)])
    gaps = np.abs(np.diff(np.sort(table)))
    assert 0.15 < gaps.min() < 0.18 and gaps.max() > 3.0
    assert table.max() < 15.5 and table.min() > -25.5
    res = _cmkd('--frames', '1', '--out', str(tmp_path / 'x'), '--lidar', 'hdl-99')
    assert res.returncode == 2 and 'hdl-99' in res.stderr
