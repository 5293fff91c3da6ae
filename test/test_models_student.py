"""Student network: MinkUNet, DA module, shared classifier, predict (pure-PyTorch backend)."""
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd_ros.config import ConfigError, build
from cmkd_ros.models import (DAModule, SelfCalibratedConv, StudentConfig, build_minkunet,
                             build_student, point_features, voxelize)
from cmkd_ros.sparse import SparseTensor

TINY = dict(arch='minkunet14', widths=[8, 8, 12, 16, 16, 16, 12, 8, 8], feature_dim=12,
            num_classes=5, backend='torch')


pytestmark = pytest.mark.usefixtures('single_torch_thread')


@pytest.fixture(scope='module')
def scan(data_dir):
    points = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', dtype=np.float32)
    points = points.reshape(-1, 5)
    near = np.linalg.norm(points[:, :2], axis=1) < 15.0  # keep the tests fast
    return points[near]


def voxel_input(scan, voxel_size=0.2, kind='height', batch=0):
    feats = point_features(scan[:, :3], scan[:, 3], kind)
    coords, vfeats, inverse = voxelize(torch.from_numpy(scan[:, :3].copy()),
                                       torch.from_numpy(feats), voxel_size)
    batch_col = torch.full((coords.shape[0], 1), batch, dtype=torch.int32)
    return torch.cat([batch_col, coords], 1), vfeats, inverse


def make_student(**overrides):
    torch.manual_seed(0)
    return build_student(build(StudentConfig, {**TINY, **overrides}))


def test_forward_shapes_and_linear_projection_without_da(scan):
    coords, feats, _ = voxel_input(scan)
    student = make_student(use_da=False).eval()
    with torch.no_grad():
        out = student(coords, feats)
    v = coords.shape[0]
    assert out['backbone'].shape == (v, 8)
    assert out['pseudo2d'].shape == (v, 12) and out['logits'].shape == (v, 5)
    proj = student.projection
    torch.testing.assert_close(out['pseudo2d'], out['backbone'] @ proj.weight.T + proj.bias)
    torch.testing.assert_close(out['logits'], student.classifier(out['pseudo2d']))


def test_outputs_follow_input_order_and_batches_are_independent(scan):
    coords, feats, _ = voxel_input(scan)
    student = make_student().eval()
    with torch.no_grad():
        ref = student(coords, feats)
        perm = torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(1))
        shuffled = student(coords[perm], feats[perm])
        # 1. A second scan in the same batch (shifted, other batch index) changes nothing.
        other, other_feats, _ = voxel_input(scan[::3] + np.float32([3, 0, 0, 0, 0]), batch=1)
        both = student(torch.cat([coords, other]), torch.cat([feats, other_feats]))
    for key in ('backbone', 'pseudo2d', 'logits'):
        torch.testing.assert_close(shuffled[key], ref[key][perm], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both[key][:coords.shape[0]], ref[key], rtol=1e-4, atol=1e-5)


def test_load_classifier_from_teacher_1x1_conv_and_freeze(scan):
    coords, feats, _ = voxel_input(scan)
    student = make_student()
    weight = torch.randn(5, 12, 1, 1)
    bias = torch.randn(5)
    student.load_classifier(weight, bias, freeze=True)
    assert not student.classifier.weight.requires_grad
    out = student(coords, feats)
    torch.testing.assert_close(out['logits'], out['pseudo2d'] @ weight[:, :, 0, 0].T + bias)
    out['logits'].square().mean().backward()
    assert student.classifier.weight.grad is None
    assert all(p.grad is not None for p in student.projection.parameters())
    with pytest.raises(ValueError, match=r'\(K, D\)'):
        student.load_classifier(torch.randn(5, 11))


