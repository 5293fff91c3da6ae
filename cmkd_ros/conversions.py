"""numpy <-> sensor_msgs conversions for rclpy *and* rosbags message classes.

Readers are duck-typed: they only read the message attributes (``fields``, ``point_step``,
``data``, ...), so the same function decodes an rclpy message received by a node and a rosbags
message read from a bag. Writers take a ``msg_types`` namespace (:func:`rclpy_types` or
:func:`rosbags_types`) naming the message classes to build.

``backend`` arguments choose the implementation: ``'own'`` (this module, always available),
``'ros'`` (``sensor_msgs_py`` / ``cv_bridge``, full ROS 2 installs only) or ``'auto'`` (the ROS
implementation when importable and able to read the message correctly, else the own one).
:func:`available_backends` lists what this interpreter has.

Conventions: color images are returned as RGB ``uint8 (H, W, 3)``; mono images as ``(H, W)``
(``uint8``, ``uint16`` or ``float32``); stamps are integer nanoseconds.
"""
from __future__ import annotations

import array
import importlib
import sys
import types
from typing import Any

import numpy as np

# PointField datatype constants (sensor_msgs/PointField) -> numpy scalar type.
POINTFIELD_DTYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32,
                     6: np.uint32, 7: np.float32, 8: np.float64}
_DTYPE_TO_POINTFIELD = {np.dtype(v).str[1:]: k for k, v in POINTFIELD_DTYPES.items()}

# Image encoding -> (numpy dtype, channels).
IMAGE_ENCODINGS = {'rgb8': (np.uint8, 3), 'bgr8': (np.uint8, 3), 'rgba8': (np.uint8, 4),
                   'bgra8': (np.uint8, 4), 'mono8': (np.uint8, 1), '8UC1': (np.uint8, 1),
                   'mono16': (np.uint16, 1), '16UC1': (np.uint16, 1), '32FC1': (np.float32, 1)}
COMPRESSED_FORMATS = ('jpeg', 'png')
BACKENDS = ('auto', 'own', 'ros')


class ConversionError(ValueError):
    """A message cannot be converted: malformed layout or unsupported content."""


class UnsupportedEncodingError(ConversionError):
    """An image encoding or compressed format this module does not handle."""


class MissingFieldsError(ConversionError):
    """A point cloud lacks a field it needs (x, y or z)."""


# ----------------------------------------------------------------------------- message types


def rosbags_types(store: str = 'ros2_humble') -> types.SimpleNamespace:
    """Message classes of a rosbags typestore (``store`` is a ``rosbags.typesys.Stores`` value)."""
    from rosbags.typesys import Stores, get_typestore
    try:
        typestore = get_typestore(Stores(store))
    except ValueError:
        raise ConversionError(f'unknown rosbags typestore {store!r}; one of '
                              f'{[s.value for s in Stores]}') from None
    t = typestore.types
    return types.SimpleNamespace(
        kind='rosbags', typestore=typestore,
        PointCloud2=t['sensor_msgs/msg/PointCloud2'], PointField=t['sensor_msgs/msg/PointField'],
        Image=t['sensor_msgs/msg/Image'], CompressedImage=t['sensor_msgs/msg/CompressedImage'],
        CameraInfo=t['sensor_msgs/msg/CameraInfo'],
        RegionOfInterest=t['sensor_msgs/msg/RegionOfInterest'],
        Header=t['std_msgs/msg/Header'], Time=t['builtin_interfaces/msg/Time'])


def rclpy_types() -> types.SimpleNamespace:
    """Message classes of the ROS 2 Python packages (sensor_msgs, std_msgs, builtin_interfaces)."""
    try:
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import (CameraInfo, CompressedImage, Image, PointCloud2,
                                     PointField, RegionOfInterest)
        from std_msgs.msg import Header
    except ImportError as exc:
        raise ImportError(f'rclpy message packages are required for rclpy_types() ({exc}); '
                          'source a ROS 2 installation or pip install the ROS 2 wheels') from exc
    return types.SimpleNamespace(
        kind='rclpy', PointCloud2=PointCloud2, PointField=PointField, Image=Image,
        CompressedImage=CompressedImage, CameraInfo=CameraInfo,
        RegionOfInterest=RegionOfInterest, Header=Header, Time=Time)


