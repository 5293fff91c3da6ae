"""Approximate-time synchronizer on hand-built LiDAR + camera sequences."""
import pytest

from cmkd_ros.config import ConfigError, build
from cmkd_ros.sync import ApproximateTimeSync, SyncConfig, SyncError

MS = 1_000_000
CAMS = ('front', 'left', 'right')


def stream(period_ms, count, jitter_ms=(0.0,), start_ms=0.0):
    """(stamp_ns) of a periodic sensor, with a repeating jitter pattern."""
    return [int(round((start_ms + i * period_ms + jitter_ms[i % len(jitter_ms)]) * MS))
            for i in range(count)]


def interleave(*streams):
    """Arrival order sorted by stamp: list of (key, stamp)."""
    events = [(stamp, key) for key, stamps in streams for stamp in stamps]
    return [(key, stamp) for stamp, key in sorted(events, key=lambda e: (e[0], str(e[1])))]


def run(sync, events):
    out = []
    for key, stamp in events:
        out.extend(sync.add(key, stamp, (key, stamp)))
    return out


def test_regular_streams_pair_each_sweep():
    lidar = stream(100, 20)
    cams = [(c, stream(100, 20, (3.0 + i, -4.0 + i), start_ms=0.0)) for i, c in enumerate(CAMS)]
    sync = ApproximateTimeSync('lidar', CAMS, queue_size=5, slop_ns=20 * MS)
    sets = run(sync, interleave(('lidar', lidar), *cams))
    assert len(sets) == 20
    for i, s in enumerate(sets):
        assert s.complete and set(s.messages) == {'lidar', *CAMS}
        assert s.stamps_ns['lidar'] == lidar[i]
        assert max(s.stamps_ns.values()) - min(s.stamps_ns.values()) < 20 * MS
        assert s.messages['front'] == ('front', s.stamps_ns['front'])


def test_camera_faster_than_lidar_takes_the_closest_frames():
    # 10 Hz LiDAR, 30 Hz cameras: each sweep pairs with the camera frame nearest to it
    lidar = stream(100, 10, start_ms=1.0)
    cams = [(c, stream(100 / 3, 30, (0.0,), start_ms=0.0)) for c in CAMS]
    sync = ApproximateTimeSync('lidar', CAMS, queue_size=10, slop_ns=15 * MS)
    sets = run(sync, interleave(('lidar', lidar), *cams))
    assert len(sets) == 10
    for s in sets:
        assert all(abs(s.stamps_ns[c] - s.stamps_ns['lidar']) <= 1 * MS for c in CAMS)


def test_drops_are_skipped_not_mismatched():
    lidar = stream(100, 30)
    front = [s for i, s in enumerate(stream(100, 30, (2.0,))) if i % 4 != 1]   # drops
    left = [s for i, s in enumerate(stream(100, 30, (-3.0,))) if i % 5 != 2]
    right = stream(100, 30, (5.0,))
    sync = ApproximateTimeSync('lidar', CAMS, queue_size=4, slop_ns=20 * MS)
    sets = run(sync, interleave(('lidar', lidar), ('front', front), ('left', left),
                                ('right', right)))
    expected = [i for i in range(30) if i % 4 != 1 and i % 5 != 2]
    assert [lidar.index(s.stamps_ns['lidar']) for s in sets] == expected
    for s in sets:
        assert max(s.stamps_ns.values()) - min(s.stamps_ns.values()) < 20 * MS


def test_out_of_order_arrival_and_bursts():
    lidar = stream(100, 12)
    cams = {c: stream(100, 12, (1.0 + i,)) for i, c in enumerate(CAMS)}
    events = []
    # cameras arrive late, in bursts of four frames after four sweeps, each burst reversed
    for b in range(0, 12, 4):
        events.extend(('lidar', s) for s in lidar[b:b + 4])
        for c in CAMS:
            events.extend((c, s) for s in reversed(cams[c][b:b + 4]))
    sync = ApproximateTimeSync('lidar', CAMS, queue_size=12, slop_ns=10 * MS)
    sets = run(sync, events)
    assert sorted(s.stamps_ns['lidar'] for s in sets) == lidar
    for s in sets:
        for i, c in enumerate(CAMS):
            assert s.stamps_ns[c] == s.stamps_ns['lidar'] + int((1.0 + i) * MS)
    # a queue smaller than the burst loses the oldest frames, as message_filters does
    small = ApproximateTimeSync('lidar', CAMS, queue_size=2, slop_ns=10 * MS)
    sets_small = run(small, events)
    assert 0 < len(sets_small) < 12 and small.dropped > 0


