"""Segment node: label every LiDAR point with a distilled student network.

Subscribes ``~/input/pointcloud`` (sensor_msgs/PointCloud2, sensor-data QoS) and publishes
``~/output/pointcloud``: the input fields plus ``class_id`` (uint8), ``probability`` (float32)
and ``rgb`` (packed float32, RViz), with the input header. Only the newest scan is processed: a
worker thread takes it from a one-item slot, so a scan that arrives while the previous one is
still being segmented replaces the waiting one (counted as a drop) instead of queueing.
Inference is skipped while nobody subscribes to the output. See docs/nodes.md.
"""
from __future__ import annotations

import threading
import time

from rclpy.exceptions import ParameterException
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64

from cmkd_ros.config import ConfigError
from cmkd_ros.conversions import ConversionError, array_to_cloud, rclpy_types
from cmkd_ros.conversions import stamp_ns as msg_stamp_ns
from cmkd_ros.nodes.ros_io import (ConfigParameters, Diagnostics, qos_overrides, run_node,
                                   sensor_qos)
from cmkd_ros.pipelines.intake import decode_cloud, oversized_cloud
from cmkd_ros.pipelines.segment import SegmentNodeConfig, SegmentPipeline
from cmkd_ros.pipelines.work_queue import WorkQueue

RUNTIME_PARAMETERS = ('range_min', 'range_max', 'classes', 'min_probability', 'always_process',
                      'max_points')