def _types_or_default(msg_types: types.SimpleNamespace | None) -> types.SimpleNamespace:
    return rosbags_types() if msg_types is None else msg_types


def _bytes_field(msg_types: types.SimpleNamespace, raw: bytes | np.ndarray) -> Any:
    """A uint8[] message field value in the representation the message classes expect."""
    buf = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1) if isinstance(
        raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if msg_types.kind == 'rosbags':
        return buf.copy()
    out = array.array('B')
    out.frombytes(buf.tobytes())
    return out


def _data_bytes(data: Any) -> np.ndarray:
    """uint8 view of a message's ``data`` (bytes, array.array, list or numpy array)."""
    if isinstance(data, np.ndarray):
        return data.view(np.uint8).reshape(-1) if data.dtype != np.uint8 else data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)


def make_header(stamp_ns: int, frame_id: str, msg_types: types.SimpleNamespace) -> Any:
    """``std_msgs/Header`` with a stamp from integer nanoseconds."""
    stamp_ns = int(stamp_ns)
    if stamp_ns < 0:
        raise ConversionError(f'stamp must be >= 0 ns, got {stamp_ns}')
    stamp = msg_types.Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return msg_types.Header(stamp=stamp, frame_id=str(frame_id))


def stamp_ns(msg_or_header_or_time: Any) -> int:
    """Integer nanoseconds of a message's header stamp (or of a Header / Time itself)."""
    obj = msg_or_header_or_time
    obj = getattr(obj, 'header', obj)
    obj = getattr(obj, 'stamp', obj)
    return int(obj.sec) * 1_000_000_000 + int(obj.nanosec)


def available_backends() -> list[str]:
    """Implementations importable here: always ``'own'``, plus ``'ros'`` on full ROS 2 installs."""
    out = ['own']
    if _importable('sensor_msgs_py') and _importable('cv_bridge'):
        out.append('ros')
    return out


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConversionError(f'backend {backend!r} is not one of {list(BACKENDS)}')


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f'backend "ros" needs the {name} package (part of a full ROS 2 '
                          f'install, e.g. apt install ros-$ROS_DISTRO-{name.replace("_", "-")})'
                          ) from exc


def _is_rclpy_msg(msg: Any) -> bool:
    return type(msg).__module__.startswith('sensor_msgs.msg')


# ----------------------------------------------------------------------------- PointCloud2


def cloud_dtype(fields: Any, point_step: int, is_bigendian: bool) -> np.dtype:
    """numpy dtype describing one point of the message layout (offsets, padding, byte order)."""
    order = '>' if is_bigendian else '<'
    names, formats, offsets = [], [], []
    for i, f in enumerate(fields):
        name = f.name or f'unnamed_field_{i}'
        if f.datatype not in POINTFIELD_DTYPES:
            raise ConversionError(f'PointField {name!r}: unknown datatype {f.datatype} '
                                  '(expected 1..8, INT8..FLOAT64)')
        if name in names:
            raise ConversionError(f'PointField {name!r} appears twice')
        count = int(f.count)
        base = np.dtype(POINTFIELD_DTYPES[f.datatype]).newbyteorder(order)
        size = base.itemsize * max(count, 1)
        if int(f.offset) + size > point_step:
            raise ConversionError(f'PointField {name!r} (offset {f.offset}, {size} bytes) '
                                  f'extends past point_step {point_step}')
        names.append(name)
        formats.append(base if count <= 1 else (base, (count,)))
        offsets.append(int(f.offset))
    try:
        return np.dtype({'names': names, 'formats': formats, 'offsets': offsets,
                         'itemsize': int(point_step)})
    except ValueError as exc:
        raise ConversionError(f'PointCloud2 fields overlap or are invalid: {exc}') from None


