"""The segment node's pipeline without ROS: cloud intake, the student's labels, the work queue.

Clouds come from a synthetic drive as rosbags PointCloud2 messages, so the intake decodes the
same bytes the node receives; the student is a small random checkpoint.
"""
import threading
import time

import numpy as np
import pytest

from cmkd_ros.classes import IGNORE_INDEX, SYNTHETIC, ClassMapError
from cmkd_ros.config import build
from cmkd_ros.conversions import array_to_cloud, rosbags_types
from cmkd_ros.pipelines.intake import CountingReport, decode_cloud, oversized_cloud
from cmkd_ros.pipelines.segment import (SegmentNodeConfig, SegmentPipeline, segment_array,
                                        unpack_rgb)
from cmkd_ros.pipelines.work_queue import WorkQueue
from ros_utils import make_sim_bag, make_student_checkpoint, predict_offline


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return make_student_checkpoint(tmp_path_factory.mktemp('ckpt') / 'student.pt')


@pytest.fixture(scope='module')
def clouds(tmp_path_factory):
    """PointCloud2 messages (rosbags classes) of a two-sweep synthetic drive."""
    from cmkd_ros.bag import deserialize, read_messages
    bag = make_sim_bag(tmp_path_factory.mktemp('sim') / 'drive', frames=2, cameras=1)
    return [deserialize(raw, msgtype)
            for _, msgtype, _, raw in read_messages(bag, ['/lidar/points'])]


def _pipeline(checkpoint, **settings):
    report = CountingReport()
    config = build(SegmentNodeConfig, {'checkpoint': str(checkpoint), 'precision': 'float32',
                                       'num_threads': 1, **settings})
    return SegmentPipeline(config, report), report


@pytest.mark.parametrize('pipelined', [True, False], ids=['pipelined', 'one_worker'])
def test_pipeline_labels_every_point_as_the_student_predicts(checkpoint, clouds, pipelined,
                                                            single_torch_thread):
    from cmkd_ros.models.checkpoint import load_checkpoint
    pipeline, report = _pipeline(checkpoint, pipeline=pipelined)
    assert pipeline.class_map.names == SYNTHETIC.names and pipeline.threads == 1
    student, _ = load_checkpoint(checkpoint)
    for msg in clouds:
        points = decode_cloud(msg, report, 'cloud skipped')
        assert points.shape[0] == msg.width * msg.height > 3000
        # the node's two stages, as its threads run them
        job = pipeline.prepare(points)
        assert job.rows.size == points.shape[0]             # all finite, all in range
        pipeline.build_maps(job)
        labeled = pipeline.infer(job)
        assert labeled.dtype.names == points.dtype.names + ('class_id', 'probability', 'rgb')
        for name in points.dtype.names:
            np.testing.assert_array_equal(labeled[name], points[name])
        ids = labeled['class_id'].astype(int)
        np.testing.assert_array_equal(unpack_rgb(labeled['rgb']), SYNTHETIC.colorize(ids))
        pred, prob = predict_offline(student, points)
        assert np.mean(pred == ids) > 0.99
        np.testing.assert_allclose(prob, labeled['probability'], atol=1e-4)
        # one call, and the one-call library function, give the same labels
        again = pipeline(points)
        np.testing.assert_array_equal(again['class_id'], labeled['class_id'])
        np.testing.assert_allclose(again['probability'], labeled['probability'], atol=1e-6)
        once = segment_array(points, pipeline.predictor, pipeline.class_map, pipeline.config)
        np.testing.assert_array_equal(once['class_id'], labeled['class_id'])
    assert report.warnings == [] and report.counters == {}


def test_non_finite_far_and_empty_clouds_are_labeled_255_and_reported(checkpoint, clouds,
                                                                       single_torch_thread):
    pipeline, report = _pipeline(checkpoint, range_max=40.0)
    points = decode_cloud(clouds[0], report, 'cloud skipped')
    points['x'][:50] = np.nan
    points['z'][50:60] = np.inf
    points['y'][60] = 1e30                                  # finite, far beyond range_max
    with np.errstate(invalid='ignore'):
        far = np.sqrt(sum(points[c].astype(float) ** 2 for c in 'xyz')) > 40.0
    labeled = pipeline(points)
    assert labeled.shape == points.shape
    assert report.warnings == [('nan_points', f'60 of {points.shape[0]} points have non-finite '
                                              'coordinates (labeled 255)')]
    dropped = np.zeros(points.shape[0], bool)
    dropped[:60] = True
    dropped |= far
    assert dropped.sum() > 61
    assert np.all(labeled['class_id'][dropped] == IGNORE_INDEX)
    assert np.all(labeled['probability'][dropped] == 0)
    assert np.all(labeled['class_id'][~dropped] < SYNTHETIC.num_classes)
    # the points kept are labeled as if the others had never been there
    alone = pipeline(points[~dropped])
    np.testing.assert_array_equal(alone['class_id'], labeled['class_id'][~dropped])
    # an empty cloud is published empty, with a warning
    empty = pipeline(points[:0])
    assert empty.shape == (0,) and empty.dtype == labeled.dtype
    assert report.counters == {'nan_points': 1, 'empty_cloud': 1}


