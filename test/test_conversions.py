"""PointCloud2 / Image / CompressedImage / CameraInfo <-> numpy, rclpy and rosbags messages.

Expected values are built independently of the module: cloud bytes with ``struct``, images with
plain numpy byte layouts and OpenCV. Decoders run on every implementation this interpreter has
(``available_backends()``: the own one everywhere, sensor_msgs_py/cv_bridge on ROS installs), so
on a full ROS install the same expectations show the two agree.
"""
import struct
import sys

import cv2
import numpy as np
import pytest

from cmkd_ros import conversions as cv
from cmkd_ros.calibration import CameraCalibration, calibration_from_camera_info

pytestmark = pytest.mark.ros  # ROS-facing: runs on every tested distro (scripts/test.sh)

BACKENDS = cv.available_backends()       # 'own' everywhere, 'ros' on full ROS 2 installs
READERS = ['auto', 'own']                 # 'auto' picks sensor_msgs_py/cv_bridge where usable
KINDS = ['rclpy', 'rosbags']
STRUCT_CODES = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 8: 'd'}
SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}


def msg_types(kind):
    return cv.rclpy_types() if kind == 'rclpy' else cv.rosbags_types()


def build_cloud(t, fields, rows, *, height, width, point_step, row_step, big_endian):
    """PointCloud2 with bytes packed by ``struct``; ``rows[i]`` maps field name -> values."""
    order = '>' if big_endian else '<'
    data = bytearray(row_step * height)
    for i, point in enumerate(rows):
        r, c = divmod(i, width)
        base = r * row_step + c * point_step
        for name, offset, datatype, count in fields:
            values = point[name] if count > 1 else [point[name]]
            struct.pack_into(order + STRUCT_CODES[datatype] * count, data, base + offset,
                             *values)
    pf = [t.PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields]
    raw = bytes(data)
    payload = np.frombuffer(raw, np.uint8).copy() if t.kind == 'rosbags' else raw
    return t.PointCloud2(header=cv.make_header(5, 'lidar', t), height=height, width=width,
                         fields=pf, is_bigendian=big_endian, point_step=point_step,
                         row_step=row_step, data=payload, is_dense=False)


ALL_TYPES_FIELDS = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('i8', 12, 1, 1),
                    ('u8', 13, 2, 1), ('i16', 14, 3, 1), ('u16', 16, 4, 1), ('i32', 20, 5, 1),
                    ('u32', 24, 6, 1), ('f64', 32, 8, 1), ('vec', 40, 7, 3)]


def random_points(rng, n):
    rows = []
    for _ in range(n):
        rows.append({'x': float(np.float32(rng.normal())), 'y': float(np.float32(rng.normal())),
                     'z': float(np.float32(rng.normal())), 'i8': int(rng.integers(-128, 128)),
                     'u8': int(rng.integers(0, 256)), 'i16': int(rng.integers(-2**15, 2**15)),
                     'u16': int(rng.integers(0, 2**16)), 'i32': int(rng.integers(-2**31, 2**31)),
                     'u32': int(rng.integers(0, 2**32)), 'f64': float(rng.normal()),
                     'vec': [float(np.float32(v)) for v in rng.normal(size=3)]})
    return rows


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('backend', READERS)
@pytest.mark.parametrize('big_endian', [False, True])
@pytest.mark.parametrize('row_pad', [0, 12])
def test_cloud_all_datatypes_layouts(kind, backend, big_endian, row_pad):
    rng = np.random.default_rng(1)
    t = msg_types(kind)
    height, width, point_step = 3, 4, 60                  # fields end at 52: 8 bytes padding
    rows = random_points(rng, height * width)
    msg = build_cloud(t, ALL_TYPES_FIELDS, rows, height=height, width=width,
                      point_step=point_step, row_step=width * point_step + row_pad,
                      big_endian=big_endian)
    arr = cv.cloud_to_array(msg, backend=backend)
    assert arr.shape == (12,)
    assert arr.dtype['i16'] == np.int16 and arr.dtype['u32'] == np.uint32
    assert arr.dtype['vec'].shape == (3,)
    for name, _, datatype, count in ALL_TYPES_FIELDS:
        expected = np.array([p[name] for p in rows])
        assert arr.dtype[name].base == np.dtype(cv.POINTFIELD_DTYPES[datatype])
        np.testing.assert_array_equal(arr[name], expected.astype(arr.dtype[name].base),
                                      err_msg=name)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('backend', READERS)
