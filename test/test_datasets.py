"""Scan datasets (pairs, nuScenes, SemanticKITTI): fixed keys, correspondences, augmentation,
resizing, live refresh, and the sparse collate's shapes and offsets."""
import numpy as np
import pytest
import torch

from fixtures.real_layouts import build_nuscenes, build_semantickitti
from fixtures.synthetic import write_sim_pairs
from offline_training.datasets import (DatasetError, NuScenesDataset, PairDataset,
                                       SemanticKITTIDataset, SparseCollate)

KEYS = {'name', 'xyz', 'feats', 'intensity', 'labels', 'images', 'label_images', 'corr_point',
        'corr_camera', 'corr_uv', 'visible_any'}


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
    # seed 5 starts beside parked cars: a scene where the occlusion test matters
    return write_sim_pairs(tmp_path_factory.mktemp('pairs'), frames=2, seed=5)


def _label_agreement(sample) -> float:
    """Fraction of correspondences whose pixel label equals the point label (labeled only)."""
    uv = torch.round(sample['corr_uv']).long()
    pix = sample['label_images'][sample['corr_camera'], uv[:, 1], uv[:, 0]]
    lab = sample['labels'][sample['corr_point']]
    keep = (lab != 255) & (pix != 255)
    return float((pix[keep] == lab[keep]).float().mean())


def test_pair_sample_keys_dtypes_and_consistency(pairs):
    ds = PairDataset(pairs)
    s = ds[0]
    assert set(s) == KEYS
    n = s['xyz'].shape[0]
    assert s['xyz'].dtype == torch.float32 and s['feats'].shape == (n, 2)
    assert s['labels'].dtype == torch.int64 and s['labels'].shape == (n,)
    assert s['images'].dtype == torch.uint8 and s['images'].shape == (2, 3, 96, 160)
    assert s['label_images'].shape == (2, 96, 160)
    m = s['corr_point'].shape[0]
    assert m > 2000 and s['corr_uv'].shape == (m, 2) and s['corr_camera'].max() == 1
    # visible_any is exactly the set of corresponded points
    expect = torch.zeros(n, dtype=torch.bool)
    expect[s['corr_point']] = True
    assert torch.equal(s['visible_any'], expect) and 0 < expect.sum() < n
    # every uv lies inside its image
    assert (s['corr_uv'] >= -0.5).all()
    assert (s['corr_uv'][:, 0] < 159.5).all() and (s['corr_uv'][:, 1] < 95.5).all()
    # correspondences (occlusion test and motion compensation on) hit the right pixels
    assert _label_agreement(s) > 0.95


def test_occlusion_and_motion_flags_change_correspondences(pairs):
    on = PairDataset(pairs)[0]
    no_occlusion = PairDataset(pairs, occlusion=False)[0]
    assert no_occlusion['corr_point'].shape[0] > on['corr_point'].shape[0]
    # the points the occlusion test drops are mostly ones whose pixel shows something else
    assert _label_agreement(on) > _label_agreement(no_occlusion) + 0.01
    no_motion = PairDataset(pairs, motion_compensation=False)[0]
    assert not torch.equal(no_motion['corr_uv'], on['corr_uv'][:no_motion['corr_uv'].shape[0]])


def test_image_scale_scales_uv_with_the_images(pairs):
    full = PairDataset(pairs)[0]
    half = PairDataset(pairs, image_scale=0.5)[0]
    assert half['images'].shape == (2, 3, 48, 80) and half['label_images'].shape == (2, 48, 80)
    assert torch.equal(half['corr_point'], full['corr_point'])
    torch.testing.assert_close(half['corr_uv'], (full['corr_uv'] + 0.5) * 0.5 - 0.5)
    assert _label_agreement(half) > 0.8


