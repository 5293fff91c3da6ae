"""nuScenes, SemanticKITTI and 2D image readers on tiny folders laid out like the real data."""
import json

import cv2
import numpy as np
import pytest

from fixtures.real_layouts import (KITTI_BUILDING, KITTI_MOVING_CAR, KITTI_ROAD,
                                   NUSCENES_GENERAL, build_nuscenes, build_semantickitti)
from cmkd_ros.classes import NUSCENES_LIDARSEG16, SEMANTICKITTI19
from offline_training.readers.base import ReaderError
from offline_training.readers.images import (CityscapesDataset, FolderImageDataset,
                                             PairImageDataset, make_lut)
from offline_training.readers.nuscenes import (CAMERAS, NuScenesLidarSegReader,
                                               NuScenesTables, matrix_to_quaternion,
                                               quaternion_to_matrix)
from offline_training.readers.semantickitti import SemanticKITTIReader, read_calib


@pytest.fixture(scope='module')
def nuscenes_root(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp('nuscenes')
    facts = build_nuscenes(root, data_dir, samples=2)
    return root, facts


@pytest.fixture(scope='module')
def kitti_root(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp('semantickitti')
    facts = build_semantickitti(root, data_dir, sequence='08', scans=2)
    return root, facts


def test_quaternion_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        R = quaternion_to_matrix(q)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(R)), R, atol=1e-9)
    # 90 degrees about z (w, x, y, z) maps x to y
    R = quaternion_to_matrix([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(R @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_nuscenes_tables_index_keyframes(nuscenes_root):
    root, facts = nuscenes_root
    tables = NuScenesTables(str(root), 'v1.0-mini')
    assert [s['token'] for s in tables.sample] == facts['samples']
    assert set(tables.sample[0]['data']) == {'LIDAR_TOP', *CAMERAS}
    with pytest.raises(ReaderError, match='not found'):
        tables.get('sample', 'nope')
    with pytest.raises(ReaderError, match='table folder not found'):
        NuScenesTables(str(root), 'v1.0-trainval')


def test_nuscenes_frame_points_labels_and_rig(nuscenes_root):
    root, facts = nuscenes_root
    reader = NuScenesLidarSegReader(str(root), 'v1.0-mini', scenes=['scene-0061'])
    assert len(reader) == 2
    frame = reader[0]
    np.testing.assert_array_equal(frame.xyz, facts['xyz'])
    assert [c.name for c in frame.rig.cameras] == list(CAMERAS)
    assert all(im.shape == (900, 1600, 3) for im in frame.images)
    # general -> challenge mapping, by category name
    general = facts['general_labels']
    names = np.array(NUSCENES_GENERAL)[general]
    expect = np.full(len(general), 255)
    expect[names == 'flat.driveable_surface'] = NUSCENES_LIDARSEG16.index('driveable_surface')
    expect[names == 'vehicle.car'] = NUSCENES_LIDARSEG16.index('car')
    expect[names == 'static.manmade'] = NUSCENES_LIDARSEG16.index('manmade')
    np.testing.assert_array_equal(frame.labels, expect)
    assert (frame.labels == 255).sum() == (general == 0).sum()
    # camera stamps differ from the LiDAR stamp; ego poses cover all of them
    assert np.all(frame.camera_stamp_ns < frame.lidar_stamp_ns)
    assert frame.ego_stamps_ns[0] <= frame.camera_stamp_ns.min()
    assert frame.ego_stamps_ns[-1] == frame.lidar_stamp_ns
    with pytest.raises(ReaderError, match='scene-9999'):
        NuScenesLidarSegReader(str(root), 'v1.0-mini', scenes=['scene-9999'])
    with pytest.raises(ReaderError, match='unknown nuScenes camera'):
        NuScenesLidarSegReader(str(root), 'v1.0-mini', cameras=['CAM_TOP'])


def test_nuscenes_missing_file_is_named(nuscenes_root, tmp_path):
    root, _ = nuscenes_root
    reader = NuScenesLidarSegReader(str(root), 'v1.0-mini', cameras=['CAM_FRONT'])
    sd = reader.tables.get('sample_data', reader.samples[1]['data']['CAM_FRONT'])
    sd_copy = dict(sd)
    sd['filename'] = 'samples/CAM_FRONT/missing.jpg'
    try:
        with pytest.raises(ReaderError, match='missing.jpg'):
            reader[1]
    finally:
        sd.update(sd_copy)


def test_semantickitti_calib_labels_and_camera(kitti_root):
    root, facts = kitti_root
    calib = read_calib(str(root / 'sequences' / '08' / 'calib.txt'))
    assert set(calib) == {'P0', 'P1', 'P2', 'P3', 'Tr'}
    reader = SemanticKITTIReader(str(root), 'val')          # the val split is sequence 08
    assert len(reader) == 2
    frame = reader[1]
    cam = frame.rig.cameras[0]
    assert (cam.width, cam.height) == (facts['width'], facts['height'])
    # the rig reproduces pixel = P2 @ Tr @ x (independent of the reader's decomposition)
    xyz = facts['xyz'][:500].astype(np.float64)
    h = np.c_[xyz, np.ones(len(xyz))] @ (facts['P2'] @ facts['T_cam_lidar']).T
    p = np.c_[xyz, np.ones(len(xyz))] @ cam.T_cam_lidar.T
    uv_rig = (p[:, :3] @ cam.K.T)
    np.testing.assert_allclose(uv_rig[:, :2] / uv_rig[:, 2:], h[:, :2] / h[:, 2:3], atol=1e-6)
    # raw ids (instance bits set) -> 19 classes
    sem = facts['raw_labels'] & 0xFFFF
    expect = np.full(len(sem), 255)
    expect[sem == KITTI_ROAD] = SEMANTICKITTI19.index('road')
    expect[sem == KITTI_BUILDING] = SEMANTICKITTI19.index('building')
    expect[sem == KITTI_MOVING_CAR] = SEMANTICKITTI19.index('car')
    np.testing.assert_array_equal(frame.labels, expect)


def test_semantickitti_bad_layouts(kitti_root, tmp_path):
    root, _ = kitti_root
    with pytest.raises(ReaderError, match='none of the sequences'):
        SemanticKITTIReader(str(root), ['00'])
    with pytest.raises(ReaderError, match='unknown split'):
        SemanticKITTIReader(str(root), 'training')
    bad = tmp_path / 'sequences' / '00'
    (bad / 'velodyne').mkdir(parents=True)
    (bad / 'calib.txt').write_text('P2: 1 0 0\n')
    with pytest.raises(ReaderError, match='P2 has 3 values'):
        SemanticKITTIReader(str(tmp_path), ['00'])


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)


def test_cityscapes_layout_train_ids_and_label_ids(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)
    ids = np.array([[7, 26, 0, 33]] * 2, dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    _png(tmp_path / 'leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png', image)
    _png(tmp_path / 'gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png', ids)
    _png(tmp_path / 'leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png', image)
    train_ids = np.full((8, 16), 255, np.uint8)
    train_ids[:, :4] = 0
    _png(tmp_path / 'gtFine/val/bonn/bonn_000001_000019_gtFine_labelTrainIds.png', train_ids)
    ds = CityscapesDataset(str(tmp_path), 'val')
    assert len(ds) == 2
    a = ds[0]
    # label ids 7 road -> 0, 26 car -> 13, 0 unlabeled -> 255, 33 bicycle -> 18
    assert a['label'][0].tolist() == [0] * 4 + [13] * 4 + [255] * 4 + [18] * 4
    np.testing.assert_array_equal(a['image'], image[:, :, ::-1])   # stored BGR, returned RGB
    np.testing.assert_array_equal(ds[1]['label'], train_ids)
    with pytest.raises(ReaderError, match='Cityscapes folder not found'):
        CityscapesDataset(str(tmp_path), 'train')


def test_folder_layout_matches_stems_and_remaps(tmp_path):
    image = np.zeros((4, 6, 3), np.uint8)
    _png(tmp_path / 'images/cam/a.png', image)
    cv2.imwrite(str(tmp_path / 'images/cam/b.jpg'), image)
    _png(tmp_path / 'masks/cam/a.png', np.full((4, 6), 3, np.uint8))
    _png(tmp_path / 'masks/cam/b.png', np.full((4, 6), 9, np.uint8))
    ds = FolderImageDataset(str(tmp_path / 'images'), str(tmp_path / 'masks'),
                            label_lut=make_lut({3: 1}))
    assert [ds[i]['label'][0, 0] for i in range(2)] == [1, 255]
    _png(tmp_path / 'images/cam/c.png', image)
    with pytest.raises(ReaderError, match='without a mask'):
        FolderImageDataset(str(tmp_path / 'images'), str(tmp_path / 'masks'))


def test_pair_images_from_synthetic_pairs(tmp_path):
    from fixtures.synthetic import write_sim_pairs
    write_sim_pairs(tmp_path / 'pairs', frames=1)
    ds = PairImageDataset(str(tmp_path / 'pairs'))
    assert len(ds) == 2                          # one frame, two cameras
    item = ds[1]
    assert item['image'].shape == (96, 160, 3) and item['label'].shape == (96, 160)
    assert set(np.unique(item['label'])) <= set(range(12)) | {255}
    write_sim_pairs(tmp_path / 'pairs', frames=1, start=1)
    assert ds.refresh() == 2 and len(ds) == 4
    meta = json.loads((tmp_path / 'pairs' / 'index.jsonl').read_text().splitlines()[0])
    assert meta['cameras'] == ['front', 'front_left']


# ---------------------------------------------------------------------------------------------
# Official splits, version folders, both KITTI color cameras


def test_nuscenes_official_splits_are_the_devkit_lists():
    from offline_training.readers.nuscenes_splits import SPLITS, resolve_scenes
    sizes = {name: len(scenes) for name, scenes in SPLITS.items()}
    assert sizes == {'train': 700, 'val': 150, 'test': 150, 'mini_train': 8, 'mini_val': 2}
    train, val, test = (set(SPLITS[n]) for n in ('train', 'val', 'test'))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 1000                  # every scene of v1.0 once
    assert set(SPLITS['mini_val']) <= val and set(SPLITS['mini_train']) <= train | val
    assert SPLITS['mini_train'][0] == 'scene-0061' and SPLITS['val'][:2] == ('scene-0003',
                                                                             'scene-0012')
    assert resolve_scenes('v1.0-mini', (), 'val') == ('mini_val', ('scene-0103', 'scene-0916'))
    assert resolve_scenes('v1.0-trainval', [], 'train')[0] == 'train'
    assert resolve_scenes('v1.0-trainval', ['scene-0001'], 'train') == ('custom',
                                                                         ('scene-0001',))
    with pytest.raises(ReaderError, match='belongs to v1.0-trainval'):
        resolve_scenes('v1.0-mini', ['train'])
    with pytest.raises(ReaderError, match='no val split'):
        resolve_scenes('v1.0-test', (), 'val')


def test_nuscenes_version_folder_is_found_or_listed(tmp_path, data_dir):
    from offline_training.readers.nuscenes import find_version
    build_nuscenes(tmp_path, data_dir, samples=1, scenes=('scene-0061', 'scene-0103'))
    assert find_version(str(tmp_path)) == 'v1.0-mini'
    # a v1.0-mini root reads without naming the version (it used to look for v1.0-trainval)
    reader = NuScenesLidarSegReader(str(tmp_path))
    assert reader.version == 'v1.0-mini' and len(reader) == 2
    with pytest.raises(ReaderError, match=r'table folder not found.*v1.0-mini'):
        NuScenesTables(str(tmp_path), 'v1.0-trainval')
    (tmp_path / 'v1.0-trainval').mkdir()
    (tmp_path / 'v1.0-trainval' / 'scene.json').write_text('[]')
    with pytest.raises(ReaderError, match=r"several nuScenes versions \['v1.0-mini', "
                                          r"'v1.0-trainval'\]"):
        find_version(str(tmp_path))
    with pytest.raises(ReaderError, match='no nuScenes version folder'):
        find_version(str(tmp_path / 'samples'))


def test_nuscenes_splits_pick_scenes_and_skip_sweeps(tmp_path, data_dir, caplog):
    facts = build_nuscenes(tmp_path, data_dir, samples=2, scenes=('scene-0061', 'scene-0103'),
                           sweeps=2, points=2000)
    tables = NuScenesTables(str(tmp_path))
    assert len(tables.sample_data) == 4 * 7               # sweeps are not kept
    train = NuScenesLidarSegReader(str(tmp_path), split=(), part='train', tables=tables)
    val = NuScenesLidarSegReader(str(tmp_path), split=(), part='val', tables=tables)
    assert (train.split_name, train.scenes) == ('mini_train', ['scene-0061'])
    assert (val.split_name, val.scenes) == ('mini_val', ['scene-0103'])
    assert [facts['scene_of_sample'][s['token']] for s in val.samples] == ['scene-0103'] * 2
    assert all(len(val[i].xyz) == 2000 for i in range(len(val)))   # keyframes, not sweeps
    with pytest.raises(ReaderError, match="scene-0916"):
        NuScenesLidarSegReader(str(tmp_path), split=['scene-0103', 'scene-0916'])
    # a partial download: keyframes whose LiDAR file is missing are left out, with a warning
    first = tables.get('sample_data', val.samples[0]['data']['LIDAR_TOP'])['filename']
    (tmp_path / first).unlink()
    with caplog.at_level('WARNING', logger='cmkd_ros.readers'):
        partial = NuScenesLidarSegReader(str(tmp_path), split='mini_val', tables=tables)
    assert len(partial) == 1 and '1 of 2 keyframes left out' in caplog.text


def test_semantickitti_both_color_cameras(tmp_path, data_dir):
    from offline_training.readers.semantickitti import resolve_sequences
    facts = build_semantickitti(tmp_path, data_dir, sequence='08', scans=2, image_3=True,
                                points=3000)
    build_semantickitti(tmp_path, data_dir, sequence='00', scans=1, points=3000)  # image_2 only
    frame = SemanticKITTIReader(str(tmp_path), 'val')[0]
    assert [c.name for c in frame.rig.cameras] == ['image_2', 'image_3']
    # each camera reproduces pixel = Pk @ Tr @ x
    xyz = facts['xyz'][:300].astype(np.float64)
    h = np.c_[xyz, np.ones(len(xyz))]
    for cam, P in zip(frame.rig.cameras, (facts['P2'][:3], facts['P3'])):
        want = h @ (P @ facts['T_cam_lidar']).T
        got = (h @ cam.T_cam_lidar.T)[:, :3] @ cam.K.T
        np.testing.assert_allclose(got[:, :2] / got[:, 2:], want[:, :2] / want[:, 2:3],
                                   atol=1e-6)
    train = SemanticKITTIReader(str(tmp_path), ())             # the official training split
    assert train.split_name == 'train' and train.sequences == ('00',)
    assert [c.name for c in train[0].rig.cameras] == ['image_2']
    only_left = SemanticKITTIReader(str(tmp_path), ['8'], cameras=['image_2'])
    assert only_left.split_name == 'custom' and len(only_left[0].images) == 1
    assert resolve_sequences((), 'val') == ('val', ('08',))
    with pytest.raises(ReaderError, match='unknown SemanticKITTI camera'):
        SemanticKITTIReader(str(tmp_path), 'val', cameras=['image_0'])
