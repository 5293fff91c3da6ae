"""Export a synthetic drive to a rosbag2 (MCAP / sqlite3) or to the on-disk pair dataset."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from cmkd_ros.config import to_dict
from cmkd_ros.sim.simulator import SimFrame, SimWorld


class _Summary:
    """Running totals over exported frames."""

    def __init__(self, path: str, fmt: str):
        self.data = {'path': str(path), 'format': fmt, 'frames': 0, 'points': 0,
                     'in_view_any': 0, 'occluded_in_some_camera': 0}
        self.start = time.perf_counter()

    def add(self, frame: SimFrame) -> None:
        stats = frame.occlusion_stats()
        self.data['frames'] += 1
        self.data['points'] += stats['points']
        self.data['in_view_any'] += stats['in_view_any']
        self.data['occluded_in_some_camera'] += stats['occluded_in_some_camera']
        names = frame.class_map.names
        counts = np.bincount(frame.labels, minlength=256)
        per_class = self.data.setdefault('points_per_class', dict.fromkeys(names, 0))
        for i, name in enumerate(names):
            per_class[name] += int(counts[i])

    def finish(self) -> dict:
        d = dict(self.data)
        d['seconds'] = time.perf_counter() - self.start
        in_view = max(1, d['in_view_any'])
        d['occluded_fraction_of_in_view'] = d['occluded_in_some_camera'] / in_view
        return d


def export_bag(world: SimWorld, path: str, frames: int, storage: str = 'mcap',
               images: str = 'raw', start: int = 0,
               on_frame: Callable[[SimFrame], None] | None = None) -> dict:
    """Render ``frames`` frames into a rosbag2 at ``path`` (plus calibration.yaml, and the rig
    on /tf_static); a summary."""
    from cmkd_ros.bag import SimBagWriter
    summary = _Summary(path, storage)
    with SimBagWriter(path, world.calibration, storage, images,
                      world.config.cameras.jpeg_quality, world.static_transforms()) as writer:
        for frame in world.frames(frames, start):
            writer.write_frame(frame)
            summary.add(frame)
            if on_frame is not None:
                on_frame(frame)
    return summary.finish()


def export_pairs(world: SimWorld, path: str, frames: int, image_format: str = 'png',
                 start: int = 0, on_frame: Callable[[SimFrame], None] | None = None,
                 stride: int = 1) -> dict:
    """Render sweeps ``start, start + stride, ...`` (``frames`` of them) into the pair dataset at
    ``path`` (cmkd_ros.pairs format); a stride spreads few frames over a longer drive."""
    from cmkd_ros.pairs import PairWriter
    writer = PairWriter(str(path), metadata={'source': 'cmkd_ros.sim',
                                             'class_names': list(world.class_map.names),
                                             'sim_config': to_dict(world.config)})
    summary = _Summary(path, 'frames')
    for frame in (world.frame(start + i * stride) for i in range(frames)):
        writer.write(frame.to_pair(image_format, world.config.cameras.jpeg_quality))
        summary.add(frame)
        if on_frame is not None:
            on_frame(frame)
    return summary.finish()
