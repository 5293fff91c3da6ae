"""``cmkd overlay`` on the real samples, a synthetic pair dataset, bags and cloud files."""
import argparse
import json

import cv2
import numpy as np
import pytest

from cmkd_ros.tools import overlay
from cmkd_ros.tools.cli import main as cli_main
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences


def run_overlay(argv):
    parser = argparse.ArgumentParser()
    overlay.add_arguments(parser)
    return overlay.run(parser.parse_args(argv))


@pytest.mark.slow
def test_nuscenes_overlay_pngs(data_dir, tmp_path, capsys):
    folder = data_dir / 'nuscenes_sample'
    out = tmp_path / 'ov'
    assert cli_main(['overlay', str(folder), '--out', str(out), '--radius', '0']) == 0
    frame = overlay.load_sample_folder(str(folder))
    corr = compute_correspondences(frame.xyz, frame.rig, ring=frame.ring,
                                   config=CorrespondenceConfig())
    printed = capsys.readouterr().out
    for c, name in enumerate(frame.rig.names):
        png = cv2.imread(str(out / f'nuscenes_{name}.png'))[:, :, ::-1]
        original = frame.images[c]
        assert png.shape == original.shape == (900, 1600, 3)
        sel = corr.for_camera(c)
        assert f'nuscenes_{name}.png: {len(sel)} points' in printed
        # radius 0: exactly the projected pixels changed (a few may keep their color by chance)
        changed = np.any(png != original, axis=2)
        px = np.rint(sel.uv).astype(int)
        drawn = np.zeros_like(changed)
        drawn[px[:, 1], px[:, 0]] = True
        assert not (changed & ~drawn).any()
        assert changed[drawn].mean() > 0.97
        # the nearest point of a pixel gives its color: near = red end of the scale
        nearest = np.argmin(sel.depth)
        u, v = px[nearest]
        r, g, b = png[v, u].astype(int)
        assert r > b


def test_kitti_overlay_and_hidden_points(data_dir, tmp_path):
    out = tmp_path / 'kitti'
    report = tmp_path / 'kitti.json'
    assert run_overlay([str(data_dir / 'kitti_000008'), '--out', str(out), '--show-hidden',
                        '--color', 'intensity', '--json', str(report)]) == 0
    png = cv2.imread(str(out / 'kitti_CAM2.png'))
    assert png.shape == (375, 1242, 3)
    frame = overlay.load_sample_folder(str(data_dir / 'kitti_000008'))
    marked = overlay.render_overlays(frame, CorrespondenceConfig(), color='intensity',
                                     show_hidden=True)[0]
    plain = overlay.render_overlays(frame, CorrespondenceConfig(), color='intensity')[0]
    np.testing.assert_array_equal(png[:, :, ::-1], marked.image)
    # hidden points are marked in magenta at their pixels, and only with --show-hidden
    every = compute_correspondences(frame.xyz, frame.rig,
                                    config=CorrespondenceConfig(occlusion=False))
    kept = compute_correspondences(frame.xyz, frame.rig)
    gone = ~np.isin(every.point, kept.point)
    px = np.rint(every.uv[gone]).astype(int)
    magenta = np.all(marked.image == overlay.HIDDEN_COLOR, axis=2)
    assert magenta[px[:, 1], px[:, 0]].all() and not np.all(
        plain.image == overlay.HIDDEN_COLOR, axis=2).any()
    cam = json.loads(report.read_text())['frames'][0]['cameras']['CAM2']
    assert cam['in_image'] == len(every) and cam['hidden'] == gone.sum() == marked.hidden
    assert cam['visible'] == len(kept) and abs(cam['baseline_m'] - 0.29) < 0.01
    # the camera sits 0.3 m from the HDL-64E: few points are hidden (13 % with the old
    # 32-beam tuning)
    assert 0.02 < cam['hidden_fraction'] < 0.09