def _packed_native(dtype: np.dtype) -> np.dtype:
    """Same fields as ``dtype`` without padding and in native byte order."""
    parts = []
    for name in dtype.names:
        sub = dtype.fields[name][0]
        base, shape = (sub.base, sub.shape) if sub.subdtype else (sub, ())
        base = base.newbyteorder('=')
        parts.append((name, base, shape) if shape else (name, base))
    return np.dtype(parts)


def cloud_to_array(msg: Any, backend: str = 'auto') -> np.ndarray:
    """Decode a PointCloud2 into a flat ``(height * width,)`` structured array.

    Fields keep their names and types (``count > 1`` becomes a sub-array), values are in native
    byte order, point and row padding are dropped, NaNs are kept (``is_dense`` false).
    """
    _check_backend(backend)
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    view_dtype = cloud_dtype(msg.fields, point_step, bool(msg.is_bigendian))
    out_dtype = _packed_native(view_dtype)
    n = height * width
    if n == 0:
        return np.zeros(0, dtype=out_dtype)
    if point_step <= 0:
        raise ConversionError(f'PointCloud2 point_step is {point_step} for {n} points')
    if row_step < width * point_step:
        raise ConversionError(f'PointCloud2 row_step {row_step} < width {width} * point_step '
                              f'{point_step}')
    data = _data_bytes(msg.data)
    need = (height - 1) * row_step + width * point_step
    if data.size < need:
        raise ConversionError(f'PointCloud2 data has {data.size} bytes, layout needs {need} '
                              f'({height}x{width}, point_step {point_step}, row_step {row_step})')
    ros_ok = ros_reads_cloud(msg)
    if backend == 'ros' and not ros_ok:
        raise ConversionError('sensor_msgs_py reads only rclpy clouds with packed count-1 '
                              'fields in host byte order and no row padding; use backend='
                              '"own" (or "auto") for this one')
    if backend == 'ros' or (backend == 'auto' and ros_ok and _importable('sensor_msgs_py')):
        return _cloud_to_array_ros(msg, out_dtype)
    # 1. one row of bytes per cloud row, row padding cut off; 2. view with the message layout.
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, width * point_step),
                                           strides=(row_step, 1))
    points = np.ascontiguousarray(rows).view(view_dtype).reshape(-1)
    # 3. copy each field into a packed, native-endian array.
    out = np.empty(n, dtype=out_dtype)
    for name in out_dtype.names:
        out[name] = points[name]
    return out


def ros_reads_cloud(msg: Any) -> bool:
    """Whether sensor_msgs_py's ``read_points`` decodes this PointCloud2 layout correctly.

    It needs an rclpy message whose count-1 fields end exactly at ``point_step``, without row
    padding, in the host byte order.
    """
    if not _is_rclpy_msg(msg):
        return False
    try:
        view = cloud_dtype(msg.fields, int(msg.point_step), bool(msg.is_bigendian))
    except ConversionError:
        return False
    ends = [view.fields[n][1] + view.fields[n][0].itemsize for n in view.names]
    return (bool(ends) and max(ends) == int(msg.point_step)
            and int(msg.row_step) == int(msg.width) * int(msg.point_step)
            and all(int(f.count) == 1 for f in msg.fields)
            and bool(msg.is_bigendian) == (sys.byteorder == 'big'))


def _cloud_to_array_ros(msg: Any, out_dtype: np.dtype) -> np.ndarray:
    pc2 = _require('sensor_msgs_py').point_cloud2
    points = pc2.read_points(msg, skip_nans=False)
    out = np.empty(int(msg.height) * int(msg.width), dtype=out_dtype)
    for name in out_dtype.names:
        out[name] = points[name]
    return out


