"""Every sparse layer of the pure-PyTorch backend against dense conv3d / conv_transpose3d.

Random voxels on small grids (two scans in a batch, negative coordinates included); the dense
reference runs on the zero-filled grid and is read at the output voxels. Outputs and gradients
(inputs and weights) must agree to a relative error below 1e-4 (float64).
"""
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd_ros.sparse import (ConvBN, CoordinateManager, SparseBatchNorm, SparseConv3d, SparseError,
                             SparsePool, SparseReLU, SparseTensor, SparseUpsample, kernel_offsets,
                             sparse_cat)

GRID = 12  # cells per axis (multiple of 4 so that strides 2 and 4 tile it)
LOW = -4  # grid origin (multiple of 4)


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def random_voxels(seed, occupancy=0.25, batch=2, channels=3, device='cpu'):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, GRID, GRID, GRID, generator=gen) < occupancy
    idx = mask.nonzero()
    coords = idx.clone()
    coords[:, 1:] += LOW
    perm = torch.randperm(coords.shape[0], generator=gen)  # arbitrary input order
    coords = coords[perm].to(torch.int32)
    feats = torch.randn(coords.shape[0], channels, generator=gen, dtype=torch.float64)
    return coords.to(device), feats.to(device)


def to_dense(coords, feats, stride=1, size=None):
    """(B, C, G, G, G) grid of voxels at ``stride`` (cells of ``stride`` voxels from LOW)."""
    size = size or GRID // stride
    batch = int(coords[:, 0].max()) + 1
    dense = feats.new_zeros(batch, feats.shape[1], size, size, size)
    cell = torch.div(coords[:, 1:].long() - LOW, stride, rounding_mode='floor')
    dense[coords[:, 0].long(), :, cell[:, 0], cell[:, 1], cell[:, 2]] = feats
    return dense


def read_dense(dense, coords, stride=1):
    cell = torch.div(coords[:, 1:].long() - LOW, stride, rounding_mode='floor')
    return dense[coords[:, 0].long(), :, cell[:, 0], cell[:, 1], cell[:, 2]]


def dense_weight(conv):
    """conv3d weight (Cout, Cin, k, k, k) (conv_transpose3d: (Cin, Cout, ...)) of a layer."""
    k = conv.kernel_size
    w = conv.weight.detach().reshape(k, k, k, conv.in_channels, conv.out_channels)
    if conv.transposed:
        return w.permute(3, 4, 0, 1, 2).contiguous()
    return w.permute(4, 3, 0, 1, 2).contiguous()


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def check_against_dense(layer, sparse_in, dense_fn, in_stride, out_stride):
    """Compare outputs and gradients of ``layer`` with ``dense_fn(dense_input, weight)``."""
    feats = sparse_in.features.clone().requires_grad_(True)
    x = sparse_in.replace(feats)
    out = layer(x)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.features.shape, generator=gen, dtype=torch.float64)
    upstream = upstream.to(out.features.device)
    (out.features * upstream).sum().backward()

    dense_in = to_dense(x.coords, sparse_in.features, in_stride).requires_grad_(True)
    weight = dense_weight(layer).requires_grad_(True)
    dense_out = dense_fn(dense_in, weight)
    ref = read_dense(dense_out, out.coords, out_stride)
    (ref * upstream).sum().backward()

    assert out.stride == out_stride
    assert rel_err(out.features.detach(), ref.detach()) < 1e-4
    assert rel_err(feats.grad, read_dense(dense_in.grad, x.coords, in_stride)) < 1e-4
    k = layer.kernel_size
    grad_w = weight.grad.permute(*((2, 3, 4, 0, 1) if layer.transposed else (2, 3, 4, 1, 0)))
    assert rel_err(layer.weight.grad, grad_w.reshape(k ** 3, layer.in_channels,
                                                     layer.out_channels)) < 1e-4
    return out