@pytest.fixture(scope='module')
def pair_dataset(tmp_path_factory):
    from cmkd_ros.pairs import PairWriter
    from cmkd_ros.sim import SimWorld
    world = SimWorld({'seed': 6, 'cameras': {'count': 2, 'width': 320, 'height': 180,
                                             'yaw_deg': [0.0, 180.0]}})
    frame = world.frame(2)
    root = tmp_path_factory.mktemp('pairs')
    writer = PairWriter(str(root), fsync=False)
    writer.write(frame.to_pair('png'))
    return root, frame


def test_pair_dataset_overlay_labels_land_on_their_class(pair_dataset, tmp_path):
    root, frame = pair_dataset
    out = tmp_path / 'ov'
    assert run_overlay([str(root), '--out', str(out), '--color', 'label', '--radius', '0']) == 0
    frames = overlay.load_pair_frames(str(root))
    assert frames[0].trajectory is not None            # ego poses -> motion compensation
    corr = compute_correspondences(
        frames[0].xyz, frames[0].rig, point_time_ns=frames[0].point_time_ns,
        camera_stamp_ns=frames[0].camera_stamp_ns, trajectory=frames[0].trajectory)
    for c, name in enumerate(frame.camera_names):
        png = cv2.imread(str(out / f'pair000000_{name}.png'))[:, :, ::-1]
        sel = corr.for_camera(c)
        px = np.rint(sel.uv).astype(int)
        # drawn colors are the class colors of the point labels (nearest point per pixel)
        order = np.argsort(-sel.depth, kind='stable')
        last = {}
        for i in order:
            last[(px[i, 1], px[i, 0])] = i
        idx = np.array(list(last.values()))
        expected = frame.class_map.colorize(frame.labels[sel.point[idx]])
        np.testing.assert_array_equal(png[px[idx, 1], px[idx, 0]], expected)
        # alignment: the rendered label image agrees with the point labels at their pixels
        agree = frame.label_images[c][px[:, 1], px[:, 0]] == frame.labels[sel.point]
        assert agree.mean() > 0.9, (name, agree.mean())


def test_overlay_errors(data_dir, tmp_path, capsys):
    assert run_overlay([str(data_dir / 'nuscenes_sample'), '--out', str(tmp_path),
                        '--color', 'label']) == 2
    assert 'needs per-point labels' in capsys.readouterr().err
    assert run_overlay([str(tmp_path), '--out', str(tmp_path / 'o')]) == 2
    assert 'not a rosbag2' in capsys.readouterr().err
    assert run_overlay([str(data_dir / 'kitti_000008'), '--out', str(tmp_path),
                        '--set', 'occlusion_radius=3']) == 2
    assert 'unknown setting' in capsys.readouterr().err


@pytest.fixture(scope='module')
def sim_bags(tmp_path_factory):
    from cmkd_ros.sim import SimWorld
    from cmkd_ros.sim.export import export_bag
    world = SimWorld({'seed': 6, 'cameras': {'count': 2, 'width': 320, 'height': 180,
                                             'yaw_deg': [0.0, 180.0]}})
    root = tmp_path_factory.mktemp('bags')
    export_bag(world, str(root / 'mcap'), 2, 'mcap', 'raw')
    export_bag(world, str(root / 'sqlite'), 2, 'sqlite3', 'compressed')
    return root, world


