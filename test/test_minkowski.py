"""MinkowskiEngine backend: layer-by-layer and whole-network parity with the torch backend.

The parity tests are defined only when ``import MinkowskiEngine`` works. Set
``CMKD_REQUIRE_MINKOWSKI=1`` (CI does, after scripts/build_minkowski.sh) to turn a missing or
broken MinkowskiEngine into a failure instead of a smaller test set.
"""
import os

import numpy as np
import pytest
import torch

from cmkd_ros.config import build
from cmkd_ros.models import (StudentConfig, build_student, load_checkpoint, point_features,
                             save_checkpoint, voxelize)
from cmkd_ros.sparse import (MinkowskiTensor, MinkowskiUnavailable, SparseConv3d, SparsePool,
                             SparseTensor, SparseUpsample, kernel_offsets, minkowski_available,
                             to_minkowski_kernel)
from cmkd_ros.sparse.minkowski import rows_in_order

REQUIRED = os.environ.get('CMKD_REQUIRE_MINKOWSKI', '') == '1'
AVAILABLE = minkowski_available()


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def test_minkowski_is_available_when_required_else_reported_clearly():
    if REQUIRED:
        assert AVAILABLE, 'CMKD_REQUIRE_MINKOWSKI=1 but MinkowskiEngine does not import'
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    feats = torch.ones(2, 1)
    if AVAILABLE:
        assert torch.equal(MinkowskiTensor(feats, coords).features, feats)
    else:
        with pytest.raises(MinkowskiUnavailable, match='build_minkowski.sh'):
            MinkowskiTensor(feats, coords)


def test_kernel_layout_conversion_is_x_fastest():
    offsets = kernel_offsets(3)
    # Tag each offset's weight slice with its own (x, y, z) and convert.
    weight = offsets.to(torch.float64).reshape(27, 1, 3)
    me = to_minkowski_kernel(weight, 3)[:, 0, :].long()
    assert me[0].tolist() == [-1, -1, -1] and me[1].tolist() == [0, -1, -1]
    assert me[3].tolist() == [-1, 0, -1] and me[9].tolist() == [-1, -1, 0]
    back = to_minkowski_kernel(to_minkowski_kernel(weight, 3), 3)
    assert torch.equal(back, weight)


def _voxels(seed, channels=3):
    gen = torch.Generator().manual_seed(seed)
    coords = (torch.rand(2, 10, 10, 10, generator=gen) < 0.3).nonzero().to(torch.int32)
    coords[:, 1:] -= 5
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    return coords, torch.randn(coords.shape[0], channels, generator=gen, dtype=torch.float64)


def _assert_same(torch_out, me_out, tol=1e-10):
    rows = rows_in_order(me_out.coords, torch_out.coords)
    diff = (torch_out.features - me_out.features[rows]).norm()
    assert torch_out.stride == me_out.stride
    assert float(diff / torch_out.features.norm()) < tol


def _scan(data_dir, radius=20.0, voxel_size=0.2):
    points = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', dtype=np.float32)
    points = points.reshape(-1, 5)
    points = points[np.linalg.norm(points[:, :2], axis=1) < radius]
    feats = point_features(points[:, :3], points[:, 3], 'intensity_height')
    coords, vfeats, _ = voxelize(points[:, :3], feats, voxel_size)
    coords = np.concatenate([np.zeros((coords.shape[0], 1), np.int32), coords], 1)
    return points, torch.from_numpy(coords), torch.from_numpy(vfeats)