def test_cloud_nans_kept_and_dropped_by_xyz(kind, backend):
    t = msg_types(kind)
    fields = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('intensity', 12, 7, 1)]
    rows = [{'x': 1.0, 'y': 2.0, 'z': 3.0, 'intensity': 0.5},
            {'x': float('nan'), 'y': float('nan'), 'z': float('nan'), 'intensity': 0.0},
            {'x': 4.0, 'y': float('inf'), 'z': 6.0, 'intensity': 1.0},
            {'x': 7.0, 'y': 8.0, 'z': 9.0, 'intensity': 2.0}]
    msg = build_cloud(t, fields, rows, height=2, width=2, point_step=16, row_step=32,
                      big_endian=False)
    arr = cv.cloud_to_array(msg, backend=backend)
    assert arr.shape == (4,) and np.isnan(arr['x'][1])
    xyz, keep = cv.xyz_from_cloud(arr)
    np.testing.assert_array_equal(keep, [0, 3])
    np.testing.assert_array_equal(xyz, [[1, 2, 3], [7, 8, 9]])
    assert xyz.dtype == np.float32
    xyz_all, keep_all = cv.xyz_from_cloud(arr, drop_invalid=False)
    assert xyz_all.shape == (4, 3) and np.isnan(xyz_all[1]).all()
    np.testing.assert_array_equal(keep_all, np.arange(4))


@pytest.mark.parametrize('kind', KINDS)
def test_empty_cloud(kind):
    t = msg_types(kind)
    msg = build_cloud(t, [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1)], [], height=1,
                      width=0, point_step=12, row_step=0, big_endian=False)
    arr = cv.cloud_to_array(msg)
    assert arr.shape == (0,) and arr.dtype.names == ('x', 'y', 'z')
    xyz, keep = cv.xyz_from_cloud(arr)
    assert xyz.shape == (0, 3) and keep.shape == (0,)
    back = cv.cloud_to_array(cv.array_to_cloud(arr, 0, 'lidar', t))
    assert back.shape == (0,)


@pytest.mark.parametrize('kind', KINDS)
def test_array_to_cloud_roundtrip_through_serialization(kind):
    rng = np.random.default_rng(2)
    t = msg_types(kind)
    dtype = np.dtype({'names': ['x', 'y', 'z', 'intensity', 'ring', 'time', 'rgb3'],
                      'formats': ['<f4', '<f4', '<f4', '>f4', '<u2', '<f8', ('<u1', (3,))],
                      'offsets': [0, 4, 8, 16, 20, 24, 32], 'itemsize': 40})
    arr = np.zeros(50, dtype=dtype)
    for name in ('x', 'y', 'z', 'intensity', 'time'):
        arr[name] = rng.normal(size=50)
    arr['x'][7] = np.nan
    arr['ring'] = rng.integers(0, 64, size=50)
    arr['rgb3'] = rng.integers(0, 256, size=(50, 3))
    msg = cv.array_to_cloud(arr, 1_700_000_000_123_456_789, 'lidar_top', t)
    assert msg.point_step == 40 and msg.row_step == 2000 and not msg.is_dense
    assert cv.stamp_ns(msg) == 1_700_000_000_123_456_789 and msg.header.frame_id == 'lidar_top'
    if kind == 'rosbags':
        store = t.typestore
        raw = store.serialize_cdr(msg, 'sensor_msgs/msg/PointCloud2')
        msg = store.deserialize_cdr(raw, 'sensor_msgs/msg/PointCloud2')
    else:
        from rclpy.serialization import deserialize_message, serialize_message
        msg = deserialize_message(serialize_message(msg), t.PointCloud2)
    back = cv.cloud_to_array(msg)
    for name in dtype.names:
        np.testing.assert_array_equal(back[name], arr[name], err_msg=name)
    assert back.dtype['intensity'] == np.dtype('=f4')      # native order after decoding


