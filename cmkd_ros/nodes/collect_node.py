"""Collect node: synchronize a LiDAR with N cameras, compute correspondences, log pairs.

Subscribes ``~/input/pointcloud`` (PointCloud2), per camera an image topic (CompressedImage or
Image) and its CameraInfo (topics from templates over the ``cameras`` parameter), and optionally
``~/input/odom`` (nav_msgs/Odometry, ``T_world_lidar``) for motion compensation. Extrinsics come
from ``calibration_file``, else from TF: a bag's ``/tf_static`` (``tf.bag``) or the live one
through tf2_ros. Every input uses sensor-data QoS. :class:`cmkd_ros.sync.ApproximateTimeSync`
groups the messages into sets (with ``sync.partial_timeout_ms``, a timer also sends out the
sweeps still waiting once every stream has stopped); the sets go through a bounded queue to a
worker thread, which runs :class:`cmkd_ros.pipelines.collect.CollectPipeline` on them:
correspondences with :func:`cmkd_ros.projection.compute_correspondences` (the function training
uses) and, when ``record.enabled``, a pair that the node writes with
:class:`cmkd_ros.pairs.PairWriter` (atomic, quota), JPEGs kept as received. One sweep in
``health.sweep_stride`` also goes, through a queue of one, to a low-priority thread that checks
each camera's calibration against the data (:class:`cmkd_ros.calibration_check.HealthMonitor`):
its steps wait while the worker makes pairs (:class:`cmkd_ros.pipelines.work_queue.IdleGate`),
so it never delays pairs, and it drops sets while busy. Publishes ``~/output/overlay`` (throttled,
only with subscribers) and ``/diagnostics`` (the collection status, and one calibration status
per camera: WARN when misaligned; with ``health.refuse_misaligned`` such a camera's images are
left out of the pairs). Bad input is
reported (throttled warning + diagnostic) and skipped; the node keeps running. See
docs/nodes.md.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import numpy as np
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from cmkd_ros.calibration import (CalibrationError, CameraCalibration, RigCalibration,
                                  calibration_from_camera_info)
from cmkd_ros.config import ConfigError, to_dict
from cmkd_ros.conversions import (IMAGE_ENCODINGS, ConversionError,
                                  UnsupportedEncodingError, array_to_image, compressed_format,
                                  image_to_array, rclpy_types)
from cmkd_ros.conversions import stamp_ns as msg_stamp_ns
from cmkd_ros.nodes.ros_io import (ConfigParameters, Diagnostics, LiveTransforms,
                                   qos_overrides, run_node, sensor_qos)
from cmkd_ros.pairs import Pair, PairWriteError, PairWriter
from cmkd_ros.pipelines.collect import (CameraSample, CollectNodeConfig, CollectPipeline,
                                        Sweep, SyncedInputs, extrinsics_disagreement,
                                        startup_rig)
from cmkd_ros.pipelines.intake import decode_cloud, oversized_cloud
from cmkd_ros.pipelines.work_queue import IdleGate, WorkQueue
from cmkd_ros.sync import ApproximateTimeSync, SyncedSet

LIDAR_KEY = '__lidar__'
RUNTIME_PARAMETERS = ('record.enabled', 'record.min_interval_s', 'record.min_correspondences',
                      'overlay.enabled', 'overlay.max_rate_hz', 'max_points',
                      'health.enabled', 'health.refuse_misaligned',
                      'health.warn_better_neighbours')


def encoded_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None if not found."""
    from cmkd_ros.calibration import read_image_size
    import io
    try:
        return read_image_size(io.BytesIO(data))
    except (CalibrationError, OSError, ValueError, TypeError):
        return None


