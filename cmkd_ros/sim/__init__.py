"""Deterministic synthetic sensor world: street scene, spinning LiDAR, pinhole cameras.

``SimWorld(config).frame(i)`` returns a :class:`SimFrame` (LiDAR sweep, camera images, label and
depth images, per-(camera, point) ground-truth pixels and visibility, ego poses, calibration).
ROS-free; exports to rosbag2 live in :mod:`cmkd_ros.bag` and :mod:`cmkd_ros.sim.export`.
"""
from cmkd_ros.sim.config import CamerasConfig, EgoConfig, LidarConfig, SceneConfig, SimConfig
from cmkd_ros.sim.simulator import SimFrame, SimWorld

__all__ = ['SimConfig', 'LidarConfig', 'CamerasConfig', 'SceneConfig', 'EgoConfig', 'SimWorld',
           'SimFrame']
