"""Readers of sensor data sets into :class:`~offline_training.readers.base.Frame` records.

- :mod:`.nuscenes`: nuScenes lidarseg (LIDAR_TOP + the six cameras), from the JSON tables.
- :mod:`.semantickitti`: SemanticKITTI scans with the KITTI odometry color camera (image_2).
- :mod:`.images`: labeled 2D images for the teacher: pair datasets, Cityscapes, folder layouts.

Readers only do file IO and unit/frame conversion; correspondences, resizing and augmentation
happen in :mod:`offline_training.datasets` so every source shares them.
"""
from offline_training.readers.base import Frame, ReaderError

__all__ = ['Frame', 'ReaderError']
