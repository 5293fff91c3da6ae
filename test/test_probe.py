"""Linear probe on frozen features: the fit, the wiring from voxels to points, the scoring."""
import types

import pytest
import torch

from fixtures.synthetic import write_sim_pairs
from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.models.student import StudentConfig, build_student
from offline_training.datasets import IGNORE, PairDataset
from offline_training.probe import (ProbedStudent, fit_linear_probe, linear_probe,
                                    point_features_of)

K = len(SYNTHETIC.names)


@pytest.fixture(scope='module')
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp('probe')
    sim = {'cameras': {'count': 2, 'width': 64, 'height': 48},
           'lidar': {'beams': 8, 'horizontal_resolution_deg': 2.0}}
    return (write_sim_pairs(root / 'train', frames=1, seed=3, sim=sim),
            write_sim_pairs(root / 'eval', frames=1, seed=4, sim=sim))


class LabelFeatures(torch.utils.data.Dataset):
    """Pairs whose point features are the one-hot ground truth (``shuffle``: of another point)."""

    def __init__(self, root, shuffle=False):
        self.pairs, self.shuffle = PairDataset(root, label_images=False), shuffle

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        sample = self.pairs[i]
        labels = sample['labels']
        if self.shuffle:
            labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(i))]
        onehot = torch.zeros(len(labels), K)
        known = labels != IGNORE
        onehot[known, labels[known]] = 1.0
        return {**sample, 'feats': onehot}


class Echo(torch.nn.Module):
    """A 'student' whose features are its voxel features (the mean one-hot label)."""
    config = types.SimpleNamespace(num_classes=K)
    voxel_size = 0.05
    backend = 'torch'

    def forward(self, coords, feats, manager=None):
        return {'pseudo2d': feats, 'backbone': feats, 'logits': torch.zeros_like(feats)}


def test_fit_separates_linear_classes_and_not_xor():
    gen = torch.Generator().manual_seed(0)
    counts = [400, 60, 15]  # imbalanced: the class weights keep the rare class
    centers = torch.randn(3, 5, generator=gen) * 4 + 10  # far from the origin: raw features
    feats = torch.cat([c + torch.randn(n, 5, generator=gen) for c, n in zip(centers, counts)])
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    head = fit_linear_probe(feats * 100, labels, 4, steps=50)  # scaled: the standardisation is folded in
    assert (head(feats * 100).argmax(1) == labels).float().mean() >= 0.99
    assert not head.weight.requires_grad
    xy = torch.rand(400, 2, generator=gen) - 0.5
    xor = ((xy[:, 0] > 0) ^ (xy[:, 1] > 0)).long()
    head = fit_linear_probe(xy, xor, 2, steps=50)
    assert (head(xy).argmax(1) == xor).float().mean() < 0.75  # a linear probe cannot do XOR
    with pytest.raises(ValueError, match='labels must lie'):
        fit_linear_probe(feats, labels, 2)


def test_probe_scores_what_the_features_hold(worlds):
    train, evaluate = worlds
    names = SYNTHETIC.names
    informative = linear_probe(Echo(), LabelFeatures(train), LabelFeatures(evaluate),
                               class_names=names, steps=100)
    noise = linear_probe(Echo(), LabelFeatures(train, shuffle=True),
                         LabelFeatures(evaluate, shuffle=True), class_names=names, steps=100)
    assert informative['eval']['all']['miou'] > 0.9
    assert informative['train_accuracy'] > 0.95
    assert noise['eval']['all']['miou'] < 0.3
    labels = torch.cat([s['labels'] for s in PairDataset(evaluate, label_images=False)])
    assert informative['eval']['all']['count'] == int((labels != IGNORE).sum())
    assert informative['train_points'] == sum(
        int((s['labels'] != IGNORE).sum()) for s in PairDataset(train, label_images=False))


def test_probe_leaves_the_student_frozen_and_maps_voxels_to_points(worlds):
    train, _ = worlds
    student = build_student(StudentConfig(
        arch='small', widths=(8,) * 9, feature_dim=8, num_classes=K, voxel_size=0.3,
        da_layers=1, backend='torch', point_features='intensity_height'))
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    dataset = PairDataset(train, label_images=False, feature_kind='intensity_height')
    data = point_features_of(student, dataset, features='backbone')
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    sample = dataset[0]
    keep = sample['labels'] != IGNORE
    assert data['feats'].shape == (int(keep.sum()), student.backbone.out_channels)
    assert torch.equal(data['labels'], sample['labels'][keep])
    # points in one voxel share its feature row
    from offline_training.datasets import SparseCollate
    inverse = SparseCollate(0.3)([sample])['inverse'][keep]
    first = {}
    for row, voxel in enumerate(inverse.tolist()):
        if voxel in first:
            assert torch.equal(data['feats'][row], data['feats'][first[voxel]])
        first.setdefault(voxel, row)
    subset = point_features_of(student, dataset, max_points=50)
    assert subset['feats'].shape == (50, 8)
    probed = ProbedStudent(student, torch.nn.Linear(8, K), 'pseudo2d')
    assert probed.voxel_size == 0.3 and probed.config.num_classes == K