def test_augmentation_moves_points_only(pairs):
    plain = PairDataset(pairs)[1]
    aug = PairDataset(pairs, augment=True, seed=3)[1]
    assert not torch.allclose(aug['xyz'], plain['xyz'])
    for key in ('corr_point', 'corr_camera', 'corr_uv', 'labels', 'visible_any', 'images'):
        assert torch.equal(aug[key], plain[key]), key
    # rotation about z, flips and scaling keep the distance ratios; height feature follows z
    ratio = aug['xyz'].norm(dim=1) / plain['xyz'].norm(dim=1).clamp(min=1e-6)
    assert 0.94 < float(ratio.min()) and float(ratio.max()) < 1.06
    torch.testing.assert_close(aug['feats'][:, 1], aug['xyz'][:, 2])
    again = PairDataset(pairs, augment=True, seed=3)[1]
    assert torch.equal(again['xyz'], aug['xyz'])           # seeded: reproducible


def test_horizontal_scaling_packs_points_and_keeps_heights(pairs):
    from offline_training.datasets import default_point_augment
    plain = PairDataset(pairs)[1]
    aug = PairDataset(pairs, augment=default_point_augment((0.5, 0.6)), seed=3)[1]
    flat = aug['xyz'][:, :2].norm(dim=1) / plain['xyz'][:, :2].norm(dim=1).clamp(min=1e-6)
    assert 0.5 * 0.95 - 1e-4 < float(flat.min()) and float(flat.max()) < 0.6 * 1.05 + 1e-4
    off_zero = plain['xyz'][:, 2].abs() > 0.1
    height = aug['xyz'][off_zero, 2] / plain['xyz'][off_zero, 2]  # isotropic 0.95..1.05 only
    assert 0.95 - 1e-4 < float(height.min()) and float(height.max()) < 1.05 + 1e-4
    assert torch.equal(aug['corr_uv'], plain['corr_uv'])


def test_camera_subset_and_unknown_camera(pairs):
    s = PairDataset(pairs, cameras=['front_left'])[0]
    assert s['images'].shape[0] == 1 and int(s['corr_camera'].max()) == 0
    with pytest.raises(DatasetError, match='rear'):
        PairDataset(pairs, cameras=['rear'])[0]


def test_refresh_sees_pairs_written_later(tmp_path):
    root = write_sim_pairs(tmp_path / 'live', frames=1)
    ds = PairDataset(root)
    assert len(ds) == 1
    write_sim_pairs(root, frames=2, start=1)
    assert ds.refresh() == 2 and len(ds) == 3
    assert ds[2]['xyz'].shape[0] > 0
    with pytest.raises(IndexError):
        ds[3]


def test_sparse_collate_offsets(pairs):
    ds = PairDataset(pairs, cameras=['front'])
    samples = [ds[0], PairDataset(pairs)[1]]             # 1 camera, then 2 cameras
    batch = SparseCollate(0.2)(samples)
    n0, n1 = (s['xyz'].shape[0] for s in samples)
    v = batch['coords'].shape[0]
    assert batch['coords'].dtype == torch.int32 and batch['coords'].shape == (v, 4)
    assert batch['vfeats'].shape == (v, 2)
    assert batch['inverse'].shape == (n0 + n1,) and int(batch['inverse'].max()) == v - 1
    assert batch['point_batch'].tolist() == [0] * n0 + [1] * n1
    assert batch['images'].shape == (3, 3, 96, 160)
    assert batch['num_cameras'].tolist() == [1, 2]
    # each point's voxel has its batch index and contains the point
    vox = batch['coords'][batch['inverse']]
    assert torch.equal(vox[:, 0].long(), batch['point_batch'])
    assert torch.equal(vox[:, 1:], torch.floor(batch['xyz'] / 0.2).int())
    # correspondences index the concatenated points and images
    m0 = samples[0]['corr_point'].shape[0]
    assert torch.equal(batch['corr_point'][:m0], samples[0]['corr_point'])
    assert torch.equal(batch['corr_point'][m0:], samples[1]['corr_point'] + n0)
    assert torch.equal(batch['corr_image'][m0:], samples[1]['corr_camera'] + 1)
    uv = torch.round(batch['corr_uv']).long()
    pix = batch['label_images'][batch['corr_image'], uv[:, 1], uv[:, 0]]
    lab = batch['labels'][batch['corr_point']]
    keep = (lab != 255) & (pix != 255)
    assert float((pix[keep] == lab[keep]).float().mean()) > 0.85
    with pytest.raises(DatasetError):
        SparseCollate(0.0)