@pytest.mark.slow
def test_training_steps_reduce_the_loss(scan):
    coords, feats, _ = voxel_input(scan, 0.3)
    labels = (feats[:, 1] > -1.0).long() + (feats[:, 1] > 0.5).long()  # height bands
    student = make_student(num_classes=3)
    optim = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(student(coords, feats)['logits'], labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_predict_labels_every_point(scan):
    student = make_student()
    cls, prob = student.predict(scan[:, :3], scan[:, 3])
    assert student.training  # predict restores the mode
    assert cls.shape == (scan.shape[0],) and cls.dtype == torch.int64
    assert prob.dtype == torch.float32 and float(prob.min()) >= 1 / 5 - 1e-6
    assert float(prob.max()) <= 1.0 and int(cls.max()) < 5
    coords, feats, inverse = voxel_input(scan, student.voxel_size)
    student.eval()
    with torch.no_grad():
        logits = student(coords, feats)['logits']
    torch.testing.assert_close(cls, logits.argmax(1)[inverse])
    empty_cls, empty_prob = student.predict(np.zeros((0, 3), np.float32), np.zeros(0))
    assert empty_cls.shape == (0,) and empty_prob.shape == (0,)


def test_forward_and_gradients_on_device_match_a_float64_cpu_reference(scan, device):
    """float32 on ``device`` (kernel maps built there too) against the same weights in float64
    on the CPU: outputs and weight gradients to a relative error below 1e-4."""
    coords, feats, _ = voxel_input(scan)
    results = []
    for where, dtype in ((device, torch.float32), ('cpu', torch.float64)):
        student = make_student().to(device=where, dtype=dtype)
        out = student(coords.to(where), feats.to(device=where, dtype=dtype))
        out['logits'].square().mean().backward()
        results.append(({k: v.detach().cpu().double() for k, v in out.items()},
                        {n: p.grad.cpu().double() for n, p in student.named_parameters()
                         if p.grad is not None}))
    (out, grads), (ref_out, ref_grads) = results
    for key in ('backbone', 'pseudo2d', 'logits'):
        assert float((out[key] - ref_out[key]).norm() / ref_out[key].norm()) < 1e-4, key
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert float((grad - ref).norm() / ref.norm().clamp(min=1e-12)) < 1e-4, name
    # predict() runs on the model's device and returns one label per input point.
    cls, prob = make_student().to(device).predict(scan[:, :3], scan[:, 3])
    assert cls.shape == (scan.shape[0],) and prob.shape == (scan.shape[0],)


def test_bfloat16_and_float16_inference_follow_float32(scan, device):
    """predict in 16-bit arithmetic: nearly the float32 labels and probabilities; float16 only
    on CUDA, unknown precisions refused."""
    student = make_student().to(device)
    cls, prob = student.predict(scan[:, :3], scan[:, 3])
    for precision in ('bfloat16',) + (('float16',) if device == 'cuda' else ()):
        cls16, prob16 = student.predict(scan[:, :3], scan[:, 3], precision=precision)
        assert cls16.shape == cls.shape and prob16.dtype == torch.float32
        assert float((cls16 == cls).float().mean()) > 0.97, precision
        assert float((prob16 - prob).abs().max()) < 0.05, precision
    if device == 'cpu':
        with pytest.raises(ValueError, match='float16 needs a CUDA device'):
            student.predict(scan[:, :3], scan[:, 3], precision='float16')
    with pytest.raises(ValueError, match='precision must be one of'):
        student.predict(scan[:, :3], scan[:, 3], precision='int8')


def test_cpu_bfloat16_linear_heads_run_on_bucketed_row_counts(scan, capfd):
    """oneDNN builds and caches a 16-bit GEMM for every row count, so a node whose scans all
    have their own voxel count grew with each scan: on the CPU the linear heads (shortcut,
    projection, classifier) run on rows padded to buckets, so scans of six sizes share the
    GEMMs of at most two buckets, and the outputs keep one row per voxel."""
    verbose, on = torch.backends.mkldnn.verbose, torch.backends.mkldnn.VERBOSE_ON
    with verbose(on), torch.autocast('cpu', dtype=torch.bfloat16):
        torch.nn.Linear(64, 16)(torch.randn(1000, 64))  # what the heads did before
    if 'matmul' not in capfd.readouterr().out:
        pytest.skip('this CPU runs bfloat16 linear layers without oneDNN')
    for student in (make_student(), make_student(use_da=False)):
        voxels = set()
        with verbose(on):
            for n in range(len(scan), len(scan) - 600, -100):
                coords, feats, _ = voxel_input(scan[:n])
                voxels.add(coords.shape[0])
                with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                    out = student.eval()(coords, feats)
                assert out['logits'].shape == (coords.shape[0], 5)
        rows = {int(m) for m in re.findall(r'matmul.*,(\d+)x\d+:\d+x\d+,', capfd.readouterr().out)}
        assert len(voxels) >= 4 and rows and len(rows) <= 2, (voxels, rows)
        assert all(r % 1024 == 0 for r in rows), rows


def test_padded_rows_bounds_the_row_counts_and_the_padding():
    from cmkd_ros.models.student import padded_rows
    assert [padded_rows(n) for n in (0, 1, 1024, 1025, 20773)] == [0, 1024, 1024, 2048, 21504]
    for n in (5_000, 33_000, 70_001, 262_144, 299_999):
        assert n <= padded_rows(n) <= n * 1.0625
    assert len({padded_rows(n) for n in range(131_073, 262_145, 97)}) == 16


def test_prepared_scans_reuse_the_maps_of_the_last_forward_pass(scan):
    student = make_student().eval()
    first = student.prepare(scan[:, :3], scan[:, 3])
    assert first.manager is None  # nothing recorded yet: maps are built during the pass
    cls_a, prob_a = student.predict_prepared(first)
    requests = student.__dict__['_map_requests']
    assert any(products for _, products in requests)  # blocks and scatter matrices recorded
    # 1. The next scan's maps are built ahead (another thread can do this) and the network
    #    builds none of its own.
    other = scan[::2]
    ahead = student.prepare(other[:, :3], other[:, 3])
    built = {key for key, _ in ahead.manager.map_requests()}
    assert built == {key for key, _ in requests}
    cls_b, prob_b = student.predict_prepared(ahead)
    assert {key for key, _ in ahead.manager.map_requests()} == built
    # 2. Same labels as the one-call path.
    cls_c, prob_c = student.predict(other[:, :3], other[:, 3])
    assert torch.equal(cls_b, cls_c) and torch.allclose(prob_b, prob_c, atol=1e-6)
    assert cls_a.shape == (scan.shape[0],) and cls_b.shape == (other.shape[0],)
    # 3. 'later': another thread builds the maps while the network already runs
    errors = []

    def build(scan):
        try:
            scan.build_maps()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    for _ in range(5):
        later = student.prepare(other[:, :3], other[:, 3], maps='later')
        assert later.manager.map_requests() == []
        builder = threading.Thread(target=build, args=(later,))
        builder.start()
        cls_d, prob_d = student.predict_prepared(later)
        builder.join(timeout=60)
        assert not errors
        assert torch.equal(cls_d, cls_c) and torch.allclose(prob_d, prob_c, atol=1e-6)
        assert {key for key, _ in later.manager.map_requests()} == built
    with pytest.raises(ValueError, match="maps must be 'build', 'later' or 'none'"):
        student.prepare(other[:, :3], other[:, 3], maps=True)


def test_maps_built_in_a_second_thread_give_the_same_outputs(scan, monkeypatch):
    """With 2+ torch threads at inference, forward builds the recorded kernel maps in a second
    thread while the network runs; the outputs are those of the one-thread pass."""
    from cmkd_ros.sparse import CoordinateManager
    coords, feats, _ = voxel_input(scan, voxel_size=0.1)
    student = make_student().eval()
    started = []
    prebuild = CoordinateManager.prebuild_in_background

    def record(self, requests, *args, **kwargs):
        started.append(len(requests))
        return prebuild(self, requests, *args, **kwargs)
    monkeypatch.setattr(CoordinateManager, 'prebuild_in_background', record)
    with torch.no_grad():
        torch.set_num_threads(2)
        student(coords, feats)                        # nothing recorded yet: built as it goes
        assert not started
        torch.set_num_threads(1)
        ref = student(coords, feats)                  # one thread: no second one
        assert not started
        torch.set_num_threads(2)
        for _ in range(3):
            out = student(coords, feats)
            assert torch.get_num_threads() == 2       # the network's threads restored
            for key in ref:
                torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    assert started == [len(student.__dict__['_map_requests'])] * 3 and started[0] > 10
    # training (gradients on) builds the maps as it goes
    student.train()
    student(coords, feats)['logits'].sum().backward()
    assert len(started) == 3


def test_config_validation():
    with pytest.raises(ConfigError, match='widths'):
        build(StudentConfig, {'widths': [8, 8]})
    with pytest.raises(ConfigError, match='in_channels'):
        build(StudentConfig, {'in_channels': 3, 'point_features': 'height'})
    with pytest.raises(ConfigError, match='arch'):
        build(StudentConfig, {'arch': 'resnet'})
    assert build(StudentConfig, {'point_features': 'intensity_height'}).input_channels == 3
    with pytest.raises(ValueError, match='channels'):
        make_student()(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 3))


