"""Student evaluation: evaluate_student figures by hand, and ``cmkd evaluate`` end to end."""
import json

import numpy as np
import pytest
import torch

from fixtures.synthetic import write_sim_pairs
from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.tools.cli import main as cmkd_main
from cmkd_ros.metrics import mean_iou
from cmkd_ros.models.checkpoint import save_checkpoint
from cmkd_ros.models.student import StudentConfig, build_student
from offline_training.datasets import PairDataset
from offline_training.evaluate import evaluate_label_transfer, evaluate_student

TINY_STUDENT = {'arch': 'small', 'widths': (8, 8, 8, 8, 8, 8, 8, 8, 8), 'feature_dim': 8,
                'num_classes': 12, 'voxel_size': 0.25, 'da_layers': 1, 'backend': 'torch'}


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
    return write_sim_pairs(tmp_path_factory.mktemp('eval_pairs'), frames=2, seed=5)


def constant_student(label: int):
    """A real student whose classifier always outputs ``label`` (zero weights, one-hot bias)."""
    student = build_student(StudentConfig(**TINY_STUDENT))
    bias = torch.full((12,), -10.0)
    bias[label] = 10.0
    student.load_classifier(torch.zeros(12, 8), bias)
    return student.eval()


def test_constant_prediction_gives_hand_computed_figures(pairs):
    dataset = PairDataset(pairs)
    road = SYNTHETIC.index('road')
    result = evaluate_student(constant_student(road), dataset, class_names=SYNTHETIC.names)
    labels = torch.cat([dataset[i]['labels'] for i in range(len(dataset))]).numpy()
    seen = torch.cat([dataset[i]['visible_any'] for i in range(len(dataset))]).numpy()
    for group, mask in (('all', np.ones_like(seen)), ('seen', seen), ('unseen', ~seen)):
        gt = labels[mask & (labels != 255)]
        present = np.unique(gt)
        # predicting road everywhere: IoU(road) = #road / #points, every other present class 0
        iou_road = (gt == road).sum() / len(gt)
        assert result[group]['count'] == len(gt)
        assert result[group]['iou']['road'] == pytest.approx(iou_road)
        classes = set(present.tolist()) | {road}          # road is predicted, so it counts
        assert result[group]['miou'] == pytest.approx(iou_road / len(classes))
        assert result[group]['accuracy'] == pytest.approx(iou_road)
        absent = [n for i, n in enumerate(SYNTHETIC.names) if i not in present and i != road]
        assert all(result[group]['iou'][n] is None for n in absent)
    assert result['all']['count'] == result['seen']['count'] + result['unseen']['count']
    assert 0 < result['unseen_fraction'] < 1
    assert result['num_scans'] == 2 and result['num_points'] == len(labels)


def test_label_transfer_scores_the_seen_points_with_the_teacher_labels(pairs):
    """A teacher that says 'car' at every pixel labels every seen point 'car': the same figures
    as a student predicting 'car', on the seen points only."""
    from cmkd_ros.models.teacher import build_teacher
    teacher = build_teacher({'arch': 'small', 'width': 8, 'feature_dim': 8, 'num_classes': 12})
    car = SYNTHETIC.index('car')
    with torch.no_grad():
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.fill_(-10.0)
        teacher.classifier.bias[car] = 10.0
    dataset = PairDataset(pairs)
    transfer = evaluate_label_transfer(teacher.eval(), dataset, class_names=SYNTHETIC.names)
    student = evaluate_student(constant_student(car), dataset, class_names=SYNTHETIC.names)
    assert transfer['num_scans'] == 2
    assert transfer['seen']['count'] == student['seen']['count'] > 0
    assert transfer['seen']['miou'] == pytest.approx(student['seen']['miou'])
    assert transfer['seen']['iou'] == pytest.approx(student['seen']['iou'])
    with pytest.raises(ValueError, match='classes'):
        evaluate_label_transfer(teacher, dataset, class_names=SYNTHETIC.names[:5])


def test_label_images_carried_give_the_correspondences_ceiling(pairs, tmp_path):
    """teacher=None carries the label images: on the synthetic renders nearly every seen point
    gets its own class; label images that say 'car' everywhere give the figures of a student
    predicting 'car'; a data set without label images is refused."""
    dataset = PairDataset(pairs)
    ceiling = evaluate_label_transfer(None, dataset, class_names=SYNTHETIC.names)
    seen = sum(int(dataset[i]['visible_any'].sum()) for i in range(len(dataset)))
    assert ceiling['seen']['count'] + ceiling['unlabeled_pixels'] == seen
    assert ceiling['seen']['accuracy'] > 0.9 and ceiling['seen']['miou'] > 0.7

    car = SYNTHETIC.index('car')

    class AllCar(PairDataset):
        def get_data(self, i):
            data = super().get_data(i)
            data['label_images'] = [np.full_like(im, car) for im in data['label_images']]
            return data

    transfer = evaluate_label_transfer(None, AllCar(pairs), class_names=SYNTHETIC.names)
    student = evaluate_student(constant_student(car), dataset, class_names=SYNTHETIC.names)
    assert transfer['unlabeled_pixels'] == 0
    assert transfer['seen']['count'] == student['seen']['count']
    assert transfer['seen']['iou'] == pytest.approx(student['seen']['iou'])
    with pytest.raises(ValueError, match='no label images'):
        evaluate_label_transfer(None, PairDataset(pairs, label_images=False),
                                class_names=SYNTHETIC.names)


