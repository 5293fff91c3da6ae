"""cmkd label-images: export a pair dataset's images, attach annotators' labels to a copy."""
import dataclasses
import os

import cv2
import numpy as np
import pytest

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.pairs import PairReader, PairWriter
from cmkd_ros.tools.cli import main as cmkd
from cmkd_ros.tools.label_images import LabelImageError, export_images, import_labels
from offline_training.datasets import PairDataset, SparseCollate
from offline_training.experiments import render_worlds

TINY_SIM = {'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0},
            'cameras': {'count': 2, 'width': 64, 'height': 48}}


@pytest.fixture(scope='module')
def drive(tmp_path_factory):
    """Three rendered pairs as the collect node writes them (no label images), and the
    ground-truth label images the renderer drew, as an annotator would return them."""
    root = tmp_path_factory.mktemp('drive')
    rendered = PairReader(render_worlds(str(root / 'rendered'), (1,), 3, 3, TINY_SIM))
    writer = PairWriter(str(root / 'pairs'), metadata={'robot': 'test'})
    truth = {}
    for entry, pair in zip(rendered.entries, rendered):
        truth[entry['id']] = {c: pair.label_image(c) for c in pair.camera_names}
        writer.write(dataclasses.replace(pair, label_images={}))
    return {'pairs': str(root / 'pairs'), 'truth': truth,
            'cameras': list(rendered[0].camera_names)}


def test_export_writes_the_stored_image_bytes(drive, tmp_path):
    files = export_images(drive['pairs'], str(tmp_path), every=2)
    reader = PairReader(drive['pairs'])
    assert files == [f'{i:06d}_{c}.png' for i in (0, 2) for c in drive['cameras']]
    for file in files:
        pair = reader[int(file[:6])]
        camera = file[7:-4]
        assert (tmp_path / file).read_bytes() == pair.images[camera]


def test_import_attaches_labels_to_a_copy_and_training_reads_them(drive, tmp_path):
    labels = tmp_path / 'labels'
    labels.mkdir()
    front = drive['cameras'][0]
    truth = drive['truth'][1][front]
    assert len(np.unique(truth)) > 2
    cv2.imwrite(str(labels / f'000001_{front}.png'), truth)
    out = str(tmp_path / 'labeled')
    counts = import_labels(drive['pairs'], str(labels), out)
    assert counts == {'pairs': 3, 'labeled_pairs': 1, 'label_images': 1}
    copy, source = PairReader(out), PairReader(drive['pairs'])
    assert len(copy) == 3 and all(not p.label_images for p in source)   # source unchanged
    np.testing.assert_array_equal(copy[1].label_image(front), truth)
    assert list(copy[1].label_images) == [front] and not copy[0].label_images
    for a, b in zip(copy, source):
        np.testing.assert_array_equal(a.xyz, b.xyz)
        assert a.images == b.images
    # Training reads them; the camera nobody labeled is unlabeled (255) everywhere.
    sample = PairDataset(out, label_images=True)[1]
    np.testing.assert_array_equal(sample['label_images'][0], truth)
    assert (np.asarray(sample['label_images'][1]) == 255).all()
    dataset = PairDataset(out, label_images=True)
    assert 'label_images' not in dataset[0]
    # A batch of a labeled and an unlabeled scan: the unlabeled one's pixels are all 255.
    batch = SparseCollate(0.2)([dataset[0], dataset[1]])
    assert batch['label_images'].shape == (4, 48, 64)
    assert (batch['label_images'][[0, 1, 3]] == 255).all()
    np.testing.assert_array_equal(batch['label_images'][2], truth)


