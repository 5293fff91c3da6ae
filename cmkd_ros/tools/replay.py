"""``cmkd replay BAG``: publish a rosbag2 (MCAP or sqlite3) with its original timing, no ros2 bag.

Messages are read with ``rosbags`` and published with rclpy as the raw CDR bytes stored in the
bag (``Publisher.publish(bytes)``), so nothing is deserialized on the way. Timing follows the
bag's receive timestamps divided by ``--rate``; ``--clock`` also publishes ``/clock``
(rosgraph_msgs/Clock) with the bag time, so nodes started with ``use_sim_time:=true`` see the
recorded time. ``--loop`` starts over at the end (time then jumps backwards, as with
``ros2 bag play --loop``).

    cmkd replay drive.mcap --rate 0.5 --clock --topics /lidar/points /odom
    cmkd replay drive.mcap --wait-for /points --ros-args -r /lidar/points:=/points
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

# Message types whose publishers use transient-local durability (latched, as tf_static).
LATCHED_TOPICS = ('/tf_static',)


class ReplayError(ValueError):
    """The bag cannot be replayed (missing file, unknown topic, unimportable message type)."""


@dataclass
class ReplayStats:
    """What one pass (or all loops) published."""

    published: dict[str, int] = field(default_factory=dict)
    skipped_topics: dict[str, str] = field(default_factory=dict)
    loops: int = 0
    wall_s: float = 0.0
    bag_s: float = 0.0
    max_lag_ms: float = 0.0          # worst lateness of a publish against its schedule


def _import_msg_class(msgtype: str) -> Any:
    """rclpy message class of ``pkg/msg/Name``; ImportError when its package is missing."""
    parts = msgtype.split('/')
    if len(parts) != 3:
        raise ImportError(f'message type {msgtype!r} is not pkg/msg/Name')
    module = importlib.import_module(f'{parts[0]}.{parts[1]}')
    return getattr(module, parts[2])


def open_bag(path: str):
    """A ``rosbags.highlevel.AnyReader`` opened on the rosbag2 folder or file ``path``."""
    from pathlib import Path
    from rosbags.highlevel import AnyReader
    bag = Path(path)
    if not bag.exists():
        raise ReplayError(f'bag not found: {path}')
    if bag.is_file() and bag.suffix in ('.mcap', '.db3'):
        bag = bag.parent              # a rosbag2 bag is its folder (metadata.yaml + files)
    if not (bag / 'metadata.yaml').is_file():
        raise ReplayError(f'{path}: not a rosbag2 bag (no metadata.yaml in {bag})')
    try:
        reader = AnyReader([bag])
        reader.open()
    except Exception as exc:       # rosbags raises several kinds for a damaged bag
        detail = ' '.join(str(exc).split())                  # one line (YAML errors span several)
        raise ReplayError(f'{path}: not a readable rosbag2 ({detail})') from None
    return reader


class Replayer:
    """Publishes a bag's messages on ``node`` with the bag's timing.

    ``on_publish(topic, bag_time_ns, raw_bytes, wall_time_monotonic)`` is called after each
    publish (evaluate-bag uses it to time the pipeline).
    """

    def __init__(self, node: Any, bag_path: str, topics: Sequence[str] | None = None,
                 rate: float = 1.0, clock: bool = False, clock_hz: float = 100.0,
                 reliable: bool = True, depth: int = 10,
                 on_publish: Callable[[str, int, bytes, float], None] | None = None):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        if rate <= 0:
            raise ReplayError(f'--rate must be > 0, got {rate}')
        if clock_hz <= 0:
            raise ReplayError(f'--clock-hz must be > 0, got {clock_hz}')
        self.node = node
        self.rate = float(rate)
        self.clock_period_s = 1.0 / clock_hz
        self.on_publish = on_publish
        self.stats = ReplayStats()
        self.reader = open_bag(bag_path)
        available = {c.topic for c in self.reader.connections}
        wanted = set(topics) if topics else available
        missing = sorted(wanted - available)
        if missing:
            self.reader.close()
            raise ReplayError(f'topic(s) {missing} not in {bag_path}; it has {sorted(available)}')
        self.connections = []
        self.publishers: dict[str, Any] = {}
        for conn in self.reader.connections:
            if conn.topic not in wanted:
                continue
            if conn.topic in self.publishers:       # a topic may have several connections
                self.connections.append(conn)
                continue
            try:
                msg_class = _import_msg_class(conn.msgtype)
            except (ImportError, AttributeError) as exc:
                self.stats.skipped_topics[conn.topic] = f'{conn.msgtype}: {exc}'
                node.get_logger().warn(f'skipping {conn.topic}: message type {conn.msgtype} '
                                       f'is not importable ({exc})')
                continue
            qos = QoSProfile(depth=depth)
            qos.reliability = (ReliabilityPolicy.RELIABLE if reliable
                               else ReliabilityPolicy.BEST_EFFORT)
            if conn.topic in LATCHED_TOPICS:
                qos.reliability = ReliabilityPolicy.RELIABLE
                qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
            self.publishers[conn.topic] = node.create_publisher(msg_class, conn.topic, qos)
            self.stats.published[conn.topic] = 0
            self.connections.append(conn)
        if not self.publishers:
            self.reader.close()
            raise ReplayError(f'nothing to publish from {bag_path}')
        self.clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock
            self._clock_class = Clock
            self.clock_pub = node.create_publisher(Clock, '/clock', QoSProfile(depth=10))
        self._raw_ok = True
        self.start_ns = self.reader.start_time
        self.end_ns = self.reader.end_time

    def wait_for_subscribers(self, topics: Iterable[str], timeout_s: float) -> list[str]:
        """Wait until every topic in ``topics`` has a subscriber; returns those that have none."""
        deadline = time.monotonic() + timeout_s
        pending = [t for t in topics]
        for topic in pending:
            if topic not in self.publishers:
                raise ReplayError(f'--wait-for {topic}: not a replayed topic')
        while pending and time.monotonic() < deadline:
            pending = [t for t in pending if self.publishers[t].get_subscription_count() == 0]
            if pending:
                time.sleep(0.05)
        return pending

    def _publish(self, topic: str, raw: bytes) -> None:
        """Publish CDR bytes as they are; deserialize first where rclpy cannot publish bytes."""
        pub = self.publishers[topic]
        if self._raw_ok:
            try:
                pub.publish(raw)
                return
            except TypeError:                  # an rclpy without serialized publishing
                self._raw_ok = False
        from rclpy.serialization import deserialize_message
        pub.publish(deserialize_message(raw, pub.msg_type))

    def _publish_clock(self, bag_ns: int) -> None:
        msg = self._clock_class()
        msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 1_000_000_000)
        self.clock_pub.publish(msg)

    def _sleep_until(self, target: float, bag_ns_at: Callable[[float], int],
                     stop: threading.Event) -> None:
        """Sleep until monotonic ``target``, publishing /clock on the way when enabled."""
        while not stop.is_set():
            now = time.monotonic()
            if now >= target:
                return
            step = target - now
            if self.clock_pub is not None:
                self._publish_clock(bag_ns_at(now))
                step = min(step, self.clock_period_s)
            stop.wait(step)

    def play(self, loop: bool = False, stop: threading.Event | None = None) -> ReplayStats:
        """Publish the bag once (or until ``stop`` with ``loop``); returns the statistics."""
        stop = stop or threading.Event()
        start_wall = time.monotonic()
        while not stop.is_set():
            pass_start = time.monotonic()

            def bag_ns_at(wall: float, _start=pass_start) -> int:
                return self.start_ns + int((wall - _start) * self.rate * 1e9)

            for conn, bag_ns, raw in self.reader.messages(connections=self.connections):
                target = pass_start + (bag_ns - self.start_ns) / 1e9 / self.rate
                self._sleep_until(target, bag_ns_at, stop)
                if stop.is_set():
                    break
                if self.clock_pub is not None:
                    self._publish_clock(bag_ns)
                self._publish(conn.topic, bytes(raw))
                now = time.monotonic()
                self.stats.max_lag_ms = max(self.stats.max_lag_ms, (now - target) * 1e3)
                self.stats.published[conn.topic] += 1
                if self.on_publish is not None:
                    self.on_publish(conn.topic, bag_ns, raw, now)
            self.stats.loops += 1
            if not loop:
                break
        self.stats.wall_s = time.monotonic() - start_wall
        self.stats.bag_s = (self.end_ns - self.start_ns) / 1e9
        return self.stats

    def close(self) -> None:
        self.reader.close()


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', help='rosbag2 folder (or its .mcap / .db3 file)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor (2 = twice as fast); default 1')
    parser.add_argument('--clock', action='store_true',
                        help='publish /clock with the bag time (for use_sim_time:=true)')
    parser.add_argument('--clock-hz', type=float, default=100.0,
                        help='/clock publish rate between messages (default 100)')
    parser.add_argument('--loop', action='store_true', help='start over at the end')
    parser.add_argument('--topics', nargs='+', default=None, metavar='TOPIC',
                        help='replay only these topics (default: all)')
    parser.add_argument('--best-effort', action='store_true',
                        help='publish with best-effort reliability (default reliable, which '
                             'also matches best-effort subscribers)')
    parser.add_argument('--wait-for', nargs='+', default=(), metavar='TOPIC',
                        help='wait until each of these topics has a subscriber before starting')
    parser.add_argument('--wait-timeout', type=float, default=30.0,
                        help='seconds to wait for --wait-for subscribers (default 30)')
    parser.add_argument('--delay', type=float, default=0.0,
                        help='seconds to sleep before the first message (default 0)')
    parser.add_argument('--ros-args', dest='ros_args', nargs=argparse.REMAINDER, default=[],
                        help='everything after it goes to rclpy, e.g. --ros-args -r a:=b')


def run(args: argparse.Namespace) -> int:
    import rclpy
    from cmkd_ros.nodes.ros_io import ensure_fastdds_profile
    ensure_fastdds_profile()
    ros_args = ['--ros-args'] + list(args.ros_args) if args.ros_args else []
    rclpy.init(args=['cmkd_replay'] + ros_args)
    node = rclpy.create_node('cmkd_replay')
    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            replayer = Replayer(node, args.bag, args.topics, rate=args.rate, clock=args.clock,
                                clock_hz=args.clock_hz, reliable=not args.best_effort)
        except ReplayError as exc:
            print(f'cmkd replay: {exc}', file=sys.stderr)
            return 2
        try:
            if args.wait_for:
                missing = replayer.wait_for_subscribers(args.wait_for, args.wait_timeout)
                if missing:
                    print(f'cmkd replay: no subscriber on {missing} after {args.wait_timeout} '
                          's; starting anyway', file=sys.stderr)
                # The subscriber side discovers this publisher a moment later; samples sent
                # before that are not delivered.
                stop.wait(0.5)
            if args.delay > 0:
                stop.wait(args.delay)
            stats = replayer.play(loop=args.loop, stop=stop)
        finally:
            replayer.close()
        total = sum(stats.published.values())
        print(f'cmkd replay: published {total} messages in {stats.wall_s:.2f} s '
              f'({stats.loops} pass(es), bag {stats.bag_s:.2f} s, rate {args.rate}, '
              f'max lag {stats.max_lag_ms:.1f} ms)')
        for topic, count in sorted(stats.published.items()):
            print(f'  {topic}: {count}')
        # Give subscribers a moment to take the last samples before the writers vanish.
        time.sleep(0.2)
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(prog='cmkd replay')
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