def test_minkunet_presets_have_the_documented_depth():
    def blocks(net):
        return [len(stage) for stage in list(net.encoder) + list(net.decoder)]
    assert blocks(build_minkunet('minkunet14', 2)) == [1] * 8
    assert blocks(build_minkunet('minkunet18', 2)) == [2] * 8
    assert blocks(build_minkunet('minkunet34', 2)) == [2, 3, 4, 6, 2, 2, 2, 2]
    assert build_minkunet('small', 2).out_channels == 32


def _dense_reference_sc(layer, coords, feats, pool=2):
    """Self-calibrated conv on a dense grid (zero outside the voxels), BN in eval mode."""
    size = 8
    grid = torch.zeros(1, feats.shape[1], size, size, size, dtype=feats.dtype)
    idx = coords[:, 1:].long()
    grid[0, :, idx[:, 0], idx[:, 1], idx[:, 2]] = feats.T
    mask = torch.zeros(1, 1, size, size, size, dtype=feats.dtype)
    mask[0, 0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1

    def conv(module, d, m):
        conv3d = module[0] if isinstance(module, torch.nn.Sequential) else module
        k = conv3d.kernel_size
        w = conv3d.weight.reshape(k, k, k, conv3d.in_channels, conv3d.out_channels)
        out = F.conv3d(d, w.permute(4, 3, 0, 1, 2), padding=k // 2)
        if conv3d.bias is not None:
            out = out + conv3d.bias.view(1, -1, 1, 1, 1)
        if isinstance(module, torch.nn.Sequential):
            bn = module[1]
            shape = (1, -1, 1, 1, 1)
            out = ((out - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape)
                   + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape))
            if len(module) > 2:
                out = out.relu()
        return out * m

    if layer.mix is not None:  # branch inputs: 1x1x1 conv + BN + ReLU of every channel
        x1, x2 = conv(layer.mix[0], grid, mask), conv(layer.mix[1], grid, mask)
    else:                      # channel halves
        x1, x2 = grid[:, :layer.split], grid[:, layer.split:]
    coarse_mask = F.max_pool3d(mask, pool)
    pooled = F.avg_pool3d(x1, pool) / F.avg_pool3d(mask, pool).clamp(min=1e-9)
    context = conv(layer.coarse, pooled, coarse_mask)
    for dim in (2, 3, 4):
        context = context.repeat_interleave(pool, dim)
    gate = torch.sigmoid(x1 + context * mask)
    y1 = conv(layer.project, conv(layer.gated, x1, mask) * gate, mask)
    out = torch.cat([y1, conv(layer.plain, x2, mask)], dim=1)
    return out[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T


@pytest.mark.parametrize('final,mix,pool', [(False, True, 2), (True, True, 2),
                                             (False, False, 2), (True, False, 2),
                                             (True, True, 4)])
def test_self_calibrated_conv_matches_dense_reference(final, mix, pool):
    gen = torch.Generator().manual_seed(3)
    coords = (torch.rand(8, 8, 8, generator=gen) < 0.3).nonzero().to(torch.int32)
    coords = torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.int32), coords], 1)
    feats = torch.randn(coords.shape[0], 6, generator=gen, dtype=torch.float64)
    layer = SelfCalibratedConv(6, 5, pool=pool, final=final, mix=mix).double().eval()
    for bn in [m for m in layer.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.data.uniform_(0.5, 1.5, generator=gen)
        bn.bias.data.uniform_(-0.5, 0.5, generator=gen)
    out = layer(SparseTensor(feats, coords)).features
    ref = _dense_reference_sc(layer, coords, feats, pool)
    assert out.shape == (coords.shape[0], 5)
    assert float((out.detach() - ref.detach()).norm() / ref.detach().norm()) < 1e-10


def test_da_module_maps_to_teacher_dimension_and_trains():
    gen = torch.Generator().manual_seed(4)
    coords = (torch.rand(10, 10, 10, generator=gen) < 0.3).nonzero().to(torch.int32)
    coords = torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.int32), coords], 1)
    feats = torch.randn(coords.shape[0], 8, generator=gen)
    da = DAModule(8, 16)
    assert sum(isinstance(m, SelfCalibratedConv) for m in da.modules()) == 3
    out = da(SparseTensor(feats, coords)).features
    assert out.shape == (coords.shape[0], 16)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in da.parameters())