if AVAILABLE:
    LAYERS = {
        'submanifold k3': lambda: SparseConv3d(3, 4, 3),
        'submanifold k5': lambda: SparseConv3d(3, 4, 5),
        'dilated k3': lambda: SparseConv3d(3, 4, 3, dilation=2),
        'even k2': lambda: SparseConv3d(3, 4, 2),
        'strided k2': lambda: SparseConv3d(3, 4, 2, stride=2),
        'strided k3': lambda: SparseConv3d(3, 4, 3, stride=2, bias=True),
        'max pool': lambda: SparsePool('max', 2, 2),
        'avg pool': lambda: SparsePool('avg', 2, 2),
    }

    @pytest.mark.parametrize('name', sorted(LAYERS))
    def test_layer_parity_outputs_and_gradients(name):
        coords, feats = _voxels(1)
        layer = LAYERS[name]().double()
        outs, grads = [], []
        for make in (SparseTensor, MinkowskiTensor):
            layer.zero_grad()
            f = feats.clone().requires_grad_(True)
            out = layer(make(f, coords))
            weight = torch.linspace(-1, 1, out.features.numel(), dtype=torch.float64)
            rows = rows_in_order(out.coords, outs[0].coords) if outs else slice(None)
            (out.features[rows] * weight.view_as(out.features)).sum().backward()
            outs.append(out)
            grads.append([f.grad] + [p.grad.clone() for p in layer.parameters()])
        _assert_same(outs[0], outs[1])
        for a, b in zip(grads[0], grads[1]):
            assert float((a - b).norm() / a.norm()) < 1e-10

    @pytest.mark.parametrize('kernel_size', [2, 3])
    def test_transposed_conv_and_upsample_parity(kernel_size):
        coords, feats = _voxels(2)
        down = SparseConv3d(3, 3, 2, stride=2).double()
        up = SparseConv3d(3, 4, kernel_size, stride=2, transposed=True).double()
        nearest = SparseUpsample(2)
        results = [(up(down(make(feats, coords))), nearest(down(make(feats, coords))))
                   for make in (SparseTensor, MinkowskiTensor)]
        _assert_same(results[0][0], results[1][0])
        _assert_same(results[0][1], results[1][1])
        assert torch.equal(results[0][0].coords, coords)

    @pytest.mark.parametrize('use_da', [True, False])
    def test_whole_student_parity_forward_and_backward(data_dir, use_da):
        _, coords, feats = _scan(data_dir)
        config = build(StudentConfig, dict(arch='minkunet14', point_features='intensity_height',
                                           widths=[16, 16, 24, 32, 48, 32, 24, 16, 16],
                                           feature_dim=24, num_classes=7, use_da=use_da))
        torch.manual_seed(0)
        student = build_student(config).double().train()
        results = []
        for backend in ('torch', 'minkowski'):
            student.set_backend(backend)
            student.zero_grad()
            out = student(coords, feats.double())
            (out['logits'].square().mean() + out['pseudo2d'].mean()).backward()
            results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()}))
        (out_t, grad_t), (out_m, grad_m) = results
        for key in ('backbone', 'pseudo2d', 'logits'):
            err = (out_t[key] - out_m[key]).norm() / out_t[key].norm()
            assert float(err) < 1e-4, key
        for name, grad in grad_t.items():
            err = (grad - grad_m[name]).norm() / grad.norm().clamp(min=1e-30)
            assert float(err) < 1e-4, name

    def test_checkpoint_loads_in_either_backend(data_dir, tmp_path):
        points, _, _ = _scan(data_dir, radius=15.0)
        config = build(StudentConfig, dict(arch='small', point_features='intensity_height',
                                           feature_dim=16, num_classes=4, voxel_size=0.2,
                                           backend='torch'))
        torch.manual_seed(1)
        student = build_student(config)
        save_checkpoint(tmp_path / 's.pt', student, class_names=list('abcd'),
                        class_colors=[[0, 0, 0]] * 4)
        xyz = torch.from_numpy(points[:, :3].copy())
        intensity = torch.from_numpy(points[:, 3].copy())
        predictions = {}
        logits = {}
        for backend in ('torch', 'minkowski'):
            loaded, _ = load_checkpoint(tmp_path / 's.pt', backend=backend)
            predictions[backend] = loaded.predict(xyz, intensity)
            coords, feats, _ = voxelize(xyz, point_features(xyz, intensity, 'intensity_height'),
                                        0.2)
            batch = torch.zeros(coords.shape[0], 1, dtype=torch.int32)
            with torch.no_grad():
                logits[backend] = loaded(torch.cat([batch, coords], 1), feats)['logits']
        err = (logits['torch'] - logits['minkowski']).norm() / logits['torch'].norm()
        assert float(err) < 1e-4
        agree = (predictions['torch'][0] == predictions['minkowski'][0]).float().mean()
        assert float(agree) > 0.999
        # 16-bit inference is the torch backend's: MinkowskiEngine refuses it with a reason
        with pytest.raises(ValueError, match='needs the torch backend'):
            loaded.predict(xyz, intensity, precision='bfloat16')
