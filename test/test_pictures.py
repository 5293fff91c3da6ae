"""Pictures of the experiments: t-SNE / PCA maps and teacher-student agreement per class."""
import pytest
import torch

from fixtures.synthetic import write_sim_pairs
from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.models.student import StudentConfig, build_student
from cmkd_ros.models.teacher import build_teacher
from offline_training.datasets import IGNORE, PairDataset
from offline_training.pictures import (agreement_per_class, balanced_subset, embed_2d,
                                       nearest_neighbour_agreement, plot_agreement,
                                       plot_embeddings)

K = len(SYNTHETIC.names)


def clusters(n=40, dims=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, dims, generator=gen) * 6
    feats = torch.cat([c + torch.randn(n, dims, generator=gen) for c in centers])
    return feats, torch.arange(3).repeat_interleave(n)


@pytest.mark.parametrize('method', ['tsne', 'pca'])
def test_embeddings_keep_clusters_apart(method, tmp_path):
    feats, labels = clusters()
    emb = embed_2d(feats, method)
    assert emb.shape == (120, 2) and torch.isfinite(emb).all()
    assert nearest_neighbour_agreement(emb, labels) >= 0.95
    shuffled = labels[torch.randperm(120, generator=torch.Generator().manual_seed(1))]
    assert nearest_neighbour_agreement(emb, shuffled) < 0.6  # the score is not always high
    assert torch.equal(emb, embed_2d(feats, method))          # deterministic
    path = tmp_path / 'map.png'
    plot_embeddings([('a', emb, labels), ('b', emb, shuffled)], SYNTHETIC.names,
                    SYNTHETIC.colors, str(path))
    assert path.stat().st_size > 1000


def test_tsne_separates_classes_that_pca_mixes():
    """Eight classes in 48 dimensions, each close to the others along any two directions: the
    two leading principal components mix them, t-SNE keeps the neighbourhoods."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(20)
    feats = (torch.randn(8, 48, generator=gen) * 0.6)[labels] + torch.randn(160, 48,
                                                                             generator=gen)
    tsne = nearest_neighbour_agreement(embed_2d(feats, 'tsne'), labels)
    pca = nearest_neighbour_agreement(embed_2d(feats, 'pca'), labels)
    assert tsne > 0.8 and pca < 0.6


def test_balanced_subset_caps_every_class():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 20)
    pick = balanced_subset(labels, 10)
    assert torch.bincount(labels[pick]).tolist() == [10, 5, 10]


def constant(module, label):
    with torch.no_grad():
        module.classifier.weight.zero_()
        module.classifier.bias.fill_(-10.0)
        module.classifier.bias[label] = 10.0
    return module.eval()


def test_agreement_counts_points_where_student_and_teacher_agree(tmp_path):
    root = write_sim_pairs(tmp_path / 'pairs', frames=1, seed=6,
                           sim={'cameras': {'count': 2, 'width': 64, 'height': 48},
                                'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0}})
    car, road = SYNTHETIC.index('car'), SYNTHETIC.index('road')
    teacher = constant(build_teacher({'arch': 'small', 'width': 8, 'feature_dim': 8,
                                      'num_classes': K}), car)
    config = StudentConfig(arch='small', widths=(8,) * 9, feature_dim=8, num_classes=K,
                           voxel_size=0.5, da_layers=1, backend='torch')
    students = {'car': constant(build_student(config), car),
                'road': constant(build_student(config), road)}
    dataset = PairDataset(root, label_images=False)
    result = agreement_per_class(teacher, students, dataset, class_names=SYNTHETIC.names)
    sample = dataset[0]
    gt = sample['labels'][sample['visible_any'] & (sample['labels'] != IGNORE)]
    counts = torch.bincount(gt, minlength=K).tolist()
    assert list(result['points'].values()) == counts and sum(counts) > 0
    # the teacher says car everywhere: wrong on every seen point that is not a car
    wrong = [0 if c == car else n for c, n in enumerate(counts)]
    assert list(result['teacher_wrong'].values()) == wrong
    for c, name in enumerate(SYNTHETIC.names):
        expected = (1.0, 0.0) if counts[c] else (None, None)
        assert (result['agreement']['car'][name], result['agreement']['road'][name]) == expected
        expected = (1.0, 0.0) if wrong[c] else (None, None)  # the car student copies them all
        assert (result['copied']['car'][name], result['copied']['road'][name]) == expected
    path = tmp_path / 'agreement.png'
    plot_agreement(result, str(path))
    assert path.stat().st_size > 1000