def test_array_to_cloud_organized_and_dense():
    t = cv.rosbags_types()
    arr = np.zeros((4, 5), dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4')])
    arr['z'] = np.arange(20, dtype=np.float32).reshape(4, 5)
    msg = cv.array_to_cloud(arr, 0, 'l', t)
    assert (msg.height, msg.width, msg.is_dense) == (4, 5, True)
    np.testing.assert_array_equal(cv.cloud_to_array(msg)['z'], np.arange(20))


def test_cloud_errors():
    t = cv.rosbags_types()
    with pytest.raises(cv.ConversionError, match="no field"):
        cv.xyz_from_cloud(np.zeros(3, dtype=[('x', 'f4'), ('y', 'f4')]))
    with pytest.raises(cv.ConversionError, match='datatype 9'):
        cv.cloud_to_array(build_cloud(t, [('x', 0, 9, 1)], [], height=1, width=0,
                                      point_step=4, row_step=0, big_endian=False))
    bad = build_cloud(t, [('x', 0, 7, 1)], [{'x': 1.0}], height=1, width=1, point_step=4,
                      row_step=4, big_endian=False)
    bad.fields[0].offset = 2
    with pytest.raises(cv.ConversionError, match='extends past point_step'):
        cv.cloud_to_array(bad)
    short = build_cloud(t, [('x', 0, 7, 1)], [{'x': 1.0}, {'x': 2.0}], height=1, width=2,
                        point_step=4, row_step=8, big_endian=False)
    short.data = short.data[:5]
    with pytest.raises(cv.ConversionError, match='data has 5 bytes'):
        cv.cloud_to_array(short)
    with pytest.raises(cv.ConversionError, match='no PointField datatype'):
        cv.array_to_cloud(np.zeros(2, dtype=[('x', 'i8')]), 0, 'l', t)
    with pytest.raises(cv.ConversionError, match='structured'):
        cv.array_to_cloud(np.zeros((2, 3), np.float32), 0, 'l', t)


def test_xyz_fields_are_checked_with_clear_messages():
    import warnings
    with pytest.raises(cv.MissingFieldsError, match=r"no field\(s\) \['z'\]"):
        cv.check_xyz_fields(np.dtype([('x', 'f4'), ('y', 'f4')]))
    wide = np.dtype([('x', 'f4', (3,)), ('y', 'f4'), ('z', 'f4')])
    with pytest.raises(cv.ConversionError, match="field 'x' has count 3: x, y and z must each"):
        cv.xyz_from_cloud(np.zeros(2, dtype=wide))
    assert cv.check_xyz_fields(np.dtype([(c, 'f8') for c in 'xyz'])) is None
    note = cv.check_xyz_fields(np.dtype([('x', 'u1'), ('y', 'i2'), ('z', 'f4')]))
    assert 'not floating point (x uint8, y int16, z float32)' in note
    far = np.zeros(3, dtype=[(c, 'f8') for c in 'xyz'])
    far['x'] = [1.0, 1e300, -1e39]                  # beyond float32: inf, no numpy warning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        xyz, keep = cv.xyz_from_cloud(far)
    np.testing.assert_array_equal(keep, [0])


# ----------------------------------------------------------------------------- images


def raw_image_msg(t, encoding, pixels_bytes, height, width, step, big_endian=0):
    payload = np.frombuffer(pixels_bytes, np.uint8).copy() if t.kind == 'rosbags' else \
        pixels_bytes
    return t.Image(header=cv.make_header(0, 'cam', t), height=height, width=width,
                   encoding=encoding, is_bigendian=big_endian, step=step, data=payload)


def padded_rows(arr2d_bytes_per_row, pad):
    return b''.join(row + b'\xee' * pad for row in arr2d_bytes_per_row)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('backend', READERS)
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_color_images_with_step_padding(kind, backend, encoding):
    rng = np.random.default_rng(3)
    t = msg_types(kind)
    height, width, pad = 5, 7, 3
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    channel_order = {'rgb8': [0, 1, 2], 'bgr8': [2, 1, 0], 'rgba8': [0, 1, 2, 3],
                     'bgra8': [2, 1, 0, 3]}[encoding]
    alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
    stacked = np.concatenate([rgb, alpha], axis=2)[:, :, channel_order]
    step = width * len(channel_order) + pad
    msg = raw_image_msg(t, encoding, padded_rows([r.tobytes() for r in stacked], pad),
                        height, width, step)
    img = cv.image_to_array(msg, backend=backend)
    assert img.shape == (height, width, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, rgb)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('backend', READERS)
@pytest.mark.parametrize('encoding,dtype,big', [('mono8', np.uint8, 0), ('mono16', np.uint16, 0),
                                                ('16UC1', np.uint16, 1),
                                                ('32FC1', np.float32, 0),
                                                ('32FC1', np.float32, 1)])
def test_mono_images(kind, backend, encoding, dtype, big):
    rng = np.random.default_rng(4)
    t = msg_types(kind)
    height, width, pad = 4, 6, 2
    if dtype == np.float32:
        values = rng.normal(size=(height, width)).astype(np.float32)
        values[0, 0] = np.nan
    else:
        values = rng.integers(0, np.iinfo(dtype).max, size=(height, width)).astype(dtype)
    stored = values.astype(np.dtype(dtype).newbyteorder('>' if big else '<'))
    step = width * stored.itemsize + pad
    msg = raw_image_msg(t, encoding, padded_rows([r.tobytes() for r in stored], pad), height,
                        width, step, big)
    img = cv.image_to_array(msg, backend=backend)
    assert img.shape == (height, width) and img.dtype == dtype
    np.testing.assert_array_equal(img, values)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16',
                                      '16UC1', '32FC1'])
