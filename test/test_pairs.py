"""The pair dataset survives kill -9 at any point and is readable while being written."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from cmkd_ros.calibration import CameraCalibration, RigCalibration
from cmkd_ros.pairs import (Pair, PairFormatError, PairIndexWarning, PairReader, PairWriteError,
                            PairWriter, encode_depth_png, encode_png)


def make_pair(seed: int, n: int = 500) -> Pair:
    rng = np.random.default_rng(seed)
    cam = CameraCalibration('front', 64, 48, K=[[50, 0, 32], [0, 50, 24], [0, 0, 1]],
                            T_cam_lidar=np.eye(4))
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return Pair(lidar_stamp_ns=1_000_000_000 + seed, xyz=rng.normal(size=(n, 3)),
                camera_names=['front'], camera_stamp_ns=np.array([1_020_000_000 + seed]),
                images={'front': encode_png(image)}, image_formats={'front': 'png'},
                calibration=RigCalibration((cam,)), intensity=rng.random(n),
                labels=rng.integers(0, 10, n),
                depth_images={'front': encode_depth_png(rng.random((48, 64)) * 30)})


def test_round_trip_keeps_every_array(tmp_path):
    writer = PairWriter(str(tmp_path))
    pair = make_pair(1)
    writer.write(pair)
    back = PairReader(str(tmp_path))[0]
    np.testing.assert_allclose(back.xyz, pair.xyz.astype(np.float32))
    np.testing.assert_array_equal(back.labels, pair.labels)
    assert back.image('front').shape == (48, 64, 3)
    depth = np.random.default_rng(1).random((48, 64)) * 30
    pair.depth_images['front'] = encode_depth_png(depth)
    writer.write(pair)
    np.testing.assert_allclose(PairReader(str(tmp_path))[1].depth_image('front'), depth,
                               atol=5e-4)
    assert back.calibration.camera('front').width == 64
    assert back.lidar_stamp_ns == pair.lidar_stamp_ns


def test_reader_sees_pairs_written_after_it_opened_and_ignores_torn_lines(tmp_path):
    writer = PairWriter(str(tmp_path))
    writer.write(make_pair(1))
    reader = PairReader(str(tmp_path))
    assert len(reader) == 1
    writer.write(make_pair(2))
    with open(tmp_path / 'index.jsonl', 'a') as fh:
        fh.write('{"id": 7, "fi')              # a writer killed mid-line
    assert reader.refresh() == 1 and len(reader) == 2
    assert reader[1].lidar_stamp_ns == make_pair(2).lidar_stamp_ns


def _cut_last_index_line(root, keep: int) -> None:
    """Leave only ``keep`` bytes of the last index line, as a writer killed mid-line does."""
    index = root / 'index.jsonl'
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b''.join(lines[:-1]) + lines[-1][:keep])


def test_a_torn_index_line_is_repaired_and_its_pair_stays_listed(tmp_path):
    writer = PairWriter(str(tmp_path))
    for i in range(3):
        writer.write(make_pair(i))
    _cut_last_index_line(tmp_path, 12)               # killed while indexing pair 2
    assert len(PairReader(str(tmp_path))) == 2       # the torn line waits
    writer = PairWriter(str(tmp_path))               # a restarted writer (the collect node)
    assert writer.repaired_bytes == 12 and writer.count == 3
    writer.write(make_pair(3))
    with warnings.catch_warnings():
        warnings.simplefilter('error')               # nothing damaged is left
        reader = PairReader(str(tmp_path))           # the default reader, as training uses
    assert [e['id'] for e in reader.entries] == [0, 1, 2, 3]
    assert [p.lidar_stamp_ns for p in reader] == [make_pair(i).lidar_stamp_ns for i in range(4)]


def test_the_default_reader_tolerates_and_reports_a_damaged_index_line(tmp_path):
    writer = PairWriter(str(tmp_path))
    for i in range(3):
        writer.write(make_pair(i))
    # What an older writer left: pair 1's torn line with its recovered entry appended to it.
    lines = (tmp_path / 'index.jsonl').read_text().splitlines(keepends=True)
    (tmp_path / 'index.jsonl').write_text(lines[0] + lines[1][:15] + lines[1] + lines[2])
    with pytest.warns(PairIndexWarning, match=r'damaged line\(s\) \[2\]'):
        reader = PairReader(str(tmp_path))
    assert reader.damaged_lines == [2]
    assert [e['id'] for e in reader.entries] == [0, 1, 2]
    assert reader[1].lidar_stamp_ns == make_pair(1).lidar_stamp_ns


def test_a_failed_write_leaves_nothing_and_the_next_one_succeeds(tmp_path, monkeypatch):
    import errno
    import resource
    writer = PairWriter(str(tmp_path))
    writer.write(make_pair(0))
    index = (tmp_path / 'index.jsonl').read_bytes()

    def contents():
        return sorted(os.listdir(tmp_path / 'pairs')), (tmp_path / 'index.jsonl').read_bytes()

    before = contents()
    # 1. the file system refuses the pair file part-way (here: the file size limit; Python
    #    ignores SIGXFSZ, so the write fails with EFBIG as with ENOSPC on a full disk)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(PairWriteError, match='File too large') as failed:
            writer.write(make_pair(1, n=20000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG and contents() == before   # no partial file
    # 2. the index append fails: the pair file is removed, the index cut back
    real_fsync = os.fsync
    calls = []

    def fsync_fails_on_the_index(fd):
        calls.append(fd)
        if len(calls) == 3:                   # 1: pair file, 2: its folder, 3: index
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', fsync_fails_on_the_index)
    with pytest.raises(PairWriteError, match='No space left on device'):
        writer.write(make_pair(1))
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert contents() == before
    # 3. less free space than the pair and the reserve: refused before anything is written
    writer.min_free_bytes = 2 ** 62
    with pytest.raises(PairWriteError, match='no space left on the disk') as full:
        writer.write(make_pair(1))
    assert full.value.errno == errno.ENOSPC and contents() == before
    # 4. space is back: the next write succeeds with the next id
    writer.min_free_bytes = 0
    writer.write(make_pair(1))
    assert [e['id'] for e in PairReader(str(tmp_path)).entries] == [0, 1]
    assert (tmp_path / 'index.jsonl').read_bytes().startswith(index)


def test_quota_stops_writing(tmp_path):
    size = len(open(PairWriter(str(tmp_path / 'probe')).write(make_pair(0)), 'rb').read())
    writer = PairWriter(str(tmp_path / 'q'), max_bytes=int(size * 2.5))
    results = [writer.write(make_pair(i)) for i in range(4)]
    assert [r is not None for r in results] == [True, True, False, False]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(PairFormatError, match='not found'):
        PairReader(str(tmp_path / 'missing'))
    writer = PairWriter(str(tmp_path))
    path = writer.write(make_pair(3))
    with open(path, 'r+b') as fh:
        fh.truncate(100)
    with pytest.raises(PairFormatError, match='unreadable'):
        PairReader(str(tmp_path))[0]


@pytest.mark.process
def test_kill_minus_9_loses_at_most_the_pair_being_written(tmp_path):
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pairs import make_pair
        from cmkd_ros.pairs import PairWriter
        writer = PairWriter({str(tmp_path)!r})
        i = 0
        while True:
            writer.write(make_pair(i, n=20000))
            print(i, flush=True)
            i += 1
    ''')
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    done = [proc.stdout.readline() for _ in range(5)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert all(line.strip() for line in done)
    reader = PairReader(str(tmp_path), scan=True)
    assert len(reader) >= 5                     # every pair reported written is there
    for i, pair in enumerate(reader):           # and every listed pair is complete
        assert pair.lidar_stamp_ns == make_pair(int(reader.entries[i]['id'])).lidar_stamp_ns
        assert len(pair.xyz) == 20000
    # A new writer resumes numbering after the last complete pair and indexes orphans.
    writer = PairWriter(str(tmp_path))
    writer.write(make_pair(99))
    ids = [json.loads(line)['id'] for line in open(tmp_path / 'index.jsonl')
           if line.endswith('\n') and line.startswith('{"id"')]
    assert len(ids) == len(set(ids))
    assert len(PairReader(str(tmp_path))) == len(reader) + 1


def test_correspondences_round_trip_compact_with_their_settings_hash(tmp_path):
    pair = make_pair(1)
    m = 40
    rng = np.random.default_rng(2)
    corr = {'point': np.sort(rng.choice(500, m, replace=False)).astype(np.int64),
            'camera': np.zeros(m, np.int64), 'uv': rng.random((m, 2)).astype(np.float32) * 40,
            'depth': rng.random(m).astype(np.float32) * 30}
    pair.correspondences, pair.correspondence_settings = corr, 'a1b2c3d4e5f60718'
    arrays = pair.to_arrays()
    assert arrays['corr_point'].dtype == np.int32 and arrays['corr_camera'].dtype == np.uint8
    writer = PairWriter(str(tmp_path))
    writer.write(pair)
    back = PairReader(str(tmp_path))[0]
    assert back.correspondence_settings == 'a1b2c3d4e5f60718'
    for key, value in corr.items():
        assert back.correspondences[key].dtype == value.dtype, key     # int64 again
        np.testing.assert_array_equal(back.correspondences[key], value)
    # without a hash (an older collect node) they are read, and training computes its own
    pair.correspondence_settings = None
    writer.write(pair)
    assert PairReader(str(tmp_path))[1].correspondence_settings is None
    bad = dict(corr, point=corr['point'] + 500)                       # past the last point
    pair.correspondences = bad
    with pytest.raises(PairFormatError, match='indices outside 500 points'):
        pair.to_arrays()


def test_files_with_teacher_outputs_of_an_older_version_stay_readable(tmp_path):
    writer = PairWriter(str(tmp_path))
    path = writer.write(make_pair(1))
    with np.load(path) as data:
        arrays = dict(data)
    arrays['teacher_front'] = np.zeros((12, 12, 16), np.float16)   # logits no reader uses
    np.savez(path, **arrays)
    pair = PairReader(str(tmp_path))[0]
    assert pair.lidar_stamp_ns == make_pair(1).lidar_stamp_ns and not hasattr(pair, 'teacher')