def test_sparse_collate_pads_different_image_sizes(pairs):
    a = PairDataset(pairs)[0]
    b = PairDataset(pairs, image_scale=0.5)[1]
    batch = SparseCollate(0.2)([a, b])
    assert batch['images'].shape == (4, 3, 96, 160)
    assert (batch['label_images'][2:, 48:, :] == 255).all()
    assert (batch['images'][2:, :, 48:, :] == 0).all()


def test_nuscenes_dataset_six_cameras_and_motion(tmp_path, data_dir):
    facts = build_nuscenes(tmp_path, data_dir, samples=1)
    ds = NuScenesDataset(str(tmp_path), 'v1.0-mini', occlusion=False, image_scale=0.25)
    s = ds[0]
    assert s['images'].shape == (6, 3, 225, 400)
    # data README: 20,206 of 34,688 points land in at least one camera
    assert abs(int(s['visible_any'].sum()) - 20206) < 100
    # motion compensated pixels equal the full nuScenes chain (global frame at each stamp)
    xyz = facts['xyz'].astype(np.float64)
    for c, channel in enumerate(ds.reader.cameras):
        sel = (s['corr_camera'] == c).numpy()
        K, T = facts['cameras'][channel]['K'], facts['cameras'][channel]['T_cam_lidar']
        p = xyz[s['corr_point'].numpy()[sel]] @ T[:3, :3].T + T[:3, 3]
        uv = p @ K.T
        uv = (uv[:, :2] / uv[:, 2:] + 0.5) * 0.25 - 0.5
        np.testing.assert_allclose(s['corr_uv'].numpy()[sel], uv, atol=0.02)
    static = NuScenesDataset(str(tmp_path), 'v1.0-mini', occlusion=False,
                             motion_compensation=False, cameras=['CAM_FRONT'])[0]
    moving = NuScenesDataset(str(tmp_path), 'v1.0-mini', occlusion=False,
                             cameras=['CAM_FRONT'])[0]
    common = np.intersect1d(static['corr_point'].numpy(), moving['corr_point'].numpy())
    shift = (moving['corr_uv'][np.searchsorted(moving['corr_point'].numpy(), common)]
             - static['corr_uv'][np.searchsorted(static['corr_point'].numpy(), common)])
    assert float(shift.norm(dim=1).median()) > 1.0        # about 0.33 m of ego motion
    assert (s['labels'] != 255).sum() > 30000


def test_semantickitti_dataset(tmp_path, data_dir):
    build_semantickitti(tmp_path, data_dir, scans=1)
    s = SemanticKITTIDataset(str(tmp_path), ['08'], occlusion=False)[0]
    assert s['images'].shape == (1, 3, 375, 1242) and 'label_images' not in s
    # the object-benchmark scan is cropped to the camera view: nearly all points project
    assert float(s['visible_any'].float().mean()) > 0.9
    occluded = SemanticKITTIDataset(str(tmp_path), ['08'])[0]
    assert occluded['visible_any'].sum() < s['visible_any'].sum()
    assert set(s['labels'].unique().tolist()) == {0, 8, 12, 255}


def _copy_with_stored(src: str, dst, edit=None) -> str:
    """The pairs of ``src`` written again with their correspondences stored (as the collect
    node stores them); ``edit(pair)`` may then change what is stored."""
    from cmkd_ros.pairs import PairReader, PairWriter
    from offline_training.datasets import store_correspondences
    writer = PairWriter(str(dst), fsync=False)
    for pair in PairReader(src):
        pair = store_correspondences(pair)
        if edit is not None:
            edit(pair)
        writer.write(pair)
    return str(dst)