def array_to_cloud(arr: np.ndarray, stamp_ns: int, frame_id: str,
                   msg_types: types.SimpleNamespace | None = None) -> Any:
    """Encode a structured array (``(N,)`` or organized ``(H, W)``) as a PointCloud2.

    The message is little-endian, keeps the array's field offsets and padding
    (``point_step = itemsize``); ``is_dense`` is false when any float field holds NaN or inf.
    """
    t = _types_or_default(msg_types)
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        raise ConversionError('array_to_cloud needs a structured array (fields x, y, z, ...), '
                              f'got dtype {arr.dtype}')
    if arr.ndim not in (1, 2):
        raise ConversionError(f'array_to_cloud needs a (N,) or (H, W) array, got {arr.shape}')
    height, width = (1, arr.shape[0]) if arr.ndim == 1 else arr.shape
    fields, le_parts = [], {'names': [], 'formats': [], 'offsets': [],
                            'itemsize': arr.dtype.itemsize}
    dense = True
    for name in arr.dtype.names:
        sub, offset = arr.dtype.fields[name][:2]
        base, shape = (sub.base, sub.shape) if sub.subdtype else (sub, ())
        key = base.str[1:]
        if key not in _DTYPE_TO_POINTFIELD:
            raise ConversionError(f'field {name!r}: dtype {base} has no PointField datatype '
                                  '(int8..uint32, float32, float64)')
        count = int(np.prod(shape)) if shape else 1
        fields.append(t.PointField(name=name, offset=int(offset),
                                   datatype=_DTYPE_TO_POINTFIELD[key], count=count))
        le_parts['names'].append(name)
        le_parts['formats'].append(base.newbyteorder('<') if not shape else
                                   (base.newbyteorder('<'), shape))
        le_parts['offsets'].append(offset)
        if base.kind == 'f' and arr.size and not np.all(np.isfinite(arr[name])):
            dense = False
    le = np.zeros(arr.shape, dtype=np.dtype(le_parts))
    for name in arr.dtype.names:
        le[name] = arr[name]
    point_step = arr.dtype.itemsize
    return t.PointCloud2(header=make_header(stamp_ns, frame_id, t), height=int(height),
                         width=int(width), fields=fields, is_bigendian=False,
                         point_step=int(point_step), row_step=int(point_step * width),
                         data=_bytes_field(t, le.tobytes()), is_dense=bool(dense))


def check_xyz_fields(dtype: np.dtype) -> str | None:
    """Check the x, y, z fields of a decoded cloud's dtype.

    Raises :class:`MissingFieldsError` when one is missing and :class:`ConversionError` when one
    has a count other than 1; returns a warning when they are not floating point (their values
    are then used as metres as they are), else None.
    """
    names = dtype.names or ()
    missing = [c for c in 'xyz' if c not in names]
    if missing:
        raise MissingFieldsError(f'no field(s) {missing}; fields are {list(names)}')
    subs = [dtype.fields[c][0] for c in 'xyz']
    for c, sub in zip('xyz', subs):
        if sub.shape:
            raise ConversionError(f'field {c!r} has count {int(np.prod(sub.shape))}: x, y and z '
                                  'must each have count 1')
    if any(sub.kind != 'f' for sub in subs):
        types = ', '.join(f'{c} {sub.base.name}' for c, sub in zip('xyz', subs))
        return (f'coordinates are not floating point ({types}): values used as metres, '
                'without fractions')
    return None


def scalar_field(points: np.ndarray, name: str, dtype: Any = None) -> np.ndarray | None:
    """Field ``name`` of a decoded cloud, cast to ``dtype`` when given (without numpy
    warnings: NaN or out-of-range values become what the cast makes of them), or None when the
    cloud has no such field or it holds more than one value per point (count != 1)."""
    if name not in (points.dtype.names or ()) or points.dtype.fields[name][0].shape:
        return None
    if dtype is None:
        return points[name]
    with np.errstate(all='ignore'):
        return points[name].astype(dtype)


