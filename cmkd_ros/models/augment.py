"""Point cloud augmentations as small composable callables.

Each transform is ``transform(xyz, rng) -> xyz``: xyz ``(N, 3) float32`` in the LiDAR frame
(numpy), ``rng`` a ``numpy.random.Generator`` so that runs are reproducible. Per-point arrays other
than xyz (features, labels, pixel correspondences) keep their order: no transform drops points.
"""
from __future__ import annotations

import math

import numpy as np


def _check_xyz(xyz) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f'xyz must be (N, 3), got {xyz.shape}')
    return xyz


class RandomRotationZ:
    """Rotation about the z axis (up) by an angle uniform in ``[-max_angle, max_angle]`` rad."""

    def __init__(self, max_angle: float = math.pi):
        if max_angle < 0:
            raise ValueError(f'max_angle must be >= 0, got {max_angle}')
        self.max_angle = max_angle

    def __call__(self, xyz, rng: np.random.Generator) -> np.ndarray:
        xyz = _check_xyz(xyz)
        angle = rng.uniform(-self.max_angle, self.max_angle)
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=xyz.dtype)
        return xyz @ rot.T


class RandomScale:
    """Scaling by one factor in ``[low, high]`` of the coordinates ``axes`` (default all three).

    ``axes=(0, 1)`` scales only horizontally: heights stay, points move closer together
    (``< 1``) as they are near the sensor.
    """

    def __init__(self, low: float = 0.95, high: float = 1.05, axes: tuple = (0, 1, 2)):
        if not 0 < low <= high:
            raise ValueError(f'need 0 < low <= high, got {low}, {high}')
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f'axes must be a non-empty subset of (0, 1, 2), got {axes}')
        self.low, self.high, self.axes = low, high, tuple(axes)

    def __call__(self, xyz, rng: np.random.Generator) -> np.ndarray:
        xyz = _check_xyz(xyz)
        factor = np.ones(3, dtype=xyz.dtype)
        factor[list(self.axes)] = rng.uniform(self.low, self.high)
        return xyz * factor


class RandomFlip:
    """Mirror x (``y -> y``, ``x -> -x``) and/or y, each with probability ``p``."""

    def __init__(self, p: float = 0.5, axes: tuple = (0, 1)):
        if not 0 <= p <= 1:
            raise ValueError(f'p must be in [0, 1], got {p}')
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f'axes must be among 0, 1, 2, got {axes}')
        self.p, self.axes = p, tuple(axes)

    def __call__(self, xyz, rng: np.random.Generator) -> np.ndarray:
        xyz = _check_xyz(xyz).copy()
        for axis in self.axes:
            if rng.random() < self.p:
                xyz[:, axis] = -xyz[:, axis]
        return xyz


class RandomJitter:
    """Gaussian noise of std ``sigma`` (m) per coordinate, clipped to ``[-clip, clip]``."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05):
        if sigma < 0 or clip < 0:
            raise ValueError(f'sigma and clip must be >= 0, got {sigma}, {clip}')
        self.sigma, self.clip = sigma, clip

    def __call__(self, xyz, rng: np.random.Generator) -> np.ndarray:
        xyz = _check_xyz(xyz)
        noise = np.clip(rng.normal(0.0, self.sigma, xyz.shape), -self.clip, self.clip)
        return xyz + noise.astype(xyz.dtype)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, xyz, rng: np.random.Generator) -> np.ndarray:
        for transform in self.transforms:
            xyz = transform(xyz, rng)
        return xyz