def test_array_to_image_roundtrip(kind, encoding):
    rng = np.random.default_rng(5)
    t = msg_types(kind)
    dtype, channels = cv.IMAGE_ENCODINGS[encoding]
    shape = (9, 11) if channels == 1 else (9, 11, 3)
    img = (rng.normal(size=shape).astype(np.float32) if dtype == np.float32 else
           rng.integers(0, np.iinfo(dtype).max, size=shape).astype(dtype))
    msg = cv.array_to_image(img, encoding, 42, 'cam', t)
    assert msg.encoding == encoding and msg.step == 11 * channels * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(cv.image_to_array(msg), img)
    if encoding == 'bgr8':                                  # bytes really are in BGR order
        raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(9, 11, 3)
        np.testing.assert_array_equal(raw, img[:, :, ::-1])


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('backend', READERS)
def test_compressed_png_exact_and_jpeg_close(kind, backend, data_dir):
    t = msg_types(kind)
    bgr = cv2.imread(str(data_dir / 'kitti_000008' / 'image_2.png'))[:64, :96]
    rgb = bgr[:, :, ::-1].copy()
    png = cv.array_to_compressed(rgb, 'png', 7, 'cam', t)
    assert cv.compressed_format(png) == 'png'
    np.testing.assert_array_equal(cv.image_to_array(png, backend=backend), rgb)
    jpg = cv.array_to_compressed(rgb, 'jpeg', 7, 'cam', t, quality=95)
    assert cv.compressed_format(jpg) == 'jpeg'
    decoded = cv.image_to_array(jpg, backend=backend)
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb).mean() < 4.0
    # the channel order is RGB: a pure red image stays red
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert cv.image_to_array(cv.array_to_compressed(red, 'jpeg', 0, 'c', t))[8, 8, 0] > 240
    mono16 = np.arange(64 * 8, dtype=np.uint16).reshape(8, 64) * 97
    np.testing.assert_array_equal(
        cv.image_to_array(cv.array_to_compressed(mono16, 'png', 0, 'c', t), backend=backend),
        mono16)