def xyz_from_cloud(arr: np.ndarray, drop_invalid: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3) float32`` x, y, z of a structured array and the ``(N,) int64`` rows kept.

    Float64 values beyond the float32 range become inf (non-finite), NaNs of any kind stay NaN,
    without numpy warnings. With ``drop_invalid`` rows with a non-finite coordinate are
    dropped. Raises as :func:`check_xyz_fields`.
    """
    check_xyz_fields(arr.dtype)
    flat = arr.reshape(-1)
    xyz = np.empty((flat.shape[0], 3), dtype=np.float32)
    with np.errstate(over='ignore', invalid='ignore'):
        for i, c in enumerate('xyz'):
            xyz[:, i] = flat[c]
    if not drop_invalid:
        return xyz, np.arange(xyz.shape[0], dtype=np.int64)
    keep = np.flatnonzero(np.isfinite(xyz).all(axis=1)).astype(np.int64)
    return xyz[keep], keep


# ----------------------------------------------------------------------------- images


def _parse_compressed_format(fmt: str) -> str:
    """``'jpeg'`` or ``'png'`` from a CompressedImage format string (image_transport style)."""
    text = (fmt or '').lower()
    if 'compresseddepth' in text:
        raise UnsupportedEncodingError(f'CompressedImage format {fmt!r}: compressedDepth is '
                                       'not supported (only jpeg and png)')
    if 'jpeg' in text or 'jpg' in text:
        return 'jpeg'
    if 'png' in text:
        return 'png'
    raise UnsupportedEncodingError(f'CompressedImage format {fmt!r} is not supported '
                                   '(only jpeg and png)')


def compressed_format(msg: Any) -> str:
    """``'jpeg'`` or ``'png'`` for a CompressedImage; raises for anything else."""
    return _parse_compressed_format(msg.format)


def image_to_array(msg: Any, backend: str = 'auto') -> np.ndarray:
    """Decode an Image or CompressedImage: RGB ``uint8 (H, W, 3)`` or mono ``(H, W)``."""
    _check_backend(backend)
    if hasattr(msg, 'encoding'):
        return _image_to_array(msg, backend)
    if hasattr(msg, 'format'):
        return _compressed_to_array(msg, backend)
    raise ConversionError(f'{type(msg).__name__} is neither an Image nor a CompressedImage')


def _image_to_array(msg: Any, backend: str) -> np.ndarray:
    encoding = str(msg.encoding)
    if encoding not in IMAGE_ENCODINGS:
        raise UnsupportedEncodingError(f'Image encoding {encoding!r} is not supported; one of '
                                       f'{sorted(IMAGE_ENCODINGS)}')
    dtype, channels = IMAGE_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    pixel = np.dtype(dtype).itemsize * channels
    if height == 0 or width == 0:
        raise ConversionError(f'Image is empty ({width}x{height})')
    if step < width * pixel:
        raise ConversionError(f'Image step {step} < width {width} * {pixel} bytes ({encoding})')
    data = _data_bytes(msg.data)
    need = (height - 1) * step + width * pixel
    if data.size < need:
        raise ConversionError(f'Image data has {data.size} bytes, {width}x{height} {encoding} '
                              f'with step {step} needs {need}')
    ros_ok = ros_reads_image(msg)
    if backend == 'ros' and not ros_ok:
        raise ConversionError('cv_bridge reads only rclpy Images in host byte order whose step '
                              'is a whole number of pixels; use backend "own" (or "auto")')
    if backend == 'ros' or (backend == 'auto' and ros_ok and _importable('cv_bridge')):
        return _image_to_array_ros(msg, channels)
    # 1. rows without step padding; 2. typed view in the message byte order; 3. channel order.
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, width * pixel),
                                           strides=(step, 1))
    order = '>' if int(msg.is_bigendian) else '<'
    typed = np.ascontiguousarray(rows).view(np.dtype(dtype).newbyteorder(order))
    img = typed.astype(np.dtype(dtype).newbyteorder('='), copy=True)
    if channels == 1:
        return img.reshape(height, width)
    img = img.reshape(height, width, channels)
    if encoding.startswith('bgr'):
        img = img[:, :, 2::-1]
    return np.ascontiguousarray(img[:, :, :3])


def ros_reads_image(msg: Any) -> bool:
    """Whether cv_bridge decodes this (supported-encoding) Image layout correctly."""
    if not _is_rclpy_msg(msg) or str(msg.encoding) not in IMAGE_ENCODINGS:
        return False
    dtype, channels = IMAGE_ENCODINGS[str(msg.encoding)]
    pixel = np.dtype(dtype).itemsize * channels
    return (int(msg.step) % pixel == 0
            and bool(int(msg.is_bigendian)) == (sys.byteorder == 'big'))


def _image_to_array_ros(msg: Any, channels: int) -> np.ndarray:
    bridge = _require('cv_bridge').CvBridge()
    if channels == 1:
        return np.array(bridge.imgmsg_to_cv2(msg, desired_encoding='passthrough'))
    return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8'))


def _compressed_to_array(msg: Any, backend: str) -> np.ndarray:
    import cv2
    _parse_compressed_format(msg.format)
    data = _data_bytes(msg.data)
    if data.size == 0:
        raise ConversionError('CompressedImage has no data')
    if backend == 'ros' and not _is_rclpy_msg(msg):
        raise ConversionError('cv_bridge reads only rclpy CompressedImage messages; use backend '
                              '"own" (or "auto")')
    if backend == 'ros' or (backend == 'auto' and _is_rclpy_msg(msg)
                            and _importable('cv_bridge')):
        bridge = _require('cv_bridge').CvBridge()
        img = bridge.compressed_imgmsg_to_cv2(msg, desired_encoding='passthrough')
    else:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ConversionError(f'CompressedImage ({msg.format!r}, {data.size} bytes) could not '
                              'be decoded')
    if img.ndim == 2:
        return img
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def array_to_image(img: np.ndarray, encoding: str, stamp_ns: int, frame_id: str,
                   msg_types: types.SimpleNamespace | None = None) -> Any:
    """Encode an image array as a little-endian, unpadded ``sensor_msgs/Image``.

    Color encodings take RGB ``(H, W, 3)`` (or RGBA ``(H, W, 4)`` for rgba8/bgra8; alpha 255 is
    added to a 3-channel input); mono encodings take ``(H, W)`` of the encoding's dtype.
    """
    t = _types_or_default(msg_types)
    if encoding not in IMAGE_ENCODINGS:
        raise UnsupportedEncodingError(f'Image encoding {encoding!r} is not supported; one of '
                                       f'{sorted(IMAGE_ENCODINGS)}')
    dtype, channels = IMAGE_ENCODINGS[encoding]
    img = np.asarray(img)
    if img.dtype != dtype:
        raise ConversionError(f'{encoding} needs a {np.dtype(dtype)} array, got {img.dtype}')
    if channels == 1:
        if img.ndim != 2:
            raise ConversionError(f'{encoding} needs a (H, W) array, got {img.shape}')
        out = img
    else:
        if img.ndim != 3 or img.shape[2] not in (3, 4) or (channels == 3 and img.shape[2] != 3):
            raise ConversionError(f'{encoding} needs an RGB{"A" if channels == 4 else ""} '
                                  f'(H, W, {channels}) array, got {img.shape}')
        rgb = img[:, :, :3]
        if encoding.startswith('bgr'):
            rgb = rgb[:, :, ::-1]
        if channels == 4:
            alpha = img[:, :, 3:] if img.shape[2] == 4 else np.full(img.shape[:2] + (1,), 255,
                                                                    np.uint8)
            out = np.concatenate([rgb, alpha], axis=2)
        else:
            out = rgb
    out = np.ascontiguousarray(out, dtype=np.dtype(dtype).newbyteorder('<'))
    height, width = img.shape[:2]
    return t.Image(header=make_header(stamp_ns, frame_id, t), height=int(height),
                   width=int(width), encoding=encoding, is_bigendian=0,
                   step=int(width * out.itemsize * channels),
                   data=_bytes_field(t, out.tobytes()))


def array_to_compressed(img_rgb: np.ndarray, fmt: str, stamp_ns: int, frame_id: str,
                        msg_types: types.SimpleNamespace | None = None,
                        quality: int = 90) -> Any:
    """Encode RGB ``(H, W, 3) uint8`` or mono ``(H, W)`` as a jpeg/png CompressedImage.

    ``format`` follows image_transport (``'rgb8; jpeg compressed bgr8'``); read it back with
    :func:`compressed_format` or :func:`image_to_array`.
    """
    import cv2
    t = _types_or_default(msg_types)
    if fmt not in COMPRESSED_FORMATS:
        raise UnsupportedEncodingError(f'compressed format {fmt!r} is not one of '
                                       f'{list(COMPRESSED_FORMATS)}')
    if not 1 <= int(quality) <= 100:
        raise ConversionError(f'jpeg quality must be in 1..100, got {quality}')
    img = np.asarray(img_rgb)
    if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
        encoded_img, label = cv2.cvtColor(img, cv2.COLOR_RGB2BGR), ('rgb8', 'bgr8')
    elif img.ndim == 2 and img.dtype == np.uint8:
        encoded_img, label = img, ('mono8', 'mono8')
    elif img.ndim == 2 and img.dtype == np.uint16 and fmt == 'png':
        encoded_img, label = img, ('mono16', 'mono16')
    else:
        raise ConversionError(f'{fmt} needs RGB (H, W, 3) uint8 or mono (H, W) uint8'
                              f'{" or uint16" if fmt == "png" else ""}, got {img.shape} '
                              f'{img.dtype}')
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == 'jpeg' else []
    ok, buf = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', encoded_img, params)
    if not ok:
        raise ConversionError(f'OpenCV could not encode the image as {fmt}')
    return t.CompressedImage(header=make_header(stamp_ns, frame_id, t),
                             format=f'{label[0]}; {fmt} compressed {label[1]}',
                             data=_bytes_field(t, buf))


# ----------------------------------------------------------------------------- CameraInfo

_ROS_DISTORTION_MODELS = ('plumb_bob', 'rational_polynomial', 'equidistant')


def camera_info_from_calibration(cam: Any, stamp_ns: int,
                                 msg_types: types.SimpleNamespace | None = None) -> Any:
    """``sensor_msgs/CameraInfo`` of a :class:`~cmkd_ros.calibration.CameraCalibration`.

    R is identity and P is ``[K | 0]`` (a monocular camera); the model ``none`` is written as
    ``plumb_bob`` with five zero coefficients.
    """
    t = _types_or_default(msg_types)
    model = cam.distortion_model
    D = np.asarray(cam.D, dtype=np.float64)
    if model == 'none':
        model, D = 'plumb_bob', np.zeros(5)
    K = np.asarray(cam.K, dtype=np.float64)
    P = np.hstack([K, np.zeros((3, 1))])
    if t.kind == 'rosbags':
        d, k, r, p = D.copy(), K.reshape(-1).copy(), np.eye(3).reshape(-1), P.reshape(-1)
    else:
        d, k, r, p = (D.tolist(), K.reshape(-1).tolist(), np.eye(3).reshape(-1).tolist(),
                      P.reshape(-1).tolist())
    roi = t.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return t.CameraInfo(header=make_header(stamp_ns, cam.frame_id, t), height=int(cam.height),
                        width=int(cam.width), distortion_model=model, d=d, k=k, r=r, p=p,
                        binning_x=0, binning_y=0, roi=roi)
