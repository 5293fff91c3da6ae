"""``cmkd overlay`` on the real samples and on a synthetic pair dataset."""
import argparse

import cv2
import numpy as np
import pytest

from cmkd_ros import overlay
from cmkd_ros.cli import main as cli_main
from cmkd_ros.projection import CorrespondenceConfig, compute_correspondences


def run_overlay(argv):
    parser = argparse.ArgumentParser()
    overlay.add_arguments(parser)
    return overlay.run(parser.parse_args(argv))


def test_nuscenes_overlay_pngs(data_dir, tmp_path, capsys):
    folder = data_dir / 'nuscenes_sample'
    out = tmp_path / 'ov'
    assert cli_main(['overlay', str(folder), '--out', str(out), '--radius', '0']) == 0
    frame = overlay.load_sample_folder(str(folder))
    corr = compute_correspondences(frame.xyz, frame.rig, config=CorrespondenceConfig())
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
    assert run_overlay([str(data_dir / 'kitti_000008'), '--out', str(out), '--show-hidden',
                        '--color', 'intensity']) == 0
    png = cv2.imread(str(out / 'kitti_CAM2.png'))
    assert png.shape == (375, 1242, 3)
    frame = overlay.load_sample_folder(str(data_dir / 'kitti_000008'))
    with_hidden = overlay.render_overlays(frame, CorrespondenceConfig(), color='intensity',
                                          show_hidden=True)[0][1]
    without = overlay.render_overlays(frame, CorrespondenceConfig(), color='intensity')[0][1]
    np.testing.assert_array_equal(png[:, :, ::-1], with_hidden)
    white = np.all(with_hidden == 255, axis=2) & ~np.all(without == 255, axis=2)
    assert white.sum() > 0                       # some points are hidden and shown in white


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
    assert 'not a pair dataset' in capsys.readouterr().err
    assert run_overlay([str(data_dir / 'kitti_000008'), '--out', str(tmp_path),
                        '--set', 'occlusion_radius=3']) == 2
    assert 'unknown setting' in capsys.readouterr().err
