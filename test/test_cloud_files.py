"""Point cloud files: PCD in its three encodings, KITTI and nuScenes .bin."""
import numpy as np
import pytest
from pypcd4 import Encoding, PointCloud

from cmkd_ros.cloud_files import CloudFileError, read_cloud_file

FIELDS = ('x', 'y', 'z', 'intensity', 'ring', 'time')


@pytest.fixture(scope='module')
def sweep():
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 4, 'cameras': {'count': 1, 'width': 64, 'height': 48},
                      'lidar': {'beams': 16, 'horizontal_resolution_deg': 1.0}})
    s = world.lidar.sweep(world.scene, world.frame_stamp_ns(1), np.random.default_rng(2))
    t = ((s.point_time_ns - s.stamp_ns) * 1e-9).astype(np.float32)
    return [s.xyz[:, 0], s.xyz[:, 1], s.xyz[:, 2], s.intensity, s.ring, t]


@pytest.mark.parametrize('encoding', [Encoding.ASCII, Encoding.BINARY,
                                      Encoding.BINARY_COMPRESSED])
def test_pcd_encodings_read_back_every_field(tmp_path, sweep, encoding):
    path = tmp_path / f'scan_{encoding.value}.pcd'
    cloud = PointCloud.from_points(sweep, FIELDS,
                                   (np.float32, np.float32, np.float32, np.float32, np.uint16,
                                    np.float32))
    cloud.save(path, encoding=encoding)
    header = path.read_bytes()[:400].decode('ascii', 'replace')
    assert f'DATA {encoding.value}\n' in header            # written as asked (LZF for compressed)
    points = read_cloud_file(path)
    assert points.dtype.names == FIELDS and points.shape == (len(sweep[0]),)
    for name, values in zip(FIELDS, sweep):
        if encoding == Encoding.ASCII and values.dtype == np.float32:
            np.testing.assert_allclose(points[name], values, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(points[name], values)


def test_kitti_and_nuscenes_bins_are_told_apart(data_dir):
    kitti = read_cloud_file(data_dir / 'kitti_000008' / 'velodyne.bin')
    raw = np.fromfile(data_dir / 'kitti_000008' / 'velodyne.bin', np.float32).reshape(-1, 4)
    assert kitti.dtype.names == ('x', 'y', 'z', 'intensity') and len(kitti) == 17238
    np.testing.assert_array_equal(kitti['intensity'], raw[:, 3])
    nus = read_cloud_file(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin')
    raw = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', np.float32).reshape(-1, 5)
    assert nus.dtype.names[-1] == 'ring' and len(nus) == 34688     # also a multiple of 16 bytes
    np.testing.assert_array_equal(nus['ring'], raw[:, 4].astype(np.uint16))
    np.testing.assert_array_equal(nus['x'], raw[:, 0])
    forced = read_cloud_file(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', 'kitti')
    assert len(forced) == 34688 * 5 // 4


def test_bad_cloud_files_say_what_is_wrong(tmp_path):
    with pytest.raises(CloudFileError, match='no such file'):
        read_cloud_file(tmp_path / 'missing.pcd')
    (tmp_path / 'scan.ply').write_bytes(b'ply\n')
    with pytest.raises(CloudFileError, match='extension'):
        read_cloud_file(tmp_path / 'scan.ply')
    (tmp_path / 'odd.bin').write_bytes(b'\0' * 10)
    with pytest.raises(CloudFileError, match='whole number'):
        read_cloud_file(tmp_path / 'odd.bin')
    (tmp_path / 'broken.pcd').write_bytes(b'VERSION 0.7\nFIELDS x y\nDATA ascii\n1 2\n')
    with pytest.raises(CloudFileError, match='broken.pcd'):
        read_cloud_file(tmp_path / 'broken.pcd')
    PointCloud.from_points([np.zeros(3, np.float32)], ('intensity',), (np.float32,)).save(
        tmp_path / 'noxyz.pcd')
    with pytest.raises(CloudFileError, match=r"no field\(s\) \['x', 'y', 'z'\]"):
        read_cloud_file(tmp_path / 'noxyz.pcd')