class SegmentNode(Node):
    """LiDAR semantic segmentation with a student checkpoint (CPU or CUDA): rclpy wiring over
    :class:`cmkd_ros.pipelines.segment.SegmentPipeline`."""

    def __init__(self, **kwargs):
        super().__init__('segment_node', **kwargs)
        # 1. parameters -> validated config (raises ConfigError: no half-built node).
        self.params = ConfigParameters(self, SegmentNodeConfig, runtime=RUNTIME_PARAMETERS,
                                       on_change=self._on_config)
        config = self.params.config
        # 2. core objects: the pipeline (student, class map; unknown class names raise).
        self.diag = Diagnostics(self, 'segmentation', config.diagnostics_period_s)
        self.pipeline = SegmentPipeline(config, self.diag)
        self.threads = self.pipeline.threads
        self.get_logger().info(f'loaded {config.checkpoint} on {config.device} '
                               f'({self.pipeline.predictor.precision}, '
                               f'{self.threads or "default"} network threads): '
                               f'{self.pipeline.class_map.num_classes} classes')
        self.msg_types = rclpy_types()
        self.slot = WorkQueue(1)                      # newest scan only
        self.processed = 0
        self.skipped_no_subscriber = 0
        self._last_stamp_ns: int | None = None
        # 3. publishers, then the worker, then the subscription (inputs flow last).
        self.pub = self.create_publisher(PointCloud2, '~/output/pointcloud', sensor_qos(),
                                         qos_overriding_options=qos_overrides())
        self.pub_processing = self.create_publisher(Float64, '~/debug/processing_time_ms', 10)
        self.pub_latency = self.create_publisher(Float64, '~/debug/pipeline_latency_ms', 10)
        # 3b. workers: one (prepare + infer), or two with a one-scan slot between them.
        self.ready = WorkQueue(1)
        stages = ([('segment_prepare', self._prepare_loop), ('segment_infer', self._infer_loop)]
                  if config.pipeline else [('segment_worker', self._work)])
        self.workers = [threading.Thread(target=fn, name=name, daemon=True)
                        for name, fn in stages]
        for worker in self.workers:
            worker.start()
        self.sub = self.create_subscription(PointCloud2, '~/input/pointcloud', self._on_cloud,
                                            sensor_qos(),
                                            qos_overriding_options=qos_overrides())

    def _on_config(self, config: SegmentNodeConfig) -> None:
        self.pipeline.configure(config)           # refuses unknown class names (ValueError)

    def _on_cloud(self, msg: PointCloud2) -> None:
        received = time.monotonic()
        if self.pub.get_subscription_count() == 0 and not self.params.config.always_process:
            self.skipped_no_subscriber += 1
            self.diag.set('skipped_no_subscriber', self.skipped_no_subscriber)
            return
        too_many = oversized_cloud(msg, self.params.config.max_points)
        if too_many is not None:
            self.diag.warn('too_many_points', too_many)
            return
        stamp = msg_stamp_ns(msg)
        if self._last_stamp_ns is not None and stamp < self._last_stamp_ns:
            self.diag.warn('stamp_backwards', f'cloud stamp jumped back by '
                           f'{(self._last_stamp_ns - stamp) / 1e9:.3f} s (bag loop or clock '
                           'reset); processing it')
        self._last_stamp_ns = stamp
        if self.slot.put((msg, received)):
            self._count_drop()

    @property
    def dropped(self) -> int:
        """Scans replaced before being processed (in either slot)."""
        return self.slot.dropped + self.ready.dropped

    def _count_drop(self) -> None:
        self.diag.set('dropped', self.dropped)

    @staticmethod
    def _set_threads(threads: int) -> None:
        if threads > 0:                 # torch's thread setting is per calling thread
            import torch
            torch.set_num_threads(threads)

    def _guarded(self, step, *args):
        """``step(*args)``, or None after a throttled warning: bad input never stops a worker."""
        try:
            return step(*args)
        except (ConversionError, ValueError) as exc:
            self.diag.warn('bad_input', f'cannot segment cloud: {exc}')
        except Exception as exc:  # keep the node alive; report what happened
            self.diag.warn('inference_error', f'{type(exc).__name__}: {exc}')
        return None

    def _prepared_scans(self):
        """Yield ``((msg, job), received, prepare seconds)`` for each scan of the input slot."""
        for msg, received in self.slot.items(drain=False):
            start = time.monotonic()
            job = self._guarded(self._prepare, msg)
            if job is not None:
                yield job, received, time.monotonic() - start

    def _work(self) -> None:
        """Single worker: prepare and infer each scan in turn."""
        self._set_threads(self.threads)
        for item in self._prepared_scans():
            self._finish(*item)

    def _prepare_loop(self) -> None:
        """Pipeline stage 1: decode, select points, voxels (one thread); then, while stage 2
        already runs the network on that scan, its kernel maps."""
        self._set_threads(1)
        for item in self._prepared_scans():
            if self.ready.put(item):
                self._count_drop()
            self._guarded(self.pipeline.build_maps, item[0][1])

    def _infer_loop(self) -> None:
        """Pipeline stage 2: the network, labels, publish."""
        self._set_threads(self.threads)
        for item in self.ready.items(drain=False):
            self._finish(*item)

    def _finish(self, job, received: float, prepare_s: float) -> None:
        start = time.monotonic()
        labeled = self._guarded(self._infer, job)
        if labeled is None:
            return
        self.pub.publish(labeled)
        done = time.monotonic()
        processing_ms = (prepare_s + done - start) * 1e3
        self.processed += 1
        self.pub_processing.publish(Float64(data=processing_ms))
        self.pub_latency.publish(Float64(data=(done - received) * 1e3))
        self.diag.set('processed', self.processed)
        self.diag.set('last_processing_ms', round(processing_ms, 1))

    def _prepare(self, msg: PointCloud2):
        """(msg, SegmentJob), or None for a cloud that cannot be decoded (warned)."""
        points = decode_cloud(msg, self.diag, 'cloud skipped')
        if points is None:
            return None
        return msg, self.pipeline.prepare(points)

    def _infer(self, item) -> PointCloud2:
        msg, job = item
        labeled = self.pipeline.infer(job)
        if int(msg.height) > 1:                               # organized in, organized out
            labeled = labeled.reshape(int(msg.height), int(msg.width))
        out = array_to_cloud(labeled, msg_stamp_ns(msg), msg.header.frame_id, self.msg_types)
        out.header = msg.header
        return out

    def close(self) -> None:
        self.slot.close()
        self.ready.close()
        for worker in self.workers:
            worker.join(timeout=2.0)


def main(args=None) -> None:
    run_node(SegmentNode, 'segment_node', SegmentNodeConfig,
             'Segments LiDAR clouds with a student checkpoint; publishes class_id, probability and'
             ' rgb.',
             (ConfigError, ValueError, FileNotFoundError, ImportError, ParameterException), args)


if __name__ == '__main__':
    main()