@pytest.mark.parametrize('name,image,message', [
    ('000001_{cam}.png', np.zeros((10, 10), np.uint8), '10x10 pixels, the image is 64x48'),
    ('000001_{cam}.png', np.full((48, 64), SYNTHETIC.num_classes, np.uint8),
     'outside the class map'),
    ('000009_{cam}.png', np.zeros((48, 64), np.uint8), 'no pair 9'),
    ('000001_rear.png', np.zeros((48, 64), np.uint8), "no camera 'rear'"),
])
def test_a_label_that_does_not_fit_is_refused_before_writing(drive, tmp_path, name, image,
                                                             message):
    labels = tmp_path / 'labels'
    labels.mkdir()
    cv2.imwrite(str(labels / name.format(cam=drive['cameras'][0])), image)
    with pytest.raises(LabelImageError, match=message):
        import_labels(drive['pairs'], str(labels), str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_cli_round_trip_and_errors(drive, tmp_path, capsys):
    assert cmkd(['label-images', 'export', '--pairs', drive['pairs'], '--out',
                 str(tmp_path / 'img'), '--cameras', drive['cameras'][1]]) == 0
    assert len(os.listdir(tmp_path / 'img')) == 3
    assert cmkd(['label-images', 'import', '--pairs', drive['pairs'], '--labels',
                 str(tmp_path / 'img'), '--out', str(tmp_path / 'x')]) == 2
    assert 'need a one-channel 8-bit PNG' in capsys.readouterr().err   # images, not labels
    labels = tmp_path / 'labels'
    labels.mkdir()
    assert cmkd(['label-images', 'import', '--pairs', drive['pairs'], '--labels', str(labels),
                 '--out', str(tmp_path / 'x')]) == 2
    assert 'no label files named <id>_<camera>.png' in capsys.readouterr().err
    cv2.imwrite(str(labels / f'000000_{drive["cameras"][1]}.png'),
                drive['truth'][0][drive['cameras'][1]])
    assert cmkd(['label-images', 'import', '--pairs', drive['pairs'], '--labels', str(labels),
                 '--out', str(tmp_path / 'y')]) == 0
    assert f'pairs written to {tmp_path / "y"}: 3, 1 of them' in capsys.readouterr().out
    assert cmkd(['label-images', 'import', '--pairs', drive['pairs'], '--labels', str(labels),
                 '--out', str(tmp_path / 'z'), '--only-labeled']) == 0
    assert ': 1, 1 of them with label images (1)' in capsys.readouterr().out
    assert len(PairReader(str(tmp_path / 'z'))) == 1
    assert PairReader(str(tmp_path / 'z'))[0].lidar_stamp_ns == \
        PairReader(drive['pairs'])[0].lidar_stamp_ns
    assert cmkd(['label-images', 'import', '--pairs', drive['pairs'], '--labels', str(labels),
                 '--out', str(tmp_path / 'y')]) == 2
    assert 'already a pair dataset' in capsys.readouterr().err


def test_training_refuses_pairs_without_labels_and_warns_on_a_few(drive, tmp_path, caplog):
    from cmkd_ros.config import ConfigError
    from offline_training.trainer import check_label_images
    with pytest.raises(ConfigError, match='carry no label images'):
        check_label_images(PairDataset(drive['pairs']))
    labels = tmp_path / 'labels'
    labels.mkdir()
    front = drive['cameras'][0]
    cv2.imwrite(str(labels / f'000001_{front}.png'), drive['truth'][1][front])
    import_labels(drive['pairs'], str(labels), str(tmp_path / 'one'))
    reader = PairReader(str(tmp_path / 'one'))
    assert reader.label_image_cameras(1) == (sorted(drive['cameras']), [front])
    assert reader.label_image_cameras(0) == (sorted(drive['cameras']), [])
    with caplog.at_level('WARNING', logger='cmkd_ros.train'):
        assert check_label_images(PairDataset(str(tmp_path / 'one'))) == pytest.approx(1 / 3)
    assert 'only 33% of the training pairs carry label images' in caplog.text
    caplog.clear()
    for i in (0, 2):
        cv2.imwrite(str(labels / f'{i:06d}_{front}.png'), drive['truth'][i][front])
    import_labels(drive['pairs'], str(labels), str(tmp_path / 'all'))
    with caplog.at_level('WARNING', logger='cmkd_ros.train'):
        assert check_label_images(PairDataset(str(tmp_path / 'all'))) == 1.0
    assert not caplog.text