def test_time_offsets_shift_matching_but_not_reported_stamps():
    lidar = stream(100, 5)
    late_front = stream(100, 5, (40.0,))          # header stamps 40 ms late
    events = interleave(('lidar', lidar), ('front', late_front))
    plain = ApproximateTimeSync('lidar', ['front'], slop_ns=10 * MS)
    assert run(plain, events) == []
    fixed = ApproximateTimeSync('lidar', ['front'], slop_ns=10 * MS,
                                time_offsets_ns={'front': -40 * MS})
    sets = run(fixed, events)
    assert len(sets) == 5
    assert [s.stamps_ns['front'] for s in sets] == late_front


def test_dead_camera_emits_partial_sets_after_timeout():
    lidar = stream(100, 20)
    front = stream(100, 20, (2.0,))
    left = stream(100, 20, (-2.0,))
    right = stream(100, 8, (4.0,))                # dies after 8 frames
    events = interleave(('lidar', lidar), ('front', front), ('left', left), ('right', right))
    stalled = ApproximateTimeSync('lidar', CAMS, queue_size=10, slop_ns=20 * MS)
    assert len(run(stalled, events)) == 8         # without the option: stuck after the death
    sync = ApproximateTimeSync('lidar', CAMS, queue_size=10, slop_ns=20 * MS,
                               partial_timeout_ns=250 * MS)
    sets = run(sync, events)
    complete = [s for s in sets if s.complete]
    partial = [s for s in sets if not s.complete]
    assert len(complete) == 8
    assert all(s.missing == ('right',) and set(s.messages) == {'lidar', 'front', 'left'}
               for s in partial)
    # every sweep up to timeout before the newest stamp came out, in order
    assert [s.stamps_ns['lidar'] for s in sets] == lidar[:len(sets)]
    assert lidar[len(sets)] > lidar[-1] - 250 * MS - 1
    # when all streams stop, poll() with an outside clock flushes the rest
    rest = sync.poll(lidar[-1] + 300 * MS)
    assert [s.stamps_ns['lidar'] for s in rest] == lidar[len(sets):]
    # a partial set needs partial_min_cameras cameras; a LiDAR alone is dropped
    lonely = ApproximateTimeSync('lidar', CAMS, slop_ns=20 * MS, partial_timeout_ns=150 * MS,
                                 partial_min_cameras=1)
    assert run(lonely, [('lidar', s) for s in lidar[:5]]) == []
    assert lonely.queued('lidar') == 2 and lonely.dropped == 3
    # a timeout longer than the queue holds: sweeps leaving the full queue still go out
    short = ApproximateTimeSync('lidar', CAMS, queue_size=3, slop_ns=20 * MS,
                                partial_timeout_ns=5000 * MS)
    sets_short = run(short, events)
    assert [s.stamps_ns['lidar'] for s in sets_short] == lidar[:len(sets_short)]
    assert len(sets_short) == 20 - 3 and short.queued('lidar') == 3
    # (the short camera queues may have lost a frame too: every set still has a camera)
    assert all('right' in s.missing and len(s.messages) >= 2 for s in sets_short[8:])


def test_poll_idle_flushes_waiting_sweeps_only_once_every_stream_stopped():
    lidar = stream(100, 6)
    front = stream(100, 6, (3.0,))
    left = stream(100, 3, (-3.0,))                # dies after 3 frames
    events = interleave(('lidar', lidar), ('front', front), ('left', left))
    sync = ApproximateTimeSync('lidar', ['front', 'left'], slop_ns=20 * MS,
                               partial_timeout_ns=250 * MS,
                               time_offsets_ns={'lidar': 10 * MS})
    sets = run(sync, events)
    assert [s.stamps_ns['lidar'] for s in sets] == lidar[:3]
    waiting = lidar[3:]                           # newest stamp too close: not yet partial
    assert sync.queued('lidar') == len(waiting) == 3
    # quiet for less than the timeout: a stream between two messages, nothing happens
    assert sync.poll_idle(249 * MS) == [] and sync.queued('lidar') == 3
    # quiet for the timeout: now = newest matched stamp + idle, so every waiting sweep is due
    out = sync.poll_idle(250 * MS)
    assert [s.stamps_ns['lidar'] for s in out] == waiting
    assert all(s.missing == ('left',) for s in out)
    assert [s.stamps_ns['front'] for s in out] == front[3:]
    assert sync.poll_idle(10_000 * MS) == [] and sync.queued('lidar') == 0
    # without partial sets, or before any message, there is nothing to flush
    off = ApproximateTimeSync('lidar', ['front'], slop_ns=20 * MS)
    off.add('lidar', 0, 'l')
    assert off.poll_idle(10_000 * MS) == [] and off.queued('lidar') == 1
    fresh = ApproximateTimeSync('lidar', ['front'], slop_ns=20 * MS, partial_timeout_ns=MS)
    assert fresh.poll_idle(10_000 * MS) == []


