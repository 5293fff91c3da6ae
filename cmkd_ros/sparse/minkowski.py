"""MinkowskiEngine backend behind the interface of :class:`cmkd_ros.sparse.tensor.SparseTensor`.

:class:`MinkowskiTensor` wraps a ``MinkowskiEngine.SparseTensor`` and implements the operations the
layers call, so the same modules and weights run on either backend. Convolution weights stay in
this project's layout (``(k^3, Cin, Cout)``, offsets z fastest) and are permuted on the fly to
MinkowskiEngine's (offsets x fastest); gradients flow back through the permutation.

MinkowskiEngine is optional: install it with ``scripts/build_minkowski.sh`` (see its header).
"""
from __future__ import annotations

import importlib

import torch

from .coords import CoordinateManager, SparseError

_INSTALL_HINT = ('MinkowskiEngine is not installed (or fails to import); build and install it '
                 'with scripts/build_minkowski.sh [VENV], or use backend="torch"')


class MinkowskiUnavailable(ImportError):
    """MinkowskiEngine was requested but cannot be imported."""


def import_minkowski():
    """The ``MinkowskiEngine`` module, or :class:`MinkowskiUnavailable` naming how to get it."""
    try:
        return importlib.import_module('MinkowskiEngine')
    except Exception as exc:  # ImportError, or an old release failing on collections.Sequence
        raise MinkowskiUnavailable(f'{_INSTALL_HINT} ({type(exc).__name__}: {exc})') from exc


def minkowski_available() -> bool:
    """True when ``import MinkowskiEngine`` works."""
    try:
        import_minkowski()
    except MinkowskiUnavailable:
        return False
    return True


def to_minkowski_kernel(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weight ``(k^3, Cin, Cout)`` with offsets z fastest -> MinkowskiEngine's x-fastest order."""
    k = kernel_size
    cin, cout = weight.shape[1], weight.shape[2]
    return weight.reshape(k, k, k, cin, cout).permute(2, 1, 0, 3, 4).reshape(k ** 3, cin, cout)


def from_minkowski_kernel(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Inverse of :func:`to_minkowski_kernel` (the permutation is its own inverse)."""
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0)
    return to_minkowski_kernel(kernel, kernel_size)


class MinkowskiTensor:
    """A ``MinkowskiEngine.SparseTensor`` behind this project's sparse tensor interface."""

    backend = 'minkowski'

    def __init__(self, features: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                 *, me_tensor=None):
        self.ME = import_minkowski()
        if me_tensor is None:
            if features is None or coords is None:
                raise SparseError('give features and coords, or me_tensor')
            # Check the coordinates with the same rules as the torch backend (unique, in range).
            CoordinateManager(coords)
            me_tensor = self.ME.SparseTensor(
                features,
                coordinates=coords.to(device=features.device, dtype=torch.int32).contiguous(),
                quantization_mode=self.ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE)
        self.me = me_tensor

    @property
    def features(self) -> torch.Tensor:
        return self.me.F

    F = features

    @property
    def coords(self) -> torch.Tensor:
        """``(N, 4) int32 [batch, x, y, z]`` in the row order of :attr:`features`."""
        return self.me.C.to(torch.int32)

    @property
    def stride(self) -> int:
        return int(self.me.tensor_stride[0])

    def __len__(self) -> int:
        return self.me.F.shape[0]

    def __repr__(self) -> str:
        return (f'MinkowskiTensor(n={len(self)}, channels={self.features.shape[1]}, '
                f'stride={self.stride})')

    def _wrap(self, features: torch.Tensor, key) -> MinkowskiTensor:
        me = self.ME.SparseTensor(features, coordinate_map_key=key,
                                  coordinate_manager=self.me.coordinate_manager)
        return MinkowskiTensor(me_tensor=me)

    def replace(self, features: torch.Tensor) -> MinkowskiTensor:
        return self._wrap(features, self.me.coordinate_map_key)

    @property
    def device(self) -> torch.device:
        return self.me.F.device

    def conv(self, weight: torch.Tensor, kernel_size: int, stride: int = 1, dilation: int = 1,
             transposed: bool = False, bias: torch.Tensor | None = None,
             residual: MinkowskiTensor | None = None, relu: bool = False) -> MinkowskiTensor:
        out = self._conv(weight, kernel_size, stride, dilation, transposed)
        feats = out.features
        if bias is not None:
            feats = feats + bias
        if residual is not None:
            feats = feats + residual.features
        if relu:
            feats = torch.relu(feats)
        return out if feats is out.features else out.replace(feats)

    def _conv(self, weight, kernel_size, stride, dilation, transposed) -> MinkowskiTensor:
        ME = self.ME
        if kernel_size == 1 and stride == 1:
            return self.replace(self.me.F.mm(weight[0]))
        if transposed and (stride < 2 or self.stride % stride):
            raise SparseError(f'transposed conv with stride {stride} cannot upsample a tensor '
                              f'at stride {self.stride}')
        generator = ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dilation=dilation,
                                       dimension=3)
        function = (ME.MinkowskiConvolutionTransposeFunction if transposed
                    else ME.MinkowskiConvolutionFunction)
        mode = importlib.import_module('MinkowskiEngineBackend._C').ConvolutionMode.DEFAULT
        out_key = ME.CoordinateMapKey(4)
        feats = function.apply(self.me.F, to_minkowski_kernel(weight, kernel_size), generator,
                               mode, self.me.coordinate_map_key, out_key,
                               self.me.coordinate_manager)
        return self._wrap(feats, out_key)

    def _pool(self, module) -> MinkowskiTensor:
        return MinkowskiTensor(me_tensor=module(self.me))

    def pool(self, kind: str, kernel_size: int, stride: int) -> MinkowskiTensor:
        ME = self.ME
        classes = {'max': ME.MinkowskiMaxPooling, 'avg': ME.MinkowskiAvgPooling}
        if kind not in classes:
            raise SparseError(f'pool kind must be one of {sorted(classes)}, got {kind!r}')
        return self._pool(classes[kind](kernel_size=kernel_size, stride=stride, dimension=3))

    def upsample_nearest(self, factor: int) -> MinkowskiTensor:
        if factor < 2 or self.stride % factor:
            raise SparseError(f'cannot upsample stride {self.stride} by {factor}')
        # Kernel == stride: every finer voxel has exactly one parent, so unpooling copies it.
        return self._pool(self.ME.MinkowskiPoolingTranspose(kernel_size=factor, stride=factor,
                                                            dimension=3))

    def cat(self, other: MinkowskiTensor) -> MinkowskiTensor:
        if other.me.coordinate_map_key != self.me.coordinate_map_key:
            raise SparseError('cat needs tensors on the same coordinates; got strides '
                              f'{self.stride} and {other.stride}')
        return MinkowskiTensor(me_tensor=self.ME.cat(self.me, other.me))


def rows_in_order(coords: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Row of ``coords`` holding each row of ``reference`` (both ``(N, 4)``, same voxel set)."""
    manager = CoordinateManager(coords)
    rows = manager.find(reference)
    if bool((rows < 0).any()):
        raise SparseError('reference coordinates missing from the output coordinates')
    return rows