def test_real_jpeg_bytes_decode(data_dir):
    t = cv.rosbags_types()
    raw = (data_dir / 'nuscenes_sample' / 'CAM_FRONT.jpg').read_bytes()
    msg = t.CompressedImage(header=cv.make_header(0, 'CAM_FRONT', t), format='jpeg',
                            data=np.frombuffer(raw, np.uint8).copy())
    img = cv.image_to_array(msg)
    expected = cv2.imread(str(data_dir / 'nuscenes_sample' / 'CAM_FRONT.jpg'))[:, :, ::-1]
    assert img.shape == (900, 1600, 3)
    np.testing.assert_array_equal(img, expected)


def test_unsupported_encodings():
    t = cv.rosbags_types()
    msg = raw_image_msg(t, 'bayer_rggb8', bytes(16), 4, 4, 4)
    with pytest.raises(cv.UnsupportedEncodingError, match='bayer_rggb8'):
        cv.image_to_array(msg)
    comp = t.CompressedImage(header=cv.make_header(0, 'c', t), format='tiff',
                             data=np.zeros(10, np.uint8))
    with pytest.raises(cv.UnsupportedEncodingError, match='tiff'):
        cv.image_to_array(comp)
    comp.format = '16UC1; compressedDepth png'
    with pytest.raises(cv.UnsupportedEncodingError, match='compressedDepth'):
        cv.image_to_array(comp)
    with pytest.raises(cv.UnsupportedEncodingError):
        cv.array_to_image(np.zeros((2, 2, 3), np.uint8), 'yuv422', 0, 'c', t)
    with pytest.raises(cv.ConversionError, match='uint8'):
        cv.array_to_image(np.zeros((2, 2, 3), np.float32), 'rgb8', 0, 'c', t)
    with pytest.raises(cv.ConversionError, match='step'):
        cv.image_to_array(raw_image_msg(t, 'rgb8', bytes(40), 4, 4, 8))
    corrupt = t.CompressedImage(header=cv.make_header(0, 'c', t), format='jpeg',
                                data=np.arange(50, dtype=np.uint8))
    with pytest.raises(cv.ConversionError, match='could not be decoded'):
        cv.image_to_array(corrupt)


# ----------------------------------------------------------------------------- ROS readers


@pytest.mark.parametrize('backend', BACKENDS)
def test_implementations_agree_on_layouts_both_read(backend):
    """The own decoders and sensor_msgs_py / cv_bridge (where installed) give the same arrays
    on the layouts both read, checked against independently packed bytes."""
    rng = np.random.default_rng(6)
    t = cv.rclpy_types()
    fields = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('intensity', 12, 7, 1),
              ('ring', 16, 4, 1), ('t', 18, 3, 1)]
    rows = [{'x': float(np.float32(v[0])), 'y': float(np.float32(v[1])),
             'z': float(np.float32(v[2])), 'intensity': float(np.float32(v[3])),
             'ring': int(r), 't': int(q)}
            for v, r, q in zip(rng.normal(size=(30, 4)), rng.integers(0, 64, 30),
                               rng.integers(-1000, 1000, 30))]
    cloud = build_cloud(t, fields, rows, height=3, width=10, point_step=20, row_step=200,
                        big_endian=sys.byteorder == 'big')
    assert cv.ros_reads_cloud(cloud)
    arr = cv.cloud_to_array(cloud, backend=backend)
    for name, *_ in fields:
        np.testing.assert_array_equal(arr[name], [p[name] for p in rows], err_msg=name)
    rgb = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    padded = padded_rows([r[:, ::-1].tobytes() for r in rgb], 6)        # bgr8, 2 pixels pad
    image = raw_image_msg(t, 'bgr8', padded, 4, 5, 21)
    assert cv.ros_reads_image(image)
    np.testing.assert_array_equal(cv.image_to_array(image, backend=backend), rgb)
    depth = rng.integers(0, 2**16, size=(3, 4)).astype(np.uint16)
    mono = raw_image_msg(t, '16UC1', depth.astype('=u2').tobytes(), 3, 4, 8,
                         int(sys.byteorder == 'big'))
    np.testing.assert_array_equal(cv.image_to_array(mono, backend=backend), depth)
    png = cv.array_to_compressed(rgb, 'png', 0, 'cam', t)
    np.testing.assert_array_equal(cv.image_to_array(png, backend=backend), rgb)


