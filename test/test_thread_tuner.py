"""ThreadTuner: the network's thread count chosen from the live scan times."""
import pytest

from cmkd_ros.pipelines.thread_tuner import ThreadTuner


def run(tuner, seconds_by_threads, scans):
    """Feed ``scans`` scans whose time depends on the tuner's current thread count; returns
    the thread count of each scan."""
    used = []
    for _ in range(scans):
        used.append(tuner.threads)
        tuner.record(seconds_by_threads(tuner.threads))
    return used


def test_keeps_the_faster_count_and_prefers_fewer_threads_when_equal():
    tuner = ThreadTuner(2, window=10, warmup=5)
    run(tuner, {1: 0.090, 2: 0.060}.get, 30)                 # 5 warm-up + 10 + 10 trials
    assert not tuner.exploring and tuner.threads == 2 and tuner.level == pytest.approx(0.060)
    assert tuner.changes == [(2, {1: 0.090, 2: 0.060})]
    equal = ThreadTuner(2, window=10, warmup=5)
    run(equal, {1: 0.060, 2: 0.058}.get, 30)                 # 3 % faster is not worth a core
    assert equal.threads == 1


def test_a_busy_core_makes_it_try_again_and_fall_back():
    tuner = ThreadTuner(2, window=10, warmup=0, recheck=10**6)
    run(tuner, {1: 0.090, 2: 0.060}.get, 20)
    assert tuner.threads == 2
    busy = {1: 0.095, 2: 0.150}                               # another process took a core
    used = run(tuner, busy.get, 40)
    assert tuner.threads == 1 and tuner.level == pytest.approx(0.095)
    # the slowdown is noticed within one window; the worse count's trial stops early
    assert used.count(2) <= 10 + 5


def test_tries_again_every_recheck_scans():
    tuner = ThreadTuner(2, window=5, warmup=0, recheck=50)
    run(tuner, {1: 0.090, 2: 0.060}.get, 10)
    assert tuner.threads == 2
    run(tuner, {1: 0.050, 2: 0.060}.get, 50 + 10)             # the other count got faster
    assert tuner.threads == 1 and len(tuner.changes) == 2


def test_one_core_never_changes():
    tuner = ThreadTuner(1)
    assert run(tuner, lambda n: 0.1, 100) == [1] * 100 and not tuner.changes
    with pytest.raises(ValueError):
        ThreadTuner(0)


def test_a_freed_core_is_noticed_without_waiting_for_the_recheck():
    tuner = ThreadTuner(2, window=10, warmup=0, recheck=10**6)
    run(tuner, {1: 0.095, 2: 0.150}.get, 20)                  # busy: one thread is faster
    assert tuner.threads == 1
    run(tuner, {1: 0.060, 2: 0.040}.get, 40)                  # the other process ended
    assert tuner.threads == 2 and tuner.level == pytest.approx(0.040)