class CollectNode(Node):
    """Online distillation-pair collection from one LiDAR and N cameras: rclpy wiring over
    :class:`cmkd_ros.pipelines.collect.CollectPipeline`."""

    def __init__(self, **kwargs):
        super().__init__('collect_node', **kwargs)
        # 1. parameters -> validated config (raises: no half-built node).
        self.params = ConfigParameters(self, CollectNodeConfig, runtime=RUNTIME_PARAMETERS,
                                       on_change=self._on_config)
        config = self.params.config
        # 2. core objects: calibration (calibration_file, else TF), synchronizer, writer.
        # Without a rig the extrinsics come from the live TF with each CameraInfo.
        rig, tf_warnings = startup_rig(config)
        if not config.cameras:
            self.params.resolve('cameras', list(rig.names))
            config = self.params.config
        self.file_calibration = {name: rig.camera(name) for name in config.cameras} if rig \
            else {}
        self.lidar_frame = config.tf.lidar_frame or (rig.lidar_frame if rig else None)
        self.live_tf = self._live_transforms(config, rig is None)
        self._tf_compared: set[str] = set()
        for line in tf_warnings:
            self.get_logger().warning(line)
        self.calibration: dict[str, CameraCalibration | None] = {
            name: None if config.use_camera_info else self.file_calibration[name]
            for name in config.cameras}
        self._camera_info_key: dict[str, tuple] = {}
        self._pending_image: dict[str, Any] = {}
        self.sync = ApproximateTimeSync.from_config(
            config.sync, LIDAR_KEY, list(config.cameras),
            time_offsets_ns={LIDAR_KEY: int(config.lidar_sync_offset_ms * 1e6),
                             **{n: self.file_calibration[n].time_offset_ns
                                for n in self.file_calibration}})
        self.writer: PairWriter | None = None
        self.quota_reached = False
        if config.record.enabled:
            self._open_writer(config)
        self.msg_types = rclpy_types()
        self.diag = Diagnostics(self, 'collection', config.diagnostics_period_s)
        self.pipeline = CollectPipeline(config, self.diag)
        self.odometry: collections.deque = collections.deque()
        self._last_lidar_ns: int | None = None
        self._last_input_ns: int | None = None
        self._last_overlay = 0.0
        self.pairs_written = 0
        self.sets_synchronized = 0
        # 3. worker with a bounded queue of synchronized sets (the oldest dropped when full).
        self.queue = WorkQueue(config.processing_queue)
        self.worker = threading.Thread(target=self._work, name='collect_worker', daemon=True)
        self.worker.start()
        # 3b. calibration health: its own low-priority thread, fed one sweep at a time (a set
        # arriving while it is busy replaces the waiting one), so pairs never wait for it.
        self.health_queue = WorkQueue(1)
        # ... and its steps wait while the worker makes pairs (the interpreter lock is shared)
        self.worker_gate = IdleGate(pending=self.queue.__len__)
        self.pipeline.health_pause = self._health_pause
        self.health_worker = threading.Thread(target=self._check_health, name='collect_health',
                                              daemon=True)
        self.health_worker.start()
        self.diag.add_source(self._calibration_statuses)
        # 4. publishers, then subscriptions (inputs flow last).
        self.pub_overlay = self.create_publisher(Image, '~/output/overlay', 2)
        qos = sensor_qos(depth=10)
        self.create_subscription(PointCloud2, '~/input/pointcloud', self._on_cloud, qos,
                                 qos_overriding_options=qos_overrides())
        image_type = CompressedImage if config.image_transport == 'compressed' else Image
        for name in config.cameras:
            self.create_subscription(image_type, config.image_topic.format(camera=name),
                                     lambda msg, n=name: self._on_image(n, msg), qos)
            if config.use_camera_info:
                self.create_subscription(CameraInfo,
                                         config.camera_info_topic.format(camera=name),
                                         lambda msg, n=name: self._on_camera_info(n, msg), qos)
        if config.use_odometry:
            from nav_msgs.msg import Odometry
            self.create_subscription(Odometry, '~/input/odom', self._on_odom, sensor_qos(50))
        if config.sync.partial_timeout_ms > 0:       # partial sets once every stream stops
            self.create_timer(min(config.sync.partial_timeout_ms / 2e3, 1.0), self._poll_sync)
        self.get_logger().info(
            f'collecting {len(config.cameras)} camera(s) {list(config.cameras)}; recording '
            f'{"on -> " + config.record.output_dir if config.record.enabled else "off"}')

    # ------------------------------------------------------------------ configuration
    def _live_transforms(self, config: CollectNodeConfig, needed: bool) -> Any:
        """tf2_ros on the live TF: the extrinsics when ``needed``, else a check of the file."""
        if not config.tf.live or (config.tf.bag and not needed):
            return None
        try:
            return LiveTransforms(self)
        except ImportError as exc:
            if needed:
                raise ImportError(f'calibration_file and tf.bag are empty, so the extrinsics '
                                  f'would come from the live TF, but {exc}; set '
                                  'calibration_file (cmkd rig BAG --out rig.yaml) or tf.bag'
                                  ) from None
            self.get_logger().info(f'calibration_file not compared with the live TF: {exc}')
            return None

    def _tf_extrinsics(self, name: str, optical_frame: str) -> Any:
        """``T_cam_lidar`` of camera ``name`` from the live TF, or None (warned) until known."""
        if not self.lidar_frame or not optical_frame:
            self.diag.warn('no_tf', f'camera {name}: waiting for ' + (
                'a PointCloud2 (its frame_id is the LiDAR frame)' if not self.lidar_frame
                else 'a CameraInfo with a frame_id (the optical frame)'))
            return None
        T = self.live_tf.lookup(optical_frame, self.lidar_frame)
        if T is None:
            self.diag.warn('no_tf', f'camera {name}: no TF from {self.lidar_frame} to '
                           f'{optical_frame} yet: {self.live_tf.last_error}')
        return T

    def _open_writer(self, config: CollectNodeConfig) -> None:
        quota = int(config.record.max_megabytes * 1e6) or None
        self.writer = PairWriter(config.record.output_dir, max_bytes=quota,
                                 fsync=config.record.fsync,
                                 min_free_bytes=int(config.record.min_free_megabytes * 1e6),
                                 metadata={'source': 'cmkd_ros collect_node',
                                           'cameras': list(config.cameras),
                                           'collect_config': to_dict(config)})

    def _on_config(self, config: CollectNodeConfig) -> None:
        if config.record.enabled and self.writer is None:
            try:
                self._open_writer(config)
            except OSError as exc:
                raise ValueError(f'record.output_dir: cannot write {config.record.output_dir}: '
                                 f'{exc}') from None
        self.pipeline.configure(config)

    # ------------------------------------------------------------------ callbacks
    def _on_camera_info(self, name: str, msg: CameraInfo) -> None:
        key = (int(msg.width), int(msg.height), tuple(msg.k), tuple(msg.d),
               msg.distortion_model)
        if self._camera_info_key.get(name) == key:
            return
        base = self.file_calibration.get(name)
        if base is None:                                   # extrinsics from the live TF
            T_cam_lidar = self._tf_extrinsics(name, msg.header.frame_id)
            if T_cam_lidar is None:
                return                                     # the next CameraInfo tries again
            frame_id, time_offset_ns = msg.header.frame_id, 0
        else:
            T_cam_lidar, frame_id, time_offset_ns = (base.T_cam_lidar, base.frame_id,
                                                     base.time_offset_ns)
            if self.live_tf is not None and name not in self._tf_compared:
                self._compare_live_tf(name, base)
        try:
            cal = calibration_from_camera_info(msg, T_cam_lidar, name, frame_id=frame_id,
                                               time_offset_ns=time_offset_ns)
        except (CalibrationError, ValueError) as exc:
            self.diag.warn('bad_camera_info', f'camera {name}: CameraInfo rejected: {exc}')
            return
        self._camera_info_key[name] = key
        self.calibration[name] = cal
        # Drivers publish an image and its CameraInfo together, in either order.
        pending = self._pending_image.pop(name, None)
        if pending is not None:
            self._on_image(name, pending)

    def _compare_live_tf(self, name: str, base: CameraCalibration) -> None:
        T = self.live_tf.lookup(base.frame_id, self.lidar_frame)
        if T is not None:
            self._tf_compared.add(name)
            line = extrinsics_disagreement(name, base.T_cam_lidar, T, self.params.config.tf,
                                           'the live TF')
            if line:
                self.get_logger().warning(line)

    def _on_image(self, name: str, msg: Any) -> None:
        stamp = msg_stamp_ns(msg)
        cal = self.calibration[name]
        if cal is None:
            if name in self._pending_image:
                self.diag.warn('no_camera_info', f'camera {name}: no valid CameraInfo yet; '
                               'image skipped')
            self._pending_image[name] = msg       # used if its CameraInfo comes next
            return
        try:
            sample = self._camera_sample(name, stamp, msg, cal)
        except UnsupportedEncodingError as exc:
            self.diag.warn('bad_encoding', f'camera {name}: image skipped: {exc}')
            return
        except CalibrationError as exc:
            self.diag.warn('image_size_mismatch', f'camera {name}: image skipped: {exc}')
            return
        except (ConversionError, ValueError) as exc:
            self.diag.warn('bad_image', f'camera {name}: image skipped: {exc}')
            return
        self._add(name, stamp, sample)

    def _camera_sample(self, name: str, stamp: int, msg: Any,
                       cal: CameraCalibration) -> CameraSample:
        if isinstance(msg, CompressedImage):
            fmt = compressed_format(msg)                     # raises for unknown formats
            data = bytes(msg.data)
            size = encoded_size(data)
            if size is None:
                raise ConversionError(f'CompressedImage ({fmt}, {len(data)} bytes) has no '
                                      'readable image header')
            sample = CameraSample(name, stamp, encoded=data, encoded_format=fmt)
        else:
            if msg.encoding not in IMAGE_ENCODINGS:
                raise UnsupportedEncodingError(f'Image encoding {msg.encoding!r} is not '
                                               f'supported; one of {sorted(IMAGE_ENCODINGS)}')
            cal.check_image_size(int(msg.width), int(msg.height))   # before decoding
            size = (int(msg.width), int(msg.height))
            img = image_to_array(msg)
            if img.ndim == 2:
                img = np.repeat(_to_uint8(img)[:, :, None], 3, axis=2)
            sample = CameraSample(name, stamp, rgb=img)
        cal.check_image_size(*size)                          # raises CalibrationError
        return sample

    def _on_cloud(self, msg: PointCloud2) -> None:
        too_many = oversized_cloud(msg, self.params.config.max_points)
        if too_many is not None:                 # never buffered by the synchronizer
            self.diag.warn('too_many_points', too_many)
            return
        stamp = msg_stamp_ns(msg)
        if self._last_lidar_ns is not None and stamp < self._last_lidar_ns:
            self.diag.warn('stamp_backwards', f'LiDAR stamp jumped back by '
                           f'{(self._last_lidar_ns - stamp) / 1e9:.3f} s (bag loop or clock '
                           'reset): odometry and rate limit reset')
            # The synchronizer resets itself on such a jump (sync.reset_jump_ms); resetting it
            # here too would lose camera images of the new time that arrived before the sweep.
            horizon = int(self.params.config.odometry_history_s * 1e9)
            kept = [m for m in self.odometry if abs(msg_stamp_ns(m) - stamp) <= horizon]
            self.odometry.clear()
            self.odometry.extend(kept)
            self.pipeline.restart()
        self._last_lidar_ns = stamp
        self.lidar_frame = self.lidar_frame or msg.header.frame_id
        self._add(LIDAR_KEY, stamp, msg)

    def _on_odom(self, msg: Any) -> None:
        self.odometry.append(msg)
        horizon = msg_stamp_ns(msg) - int(self.params.config.odometry_history_s * 1e9)
        while self.odometry and msg_stamp_ns(self.odometry[0]) < horizon:
            self.odometry.popleft()

    def _add(self, key: str, stamp: int, msg: Any) -> None:
        self._last_input_ns = self.get_clock().now().nanoseconds
        self._emit(self.sync.add(key, stamp, msg))

    def _poll_sync(self) -> None:
        """Timer: when every stream has been quiet for the partial timeout (ROS time, so a bag
        replayed with /clock and use_sim_time counts bag time), the LiDAR sweeps still waiting
        go out as partial sets (:meth:`ApproximateTimeSync.poll_idle`)."""
        if self._last_input_ns is not None:
            idle = self.get_clock().now().nanoseconds - self._last_input_ns
            self._emit(self.sync.poll_idle(idle))

    def _emit(self, synced: list[SyncedSet]) -> None:
        for item in synced:
            self.sets_synchronized += 1
            if self.queue.put((item, list(self.odometry))):
                self.diag.warn('dropped_sets', 'worker too slow: oldest synchronized set '
                               'dropped')
        self.diag.set('synchronized', self.sets_synchronized)
        self.diag.set('sync_evicted', self.sync.dropped)

    @property
    def sets_dropped(self) -> int:
        """Synchronized sets dropped because the worker queue was full."""
        return self.queue.dropped

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        for item, odometry in self.queue.items():           # drains the queue on close
            try:
                with self.worker_gate.busy():
                    self._process(item, odometry)
            except (ConversionError, CalibrationError, ValueError) as exc:
                self.diag.warn('bad_input', f'set skipped: {exc}')
            except Exception as exc:  # keep collecting; report what happened
                self.diag.warn('processing_error', f'{type(exc).__name__}: {exc}')

    def _process(self, item: SyncedSet, odometry: list) -> None:
        config = self.params.config
        start = time.monotonic()
        lidar_msg = item.messages[LIDAR_KEY]
        points = decode_cloud(lidar_msg, self.diag, 'set skipped')
        if points is None:
            return
        samples = {k: v for k, v in item.messages.items() if k != LIDAR_KEY}
        names = [n for n in config.cameras if n in samples]
        rig = RigCalibration(tuple(self.calibration[n] for n in names), self.lidar_frame)
        sweep = self.pipeline.sweep(SyncedInputs(msg_stamp_ns(lidar_msg), points, rig,
                                                 samples, odometry),
                                    hurry=len(self.queue) > 0)       # sets are waiting
        if sweep is None:
            return
        if self.pipeline.health_due(sweep) and self.health_queue.put(sweep):
            self.diag.count('health_sets_dropped')            # the check was busy
        self._publish_overlay(config, sweep)
        if config.record.enabled and self.writer is not None and not self.quota_reached \
                and self.pipeline.accept(sweep):
            pair = self.pipeline.pair(sweep)
            if pair is not None:
                self._write(config, pair)
        self.diag.set('last_processing_ms', round((time.monotonic() - start) * 1e3, 1))

    def _health_pause(self) -> None:
        """Between the steps of a health check: wait while the worker makes pairs; stop at
        shutdown (a check half done is dropped)."""
        self.worker_gate.wait_idle()
        if self.health_queue.closed:
            raise _HealthStopped

    def _check_health(self) -> None:
        """Health worker: each sweep it is given goes to the calibration health monitor; a
        camera turning misaligned is logged (WARN) and one turning ok again told."""
        _lower_thread_priority(10)
        for sweep in self.health_queue.items(drain=False):
            before = dict(self.pipeline.health)
            try:
                verdicts = self.pipeline.check_health(sweep) or {}
            except _HealthStopped:
                return
            except Exception as exc:  # keep collecting; report what happened
                self.diag.warn('health_check_error', f'calibration health check: '
                               f'{type(exc).__name__}: {exc}')
                continue
            refusing = self.params.config.health.refuse_misaligned
            for name, health in verdicts.items():
                was = before.get(name)
                was = was.status if was is not None else 'unknown'
                if health.status == 'misaligned' and was != 'misaligned':
                    self.diag.warn(f'calibration_misaligned_{name}', f'camera {name}: '
                                   f'calibration misaligned: {health.message}' +
                                   ('; its images are left out of the pairs' if refusing
                                    else ''))
                elif health.status == 'ok' and was == 'misaligned':
                    self.diag.info(f'camera {name}: calibration aligned again: '
                                   f'{health.message}')

    def _calibration_statuses(self) -> list[tuple[str, int, str, dict]]:
        """One /diagnostics status per camera: OK (aligned, or no verdict yet) or WARN
        (misaligned); none while ``health.enabled`` is off."""
        config = self.params.config
        if not config.health.enabled:
            return []
        out = []
        for name in config.cameras:
            health = self.pipeline.health.get(name)
            status = health.status if health is not None else 'unknown'
            message = health.message if health is not None else 'no set checked yet'
            values = {'status': status}
            report = health.report if health is not None else None
            if report is not None:
                values.update(sets=report.frames, silhouette_points=report.edge_points,
                              better_neighbours=round(report.better_neighbours, 3),
                              score=round(report.score, 4))
                if report.searched and status == 'misaligned':
                    values['misalignment_deg'] = round(report.misalignment_deg, 2)
            refusing = status == 'misaligned' and config.health.refuse_misaligned
            values['refusing'] = refusing
            level = Diagnostics.WARN if status == 'misaligned' else Diagnostics.OK
            text = f'{status}: {message}' + ('; its images are left out of the pairs '
                                             '(health.refuse_misaligned)' if refusing else '')
            out.append((f'calibration {name}', level, text, values))
        return out

    def _write(self, config: CollectNodeConfig, pair: Pair) -> None:
        try:
            path = self.writer.write(pair)
        except PairWriteError as exc:       # disk full: nothing left behind; retried next set
            self.diag.fail('write_failed', f'recording paused: {exc}')
            return
        if self.diag.recover('write_failed'):
            self.get_logger().info(f'recording resumed in {config.record.output_dir} after '
                                   f'{self.diag.counters["write_failed"]} failed write(s)')
        if path is None:
            self.quota_reached = True
            self.diag.warn('quota_reached', f'disk quota of {config.record.max_megabytes} MB '
                           f'reached in {config.record.output_dir}: recording stopped')
            return
        self.pairs_written += 1
        self.diag.set('pairs_written', self.pairs_written)
        self.diag.set('dataset_megabytes', round(self.writer.bytes_used / 1e6, 2))

    def _publish_overlay(self, config: CollectNodeConfig, sweep: Sweep) -> None:
        if not config.overlay.enabled or self.pub_overlay.get_subscription_count() == 0:
            return
        now = time.monotonic()
        if now - self._last_overlay < 1.0 / config.overlay.max_rate_hz:
            return
        name = config.overlay.camera or config.cameras[0]
        img = self.pipeline.overlay(sweep, name)
        if img is None:
            return
        self._last_overlay = now
        msg = array_to_image(img, 'rgb8', sweep.samples[name].stamp_ns,
                             sweep.rig.camera(name).frame_id, self.msg_types)
        self.pub_overlay.publish(msg)

    def close(self) -> None:
        self.queue.close()
        self.health_queue.close()
        self.worker_gate.close()
        self.worker.join(timeout=10.0)
        self.health_worker.join(timeout=5.0)


class _HealthStopped(Exception):
    """The node shuts down during a health check."""


def _lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux: nice is per thread);
    nothing where that is not possible."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):
        pass


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    top = float(np.nanmax(img)) if img.size else 1.0
    return (np.clip(np.nan_to_num(img) / max(top, 1e-9), 0, 1) * 255).astype(np.uint8)


def main(args=None) -> None:
    run_node(CollectNode, 'collect_node', CollectNodeConfig,
             'Synchronizes LiDAR + cameras, computes correspondences and records distillation'
             ' pairs.',
             (ConfigError, CalibrationError, ValueError, FileNotFoundError, ImportError, OSError,
              ParameterException), args)


if __name__ == '__main__':
    main()