def test_ros_backend_refuses_layouts_it_cannot_read():
    rosbags_cloud = build_cloud(cv.rosbags_types(), [('x', 0, 7, 1)], [{'x': 1.0}], height=1,
                                width=1, point_step=4, row_step=4, big_endian=False)
    with pytest.raises(cv.ConversionError, match='sensor_msgs_py reads only rclpy'):
        cv.cloud_to_array(rosbags_cloud, backend='ros')
    padded = build_cloud(cv.rclpy_types(), [('x', 0, 7, 1)], [{'x': 1.0}], height=1, width=1,
                         point_step=8, row_step=8, big_endian=False)
    assert not cv.ros_reads_cloud(padded)                # 4 bytes of point padding
    with pytest.raises(cv.ConversionError, match='packed count-1'):
        cv.cloud_to_array(padded, backend='ros')
    odd_step = raw_image_msg(cv.rclpy_types(), 'rgb8', bytes(2 * 10), 2, 3, 10)
    assert not cv.ros_reads_image(odd_step)
    with pytest.raises(cv.ConversionError, match='cv_bridge reads only'):
        cv.image_to_array(odd_step, backend='ros')
    # auto still decodes them with the own implementation
    assert cv.cloud_to_array(padded, backend='auto')['x'].tolist() == [1.0]
    with pytest.raises(cv.ConversionError, match="backend 'gpu'"):
        cv.cloud_to_array(padded, backend='gpu')


def test_ros_backend_needs_its_packages():
    t = cv.rclpy_types()
    cloud = build_cloud(t, [('x', 0, 7, 1)], [{'x': 2.0}], height=1, width=1, point_step=4,
                        row_step=4, big_endian=sys.byteorder == 'big')
    if 'ros' in BACKENDS:
        assert cv.cloud_to_array(cloud, backend='ros')['x'].tolist() == [2.0]
    else:
        with pytest.raises(ImportError, match='sensor_msgs_py'):
            cv.cloud_to_array(cloud, backend='ros')


# ----------------------------------------------------------------------------- CameraInfo


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('model,D', [('plumb_bob', [-0.3, 0.1, 1e-3, -2e-3, 0.01]),
                                     ('rational_polynomial',
                                      [0.2, -0.1, 1e-3, 2e-3, 0.01, 0.5, -0.05, 0.02]),
                                     ('equidistant', [0.1, -0.02, 0.003, -0.001]),
                                     ('none', [])])
def test_camera_info_roundtrip(kind, model, D):
    t = msg_types(kind)
    T = np.eye(4)
    T[:3, 3] = [0.1, -0.2, 0.3]
    cam = CameraCalibration(name='front', width=640, height=480,
                            K=[[500, 0, 320.5], [0, 505, 240.2], [0, 0, 1]], T_cam_lidar=T,
                            distortion_model=model, D=D, frame_id='front_optical')
    msg = cv.camera_info_from_calibration(cam, 123, t)
    if kind == 'rosbags':
        msg = t.typestore.deserialize_cdr(t.typestore.serialize_cdr(
            msg, 'sensor_msgs/msg/CameraInfo'), 'sensor_msgs/msg/CameraInfo')
    else:
        from rclpy.serialization import deserialize_message, serialize_message
        msg = deserialize_message(serialize_message(msg), t.CameraInfo)
    assert msg.header.frame_id == 'front_optical' and cv.stamp_ns(msg) == 123
    back = calibration_from_camera_info(msg, T, 'front')
    assert back.distortion_model == model and back.frame_id == 'front_optical'
    np.testing.assert_allclose(back.K, cam.K)
    np.testing.assert_allclose(back.D, cam.D)
    np.testing.assert_allclose(back.T_cam_lidar, T)
    assert (back.width, back.height) == (640, 480)