def test_residual_da_module_adds_a_linear_projection(scan):
    """With ``da_residual`` the pseudo-2D features are DA(x) + W x + b: silencing the DA
    module's last layer leaves exactly the linear projection of the backbone features."""
    student = make_student(da_residual=True).eval()
    coords, feats, _ = voxel_input(scan)
    last = student.projection.layers[-1]
    with torch.no_grad():
        for conv in (last.plain, last.project):
            conv.weight.zero_()
            conv.bias.zero_()
        out = student(coords, feats)
    expected = student.shortcut(out['backbone'])
    assert torch.allclose(out['pseudo2d'], expected, atol=1e-6)
    assert not make_student(da_residual=False).state_dict().keys() & {'shortcut.weight'}


def test_paper_da_module_has_three_layers_pooling_by_4_and_no_shortcut(scan):
    """The paper's DA module (student.da_pool=4, da_residual=false): three self-calibrated
    layers whose calibration branches pool by 4, the pseudo-2D features are the DA output
    alone; the current default pools by 2 and adds the linear shortcut."""
    paper = make_student(da_pool=4, da_residual=False).eval()
    layers = [m for m in paper.projection.modules() if isinstance(m, SelfCalibratedConv)]
    assert len(layers) == 3
    assert all(m.down.stride == 4 and m.down.kernel_size == 4 for m in layers)
    assert not hasattr(paper, 'shortcut')
    coords, feats, _ = voxel_input(scan)
    with torch.no_grad():
        out = paper(coords, feats)
        da_only = paper.projection(SparseTensor(out['backbone'], coords))
    assert out['pseudo2d'].shape == (coords.shape[0], TINY['feature_dim'])
    assert out['logits'].shape == (coords.shape[0], TINY['num_classes'])
    assert torch.allclose(out['pseudo2d'], da_only.features, atol=1e-5)
    current = make_student()
    assert current.config.da_pool == 2 and hasattr(current, 'shortcut')
    assert all(m.down.stride == 2 for m in current.projection.modules()
               if isinstance(m, SelfCalibratedConv))
    with pytest.raises(ConfigError, match='da_pool'):
        build(StudentConfig, {**TINY, 'da_pool': 1})