def _assert_same_samples(a, b):
    assert set(a) == set(b)
    for key in a:
        if key != 'name':
            assert torch.equal(a[key], b[key]), key


def test_stored_correspondences_with_matching_settings_give_identical_samples(pairs, tmp_path):
    """The collect node's stored correspondences replace the computation when their settings
    hash matches; the samples are then identical (a camera subset computes them)."""
    stored = _copy_with_stored(pairs, tmp_path / 'stored')
    for kwargs in ({}, {'image_scale': 0.5}, {'cameras': ['front_left']}):
        used = PairDataset(stored, **kwargs)
        computed = PairDataset(stored, stored_correspondences=False, **kwargs)
        extras = used.get_frame(0).extras
        if 'cameras' in kwargs:
            assert 'correspondences' not in extras
        else:
            assert extras['correspondence_settings'] == used.correspondence_settings
        for i in range(len(used)):
            _assert_same_samples(used[i], computed[i])
            _assert_same_samples(used[i], PairDataset(pairs, **kwargs)[i])   # never stored


def test_stored_correspondences_are_read_and_a_mismatching_hash_recomputes(pairs, tmp_path):
    def halve(pair):                       # keep every other one: visibly not the computed set
        pair.correspondences = {k: v[::2] for k, v in pair.correspondences.items()}

    halved = _copy_with_stored(pairs, tmp_path / 'halved', halve)
    computed = PairDataset(pairs)[0]
    read = PairDataset(halved)[0]           # same settings: the stored arrays are used
    assert torch.equal(read['corr_point'], computed['corr_point'][::2])
    assert torch.equal(read['corr_uv'], computed['corr_uv'][::2])
    # other settings (no occlusion test) or another hash: computed again
    _assert_same_samples(PairDataset(halved, occlusion=False)[0],
                         PairDataset(pairs, occlusion=False)[0])

    def other_hash(pair):
        halve(pair)
        pair.correspondence_settings = '0123456789abcdef'

    _assert_same_samples(PairDataset(_copy_with_stored(pairs, tmp_path / 'other',
                                                       other_hash))[0], computed)

    def no_hash(pair):
        halve(pair)
        pair.correspondence_settings = None   # written by an older collect node

    _assert_same_samples(PairDataset(_copy_with_stored(pairs, tmp_path / 'old', no_hash))[0],
                         computed)


def test_stored_correspondences_not_fitting_the_pair_are_recomputed(pairs, tmp_path):
    from cmkd_ros.pairs import PairReader
    from offline_training.datasets import frame_from_pair, stored_correspondences
    pair = PairReader(_copy_with_stored(pairs, tmp_path / 'stored'))[0]
    n = len(pair.xyz)
    pair.correspondences['point'] = pair.correspondences['point'] + n   # past the last point
    with pytest.warns(UserWarning, match='do not fit the pair'):
        assert stored_correspondences(pair, 'p0') is None
    with pytest.warns(UserWarning, match='do not fit the pair'):
        assert 'correspondences' not in frame_from_pair(pair).extras


def test_stored_correspondences_of_a_pair_with_non_finite_points_are_recomputed(pairs, tmp_path):
    """Non-finite points are dropped before the correspondences, so stored point indices no
    longer fit: they are computed on the finite points."""
    def corrupt(pair):
        pair.correspondences = {k: v[::2] for k, v in pair.correspondences.items()}
        pair.xyz = pair.xyz.copy()
        pair.xyz[0] = np.nan

    stored = PairDataset(_copy_with_stored(pairs, tmp_path / 'nan', corrupt))
    computed = PairDataset(stored.root, stored_correspondences=False)
    assert 'correspondences' in stored.get_frame(0).extras
    _assert_same_samples(stored[0], computed[0])
    assert stored[0]['xyz'].shape[0] == len(stored.reader[0].xyz) - 1