@pytest.mark.slow
def test_bag_overlay_lands_points_where_the_renderer_sees_them(sim_bags, tmp_path):
    root, world = sim_bags
    report = tmp_path / 'mcap.json'
    assert run_overlay([str(root / 'mcap'), '--out', str(tmp_path / 'a'), '--index', '1',
                        '--json', str(report), '--show-hidden']) == 0
    truth = world.frame(1)
    frame = overlay.load_bag_frames(str(root / 'mcap'), overlay.BagOptions(), [1])[0]
    assert frame.trajectory is not None and frame.ring is not None      # /odom, ring field
    np.testing.assert_array_equal(frame.camera_stamp_ns, truth.camera_stamp_ns)
    corr, every = overlay.frame_correspondences(frame, CorrespondenceConfig())
    # motion compensation from the bag's odometry and per-point times: pixels match the truth
    err = np.linalg.norm(corr.uv - truth.gt_uv[corr.camera, corr.point], axis=1)
    assert len(corr) > 3000 and np.median(err) < 0.05 and np.percentile(err, 99) < 0.5
    assert truth.gt_visible[corr.camera, corr.point].mean() > 0.97
    cams = json.loads(report.read_text())['frames'][0]['cameras']
    for c, name in enumerate(truth.camera_names):
        assert cams[name]['visible'] == len(corr.for_camera(c))
        assert cams[name]['in_image'] == len(every.for_camera(c))
        assert (tmp_path / 'a' / f'sweep000001_{name}.png').exists()
    # sqlite3 with JPEG images and the intrinsics from CameraInfo: the same points
    report2 = tmp_path / 'sqlite.json'
    assert run_overlay([str(root / 'sqlite'), '--out', str(tmp_path / 'b'), '--index', '1',
                        '--json', str(report2), '--camera-info-topic',
                        '/cameras/{camera}/camera_info']) == 0
    assert json.loads(report2.read_text())['frames'][0]['cameras'] == cams


def test_cloud_file_overlay_matches_the_sample_folder(data_dir, tmp_path):
    from pypcd4 import Encoding, PointCloud
    folder = data_dir / 'nuscenes_sample'
    sample = overlay.load_sample_folder(str(folder))
    sample.rig.save(str(tmp_path / 'rig.yaml'))
    raw = np.fromfile(folder / 'LIDAR_TOP.bin', np.float32).reshape(-1, 5)
    PointCloud.from_points([raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3],
                            raw[:, 4].astype(np.uint16)],
                           ('x', 'y', 'z', 'intensity', 'ring'),
                           (np.float32,) * 4 + (np.uint16,)).save(
        tmp_path / 'scan.pcd', encoding=Encoding.BINARY_COMPRESSED)
    images = ['--image', f'CAM_FRONT={folder / "CAM_FRONT.jpg"}',
              '--image', f'CAM_BACK={folder / "CAM_BACK.jpg"}']
    reports = {}
    for cloud in ('scan.pcd', str(folder / 'LIDAR_TOP.bin')):
        out = tmp_path / f'out_{len(reports)}'
        assert run_overlay(['--cloud', str(tmp_path / cloud), *images, '--calibration',
                            str(tmp_path / 'rig.yaml'), '--out', str(out), '--json',
                            str(out / 'r.json')]) == 0
        reports[cloud] = json.loads((out / 'r.json').read_text())['frames'][0]
    pcd, binary = reports.values()
    assert pcd['cameras'] == binary['cameras'] and pcd['scan_pattern'] == binary['scan_pattern']
    assert pcd['scan_pattern']['source'] == 'ring field' and pcd['scan_pattern']['beams'] == 32
    corr = compute_correspondences(sample.xyz, sample.rig, ring=sample.ring)
    for name in ('CAM_FRONT', 'CAM_BACK'):
        assert pcd['cameras'][name]['visible'] == len(corr.for_camera(name))


@pytest.mark.slow
def test_raw_input_errors(data_dir, sim_bags, tmp_path, capsys):
    root, _ = sim_bags
    folder = data_dir / 'kitti_000008'
    cases = [
        (['--cloud', str(folder / 'velodyne.bin'), '--image', f'CAM2={folder / "image_2.png"}'],
         '--calibration FILE'),
        (['--cloud', str(folder / 'velodyne.bin'), '--image', 'CAM2'], 'NAME=FILE'),
        (['--cloud', str(folder / 'nope.pcd'), '--image', 'a=b'], 'no such file'),
        ([str(root / 'mcap'), '--cloud-topic', '/velodyne_points'], '/velodyne_points'),
        ([str(root / 'mcap'), '--image-topic', '/{camera}/image'], "camera 'cam0'"),
        ([str(root / 'mcap'), '--index', '7'], 'out of range'),
        ([str(root / 'mcap'), '--calibration', str(tmp_path / 'none.yaml')], 'not found'),
    ]
    for argv, message in cases:
        assert run_overlay([*argv, '--out', str(tmp_path / 'o')]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, (argv, err)