@pytest.mark.parametrize('mix', [True, False])
def test_da_output_channels_depend_on_which_input_channels(mix):
    """With mixing every pseudo-2D channel sees every student channel; with channel halves the
    module is two separate towers (the first half of the outputs never sees the second half of
    the inputs), the reason mixing is the default."""
    gen = torch.Generator().manual_seed(5)
    coords = (torch.rand(8, 8, 8, generator=gen) < 0.3).nonzero().to(torch.int32)
    coords = torch.cat([torch.zeros(coords.shape[0], 1, dtype=torch.int32), coords], 1)
    feats = torch.randn(coords.shape[0], 8, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    da = DAModule(8, 16, hidden=8, mix=mix).double()
    out = da(SparseTensor(feats, coords)).features
    # d(sum of output half a) / d(input half b) for all four (a, b) pairs
    reach = torch.zeros(2, 2)
    for a in range(2):
        grad, = torch.autograd.grad(out[:, a * 8:(a + 1) * 8].sum(), feats, retain_graph=True)
        for b in range(2):
            reach[a, b] = grad[:, b * 4:(b + 1) * 4].abs().sum()
    if mix:
        assert bool((reach > 0).all())
    else:
        assert reach[0, 1] == 0 and reach[1, 0] == 0
        assert reach[0, 0] > 0 and reach[1, 1] > 0


def test_mixed_precision_autocast_trains(scan, device):
    """Under autocast (bfloat16 on CPU, float16 on CUDA as in training) forward and backward
    run and stay close to float32."""
    coords, feats, _ = voxel_input(scan, 0.3)
    coords, feats = coords.to(device), feats.to(device)
    student = make_student().to(device).eval()
    with torch.no_grad():
        ref = student(coords, feats)['pseudo2d']
    dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = student(coords, feats)
    pseudo = out['pseudo2d'].float()
    assert float((pseudo.detach() - ref).norm() / ref.norm()) < 0.05
    out['logits'].float().square().mean().backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


def test_resolve_precision_auto_follows_the_hardware(monkeypatch):
    from cmkd_ros.models import fast_bfloat16, native_bfloat16, resolve_precision
    from cmkd_ros.sparse import native
    assert resolve_precision('float16', 'cuda') == 'float16'       # names pass through
    assert resolve_precision('auto') == ('bfloat16' if fast_bfloat16() else 'float32')
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    assert not native_bfloat16('cpu') and resolve_precision('auto', 'cpu') == 'float32'
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True, raising=False)
    assert resolve_precision('auto', 'cpu') == 'bfloat16'
    # AVX512-BF16 without AMX: bfloat16 on the pure-PyTorch path (oneDNN), float32 with the
    # compiled kernels (they would compute bfloat16 in float32 after a conversion)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True, raising=False)
    with native.disabled():
        assert resolve_precision('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(native, 'available', lambda: True)
    assert resolve_precision('auto', 'cpu') == 'float32'
