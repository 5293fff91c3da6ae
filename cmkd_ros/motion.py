"""Ego motion: interpolated ``T_world_lidar`` trajectories and point motion compensation.

A spinning LiDAR captures each point at its own time while the ego moves; a camera captures its
image at yet another time. To pair them, each point ``p`` (LiDAR frame at its capture time
``t_i``) is moved to the LiDAR frame at the camera's capture time ``t_c``::

    p_c = inv(T_world_lidar(t_c)) @ T_world_lidar(t_i) @ p

and only then projected with the camera's ``T_cam_lidar``. Poses are interpolated with slerp for
rotation and linearly for translation (:class:`PoseTrajectory`), or come from a constant-velocity
model (:class:`ConstantVelocityTrajectory`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


class MotionError(ValueError):
    """Bad poses or stamps, or a time outside the trajectory."""


# ----------------------------------------------------------------------------- rotations


def quat_to_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w; normalized here) -> (..., 3, 3) rotation matrices."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    out = np.empty(q.shape[:-1] + (3, 3))
    out[..., 0, 0] = 1 - 2 * (y * y + z * z)
    out[..., 0, 1] = 2 * (x * y - z * w)
    out[..., 0, 2] = 2 * (x * z + y * w)
    out[..., 1, 0] = 2 * (x * y + z * w)
    out[..., 1, 1] = 1 - 2 * (x * x + z * z)
    out[..., 1, 2] = 2 * (y * z - x * w)
    out[..., 2, 0] = 2 * (x * z - y * w)
    out[..., 2, 1] = 2 * (y * z + x * w)
    out[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return out


def rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis * angle -> (..., 3, 3) rotation matrices (Rodrigues).

    ``R = cos(a) I + sin(a) [n]x + (1 - cos(a)) n n^T`` for the unit axis ``n``.
    """
    v = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1)
    n = v / np.where(angle > 1e-12, angle, 1.0)[..., None]
    c, s = np.cos(angle)[..., None, None], np.sin(angle)
    R = (1 - c) * (n[..., :, None] * n[..., None, :])
    R += c * np.eye(3)
    x, y, z = n[..., 0] * s, n[..., 1] * s, n[..., 2] * s
    R[..., 0, 1] -= z
    R[..., 0, 2] += y
    R[..., 1, 0] += z
    R[..., 1, 2] -= x
    R[..., 2, 0] -= y
    R[..., 2, 1] += x
    return R


def matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 3) axis * angle, angle in [0, pi]."""
    R = np.asarray(R, dtype=np.float64)
    cos = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    w = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                  R[..., 1, 0] - R[..., 0, 1]], axis=-1)
    sin = np.sin(angle)
    out = np.where((sin > 1e-6)[..., None], w * (angle / np.where(sin > 1e-6, 2 * sin, 1.0))
                   [..., None], 0.5 * w)
    near_pi = angle > math.pi - 1e-3
    if np.any(near_pi):
        # axis from the diagonal of R = 2 a a^T - I when the angle is close to pi
        for index in zip(*np.nonzero(near_pi)) if near_pi.ndim else [()]:
            Ri = R[index]
            a = np.sqrt(np.clip((np.diag(Ri) + 1) / 2, 0, None))
            j = int(np.argmax(a))
            a[[i for i in range(3) if i != j]] = [
                (Ri[j, i] + Ri[i, j]) / (4 * a[j]) for i in range(3) if i != j]
            if np.dot(a, w[index]) < 0:
                a = -a
            out[index] = a / np.linalg.norm(a) * angle[index]
    return out


def _check_poses(T: np.ndarray, what: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise MotionError(f'{what} must be (P, 4, 4), got {T.shape}')
    if not np.all(np.isfinite(T)):
        raise MotionError(f'{what} contains non-finite values')
    R = T[:, :3, :3]
    err = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((err > 1e-4) | (np.linalg.det(R) < 0))
    if bad.size:
        raise MotionError(f'{what}[{bad[0]}] rotation is not orthonormal '
                          f'(max |R R^T - I| = {err[bad[0]]:.2e})')
    if not np.allclose(T[:, 3], [0, 0, 0, 1]):
        raise MotionError(f'{what}: last rows must be 0 0 0 1')
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of (..., 4, 4) rigid transforms."""
    T = np.asarray(T, dtype=np.float64)
    out = np.zeros_like(T)
    Rt = np.swapaxes(T[..., :3, :3], -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum('...ij,...j->...i', Rt, T[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


# ----------------------------------------------------------------------------- trajectories


class PoseTrajectory:
    """Ego poses ``T_world_lidar`` (P, 4, 4) at increasing ``stamps_ns`` (P,), interpolated.

    Rotation is interpolated along the geodesic (slerp), translation linearly. Times up to
    ``max_extrapolation_ns`` outside the stamps are extrapolated with the end segment's motion;
    further ones raise :class:`MotionError`.
    """

    def __init__(self, stamps_ns: np.ndarray, T_world_lidar: np.ndarray, *,
                 max_extrapolation_ns: int = 100_000_000) -> None:
        stamps = np.asarray(stamps_ns)
        if stamps.ndim != 1 or stamps.size == 0:
            raise MotionError(f'stamps_ns must be a non-empty (P,) array, got {stamps.shape}')
        if not np.issubdtype(stamps.dtype, np.integer):
            raise MotionError(f'stamps_ns must be integer nanoseconds, got {stamps.dtype}')
        T = _check_poses(T_world_lidar, 'T_world_lidar')
        if T.shape[0] != stamps.size:
            raise MotionError(f'{stamps.size} stamps but {T.shape[0]} poses')
        if np.any(np.diff(stamps) <= 0):
            i = int(np.flatnonzero(np.diff(stamps) <= 0)[0])
            raise MotionError(f'stamps_ns must increase strictly; stamps[{i + 1}]='
                              f'{stamps[i + 1]} follows {stamps[i]}')
        self.stamps_ns = stamps.astype(np.int64)
        self.T_world_lidar = T
        self.max_extrapolation_ns = int(max_extrapolation_ns)
        # relative rotation vector of each segment, for slerp
        if T.shape[0] > 1:
            R_rel = T[:-1, :3, :3].transpose(0, 2, 1) @ T[1:, :3, :3]
            self._seg_rotvec = matrix_to_rotvec(R_rel)
        else:
            self._seg_rotvec = np.zeros((0, 3))

    def __len__(self) -> int:
        return int(self.stamps_ns.size)

    def merged(self, other: 'PoseTrajectory') -> 'PoseTrajectory':
        """One trajectory over the poses of both (this one's pose where a stamp repeats)."""
        stamps, at = np.unique(np.r_[self.stamps_ns, other.stamps_ns], return_index=True)
        poses = np.concatenate([self.T_world_lidar, other.T_world_lidar])[at]
        return PoseTrajectory(stamps, poses, max_extrapolation_ns=self.max_extrapolation_ns)

    @property
    def span_ns(self) -> tuple[int, int]:
        return int(self.stamps_ns[0]), int(self.stamps_ns[-1])

    # -- constructors
    @classmethod
    def from_translations_quaternions(cls, stamps_ns: np.ndarray, translations: np.ndarray,
                                      quaternions: np.ndarray, *, order: str = 'xyzw',
                                      T_body_lidar: np.ndarray | None = None,
                                      **kwargs: Any) -> 'PoseTrajectory':
        """From a dataset pose list: translations (P, 3), quaternions (P, 4) of ``T_world_body``.

        ``order`` is ``'xyzw'`` (ROS) or ``'wxyz'`` (nuScenes ``ego_pose``); ``T_body_lidar``
        (4, 4) is the LiDAR mounting (``T_ego_lidar``); identity when the body is the LiDAR.
        Unsorted input is sorted by stamp.
        """
        q = np.asarray(quaternions, dtype=np.float64)
        if order not in ('xyzw', 'wxyz'):
            raise MotionError(f'order must be "xyzw" or "wxyz", got {order!r}')
        if q.ndim != 2 or q.shape[1] != 4:
            raise MotionError(f'quaternions must be (P, 4), got {q.shape}')
        if order == 'wxyz':
            q = q[:, [1, 2, 3, 0]]
        norms = np.linalg.norm(q, axis=1)
        if np.any(np.abs(norms - 1) > 1e-3):
            raise MotionError('quaternions must be unit length (|q| = '
                              f'{norms[np.argmax(np.abs(norms - 1))]:.4f})')
        trans = np.asarray(translations, dtype=np.float64)
        if trans.shape != (q.shape[0], 3):
            raise MotionError(f'translations must be ({q.shape[0]}, 3), got {trans.shape}')
        T = np.tile(np.eye(4), (q.shape[0], 1, 1))
        T[:, :3, :3] = quat_to_matrix(q)
        T[:, :3, 3] = trans
        if T_body_lidar is not None:
            T = T @ np.asarray(T_body_lidar, dtype=np.float64)
        stamps = np.asarray(stamps_ns, dtype=np.int64)
        order_idx = np.argsort(stamps, kind='stable')
        return cls(stamps[order_idx], T[order_idx], **kwargs)

    @classmethod
    def from_odometry(cls, messages: Iterable[Any], *, T_body_lidar: np.ndarray | None = None,
                      **kwargs: Any) -> 'PoseTrajectory':
        """From nav_msgs/Odometry-like messages (rclpy or rosbags): ``header.stamp`` and
        ``pose.pose`` give ``T_world_body``; ``T_body_lidar`` maps the child frame to the LiDAR.

        Messages may arrive unsorted; repeated stamps keep the last message.
        """
        by_stamp: dict[int, tuple] = {}
        for msg in messages:
            stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
            p, o = msg.pose.pose.position, msg.pose.pose.orientation
            by_stamp[stamp] = ((p.x, p.y, p.z), (o.x, o.y, o.z, o.w))
        if not by_stamp:
            raise MotionError('no odometry messages')
        stamps = np.array(sorted(by_stamp), dtype=np.int64)
        trans = np.array([by_stamp[s][0] for s in stamps])
        quats = np.array([by_stamp[s][1] for s in stamps])
        return cls.from_translations_quaternions(stamps, trans, quats,
                                                 T_body_lidar=T_body_lidar, **kwargs)

    # -- queries
    def pose_at(self, stamps_ns: np.ndarray | int) -> np.ndarray:
        """(K, 4, 4) float64 ``T_world_lidar`` at the given (K,) integer nanosecond times."""
        t = np.atleast_1d(np.asarray(stamps_ns, dtype=np.int64))
        first, last = self.span_ns
        lo, hi = t.min(), t.max()
        if lo < first - self.max_extrapolation_ns or hi > last + self.max_extrapolation_ns:
            raise MotionError(f'time {lo if lo < first else hi} ns is outside the trajectory '
                              f'[{first}, {last}] by more than {self.max_extrapolation_ns} ns')
        P = len(self)
        if P == 1:
            return np.repeat(self.T_world_lidar, t.size, axis=0)
        # 1. segment index and fraction (outside the span: the end segment, fraction < 0 or > 1)
        seg = np.clip(np.searchsorted(self.stamps_ns, t, side='right') - 1, 0, P - 2)
        t0 = self.stamps_ns[seg]
        frac = (t - t0).astype(np.float64) / (self.stamps_ns[seg + 1] - t0).astype(np.float64)
        # 2. slerp: R = R0 Exp(frac * Log(R0^T R1)); 3. linear translation.
        T0 = self.T_world_lidar[seg]
        T1 = self.T_world_lidar[seg + 1]
        out = np.zeros((t.size, 4, 4))
        out[:, :3, :3] = T0[:, :3, :3] @ rotvec_to_matrix(self._seg_rotvec[seg] *
                                                          frac[:, None])
        out[:, :3, 3] = T0[:, :3, 3] + frac[:, None] * (T1[:, :3, 3] - T0[:, :3, 3])
        out[:, 3, 3] = 1.0
        return out


class ConstantVelocityTrajectory:
    """``T_world_lidar(t) = T0 Exp((t - t0) [v, w])``: constant body-frame twist.

    ``linear_velocity`` (3,) m/s and ``angular_velocity`` (3,) rad/s in the LiDAR frame.
    """

    def __init__(self, stamp_ns: int, T_world_lidar: np.ndarray, linear_velocity: np.ndarray,
                 angular_velocity: np.ndarray = (0.0, 0.0, 0.0)) -> None:
        self.stamp_ns = int(stamp_ns)
        T0 = np.asarray(T_world_lidar, dtype=np.float64)[None]
        self.T0 = _check_poses(T0, 'T_world_lidar')[0]
        self.v = np.asarray(linear_velocity, dtype=np.float64).reshape(3)
        self.w = np.asarray(angular_velocity, dtype=np.float64).reshape(3)
        if not (np.all(np.isfinite(self.v)) and np.all(np.isfinite(self.w))):
            raise MotionError('velocities must be finite')

    def pose_at(self, stamps_ns: np.ndarray | int) -> np.ndarray:
        """(K, 4, 4) float64 ``T_world_lidar`` at the given times (SE(3) exponential)."""
        dt = (np.atleast_1d(np.asarray(stamps_ns, dtype=np.int64)) - self.stamp_ns) * 1e-9
        phi = dt[:, None] * self.w                         # (K, 3) rotation vectors
        rho = dt[:, None] * self.v
        R = rotvec_to_matrix(phi)
        # V = I + (1 - cos a)/a^2 [phi] + (a - sin a)/a^3 [phi]^2 maps rho to the translation
        a = np.linalg.norm(phi, axis=1)
        Kx = np.zeros((dt.size, 3, 3))
        Kx[:, 0, 1], Kx[:, 0, 2] = -phi[:, 2], phi[:, 1]
        Kx[:, 1, 0], Kx[:, 1, 2] = phi[:, 2], -phi[:, 0]
        Kx[:, 2, 0], Kx[:, 2, 1] = -phi[:, 1], phi[:, 0]
        big = a > 1e-6
        safe = np.where(big, a, 1.0)
        c1 = np.where(big, (1 - np.cos(a)) / safe ** 2, 0.5 - a * a / 24)
        c2 = np.where(big, (a - np.sin(a)) / safe ** 3, 1 / 6 - a * a / 120)
        V = np.eye(3) + c1[:, None, None] * Kx + c2[:, None, None] * (Kx @ Kx)
        delta = np.tile(np.eye(4), (dt.size, 1, 1))
        delta[:, :3, :3] = R
        delta[:, :3, 3] = np.einsum('kij,kj->ki', V, rho)
        return self.T0 @ delta


def constant_velocity(stamp_ns: int, T_world_lidar: np.ndarray, linear_velocity: np.ndarray,
                      angular_velocity: np.ndarray = (0.0, 0.0, 0.0)
                      ) -> ConstantVelocityTrajectory:
    """A :class:`ConstantVelocityTrajectory` (twist in the LiDAR frame, m/s and rad/s)."""
    return ConstantVelocityTrajectory(stamp_ns, T_world_lidar, linear_velocity, angular_velocity)


# ----------------------------------------------------------------------------- compensation


def compensation_transforms(xyz: np.ndarray, point_time_ns: np.ndarray | int,
                            target_time_ns: np.ndarray, trajectory: Any, *,
                            time_resolution_ns: int = 100_000
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Points in a common reference LiDAR frame and the per-target transforms out of it.

    ``xyz`` (N, 3) float32, each point in the LiDAR frame at ``point_time_ns`` ((N,) int64 or
    one int); ``target_time_ns`` (C,) int64. Returns ``xyz_ref`` (N, 3) float32 in the LiDAR frame
    at the reference time (the mean target time) and ``T_target_ref`` (C, 4, 4) float64, so that
    ``T_target_ref[c] @ xyz_ref`` is the point in the LiDAR frame at ``target_time_ns[c]``.
    Point times are rounded to ``time_resolution_ns`` before interpolating poses.
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    targets = np.asarray(target_time_ns, dtype=np.int64).reshape(-1)
    ref_ns = int(np.round(targets.astype(np.float64).mean()))
    T_world_ref = trajectory.pose_at(ref_ns)[0]
    T_ref_world = invert(T_world_ref)
    T_target_ref = invert(trajectory.pose_at(targets)) @ T_world_ref
    times = np.asarray(point_time_ns)
    if not np.issubdtype(times.dtype, np.integer):
        raise MotionError(f'point_time_ns must be integer nanoseconds, got {times.dtype}')
    if times.ndim == 0:
        T = T_ref_world @ trajectory.pose_at(int(times))[0]
        return (xyz @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32),
                T_target_ref)
    times = times.astype(np.int64).reshape(-1)
    if times.shape[0] != xyz.shape[0]:
        raise MotionError(f'point_time_ns has {times.shape[0]} entries for {xyz.shape[0]} '
                          'points')
    if times.size == 0:
        return xyz.reshape(0, 3), T_target_ref
    # 1. quantize point times; 2. one pose per used time bin; 3. move every point into ref.
    q = int(time_resolution_ns)
    t_min = int(times.min())
    bins = (times - t_min + q // 2) // q
    n_bins = int(bins.max()) + 1
    if n_bins <= times.size:
        bin_times = t_min + np.arange(n_bins, dtype=np.int64) * q
    else:                                     # sparse times: poses only at the used bins
        used, bins = np.unique(bins, return_inverse=True)
        bin_times = t_min + used * q
    T_ref_bin = T_ref_world @ trajectory.pose_at(bin_times)
    R = T_ref_bin[:, :3, :3].astype(np.float32)
    t = T_ref_bin[:, :3, 3].astype(np.float32)
    xyz_ref = np.einsum('nij,nj->ni', R[bins], xyz) + t[bins]
    return xyz_ref.astype(np.float32, copy=False), T_target_ref
