"""rosbag2 files (MCAP or sqlite3) written and read with the ``rosbags`` library, ROS-free.

:class:`BagWriter` serializes rosbags message objects to CDR (readable by
``rclpy.serialization.deserialize_message``); :func:`read_messages` yields
``(topic, msgtype, timestamp_ns, raw CDR bytes)``; :func:`deserialize` decodes raw bytes into a
rosbags message object that :mod:`cmkd_ros.conversions` turns into arrays.

Synthetic bag layout (:func:`write_sim_frame`, see docs/architecture.md)::

    /lidar/points                          sensor_msgs/PointCloud2  x y z intensity ring time
    /lidar/labels                          sensor_msgs/PointCloud2  label (uint8), ground truth
    /cameras/<name>/image_raw              sensor_msgs/Image        rgb8
    /cameras/<name>/image_raw/compressed   sensor_msgs/CompressedImage  jpeg
    /cameras/<name>/camera_info            sensor_msgs/CameraInfo   K, D, plumb_bob
    /odom                                  nav_msgs/Odometry        T_world_lidar
    /tf_static                             tf2_msgs/TFMessage       base_link -> lidar,
                                           base_link -> <name>_camera_link -> <frame_id>
    calibration.yaml                       RigCalibration YAML in the bag folder
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

STORAGES = ('mcap', 'sqlite3')
DEFAULT_TYPESTORE = 'ros2_humble'
CALIBRATION_FILE = 'calibration.yaml'

POINTS_TOPIC = '/lidar/points'
LABELS_TOPIC = '/lidar/labels'
ODOM_TOPIC = '/odom'
WORLD_FRAME = 'world'

POINTCLOUD2 = 'sensor_msgs/msg/PointCloud2'
IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'
ODOMETRY = 'nav_msgs/msg/Odometry'
TF_MESSAGE = 'tf2_msgs/msg/TFMessage'
TF_STATIC_TOPIC = '/tf_static'
TF_TOPIC = '/tf'

# /lidar/points layout: aligned like a Velodyne/Ouster driver (point_step 24).
POINT_DTYPE = np.dtype([('x', np.float32), ('y', np.float32), ('z', np.float32),
                        ('intensity', np.float32), ('ring', np.uint16), ('time', np.float32)],
                       align=True)
LABEL_DTYPE = np.dtype([('label', np.uint8)])


class BagError(ValueError):
    """A bag cannot be written or read (bad path, storage, topic or message type)."""


def camera_topics(name: str) -> dict[str, str]:
    """Topics of camera ``name`` in a synthetic bag: image, compressed, info."""
    base = f'/cameras/{name}'
    return {'image': f'{base}/image_raw', 'compressed': f'{base}/image_raw/compressed',
            'info': f'{base}/camera_info'}


def _typestore(name: str = DEFAULT_TYPESTORE):
    from rosbags.typesys import Stores, get_typestore
    try:
        return get_typestore(Stores(name))
    except ValueError:
        raise BagError(f'unknown rosbags typestore {name!r}; one of '
                       f'{[s.value for s in Stores]}') from None


class BagWriter:
    """Write a rosbag2 folder at ``path`` (must not exist) in ``storage`` 'mcap' or 'sqlite3'.

    ``write(topic, msg, stamp_ns)`` serializes a rosbags message (its type is taken from the
    message); connections are created on first use. Use as a context manager or call close().
    """

    def __init__(self, path: str | os.PathLike, storage: str = 'mcap',
                 typestore: str = DEFAULT_TYPESTORE):
        from rosbags.rosbag2 import StoragePlugin, Writer
        if storage not in STORAGES:
            raise BagError(f'storage must be one of {list(STORAGES)}, got {storage!r}')
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f'bag output {self.path} already exists; choose a new folder')
        self.storage = storage
        from cmkd_ros.conversions import rosbags_types
        _typestore(typestore)                     # a clear BagError for an unknown name
        self._types = rosbags_types(typestore)
        self.typestore = self._types.typestore
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def msg_types(self):
        """``cmkd_ros.conversions`` message-class namespace of this writer's typestore."""
        return self._types

    def _connection(self, topic: str, msgtype: str):
        conn = self._connections.get(topic)
        if conn is None:
            if msgtype not in self.typestore.types:
                raise BagError(f'message type {msgtype!r} is not in the typestore')
            conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
            self._connections[topic] = conn
        elif conn.msgtype != msgtype:
            raise BagError(f'topic {topic} already carries {conn.msgtype}, not {msgtype}')
        return conn

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        """Serialize rosbags message ``msg`` to CDR and log it at ``stamp_ns``."""
        msgtype = getattr(msg, '__msgtype__', None)
        if msgtype is None:
            raise BagError(f'{type(msg).__name__} is not a rosbags message (no __msgtype__)')
        self.write_raw(topic, msgtype, stamp_ns, self.typestore.serialize_cdr(msg, msgtype))

    def write_raw(self, topic: str, msgtype: str, stamp_ns: int, data: bytes) -> None:
        """Log already serialized CDR bytes."""
        if int(stamp_ns) < 0:
            raise BagError(f'timestamp must be >= 0 ns, got {stamp_ns}')
        self._writer.write(self._connection(topic, msgtype), int(stamp_ns), bytes(data))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> 'BagWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_messages(path: str | os.PathLike, topics: Iterable[str] | None = None
                  ) -> Iterator[tuple[str, str, int, bytes]]:
    """Yield ``(topic, msgtype, timestamp_ns, raw CDR bytes)`` of a bag, in log-time order."""
    from rosbags.rosbag2 import Reader
    path = Path(path)
    if not (path / 'metadata.yaml').exists():
        raise BagError(f'{path} is not a rosbag2 folder (no metadata.yaml)')
    with Reader(path) as reader:
        wanted = None if topics is None else set(topics)
        conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if wanted is not None:
            missing = sorted(wanted - {c.topic for c in conns})
            if missing:
                raise BagError(f'{path}: no topic(s) {missing}; the bag has '
                               f'{sorted({c.topic for c in reader.connections})}')
        for conn, stamp, raw in reader.messages(connections=conns):
            yield conn.topic, conn.msgtype, int(stamp), raw


