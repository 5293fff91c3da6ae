"""Compiled sparse kernels (cmkd_ros.sparse.native) against the pure-PyTorch reference path.

Both paths run on the same inputs in one process (``native.disabled()`` switches to the
reference): coordinate sets, kernel maps, convolutions (bias, residual, ReLU, two inputs),
pooling and whole students must agree. The comparisons run only where the kernels are built
(scripts/install.sh builds them); ``CMKD_REQUIRE_NATIVE=1`` (scripts/test.sh sets it) turns a
missing build into a failure instead of a smaller test set.
"""
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cmkd_ros.config import build
from cmkd_ros.models import StudentConfig, build_student, point_features, voxelize
from cmkd_ros.sparse import (ConvBN, CoordinateManager, SparseConv3d, SparsePool, SparseTensor,
                             native, sparse_cat)
from cmkd_ros.sparse.functional import native_layout

REQUIRED = os.environ.get('CMKD_REQUIRE_NATIVE', '') == '1'
AVAILABLE = native.available()
needs_native = pytest.mark.skipif(not AVAILABLE, reason=f'compiled kernels: {native.status()}')

pytestmark = pytest.mark.usefixtures('single_torch_thread')


def random_voxels(seed, n=600, extent=14, batch=2, channels=8, dtype=torch.float32):
    """Unique voxels of ``batch`` scans around the origin (negative coordinates), shuffled."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randint(-extent, extent, (n, 3), generator=gen)
    b = torch.randint(0, batch, (n, 1), generator=gen)
    coords = torch.unique(torch.cat([b, cells], 1), dim=0)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)].to(torch.int32)
    feats = torch.randn(coords.shape[0], channels, generator=gen).to(dtype)
    return coords, feats


def both(fn):
    """``fn()`` with the compiled kernels, then with the reference path."""
    fast = fn()
    with native.disabled():
        ref = fn()
    return fast, ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def same_pairs(a, b):
    """Kernel maps with equal sizes and, per kernel offset, the same (input, output) pairs."""
    assert (a.volume, a.num_in, a.num_out, a.identity) == (b.volume, b.num_in, b.num_out,
                                                          b.identity)

    def per_offset(m):
        groups = {}
        for g, k in enumerate(m.kernel_index):
            rows = torch.stack([m.in_rows[m.bounds[g]:m.bounds[g + 1]],
                                m.out_rows[m.bounds[g]:m.bounds[g + 1]]], 1)
            groups[k] = sorted(map(tuple, rows.tolist()))
        return groups
    assert per_offset(a) == per_offset(b)


def test_available_when_required_else_reported_clearly(tmp_path, monkeypatch):
    if REQUIRED:
        assert AVAILABLE, f'CMKD_REQUIRE_NATIVE=1 but {native.status()}'
    # 1. No build for this environment: the reference path, and a status that says how to build.
    monkeypatch.setenv('CMKD_NATIVE_CACHE', str(tmp_path))
    monkeypatch.setenv('CMKD_SPARSE_NATIVE', 'auto')
    monkeypatch.setattr(native, '_state', {})
    assert native.module() is None
    assert 'build_native.sh' in native.status()
    # 2. Required but missing: a clear error at the point of use.
    monkeypatch.setenv('CMKD_SPARSE_NATIVE', '1')
    monkeypatch.setattr(native, '_state', {})
    with pytest.raises(native.NativeUnavailable, match='not built'):
        native.module()
    monkeypatch.setenv('CMKD_SPARSE_NATIVE', 'sometimes')
    with pytest.raises(ValueError, match='CMKD_SPARSE_NATIVE'):
        native.mode()
    # 3. Off: never loaded, even where built.
    monkeypatch.setenv('CMKD_SPARSE_NATIVE', '0')
    monkeypatch.setattr(native, '_state', {})
    assert native.module() is None and 'CMKD_SPARSE_NATIVE=0' in native.status()


def test_build_key_names_torch_python_and_source():
    key = native.build_key()
    assert key.startswith(f'torch-{torch.__version__}-') and len(key.split('/')[-1]) == 16
    assert native.library_path().name == f'{native.NAME}.so'


@needs_native
def test_disabled_switches_to_the_reference_path():
    assert native.module() is not None
    with native.disabled():
        assert native.module() is None
        with native.disabled():
            assert native.module() is None
        assert native.module() is None
    assert native.module() is not None


@needs_native
@pytest.mark.parametrize('seed', [0, 1])
def test_coordinate_sets_parents_and_kernel_maps_match(seed):
    coords, _ = random_voxels(seed)
    fast, ref = both(lambda: CoordinateManager(coords))
    assert torch.equal(fast.origin, ref.origin)
    assert torch.equal(fast.pack(coords), ref.pack(coords))
    requests = [(1, 3, 1, 1), (1, 2, 1, 1), (1, 3, 1, 2), (1, 5, 1, 1), (1, 2, 2, 1),
                (2, 3, 1, 1), (2, 3, 2, 1), (4, 3, 1, 1), (4, 2, 2, 1), (8, 3, 1, 1)]
    for request in requests:
        a = fast.kernel_map(*request)
        with native.disabled():
            b = ref.kernel_map(*request)
        same_pairs(a, b)
    for stride in (1, 2, 4, 8):
        assert torch.equal(fast.coordinates(stride), ref.coordinates(stride))
        parent_a, code_a = fast.parents(stride, 2)
        parent_b, code_b = ref.parents(stride, 2)
        assert torch.equal(parent_a, parent_b) and torch.equal(code_a, code_b)
    assert torch.equal(fast.unpack(fast._sets[4].keys), ref.coordinates(4))


@needs_native
def test_sorted_input_gives_identical_maps_not_just_equal_pairs():
    coords, _ = random_voxels(2)
    order = torch.argsort(CoordinateManager(coords).pack(coords))
    coords = coords[order]  # voxelize() order: the maps come out in the same order too
    fast, ref = both(lambda: CoordinateManager(coords).kernel_map(1, 3))
    assert torch.equal(fast.in_rows, ref.in_rows) and torch.equal(fast.out_rows, ref.out_rows)
    assert fast.bounds == ref.bounds and fast.kernel_index == ref.kernel_index


@needs_native
@pytest.mark.parametrize('kernel_size,stride,transposed,channels', [
    (3, 1, False, (8, 16)), (3, 1, False, (5, 7)), (1, 1, False, (8, 32)), (2, 2, False, (8, 48)),
    (3, 2, False, (8, 16)), (2, 2, True, (8, 16)), (5, 1, False, (8, 80))])
def test_convolutions_match_the_reference(kernel_size, stride, transposed, channels):
    cin, cout = channels
    coords, feats = random_voxels(3, channels=cin)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(kernel_size ** 3, cin, cout, generator=gen) / cin
    bias = torch.randn(cout, generator=gen)

    def run():
        x = SparseTensor(feats, coords)
        if transposed:
            x = x.conv(torch.randn(8, cin, cin, generator=torch.Generator().manual_seed(5)), 2,
                       2)
        with torch.no_grad():
            return x.conv(weight, kernel_size, stride, transposed=transposed, bias=bias)
    fast, ref = both(run)
    assert fast.stride == ref.stride
    assert torch.equal(fast.coords, ref.coords)
    assert rel_err(fast.features, ref.features) < 1e-5


@needs_native
def test_every_float32_kernel_variant_the_cpu_has_matches_the_reference():
    # register tiles of 16 floats (AVX-512), of 8 (AVX2, baseline), on every column remainder:
    # whole tiles, partial tiles, single vectors and leftover columns
    kernels = native.module()
    variants = [v for v in ('avx512', 'avx2', 'baseline') if kernels.use_float32_kernels(v) == v]
    try:
        assert 'baseline' in variants
        for variant in variants:
            kernels.use_float32_kernels(variant)
            for cin, cout in ((5, 1), (5, 7), (16, 8), (3, 12), (16, 20), (8, 24), (16, 40),
                              (4, 48), (16, 64), (8, 72), (16, 100)):
                coords, feats = random_voxels(cout, n=300, channels=cin)
                gen = torch.Generator().manual_seed(cin * 1000 + cout)
                weight = torch.randn(27, cin, cout, generator=gen) / cin

                def run():
                    with torch.no_grad():
                        return SparseTensor(feats, coords).conv(weight, 3)
                fast, ref = both(run)
                assert rel_err(fast.features, ref.features) < 1e-5, (variant, cin, cout)
    finally:
        kernels.use_float32_kernels('auto')


@needs_native
def test_fused_residual_relu_and_concatenated_inputs_match():
    coords, feats = random_voxels(6, channels=16)
    gen = torch.Generator().manual_seed(7)
    other = torch.randn(feats.shape[0], 8, generator=gen)
    skip = torch.randn(feats.shape[0], 32, generator=gen)
    weight = torch.randn(27, 24, 32, generator=gen) / 24

    def run():
        x = SparseTensor(feats, coords)
        with torch.no_grad():
            joined = sparse_cat(x, x.replace(other))  # lazy with the compiled kernels
            out = joined.conv(weight, 3, bias=torch.ones(32), residual=x.replace(skip),
                              relu=True)
            return out.features, joined.features
    (fast, fast_joined), (ref, ref_joined) = both(run)
    assert rel_err(fast, ref) < 1e-5
    assert fast.min() == 0 and torch.equal(fast_joined, ref_joined)  # made when asked for


@needs_native
def test_bfloat16_convolution_and_pooling_match_within_rounding():
    coords, feats = random_voxels(8, channels=16)
    weight = torch.randn(27, 16, 32, generator=torch.Generator().manual_seed(9)) / 16

    def run():
        x = SparseTensor(feats.bfloat16(), coords)
        with torch.no_grad():
            out = x.conv(weight.bfloat16(), 3, bias=torch.zeros(32, dtype=torch.bfloat16))
            return (out.features, SparsePool('avg', 2, 2)(out).features,
                    SparsePool('max', 2, 2)(out).features)
    fast, ref = both(run)
    for a, b in zip(fast, ref):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, b) < 1e-2  # float32 sums, one rounding (the reference rounds more)
    exact = SparseTensor(feats, coords).conv(weight, 3).features.detach()
    assert rel_err(fast[0], exact) < rel_err(ref[0], exact) + 1e-3


@needs_native
@pytest.mark.parametrize('channels', [(2, 16), (16, 16), (16, 40), (48, 32), (96, 48)])
def test_bfloat16_kernels_agree_with_and_without_amx_tiles(channels):
    # AMX tiles where the CPU has them, else float32 arithmetic on bfloat16 copies: the sums
    # are float32 either way (same result up to their order)
    kernels = native.module()
    cin, cout = channels
    coords, feats = random_voxels(13, channels=cin, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(14)
    weight = (torch.randn(27, cin, cout, generator=gen) / cin).bfloat16()
    skip = torch.randn(feats.shape[0], cout, generator=gen).bfloat16()
    half = cin // 2

    def run():
        x = SparseTensor(feats[:, :half].contiguous(), coords)
        with torch.no_grad():
            joined = sparse_cat(x, x.replace(feats[:, half:].contiguous()))
            return joined.conv(weight, 3, bias=torch.ones(cout, dtype=torch.bfloat16),
                               residual=x.replace(skip), relu=True).features.float()
    amx = kernels.use_amx(True)
    try:
        tiles = run()
        kernels.use_amx(False)
        plain = run()
    finally:
        kernels.use_amx(True)
    exact = (SparseTensor(feats.float(), coords).conv(weight.float(), 3, bias=torch.ones(cout),
                                                      residual=None).features.detach()
             + skip.float()).relu()
    assert rel_err(plain, exact) < 1e-2 and rel_err(tiles, exact) < 1e-2
    assert rel_err(tiles, plain) < (1e-2 if amx else 1e-7)


@needs_native
@pytest.mark.parametrize('kind', ['max', 'avg'])
def test_pooling_matches_the_reference(kind):
    coords, feats = random_voxels(10)

    def run():
        with torch.no_grad():
            return SparsePool(kind, 2, 2)(SparseTensor(feats, coords)).features
    fast, ref = both(run)
    assert rel_err(fast, ref) < 1e-6


@needs_native
def test_training_gradients_agree():
    # the autograd function runs the compiled convolution forward and for input gradients
    coords, feats = random_voxels(11)
    layer = SparseConv3d(8, 16, 3, bias=True)
    upstream = torch.randn(feats.shape[0], 16, generator=torch.Generator().manual_seed(12))

    def run():
        x = SparseTensor(feats.clone().requires_grad_(True), coords)
        layer.zero_grad()
        (layer(x).features * upstream).sum().backward()
        return x.features.grad, layer.weight.grad.clone(), layer.bias.grad.clone()
    fast, ref = both(run)
    for a, b in zip(fast, ref):
        assert rel_err(a, b) < 1e-5


@needs_native
def test_layouts_refuse_rows_out_of_range():
    kernels = native.module()
    rows = torch.tensor([0, 5])
    bounds, offsets = torch.tensor([0, 2]), torch.tensor([0])
    with pytest.raises(RuntimeError, match='out of range'):
        kernels.conv_layout(rows, torch.tensor([0, 1]), bounds, offsets, 1, 3, 2, 64)
    with pytest.raises(RuntimeError, match='cover'):
        kernels.conv_layout(rows, torch.tensor([0, 1]), torch.tensor([0, 1]), offsets, 1, 9, 2,
                            64)
    with pytest.raises(RuntimeError, match='float32 or bfloat16'):
        m = CoordinateManager(torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)).kernel_map(1, 3)
        kernels.conv_forward(torch.ones(1, 2, dtype=torch.float64), None,
                             torch.ones(27, 2, 2, dtype=torch.float64), None, None,
                             *native_layout(m)[:3], 1, 1, 64, 13, False)


@needs_native
@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
def test_small_student_on_the_nuscenes_scan_matches(data_dir, precision):
    points = np.fromfile(data_dir / 'nuscenes_sample' / 'LIDAR_TOP.bin',
                         dtype=np.float32).reshape(-1, 5)
    torch.manual_seed(0)
    student = build_student(build(StudentConfig, dict(arch='small', feature_dim=64,
                                                      da_width=32, backend='torch'))).eval()
    with torch.no_grad():
        for m in student.modules():  # non-trivial batch norms, so that folding matters
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    fast, ref = both(lambda: student.predict(points[:, :3], points[:, 3], precision=precision))
    agree = float((fast[0] == ref[0]).float().mean())
    if precision == 'float32':
        assert agree == 1.0 and float((fast[1] - ref[1]).abs().max()) < 1e-4
    else:  # the reference rounds every scatter to 16 bits; the kernels sum in float32
        assert agree > 0.98 and float((fast[1] - ref[1]).abs().max()) < 0.05
    # the same through the forward pass, checked against float32 layer by layer
    feats = point_features(points[:, :3], points[:, 3], 'height')
    coords, vfeats, _ = voxelize(points[:, :3], feats, 0.1)
    coords = torch.from_numpy(np.concatenate([np.zeros((len(coords), 1), np.int32), coords], 1))
    with torch.no_grad():
        out, expected = both(lambda: student(coords, torch.from_numpy(vfeats))['logits'])
    assert rel_err(out, expected) < 1e-5


@needs_native
def test_conv_module_with_a_second_input_tensor_keeps_one_weight():
    coords, feats = random_voxels(12, channels=6)
    layer = SparseConv3d(12, 4, 3).eval()
    with torch.no_grad():
        x = SparseTensor(feats, coords)
        joined = sparse_cat(x, x)
        lazy = layer(joined).features
        eager = layer(x.replace(torch.cat([feats, feats], 1))).features
    assert rel_err(lazy, eager) < 1e-6


@needs_native
def test_kernels_let_other_python_threads_run():
    """A compiled kernel releases the GIL while it runs (the segment node's preparing thread and
    the kernel-map builder run beside the network): a thread that only needs the GIL for a
    moment every millisecond makes progress during a long convolution. The switch interval is
    raised to 1 s so that a kernel holding the GIL would block that thread for its whole run."""
    side = torch.arange(40, dtype=torch.int32)
    grid = torch.stack(torch.meshgrid(side, side, side, indexing='ij'), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(grid.shape[0], 1, dtype=torch.int32), grid], 1)
    kmap = CoordinateManager(coords).kernel_map(1, 3)
    feats = torch.randn(coords.shape[0], 32)
    weight = torch.randn(27, 32, 32)
    kernels = native.module()
    layout = native_layout(kmap)

    def convolve():
        return kernels.conv_forward(feats, None, weight, None, None, *layout[:3], kmap.num_in,
                                    kmap.num_out, layout[3], kmap.identity, False)

    ticks, stop = [0], threading.Event()

    def ticker():
        while not stop.wait(0.001):
            ticks[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        during = []
        for _ in range(3):
            before = ticks[0]
            start = time.perf_counter()
            convolve()
            elapsed = time.perf_counter() - start
            during.append((ticks[0] - before, elapsed))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    # at least one tick per 10 ms of kernel time (about 10 per 10 ms when the GIL is free)
    assert all(n >= max(1, int(elapsed / 0.01)) for n, elapsed in during), during
