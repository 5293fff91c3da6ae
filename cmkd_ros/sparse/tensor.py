"""Sparse tensor of the pure-PyTorch backend.

A sparse tensor is features ``(N, C)`` on coordinates ``(N, 4) int32 [batch, x, y, z]`` at a
tensor stride. The layers in :mod:`cmkd_ros.sparse.layers` only call the methods below
(``conv``, ``pool``, ``upsample_nearest``, ``cat``, ``replace``), which the MinkowskiEngine adapter
(:mod:`cmkd_ros.sparse.minkowski`) implements too: one set of modules and weights, two backends.
"""
from __future__ import annotations

import torch

from . import native
from .coords import CoordinateManager, SparseError
from .functional import NATIVE_DTYPES, average_matrix, native_layout, sparse_conv

POOL_KINDS = ('max', 'avg')


class SparseTensor:
    """Features ``(N, C)`` on the coordinates of ``manager`` at tensor stride ``stride``."""

    backend = 'torch'

    def __init__(self, features: torch.Tensor, coords: torch.Tensor | None = None, *,
                 stride: int = 1, manager: CoordinateManager | None = None):
        if manager is None:
            if coords is None:
                raise SparseError('give coords (N, 4) int32 or an existing coordinate manager')
            if stride != 1:
                raise SparseError('a new coordinate manager starts at tensor stride 1')
            manager = CoordinateManager(coords.to(features.device))
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            raise SparseError(f'features must be a (N, C) tensor, got '
                              f'{getattr(features, "shape", type(features))}')
        n = manager.coordinates(stride).shape[0]
        if features.shape[0] != n:
            raise SparseError(f'{features.shape[0]} feature rows for {n} coordinates at '
                              f'stride {stride}')
        self._features = features
        self._second = None  # more channels of a lazy concatenation (see cat)
        self.stride = int(stride)
        self.manager = manager

    @property
    def features(self) -> torch.Tensor:
        """``(N, C)``; a lazy concatenation (:meth:`cat`) is made here on first use."""
        if self._second is not None:
            self._features = torch.cat([self._features, self._second], dim=1)
            self._second = None
        return self._features

    @property
    def device(self) -> torch.device:
        return self._features.device

    @property
    def coords(self) -> torch.Tensor:
        """``(N, 4) int32 [batch, x, y, z]`` in stride-1 voxel units (multiples of stride)."""
        return self.manager.coordinates(self.stride)

    @property
    def F(self) -> torch.Tensor:  # noqa: N802 (MinkowskiEngine's name)
        return self.features

    def __len__(self) -> int:
        return self._features.shape[0]

    def __repr__(self) -> str:
        return (f'SparseTensor(n={len(self)}, channels={self.features.shape[1]}, '
                f'stride={self.stride})')

    def replace(self, features: torch.Tensor) -> SparseTensor:
        """The same coordinates with new features ``(N, C')``."""
        return SparseTensor(features, stride=self.stride, manager=self.manager)

    # -- operations used by the layers --------------------------------------------------------
    def conv(self, weight: torch.Tensor, kernel_size: int, stride: int = 1, dilation: int = 1,
             transposed: bool = False, bias: torch.Tensor | None = None,
             residual: SparseTensor | None = None, relu: bool = False) -> SparseTensor:
        """Sparse convolution with weight ``(k^3, Cin, Cout)`` (offsets z fastest), optional bias,
        then ``+ residual`` (a tensor on the output coordinates) and a ReLU with ``relu``.

        ``stride == 1``: output on the input coordinates (submanifold). ``stride > 1``: output on
        the coarser coordinates ``floor(c / (s r)) * s r``. ``transposed``: output on the cached
        finer coordinates at ``tensor stride / stride`` (which an encoder created before).
        """
        if transposed:
            if stride < 2 or self.stride % stride:
                raise SparseError(f'transposed conv with stride {stride} cannot upsample a '
                                  f'tensor at stride {self.stride}')
            target = self.stride // stride
            kmap = self.manager.kernel_map(target, kernel_size, stride, dilation,
                                           transposed=True)
        else:
            target = self.stride * stride
            kmap = self.manager.kernel_map(self.stride, kernel_size, stride, dilation)
        if residual is not None and (residual.manager is not self.manager
                                     or residual.stride != target):
            raise SparseError(f'the residual lies at stride {residual.stride}, the output at '
                              f'{target} (or on other coordinates)')
        feats, second = (self._features, self._second) if self._second is not None else (
            self.features, None)
        out = sparse_conv(feats, weight, kmap, bias, feats2=second, relu=relu,
                          residual=None if residual is None else residual.features)
        return SparseTensor(out, stride=target, manager=self.manager)

    def pool(self, kind: str, kernel_size: int, stride: int) -> SparseTensor:
        """Max or average (over present inputs) pooling to the stride ``self.stride * stride``."""
        if kind not in POOL_KINDS:
            raise SparseError(f'pool kind must be one of {POOL_KINDS}, got {kind!r}')
        kmap = self.manager.kernel_map(self.stride, kernel_size, stride)
        if kmap.identity >= 0:
            raise SparseError('pooling needs stride > 1 or an even kernel')
        feats = self.features
        kernels = native.module() if feats.device.type == 'cpu' else None
        if kernels is not None and feats.dtype in NATIVE_DTYPES and not (
                torch.is_grad_enabled() and feats.requires_grad):
            pin, pout, seg, block = native_layout(kmap)
            out = kernels.pool_forward(feats.contiguous(), pin, pout, seg, kmap.volume,
                                       kmap.num_in, kmap.num_out, block, kind == 'avg')
            return SparseTensor(out, stride=self.stride * stride, manager=self.manager)
        if kind == 'avg' and feats.device.type == 'cpu':
            # one row-parallel sparse product, weights 1 / count (16-bit features in float32)
            average = average_matrix(kmap, feats.dtype)
            with torch.autocast('cpu', enabled=False):  # autocast would cast it to 16 bits
                out = torch.mm(average, feats.to(average.dtype)).to(feats.dtype)
            return SparseTensor(out, stride=self.stride * stride, manager=self.manager)
        rows = feats.index_select(0, kmap.in_rows)
        index = kmap.out_rows.unsqueeze(1).expand(-1, feats.shape[1])
        out = feats.new_zeros(kmap.num_out, feats.shape[1])
        if kind == 'max':
            out = out.scatter_reduce(0, index, rows, 'amax', include_self=False)
        else:
            out = out.index_add(0, kmap.out_rows, rows)
            count = torch.bincount(kmap.out_rows, minlength=kmap.num_out).clamp_(min=1)
            out = out / count.to(out.dtype).unsqueeze(1)
        return SparseTensor(out, stride=self.stride * stride, manager=self.manager)

    def upsample_nearest(self, factor: int) -> SparseTensor:
        """Copy each voxel's features to its children at the cached stride ``stride / factor``."""
        if factor < 2 or self.stride % factor:
            raise SparseError(f'cannot upsample stride {self.stride} by {factor}')
        target = self.stride // factor
        parent, _ = self.manager.parents(target, factor)
        return SparseTensor(self.features.index_select(0, parent), stride=target,
                            manager=self.manager)

    def cat(self, other: SparseTensor) -> SparseTensor:
        """Channel concatenation with a tensor on the same coordinates (skip connection)."""
        if other.manager is not self.manager or other.stride != self.stride:
            raise SparseError('cat needs tensors on the same coordinates (same manager and '
                              f'stride); got strides {self.stride} and {other.stride}')
        first, second = self.features, other.features
        if (native.module() is not None and first.device.type == 'cpu'
                and not torch.is_grad_enabled() and first.dtype == second.dtype):
            # Lazy: a compiled convolution reads both parts; anything else concatenates.
            out = self.replace(first)
            out._second = second
            return out
        return self.replace(torch.cat([first, second], dim=1))