def bag_topics(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``{topic: (msgtype, message count)}`` of a bag."""
    from rosbags.rosbag2 import Reader
    with Reader(Path(path)) as reader:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}


def deserialize(raw: bytes, msgtype: str, typestore: str = DEFAULT_TYPESTORE) -> Any:
    """Decode CDR bytes into a rosbags message object of ``msgtype``."""
    store = _typestore(typestore)
    if msgtype not in store.types:
        raise BagError(f'message type {msgtype!r} is not in the {typestore} typestore')
    return store.deserialize_cdr(raw, msgtype)


def load_calibration(path: str | os.PathLike):
    """The :class:`RigCalibration` stored as ``calibration.yaml`` in a bag folder."""
    from cmkd_ros.calibration import RigCalibration
    return RigCalibration.load(str(Path(path) / CALIBRATION_FILE))


# ---------------------------------------------------------------------- synthetic bags


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (x, y, z, w) unit quaternion."""
    m = np.asarray(R, np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = s / 4
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def quaternion_to_rotation(q) -> np.ndarray:
    """(x, y, z, w) quaternion -> (3, 3) rotation."""
    x, y, z, w = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def odometry_msg(typestore, stamp_ns: int, T_world_lidar: np.ndarray,
                 velocity_lidar: np.ndarray, yaw_rate: float, child_frame: str = 'lidar'):
    """rosbags ``nav_msgs/Odometry``: pose T_world_lidar, twist in the LiDAR frame."""
    t = typestore.types
    Time, Header = t['builtin_interfaces/msg/Time'], t['std_msgs/msg/Header']
    Point, Quat = t['geometry_msgs/msg/Point'], t['geometry_msgs/msg/Quaternion']
    Vec = t['geometry_msgs/msg/Vector3']
    q = rotation_to_quaternion(T_world_lidar[:3, :3])
    pos = T_world_lidar[:3, 3]
    pose = t['geometry_msgs/msg/PoseWithCovariance'](
        pose=t['geometry_msgs/msg/Pose'](position=Point(x=float(pos[0]), y=float(pos[1]),
                                                        z=float(pos[2])),
                                         orientation=Quat(x=float(q[0]), y=float(q[1]),
                                                          z=float(q[2]), w=float(q[3]))),
        covariance=np.zeros(36))
    twist = t['geometry_msgs/msg/TwistWithCovariance'](
        twist=t['geometry_msgs/msg/Twist'](
            linear=Vec(x=float(velocity_lidar[0]), y=float(velocity_lidar[1]),
                       z=float(velocity_lidar[2])),
            angular=Vec(x=0.0, y=0.0, z=float(yaw_rate))),
        covariance=np.zeros(36))
    header = Header(stamp=Time(sec=int(stamp_ns) // 10 ** 9, nanosec=int(stamp_ns) % 10 ** 9),
                    frame_id=WORLD_FRAME)
    return t[ODOMETRY](header=header, child_frame_id=child_frame, pose=pose, twist=twist)


def tf_message(typestore, stamp_ns: int, edges):
    """rosbags ``tf2_msgs/TFMessage`` of ``(parent, child, T_parent_child)`` edges."""
    t = typestore.types
    Vec, Quat = t['geometry_msgs/msg/Vector3'], t['geometry_msgs/msg/Quaternion']
    stamp = t['builtin_interfaces/msg/Time'](sec=int(stamp_ns) // 10 ** 9,
                                             nanosec=int(stamp_ns) % 10 ** 9)
    transforms = []
    for parent, child, T in edges:
        q, p = rotation_to_quaternion(T[:3, :3]), T[:3, 3]
        transforms.append(t['geometry_msgs/msg/TransformStamped'](
            header=t['std_msgs/msg/Header'](stamp=stamp, frame_id=parent), child_frame_id=child,
            transform=t['geometry_msgs/msg/Transform'](
                translation=Vec(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                rotation=Quat(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))))
    return t[TF_MESSAGE](transforms=transforms)


def points_array(xyz, intensity, ring, point_time_ns, stamp_ns: int) -> np.ndarray:
    """Structured (N,) array of :data:`POINT_DTYPE`; ``time`` is seconds since ``stamp_ns``."""
    n = len(xyz)
    arr = np.zeros(n, POINT_DTYPE)
    arr['x'], arr['y'], arr['z'] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    arr['intensity'] = intensity
    arr['ring'] = ring
    arr['time'] = (np.asarray(point_time_ns, np.int64) - int(stamp_ns)).astype(np.float64) * 1e-9
    return arr


class SimBagWriter:
    """Writes :class:`~cmkd_ros.sim.SimFrame` objects in the synthetic topic layout.

    ``images``: 'raw' (rgb8 Image), 'compressed' (jpeg CompressedImage) or 'both'. Odometry is
    written for every ego pose of each frame, strictly increasing in time. ``static_transforms``
    (``(parent, child, T_parent_child)``, e.g. ``SimWorld.static_transforms()``) go to
    ``/tf_static`` once, before the first frame.
    """

    def __init__(self, path: str | os.PathLike, calibration, storage: str = 'mcap',
                 images: str = 'raw', jpeg_quality: int = 90, static_transforms=()):
        if images not in ('raw', 'compressed', 'both'):
            raise BagError(f'images must be raw, compressed or both, got {images!r}')
        self.bag = BagWriter(path, storage)
        self.images = images
        self.jpeg_quality = int(jpeg_quality)
        self.calibration = calibration
        self.types = self.bag.msg_types()
        self._last_odom_ns = -1
        self._static_transforms = list(static_transforms)
        calibration.save(str(Path(path) / CALIBRATION_FILE))

    @property
    def path(self) -> Path:
        return self.bag.path

    def write_frame(self, frame) -> None:
        from cmkd_ros import conversions as conv
        t = self.types
        lidar_frame = self.calibration.lidar_frame
        stamp = int(frame.lidar_stamp_ns)
        poses, stamps = frame.ego_poses, np.asarray(frame.ego_stamps_ns, np.int64)
        # 0. the rig's static transforms, once, at the bag's first stamp.
        if self._static_transforms:
            first = min(stamp, int(stamps.min(initial=stamp)))
            self.bag.write(TF_STATIC_TOPIC, tf_message(t.typestore, first,
                                                       self._static_transforms), first)
            self._static_transforms = []
        # 1. ego odometry (dense), before the sensor data that it covers.
        for i in np.nonzero(stamps > self._last_odom_ns)[0]:
            j0, j1 = max(i - 1, 0), min(i + 1, len(stamps) - 1)
            dt = (stamps[j1] - stamps[j0]) * 1e-9
            vel_world = (poses[j1, :3, 3] - poses[j0, :3, 3]) / dt
            yaw = np.arctan2(poses[:, 1, 0], poses[:, 0, 0])
            yaw_rate = float(np.angle(np.exp(1j * (yaw[j1] - yaw[j0])))) / dt
            msg = odometry_msg(t.typestore, int(stamps[i]), poses[i],
                               poses[i, :3, :3].T @ vel_world, yaw_rate, lidar_frame)
            self.bag.write(ODOM_TOPIC, msg, int(stamps[i]))
        self._last_odom_ns = int(stamps[-1])
        # 2. the sweep and its ground-truth labels (same order, same stamp).
        arr = points_array(frame.xyz, frame.intensity, frame.ring, frame.point_time_ns, stamp)
        self.bag.write(POINTS_TOPIC, conv.array_to_cloud(arr, stamp, lidar_frame, t), stamp)
        labels = np.zeros(len(frame.labels), LABEL_DTYPE)
        labels['label'] = frame.labels
        self.bag.write(LABELS_TOPIC, conv.array_to_cloud(labels, stamp, lidar_frame, t), stamp)
        # 3. cameras at their own capture stamps.
        for c, name in enumerate(frame.camera_names):
            cam = self.calibration.camera(name)
            cam_stamp = int(frame.camera_stamp_ns[c])
            topics = camera_topics(name)
            if self.images in ('raw', 'both'):
                msg = conv.array_to_image(frame.images[c], 'rgb8', cam_stamp, cam.frame_id, t)
                self.bag.write(topics['image'], msg, cam_stamp)
            if self.images in ('compressed', 'both'):
                msg = conv.array_to_compressed(frame.images[c], 'jpeg', cam_stamp,
                                               cam.frame_id, t, quality=self.jpeg_quality)
                self.bag.write(topics['compressed'], msg, cam_stamp)
            self.bag.write(topics['info'], conv.camera_info_from_calibration(cam, cam_stamp, t),
                           cam_stamp)

    def close(self) -> None:
        self.bag.close()

    def __enter__(self) -> 'SimBagWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