@pytest.mark.parametrize('kernel_size,dilation', [(3, 1), (5, 1), (3, 2), (1, 1)])
def test_submanifold_conv_matches_dense(kernel_size, dilation, device):
    coords, feats = random_voxels(1, device=device)
    x = SparseTensor(feats, coords)
    layer = SparseConv3d(3, 4, kernel_size, dilation=dilation).double().to(device)
    pad = (kernel_size // 2) * dilation
    out = check_against_dense(layer, x, lambda d, w: F.conv3d(d, w, padding=pad,
                                                              dilation=dilation), 1, 1)
    assert torch.equal(out.coords, coords)  # submanifold: same voxels, same order


def test_even_kernel_stride_one_uses_forward_offsets(device):
    coords, feats = random_voxels(2, device=device)
    layer = SparseConv3d(3, 2, kernel_size=2).double().to(device)
    check_against_dense(layer, SparseTensor(feats, coords),
                        lambda d, w: F.conv3d(F.pad(d, (0, 1, 0, 1, 0, 1)), w), 1, 1)


@pytest.mark.parametrize('kernel_size', [2, 3])
def test_strided_conv_matches_dense(kernel_size, device):
    coords, feats = random_voxels(3, device=device)
    layer = SparseConv3d(3, 5, kernel_size, stride=2).double().to(device)
    pad = 1 if kernel_size == 3 else 0
    out = check_against_dense(layer, SparseTensor(feats, coords),
                              lambda d, w: F.conv3d(d, w, stride=2, padding=pad), 1, 2)
    # 1. The output voxels are exactly the occupied stride-2 cells.
    parents = torch.cat([coords[:, :1], torch.div(coords[:, 1:], 2, rounding_mode='floor') * 2],
                        dim=1)
    assert torch.equal(torch.unique(parents, dim=0), torch.unique(out.coords, dim=0))
    assert out.coords.shape[0] == torch.unique(parents, dim=0).shape[0]


def test_second_level_conv_uses_stride_units(device):
    coords, feats = random_voxels(4, occupancy=0.5, device=device)
    x = SparseTensor(feats, coords)
    x2 = SparseConv3d(3, 3, 2, stride=2).double().to(device)(x)
    x2 = x2.replace(x2.features.detach())
    check_against_dense(SparseConv3d(3, 2, 3).double().to(device), x2,
                        lambda d, w: F.conv3d(d, w, padding=1), 2, 2)
    check_against_dense(SparseConv3d(3, 2, 2, stride=2).double().to(device), x2,
                        lambda d, w: F.conv3d(d, w, stride=2), 2, 4)


@pytest.mark.parametrize('kernel_size', [2, 3])
def test_transposed_conv_matches_dense(kernel_size, device):
    coords, feats = random_voxels(5, device=device)
    x = SparseTensor(feats, coords)
    coarse = SparseConv3d(3, 3, 2, stride=2).double().to(device)(x)
    coarse = coarse.replace(coarse.features.detach())
    layer = SparseConv3d(3, 4, kernel_size, stride=2, transposed=True).double().to(device)
    if kernel_size == 2:
        def dense(d, w):
            return F.conv_transpose3d(d, w, stride=2)
    else:
        def dense(d, w):
            return F.conv_transpose3d(d, w, stride=2, padding=1, output_padding=1)
    out = check_against_dense(layer, coarse, dense, 2, 1)
    assert torch.equal(out.coords, coords)  # back onto the cached finer voxels, same order


def test_max_and_avg_pool_match_dense(device):
    coords, feats = random_voxels(6, device=device)
    x = SparseTensor(feats.clone().requires_grad_(True), coords)
    dense = to_dense(coords, x.features.detach())
    occupied = to_dense(coords, feats.new_ones(coords.shape[0], 1))
    out_max = SparsePool('max', 2, 2)(x)
    filled = torch.where(occupied > 0, dense, torch.full_like(dense, -torch.inf))
    ref_max = read_dense(F.max_pool3d(filled, 2), out_max.coords, 2)
    assert rel_err(out_max.features.detach(), ref_max) < 1e-12
    out_avg = SparsePool('avg', 2, 2)(x)
    ref_avg = read_dense(F.avg_pool3d(dense, 2) / F.avg_pool3d(occupied, 2), out_avg.coords, 2)
    assert rel_err(out_avg.features.detach(), ref_avg) < 1e-12
    # 1. Gradients: the average spreads 1/count to each child; the max routes to the argmax.
    out_avg.features.sum().backward()
    count = read_dense(F.avg_pool3d(occupied, 2) * 8, out_avg.coords, 2)[:, 0]
    parent = x.manager.parents(1, 2)[0]
    expected = (1.0 / count)[parent].unsqueeze(1).expand(-1, 3)
    assert rel_err(x.features.grad, expected) < 1e-12
    # 2. 16-bit features (bfloat16 inference): averaged in float32, one rounding at the end
    half = SparsePool('avg', 2, 2)(x.replace(feats.to(torch.bfloat16)))
    assert half.features.dtype == torch.bfloat16
    assert rel_err(half.features.double(), ref_avg) < 4e-3


def test_upsample_nearest_copies_parent():
    coords, feats = random_voxels(8)
    x = SparseTensor(feats, coords)
    coarse = SparsePool('avg', 2, 2)(x)
    fine = SparseUpsample(2)(coarse)
    dense = to_dense(coarse.coords, coarse.features, 2, GRID // 2)
    ref = read_dense(dense.repeat_interleave(2, 2).repeat_interleave(2, 3)
                     .repeat_interleave(2, 4), coords)
    assert torch.equal(fine.coords, coords)
    assert rel_err(fine.features, ref) < 1e-12


def test_batch_norm_relu_and_cat_keep_coordinates():
    coords, feats = random_voxels(9)
    x = SparseTensor(feats, coords)
    bn = SparseBatchNorm(3).double()
    y = SparseReLU()(bn(x))
    ref = torch.relu((feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-5))
    assert rel_err(y.features, ref) < 1e-6
    z = sparse_cat(x, y)
    assert z.features.shape == (coords.shape[0], 6)
    assert torch.equal(z.features[:, 3:], y.features)
    coarse = SparsePool('max', 2, 2)(x)
    with pytest.raises(SparseError, match='same coordinates'):
        sparse_cat(x, coarse)


def test_kernel_maps_are_cached_and_shared(device):
    coords, feats = random_voxels(10, device=device)
    x = SparseTensor(feats, coords)
    first = x.manager.kernel_map(1, 3)
    assert x.manager.kernel_map(1, 3) is first
    # 1. Pair count equals the dense count of occupied neighbours.
    occ = to_dense(coords, feats.new_ones(coords.shape[0], 1))
    neighbours = F.conv3d(occ, feats.new_ones(1, 1, 3, 3, 3), padding=1)
    assert first.num_pairs == int(read_dense(neighbours, coords).sum())


@pytest.mark.parametrize('kernel_size,stride,transposed,relu', [
    (3, 1, False, True), (1, 1, False, False), (2, 2, False, True), (3, 2, False, False),
    (2, 2, True, True)])
def test_eval_mode_folds_batch_norm_into_the_convolution(kernel_size, stride, transposed, relu,
                                                         device):
    coords, feats = random_voxels(11, device=device)
    x = SparseTensor(feats, coords)
    if transposed:  # start from the coarse voxels an encoder would have made
        x = SparseConv3d(3, 3, 2, 2).double().to(device)(x)
    layer = ConvBN(3, 5, kernel_size, stride, transposed, relu).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn = layer[1]
        bn.running_mean.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
    layer.to(device).eval()
    unfolded = x
    for module in layer:  # conv, then batch norm, then ReLU: the training-mode path
        unfolded = module(unfolded)
    with torch.no_grad():
        folded = layer(x)
    assert folded.stride == unfolded.stride
    assert rel_err(folded.features, unfolded.features) < 1e-10
    assert (folded.features.min() >= 0) == relu
    # 2. The inference cache follows in-place changes of the statistics.
    with torch.no_grad():
        layer[1].running_mean.add_(1.0)
        moved = layer(x)
    reference = x
    for module in layer:
        reference = module(reference)
    assert rel_err(moved.features, reference.features) < 1e-10
    assert rel_err(moved.features, folded.features) > 1e-3
    # 3. With gradients the folded path is differentiable in the batch norm parameters too.
    layer(x).features.sum().backward()
    assert layer[1].weight.grad is not None and layer[0].weight.grad is not None


def test_conv_bias_is_added_with_and_without_gradients():
    coords, feats = random_voxels(12)
    x = SparseTensor(feats, coords)
    layer = SparseConv3d(3, 4, 3, bias=True).double()
    with torch.no_grad():
        fused = layer(x).features  # the bias initialises the output buffer
        plain = x.conv(layer.weight, 3).features + layer.bias
    assert rel_err(fused, plain) < 1e-12
    out = layer(x.replace(feats.clone().requires_grad_(True)))
    out.features.sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((4,), float(coords.shape[0]),
                                                      dtype=torch.float64))
    assert rel_err(out.features, plain) < 1e-12


def test_transposed_maps_are_cached():
    coords, feats = random_voxels(13)
    manager = SparseTensor(feats, coords).manager
    manager.parents(1, 2)
    up = manager.kernel_map(1, 2, 2, transposed=True)
    assert manager.kernel_map(1, 2, 2, transposed=True) is up
    down = manager.kernel_map(1, 2, 2)
    assert torch.equal(up.in_rows, down.out_rows) and up.num_out == down.num_in


def test_maps_and_their_transposes_are_freed_without_the_cyclic_collector():
    """A map and its transpose make no reference cycle: dropping the scan's coordinates frees
    every map at once, as reference counting does, not at the next run of Python's cyclic
    collector (which kept the segment node's maps and their tensors alive for hundreds of scans
    and grew its heap). The transpose still finds its source's blocks while it exists."""
    import gc
    import weakref
    from cmkd_ros.sparse.functional import blocked_pairs
    coords, feats = random_voxels(13)
    manager = SparseTensor(feats, coords).manager
    manager.parents(1, 2)
    down = manager.kernel_map(1, 2, 2)
    up = manager.kernel_map(1, 2, 2, transposed=True)
    assert up.transposed() is down and down.transposed() is up
    assert up.transpose_source() is down
    src_in, src_out, _ = blocked_pairs(down)
    up_in, up_out, _ = blocked_pairs(up)
    real = src_out != down.num_out
    assert torch.equal(up_in[real], src_out[real]) and torch.equal(up_out[real], src_in[real])
    refs = [weakref.ref(m) for m in (down, up)]
    gc.disable()
    try:
        del manager, down, up
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
    # a transpose that outlives its source makes a new one when asked
    lone = SparseTensor(feats, coords).manager
    lone.parents(1, 2)
    orphan = lone.kernel_map(1, 2, 2, transposed=True)
    del lone
    gc.collect()
    again = orphan.transposed()
    assert torch.equal(again.in_rows, orphan.out_rows) and again.num_in == orphan.num_out
    assert again.transposed() is orphan


def test_kernel_offsets_order_is_z_fastest():
    offs = kernel_offsets(3)
    assert offs.shape == (27, 3)
    assert offs[0].tolist() == [-1, -1, -1] and offs[1].tolist() == [-1, -1, 0]
    assert offs[9].tolist() == [0, -1, -1]
    assert kernel_offsets(2)[-1].tolist() == [1, 1, 1]


def test_bad_coordinates_raise():
    with pytest.raises(SparseError, match='duplicate'):
        CoordinateManager(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(SparseError, match=r'\(N, 4\)'):
        CoordinateManager(torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(SparseError, match='span'):
        CoordinateManager(torch.tensor([[0, 0, 0, 0], [0, 200000, 0, 0]], dtype=torch.int32))
    with pytest.raises(SparseError, match='feature rows'):
        SparseTensor(torch.zeros(2, 1), torch.tensor([[0, 0, 0, 0]], dtype=torch.int32))
    x = SparseTensor(torch.zeros(1, 1), torch.tensor([[0, 0, 0, 0]], dtype=torch.int32))
    with pytest.raises(SparseError, match='upsample'):
        SparseConv3d(1, 1, 2, stride=2, transposed=True)(x)


def test_two_threads_give_the_single_thread_result(data_dir):
    """No race in the parallel gather/scatter: 2 threads reproduce 1 thread on a real scan."""
    points = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin', dtype=np.float32)
    xyz = torch.from_numpy(points.reshape(-1, 5)[:, :3].copy())
    cells = torch.unique(torch.floor(xyz / 0.2).to(torch.int32), dim=0)
    coords = torch.cat([torch.zeros(cells.shape[0], 1, dtype=torch.int32), cells], 1)
    feats = torch.randn(coords.shape[0], 16, generator=torch.Generator().manual_seed(0))
    conv = SparseConv3d(16, 16, 3)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        conv.zero_grad()
        f = feats.clone().requires_grad_(True)
        out = conv(SparseTensor(f, coords))
        out.features.square().sum().backward()
        results.append((out.features.detach(), f.grad, conv.weight.grad.clone()))
    for single, double in zip(*results):
        assert torch.allclose(single, double, rtol=1e-5, atol=1e-5)


def _network_map_requests(coords):
    """The maps a small U-Net asks for, in its order, from a lazily built manager."""
    manager = CoordinateManager(coords)
    wanted = [(1, 3, 1, 1), (1, 2, 2, 1), (2, 3, 1, 1), (2, 2, 2, 1), (4, 3, 1, 1),
              (2, 2, 2, 1, True), (1, 2, 2, 1, True), (1, 1, 1, 1)]
    for key in wanted:
        manager.kernel_map(*key[:4], transposed=len(key) > 4)
    return manager, [(key, ('_blocked',)) for key in wanted]


def test_maps_built_by_two_threads_match_and_each_is_built_once(monkeypatch):
    coords, _ = random_voxels(3, occupancy=0.3, batch=2)
    reference, requests = _network_map_requests(coords)
    builds = []
    submanifold = CoordinateManager._submanifold_map

    def counted(self, *args):
        builds.append(args)
        return submanifold(self, *args)
    monkeypatch.setattr(CoordinateManager, '_submanifold_map', counted)
    for _ in range(5):
        builds.clear()
        manager = CoordinateManager(coords)
        builder = manager.prebuild_in_background(requests)
        for key, _ in requests:  # the "network" asks in the same order meanwhile
            got = manager.kernel_map(*key[:4], transposed=len(key) > 4)
            want = reference.kernel_map(*key[:4], transposed=len(key) > 4)
            assert torch.equal(got.in_rows, want.in_rows) and torch.equal(got.out_rows,
                                                                          want.out_rows)
            assert (got.bounds, got.kernel_index, got.identity) == (
                want.bounds, want.kernel_index, want.identity)
        builder.join(timeout=30)
        assert not builder.is_alive()
        assert sorted(builds) == sorted(set(builds)) and len(builds) == 4  # strides 1, 2, 4; 1x1
    # built by prebuild alone, every map comes with the products asked for
    manager = CoordinateManager(coords)
    manager.prebuild(requests)
    assert all('_blocked' in manager.kernel_map(*k[:4], transposed=len(k) > 4).__dict__
               for k, _ in requests)


@pytest.mark.parametrize('early', [True, False])
def test_a_thread_lent_to_the_map_builder_comes_back(early):
    coords, _ = random_voxels(5)
    _, requests = _network_map_requests(coords)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        manager = CoordinateManager(coords)
        builder = manager.prebuild_in_background(requests, lend_thread=True,
                                                 give_back_early=early)
        assert torch.get_num_threads() == 2             # lent while the maps are built
        builder.join(timeout=30)
        manager.kernel_map(1, 3)                        # the network's next step
        assert torch.get_num_threads() == (3 if early else 2)
        manager.join_background()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def _prebuild_in_thread(manager, requests):
    """``manager.prebuild(requests)`` in a started thread: (thread, the errors it raised)."""
    errors = []

    def run():
        try:
            manager.prebuild(requests)
        except Exception as exc:  # noqa: BLE001 - the test asserts there are none
            errors.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_a_thread_building_queued_maps_never_sees_a_false_dead_end():
    """One thread runs prebuild while another asks for the maps in the network's order and
    helps with the queue: neither may give up on a map the other is about to make."""
    coords, _ = random_voxels(6, occupancy=0.3, batch=2)
    _, requests = _network_map_requests(coords)
    for _ in range(30):
        manager = CoordinateManager(coords)
        builder, errors = _prebuild_in_thread(manager, requests)
        for key, _ in requests:
            manager.kernel_map(*key[:4], transposed=len(key) > 4)
        builder.join(timeout=30)
        assert not errors and not builder.is_alive()


def test_a_queued_map_taken_but_not_yet_claimed_is_waited_for(monkeypatch):
    """The race behind a false dead end, widened with delays: the network thread, waiting for
    the stride-1 map the builder is making, takes the map that creates stride 2 from the
    queue and is slow to start it; the builder, left with a stride-2 map only, must wait for
    it instead of giving up."""
    coords, _ = random_voxels(7)
    requests = [((1, 3, 1, 1), ()), ((1, 2, 2, 1), ()), ((2, 3, 1, 1), ())]
    kernel_map, submanifold = CoordinateManager._kernel_map, CoordinateManager._submanifold_map

    def slow_start(self, key, transposed, products):
        if key == (1, 2, 2, 1):
            time.sleep(0.3)  # taken from the queue, not yet claimed
        return kernel_map(self, key, transposed, products)

    def slow_build(self, stride, *args):
        if stride == 1:
            time.sleep(0.1)  # claimed, in progress
        return submanifold(self, stride, *args)
    monkeypatch.setattr(CoordinateManager, '_kernel_map', slow_start)
    monkeypatch.setattr(CoordinateManager, '_submanifold_map', slow_build)
    manager = CoordinateManager(coords)
    builder, errors = _prebuild_in_thread(manager, requests)
    time.sleep(0.03)                       # the builder has claimed the stride-1 map
    manager.kernel_map(1, 3)               # waits for it and helps with the queue
    builder.join(timeout=30)
    assert not errors
    assert manager.kernel_map(2, 3).num_out == manager.coordinates(2).shape[0]


def test_a_failing_background_build_leaves_the_error_to_the_caller():
    coords, _ = random_voxels(4)
    manager = CoordinateManager(coords)
    builder = manager.prebuild_in_background([((8, 3, 1, 1), ())])  # stride 8 never made
    builder.join(timeout=30)
    assert not builder.is_alive()
    with pytest.raises(SparseError, match='no coordinates at tensor stride 8'):
        manager.kernel_map(8, 3)
    assert manager.kernel_map(1, 3).num_out == coords.shape[0]  # the manager still works


def test_coordinate_lookup_finds_present_and_rejects_absent_voxels():
    coords, _ = random_voxels(11, occupancy=0.6)
    manager = CoordinateManager(coords)
    perm = torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(2))
    assert torch.equal(manager.find(coords[perm]), perm)
    absent = torch.tensor([[0, LOW - 1, 0, 0], [1, 0, GRID + LOW, 0], [2, 0, 0, 0],
                           [0, 10 ** 6, 0, 0], [0, -10 ** 6, 5, 5]], dtype=torch.int32)
    assert manager.find(absent).tolist() == [-1] * 5
