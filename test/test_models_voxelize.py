"""Voxelization, batching, point features and augmentations on the real nuScenes scan."""
import numpy as np
import pytest
import torch

from cmkd_ros.models import (Compose, RandomFlip, RandomJitter, RandomRotationZ, RandomScale,
                             VoxelizeError, feature_channels, point_features, sparse_collate,
                             voxelize)


@pytest.fixture(scope='module')
def scan(data_dir):
    points = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', dtype=np.float32)
    return points.reshape(-1, 5)


def test_voxelize_round_trip_on_real_scan(scan):
    xyz, feats = scan[:, :3], scan[:, 3:5]
    coords, vfeats, inverse = voxelize(xyz, feats, 0.1)
    assert isinstance(coords, np.ndarray) and coords.dtype == np.int32
    assert inverse.dtype == np.int64 and inverse.shape == (xyz.shape[0],)
    # 1. Every point lies in the voxel the inverse map names; voxels are unique.
    np.testing.assert_array_equal(np.floor(xyz.astype(np.float64) / 0.1).astype(np.int32),
                                  coords[inverse])
    assert np.unique(coords, axis=0).shape[0] == coords.shape[0]
    # 2. Voxel features are the mean of their points.
    sums = np.zeros((coords.shape[0], 2))
    np.add.at(sums, inverse, feats.astype(np.float64))
    counts = np.bincount(inverse, minlength=coords.shape[0])
    np.testing.assert_allclose(vfeats, sums / counts[:, None], rtol=1e-5, atol=1e-4)
    assert counts.min() >= 1 and 1000 < coords.shape[0] < xyz.shape[0]


def test_voxelize_torch_in_torch_out_and_larger_voxels_merge(scan):
    xyz = torch.from_numpy(scan[:, :3].copy())
    coords, vfeats, inverse = voxelize(xyz, torch.ones(xyz.shape[0], 1), 0.2)
    fine, _, _ = voxelize(xyz, torch.ones(xyz.shape[0], 1), 0.1)
    assert isinstance(coords, torch.Tensor) and coords.dtype == torch.int32
    assert coords.shape[0] < fine.shape[0]
    assert torch.all(vfeats == 1)
    assert int(inverse.max()) == coords.shape[0] - 1


def test_voxelize_rejects_bad_input():
    xyz = np.zeros((4, 3), np.float32)
    with pytest.raises(VoxelizeError, match='voxel_size'):
        voxelize(xyz, np.zeros((4, 1), np.float32), 0.0)
    with pytest.raises(VoxelizeError, match=r'\(N, F\)'):
        voxelize(xyz, np.zeros((3, 1), np.float32), 0.1)
    xyz[2, 1] = np.nan
    with pytest.raises(VoxelizeError, match='1 of 4 points'):
        voxelize(xyz, np.zeros((4, 1), np.float32), 0.1)
    with pytest.raises(VoxelizeError, match='no points'):
        voxelize(np.zeros((0, 3), np.float32), np.zeros((0, 1), np.float32), 0.1)


def test_sparse_collate_adds_batch_index():
    a = (np.array([[0, 0, 0], [1, 2, 3]], np.int32), np.ones((2, 2), np.float32))
    b = (np.array([[0, 0, 0]], np.int32), np.zeros((1, 2), np.float32))
    coords, feats = sparse_collate([a, b])
    assert coords.dtype == torch.int32 and coords.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3],
                                                               [1, 0, 0, 0]]
    assert feats.shape == (3, 2)
    with pytest.raises(VoxelizeError, match='feature widths'):
        sparse_collate([a, (b[0], np.zeros((1, 3), np.float32))])


def test_point_features_kinds(scan):
    xyz, intensity = scan[:, :3], scan[:, 3]
    for kind in ('constant', 'height', 'intensity', 'intensity_height'):
        feats = point_features(xyz, intensity, kind)
        assert feats.shape == (xyz.shape[0], feature_channels(kind))
        assert feats.dtype == np.float32 and np.all(feats[:, 0] == 1)
    both = point_features(xyz, intensity, 'intensity_height')
    np.testing.assert_array_equal(both[:, 2], xyz[:, 2])
    assert 0 <= both[:, 1].min() and both[:, 1].max() <= 1.0 + 1e-6  # nuScenes: 0..255
    with pytest.raises(VoxelizeError, match='needs intensity'):
        point_features(xyz, None, 'intensity')
    with pytest.raises(VoxelizeError, match='unknown point feature kind'):
        point_features(xyz, None, 'rgb')


def test_augmentations(scan):
    xyz = scan[:2000, :3]
    rng = np.random.default_rng(0)
    rotated = RandomRotationZ()(xyz, rng)
    np.testing.assert_allclose(np.linalg.norm(rotated[:, :2], axis=1),
                               np.linalg.norm(xyz[:, :2], axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rotated[:, 2], xyz[:, 2])
    assert not np.allclose(rotated, xyz)
    scaled = RandomScale(0.9, 1.1)(xyz, rng)
    ratio = np.linalg.norm(scaled, axis=1) / np.linalg.norm(xyz, axis=1)
    assert 0.9 <= ratio.min() and np.ptp(ratio) < 1e-5 and ratio.max() <= 1.1
    flipped = RandomFlip(p=1.0)(xyz, rng)
    np.testing.assert_array_equal(flipped, xyz * np.array([-1, -1, 1], np.float32))
    jittered = RandomJitter(0.01, 0.02)(xyz, rng)
    assert 0 < np.abs(jittered - xyz).max() <= 0.02 + 1e-6
    pipeline = Compose([RandomRotationZ(), RandomScale(), RandomFlip(), RandomJitter()])
    first = pipeline(xyz, np.random.default_rng(5))
    np.testing.assert_array_equal(first, pipeline(xyz, np.random.default_rng(5)))
    assert first.shape == xyz.shape and first.dtype == xyz.dtype
    with pytest.raises(ValueError, match='low <= high'):
        RandomScale(1.2, 1.1)
    # Horizontal only: heights stay, x and y shrink by one common factor.
    packed = RandomScale(0.5, 0.6, axes=(0, 1))(xyz, rng)
    np.testing.assert_array_equal(packed[:, 2], xyz[:, 2])
    factor = np.linalg.norm(packed[:, :2], axis=1) / np.linalg.norm(xyz[:, :2], axis=1)
    assert 0.5 <= factor.min() and np.ptp(factor) < 1e-5 and factor.max() <= 0.6
    with pytest.raises(ValueError, match='axes'):
        RandomScale(axes=(3,))
