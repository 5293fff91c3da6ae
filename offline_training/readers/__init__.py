"""Readers of sensor data sets into :class:`~offline_training.readers.base.Frame` records.

- :mod:`.nuscenes`: nuScenes lidarseg (LIDAR_TOP + the six cameras), from the JSON tables;
  :mod:`.nuscenes_splits`: the official scene splits.
- :mod:`.semantickitti`: SemanticKITTI scans with the KITTI odometry color cameras (image_2,
  image_3) and the official sequence splits.
- :mod:`.images`: labeled 2D images for the teacher: pair datasets, Cityscapes, nuImages,
  folder layouts; :mod:`.label_maps`: their classes mapped onto the LiDAR class sets.

Readers only do file IO and unit/frame conversion; correspondences, resizing and augmentation
happen in :mod:`offline_training.datasets` so every source shares them.
"""
from offline_training.readers.base import Frame, ReaderError

__all__ = ['Frame', 'ReaderError']