def test_runtime_settings_filter_classes_and_refuse_unknown_names(checkpoint, clouds,
                                                                  single_torch_thread):
    import dataclasses
    pipeline, report = _pipeline(checkpoint)
    points = decode_cloud(clouds[0], report, 'cloud skipped')
    every = pipeline(points)
    shown = sorted({SYNTHETIC.names[i] for i in np.unique(every['class_id'])})
    assert len(shown) >= 2
    keep = shown[0]
    pipeline.configure(dataclasses.replace(pipeline.config, classes=(keep,)))
    only = pipeline(points)
    kept = every['class_id'] == SYNTHETIC.index(keep)
    np.testing.assert_array_equal(only['class_id'][kept], every['class_id'][kept])
    assert np.all(only['class_id'][~kept] == IGNORE_INDEX)
    before = pipeline.config
    with pytest.raises(ClassMapError, match="no class named 'unicorn'"):
        pipeline.configure(dataclasses.replace(before, classes=('unicorn',)))
    assert pipeline.config is before


def test_pipeline_refuses_a_missing_checkpoint_or_an_unknown_class(tmp_path, checkpoint):
    from cmkd_ros.models.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        _pipeline(tmp_path / 'missing.pt')
    with pytest.raises(ClassMapError, match='unicorn'):
        _pipeline(checkpoint, classes=['road', 'unicorn'])


def test_cloud_intake_reports_what_it_cannot_use():
    t = rosbags_types()
    report = CountingReport()
    xyz = np.random.default_rng(0).uniform(-5, 5, (20, 3)).astype(np.float32)

    def cloud(dtype, names='xyz'):
        arr = np.zeros(20, dtype=[(name, dtype) for name in names])
        for i, name in enumerate(names):
            arr[name] = xyz[:, i]
        return array_to_cloud(arr, 5, 'lidar', t)

    good = decode_cloud(cloud('f4'), report, 'cloud skipped')
    np.testing.assert_array_equal(good['y'], xyz[:, 1])
    assert report.warnings == []
    assert decode_cloud(cloud('f4', 'abc'), report, 'cloud skipped') is None
    bad_step = cloud('f4')
    bad_step.point_step = 4
    assert decode_cloud(bad_step, report, 'set skipped') is None
    ints = decode_cloud(cloud('i2'), report, 'cloud skipped')
    assert ints is not None and ints.shape == (20,)
    keys = [key for key, _ in report.warnings]
    assert keys == ['missing_xyz', 'bad_layout', 'integer_xyz'], report.warnings
    assert report.warnings[0][1].startswith("cloud skipped: no field(s) ['x', 'y', 'z']")
    assert report.warnings[1][1].startswith('set skipped: ')
    assert report.warnings[2][1].startswith('coordinates are not floating point (x int16, '
                                            'y int16, z int16)')
    # the size bound reads width and height only
    msg = cloud('f4')
    assert oversized_cloud(msg, 20) is None and oversized_cloud(msg, 0) is None
    assert oversized_cloud(msg, 19) == ('cloud of 20 points (20 x 1) skipped unread: more '
                                             'than max_points (19)')


def test_keep_latest_queue_keeps_only_the_newest_item_and_counts_drops():
    slot = WorkQueue(1)
    assert not slot.put(1) and slot.put(2) and slot.put(3)     # 1 and 2 never taken
    assert slot.take(timeout=0.1) == 3 and slot.dropped == 2
    assert slot.take(timeout=0.05) is None
    got = []
    worker = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    worker.start()
    time.sleep(0.05)
    slot.put(4)                                                 # wakes the waiting taker
    worker.join(timeout=5)
    assert got == [4] and slot.dropped == 2
    slot.close()
    assert slot.take(timeout=5) is None and slot.closed
    # a worker loop without drain stops at close, leaving what waits
    slot = WorkQueue(1)
    slot.put('stale')
    slot.close()
    assert list(slot.items(drain=False)) == [] and len(slot) == 1


def test_scans_reuse_freed_memory_instead_of_faulting_it_back(checkpoint, data_dir,
                                                              single_torch_thread):
    """The pipeline keeps freed heap memory mapped (glibc), so a scan's temporaries do not
    page-fault back in on every scan (about 5,000 faults a nuScenes scan with glibc's
    defaults). The minimum over scans is taken: a fault burst of other threads is no signal."""
    import resource
    raw = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', np.float32).reshape(-1, 5)
    points = np.zeros(raw.shape[0], dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'),
                                            ('intensity', 'f4')])
    for i, name in enumerate(points.dtype.names):
        points[name] = raw[:, i]
    pipeline, _ = _pipeline(checkpoint)
    for _ in range(3):                                          # warm-up: the heap grows once
        pipeline(points)
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pipeline(points)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults) < 500, faults