@pytest.mark.slow
def test_cli_end_to_end(pairs, tmp_path, capsys):
    student = build_student(StudentConfig(**TINY_STUDENT))
    ckpt = tmp_path / 'student.pt'
    save_checkpoint(ckpt, student, class_names=SYNTHETIC.names,
                    class_colors=[list(c) for c in SYNTHETIC.colors])
    out = tmp_path / 'report'
    assert cmkd_main(['evaluate', '--checkpoint', str(ckpt), '--data', pairs,
                      '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'mIoU' in printed and 'unseen by any camera' in printed
    result = json.loads((out / 'eval.json').read_text())
    for group in ('all', 'seen', 'unseen'):
        matrix = np.array(result['confusion'][group])
        assert matrix.shape == (12, 12) and matrix.sum() == result[group]['count']
        assert result[group]['miou'] == pytest.approx(mean_iou(matrix))
    assert result['all']['count'] == result['seen']['count'] + result['unseen']['count']
    for name in ('confusion_all.png', 'confusion_unseen.png', 'iou_per_class.png'):
        data = (out / name).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    # without the occlusion test more points count as seen
    assert cmkd_main(['evaluate', '--checkpoint', str(ckpt), '--data', pairs,
                      '--no-occlusion', '--out', str(tmp_path / 'r2')]) == 0
    no_occ = json.loads((tmp_path / 'r2' / 'eval.json').read_text())
    assert no_occ['unseen']['count'] < result['unseen']['count']


def test_cli_reports_bad_inputs(pairs, tmp_path, capsys):
    assert cmkd_main(['evaluate', '--checkpoint', str(tmp_path / 'missing.pt'),
                      '--data', pairs]) == 1
    assert 'missing.pt' in capsys.readouterr().err
    student = build_student(StudentConfig(**{**TINY_STUDENT, 'num_classes': 3}))
    ckpt = tmp_path / 'three.pt'
    save_checkpoint(ckpt, student, class_names=['a', 'b', 'c'],
                    class_colors=[[0, 0, 0]] * 3)
    # the synthetic labels go up to 11: a 3-class student cannot be scored on them
    assert cmkd_main(['evaluate', '--checkpoint', str(ckpt), '--data', pairs]) == 1
    assert 'outside [0, 3)' in capsys.readouterr().err


def test_pictures_show_the_students_labels_in_bev_and_in_a_camera(pairs, tmp_path):
    """A constant 'road' student: the right half of the bird's-eye view is road-colored and the
    camera picture shows road-colored dots where the camera sees points, nowhere else."""
    import cv2

    from offline_training.evaluate import write_pictures
    road = SYNTHETIC.index('road')
    dataset = PairDataset(pairs)
    paths = write_pictures(constant_student(road), dataset, str(tmp_path), 1,
                           class_names=SYNTHETIC.names, class_colors=SYNTHETIC.colors)
    names = [p.rsplit('/', 1)[1] for p in paths]
    assert names[0] == 'scan0_bev.png' and names[1].startswith('scan0_') and len(names) == 2
    bev = cv2.cvtColor(cv2.imread(paths[0]), cv2.COLOR_BGR2RGB)
    right = bev[:, bev.shape[1] // 2:].reshape(-1, 3).astype(int)
    road_rgb = np.array(SYNTHETIC.colors[road])
    assert (np.abs(right - road_rgb).sum(1) < 30).sum() > 500       # the student panel is road
    data = dataset.get_data(0)
    cam = int(np.bincount(data['corr_camera']).argmax())
    picture = cv2.cvtColor(cv2.imread(paths[1]), cv2.COLOR_BGR2RGB)
    image = data['images'][cam]
    scale = picture.shape[1] // image.shape[1]               # small images are enlarged
    assert scale >= 1 and picture.shape == (image.shape[0] * scale, image.shape[1] * scale, 3)
    enlarged = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    changed = np.any(picture != enlarged, axis=2)
    assert np.all(picture[changed] == road_rgb)
    uv = np.rint((data['corr_uv'][data['corr_camera'] == cam] + 0.5) * scale - 0.5).astype(int)
    assert changed[uv[:, 1], uv[:, 0]].all()
