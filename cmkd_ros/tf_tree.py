"""A ROS-free tree of static transforms (REP 105 ``/tf_static``), read from rosbag2 files.

Each edge ``parent -> child`` holds ``T_parent_child`` (maps points from the child frame to the
parent frame, the pose of the child in the parent, as ``geometry_msgs/TransformStamped`` stores
it). :meth:`TransformTree.lookup` gives ``T_target_source`` through any chain of edges, walked in
either direction; a broken chain raises :class:`TfError` naming the frames each side reaches and
the frame that lacks a parent.

:func:`tree_from_bag` reads ``/tf_static`` (every edge, the last value of each) and ``/tf``
edges that look static: at least :data:`MIN_STATIC_SAMPLES` messages, all within
:data:`STATIC_TRANSLATION_TOL_M` (1 mm) and :data:`STATIC_ROTATION_TOL_RAD` (1 mrad, 0.057 deg)
of the edge's first message. Moving ``/tf`` edges are not used; a lookup that fails says which
of them would have closed the chain.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from cmkd_ros.bag import TF_MESSAGE, TF_STATIC_TOPIC, TF_TOPIC
from cmkd_ros.motion import invert, matrix_to_rotvec, quat_to_matrix

STATIC_TRANSLATION_TOL_M = 1e-3
STATIC_ROTATION_TOL_RAD = 1e-3
MIN_STATIC_SAMPLES = 2
BASE_FRAME = 'base_link'
# REP 103: a camera's optical frame (z forward, x right, y down) in its body frame (x forward,
# z up): the columns are the optical axes in body coordinates.
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


class TfError(ValueError):
    """A frame is unknown, a chain of transforms is broken, or the tree is inconsistent."""


def transform_matrix(translation: Iterable[float], quaternion_xyzw: Iterable[float]
                     ) -> np.ndarray:
    """(4, 4) float64 rigid transform from a translation and an (x, y, z, w) quaternion."""
    T = np.eye(4)
    T[:3, :3] = quat_to_matrix(np.asarray(list(quaternion_xyzw), np.float64))
    T[:3, 3] = np.asarray(list(translation), np.float64)
    return T


def message_matrix(transform: Any) -> np.ndarray:
    """(4, 4) of a ``geometry_msgs/Transform`` (rclpy or rosbags message)."""
    t, q = transform.translation, transform.rotation
    return transform_matrix((t.x, t.y, t.z), (q.x, q.y, q.z, q.w))


def transform_difference(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """(rotation angle in rad, translation distance in m) between two rigid transforms."""
    angle = float(np.linalg.norm(matrix_to_rotvec(T_a[:3, :3] @ T_b[:3, :3].T)))
    return angle, float(np.linalg.norm(T_a[:3, 3] - T_b[:3, 3]))


@dataclass(frozen=True)
class MovingEdge:
    """A ``/tf`` edge left out because it changes during the bag (largest change from its first
    value)."""

    parent: str
    child: str
    samples: int
    max_angle_rad: float
    max_offset_m: float

    def describe(self) -> str:
        if self.samples < MIN_STATIC_SAMPLES:
            return (f'/tf has {self.parent!r} -> {self.child!r} only {self.samples} time(s): '
                    'too few to tell that it is static')
        return (f'/tf has {self.parent!r} -> {self.child!r} but it moves (up to '
                f'{np.degrees(self.max_angle_rad):.3g} deg and {self.max_offset_m * 100:.3g} cm '
                'from its first value)')


class TransformTree:
    """Static transforms ``parent -> child``; one parent per frame, no cycles (as in tf2)."""

    def __init__(self) -> None:
        self._parent: dict[str, tuple[str, np.ndarray]] = {}
        self.moving: dict[str, MovingEdge] = {}          # by child frame

    # ---------------------------------------------------------------- building
    def add(self, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """Add or replace the edge ``parent -> child`` (a leading ``/`` is dropped, as tf2
        does)."""
        parent, child = parent.lstrip('/'), child.lstrip('/')
        if not parent or not child or parent == child:
            raise TfError(f'a transform needs two different, non-empty frame ids, got '
                          f'{parent!r} -> {child!r}')
        T = np.asarray(T_parent_child, np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise TfError(f'{parent!r} -> {child!r}: the transform must be a finite 4x4 matrix')
        old = self._parent.get(child)
        if old is not None and old[0] != parent:
            raise TfError(f'frame {child!r} has two parents, {old[0]!r} and {parent!r} '
                          '(a TF frame has one)')
        if child in self._ancestors(parent):
            raise TfError(f'{parent!r} -> {child!r} would close a cycle: {child!r} is above '
                          f'{parent!r} already')
        self._parent[child] = (parent, T)

    # ---------------------------------------------------------------- queries
    @property
    def frames(self) -> list[str]:
        """Every frame of the tree, sorted."""
        return sorted(set(self._parent) | {p for p, _ in self._parent.values()})

    @property
    def edges(self) -> list[tuple[str, str, np.ndarray]]:
        """``(parent, child, T_parent_child)`` of every edge, by child name."""
        return [(p, c, T) for c, (p, T) in sorted(self._parent.items())]

    def __contains__(self, frame: str) -> bool:
        return frame in self._parent or any(p == frame for p, _ in self._parent.values())

    def parent(self, frame: str) -> str | None:
        """The parent of ``frame``, or None for a root."""
        edge = self._parent.get(frame.lstrip('/'))
        return None if edge is None else edge[0]

    def children(self, frame: str) -> list[str]:
        """The frames whose parent is ``frame``, sorted."""
        return sorted(c for c, (p, _) in self._parent.items() if p == frame.lstrip('/'))

    def _ancestors(self, frame: str) -> list[str]:
        """``frame``, its parent, ..., its root."""
        out = [frame]
        while out[-1] in self._parent:
            out.append(self._parent[out[-1]][0])
        return out

    def _to_ancestor(self, chain: list[str]) -> np.ndarray:
        """``T_top_bottom`` along ``chain`` = [bottom, ..., top]."""
        T = np.eye(4)
        for frame in chain[:-1]:
            T = self._parent[frame][1] @ T
        return T

    def chain(self, target: str, source: str) -> list[str]:
        """Frames from ``source`` to ``target`` through their lowest common ancestor."""
        up_source, up_target = self._common_path(target, source)
        return up_source + up_target[::-1][1:]

    def lookup(self, target: str, source: str) -> np.ndarray:
        """(4, 4) ``T_target_source``: maps points from frame ``source`` to frame ``target``."""
        up_source, up_target = self._common_path(target, source)
        # 1. source -> common ancestor; 2. common ancestor -> target.
        return invert(self._to_ancestor(up_target)) @ self._to_ancestor(up_source)

    def _common_path(self, target: str, source: str) -> tuple[list[str], list[str]]:
        target, source = target.lstrip('/'), source.lstrip('/')
        for frame in (source, target):
            if frame not in self:
                raise TfError(f'frame {frame!r} is not in the TF tree (frames: '
                              f'{_names(self.frames)}){self._moving_note({frame})}')
        up_source, up_target = self._ancestors(source), self._ancestors(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise TfError(self._broken(target, source, up_target[-1], up_source[-1]))
        return (up_source[:up_source.index(common) + 1],
                up_target[:up_target.index(common) + 1])

    def _component(self, root: str) -> list[str]:
        return sorted(f for f in self.frames if self._ancestors(f)[-1] == root)

    def _broken(self, target: str, source: str, root_t: str, root_s: str) -> str:
        side_s, side_t = self._component(root_s), self._component(root_t)
        return (f'no TF chain from {source!r} to {target!r}: {source!r} connects to '
                f'{_names(side_s)} (top {root_s!r}), {target!r} to {_names(side_t)} (top '
                f'{root_t!r}, which has no parent); missing: a transform joining the two, e.g. '
                f'a parent for {root_t!r}{self._moving_note(set(side_s) | set(side_t))}')

    def _moving_note(self, frames: set[str]) -> str:
        notes = [m.describe() for m in self.moving.values()
                 if m.parent in frames or m.child in frames]
        return ('; ' + '; '.join(notes) + ', so it is not used') if notes else ''


def _names(frames: list[str], most: int = 12) -> str:
    shown = ', '.join(frames[:most])
    return f'[{shown}{", ..." if len(frames) > most else ""}]'


def rig_edges(rig: Any, T_base_lidar: np.ndarray, base_frame: str = BASE_FRAME
              ) -> list[tuple[str, str, np.ndarray]]:
    """URDF-like static edges ``(parent, child, T_parent_child)`` of a
    :class:`~cmkd_ros.calibration.RigCalibration`, as robot_state_publisher would publish them:
    ``base_frame -> rig.lidar_frame``, ``base_frame -> <camera>_camera_link`` (body frame: x
    forward, z up) and ``<camera>_camera_link -> <camera frame_id>`` (the optical frame)."""
    T_link_optical = np.eye(4)
    T_link_optical[:3, :3] = R_BODY_OPTICAL
    edges = [(base_frame, rig.lidar_frame, np.asarray(T_base_lidar, np.float64))]
    for cam in rig.cameras:
        link = f'{cam.name}_camera_link'
        if cam.frame_id in (link, rig.lidar_frame, base_frame):
            raise TfError(f'camera {cam.name!r}: frame_id {cam.frame_id!r} must be its own '
                          'optical frame')
        # 1. link -> optical (fixed REP 103 rotation); 2. optical -> LiDAR; 3. LiDAR -> base.
        T_base_link = edges[0][2] @ invert(cam.T_cam_lidar) @ invert(T_link_optical)
        edges += [(base_frame, link, T_base_link), (link, cam.frame_id, T_link_optical)]
    return edges


def tree_from_messages(static: Iterable[Any], dynamic: Iterable[Any] = ()) -> TransformTree:
    """Tree of ``tf2_msgs/TFMessage`` messages: every ``/tf_static`` transform (the last value
    of each edge) and the ``/tf`` edges that look static (see the module docstring)."""
    tree = TransformTree()
    for msg in static:
        for tf in msg.transforms:
            tree.add(tf.header.frame_id, tf.child_frame_id, message_matrix(tf.transform))
    samples: dict[tuple[str, str], list[np.ndarray]] = {}
    for msg in dynamic:
        for tf in msg.transforms:
            samples.setdefault((tf.header.frame_id, tf.child_frame_id), []).append(
                message_matrix(tf.transform))
    for (parent, child), Ts in samples.items():
        if tree.parent(child) == parent:                 # /tf_static has it already
            continue
        diffs = np.array([transform_difference(T, Ts[0]) for T in Ts])
        angle, offset = diffs.max(axis=0)
        if len(Ts) >= MIN_STATIC_SAMPLES and angle <= STATIC_ROTATION_TOL_RAD and \
                offset <= STATIC_TRANSLATION_TOL_M:
            tree.add(parent, child, Ts[-1])
        else:
            tree.moving[child] = MovingEdge(parent, child, len(Ts), float(angle), float(offset))
    return tree


def tree_from_bag(path: str | os.PathLike) -> TransformTree:
    """:func:`tree_from_messages` of a rosbag2's ``/tf_static`` and ``/tf`` topics."""
    from cmkd_ros.bag import bag_topics, deserialize, read_messages
    topics = {t: kind for t, (kind, _) in bag_topics(path).items()
              if t in (TF_STATIC_TOPIC, TF_TOPIC)}
    if not topics:
        raise TfError(f'{path}: no {TF_STATIC_TOPIC} or {TF_TOPIC} topic (the bag holds no '
                      'extrinsics; record them with the robot_state_publisher running)')
    for topic, kind in topics.items():
        if kind != TF_MESSAGE:
            raise TfError(f'{path}: {topic} carries {kind}, not {TF_MESSAGE}')
    messages: dict[str, list] = {t: [] for t in (TF_STATIC_TOPIC, TF_TOPIC)}
    for topic, msgtype, _, raw in read_messages(path, list(topics)):
        messages[topic].append(deserialize(raw, msgtype))
    try:
        return tree_from_messages(messages[TF_STATIC_TOPIC], messages[TF_TOPIC])
    except TfError as exc:
        raise TfError(f'{path}: {exc}') from None