def test_partial_set_keeps_spread_below_slop():
    sync = ApproximateTimeSync('lidar', ['a', 'b'], slop_ns=20 * MS, partial_timeout_ns=50 * MS)
    sync.add('a', 118 * MS, 'a')                  # within slop of the LiDAR, far from b
    sync.add('b', 83 * MS, 'b')
    sync.add('lidar', 100 * MS, 'l')
    out = sync.poll(200 * MS)
    assert len(out) == 1 and len(out[0].messages) == 2
    assert max(out[0].stamps_ns.values()) - min(out[0].stamps_ns.values()) < 20 * MS


def test_stamps_jumping_back_reset_the_queues():
    lidar = stream(100, 10)
    cams = [(c, stream(100, 10, (3.0,))) for c in CAMS]
    first = interleave(('lidar', lidar), *cams)
    sync = ApproximateTimeSync('lidar', CAMS, slop_ns=20 * MS, reset_jump_ns=500 * MS)
    # the loop restarts while a half-built set is queued: its LiDAR message must not pair with
    # camera frames from the next loop
    events = first + [('lidar', lidar[-1] + 100 * MS)]
    sets_a = run(sync, events)
    assert len(sets_a) == 10 and sync.queued('lidar') == 1
    sets_b = run(sync, first)
    assert sync.resets == 1
    assert len(sets_b) == 10
    assert [s.stamps_ns['lidar'] for s in sets_b] == lidar
    # small reordering (less than the jump) is not a reset
    sync.add('front', lidar[-1] - 200 * MS, 'late')
    assert sync.resets == 1


def test_errors_and_config():
    with pytest.raises(SyncError, match='unique'):
        ApproximateTimeSync('lidar', ['a', 'a'])
    with pytest.raises(SyncError, match='unknown input'):
        ApproximateTimeSync('lidar', ['a']).add('b', 0, None)
    with pytest.raises(SyncError, match='unknown inputs'):
        ApproximateTimeSync('lidar', ['a'], time_offsets_ns={'c': 1})
    with pytest.raises(SyncError, match='partial_min_cameras'):
        ApproximateTimeSync('lidar', ['a'], partial_min_cameras=2)
    cfg = build(SyncConfig, {'slop_ms': 30, 'partial_timeout_ms': 250})
    sync = ApproximateTimeSync.from_config(cfg, 'lidar', CAMS)
    assert sync.slop_ns == 30 * MS and sync.partial_timeout_ns == 250 * MS
    with pytest.raises(ConfigError, match='queue_size'):
        build(SyncConfig, {'queue_size': 0})
    got = []
    cb = ApproximateTimeSync('lidar', ['a'], slop_ns=5 * MS, callback=got.append)
    cb.add('lidar', 0, 'l')
    cb.add('a', 1 * MS, 'a')
    assert len(got) == 1 and got[0].messages == {'lidar': 'l', 'a': 'a'}


def test_default_config_groups_a_nuscenes_style_rig_by_sweep():
    """Six cameras triggered as a 10 Hz LiDAR sweeps past them (stamps spread over ~80 ms, one
    before the sweep stamp) form one complete set per sweep with the default settings and the
    collect node's 50 ms LiDAR offset (sweep middle)."""
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 21})
    names = world.calibration.names
    sync = ApproximateTimeSync.from_config(build(SyncConfig, {}), 'lidar', names,
                                           time_offsets_ns={'lidar': 50 * MS})
    sets = []
    for sweep in range(6):
        sets += sync.add('lidar', world.frame_stamp_ns(sweep), sweep)
        for name, stamp in zip(names, world.camera_stamps_ns(sweep)):
            sets += sync.add(name, int(stamp), sweep)
    assert len(sets) >= 5
    for found in sets:
        assert found.complete
        assert set(found.messages.values()) == {found.messages['lidar']}   # one sweep each
