"""Sparse 3D convolution: a pure-PyTorch backend and a MinkowskiEngine adapter, one layer set.

``SparseTensor(features (N, C), coords (N, 4) int32 [batch, x, y, z])`` starts a coordinate
manager that caches coordinates per tensor stride and kernel maps per (stride, kernel); the layers
(:mod:`.layers`) run on it or on a ``MinkowskiTensor`` (:mod:`.minkowski`) with the same weights.
"""
from . import native
from .coords import CoordinateManager, KernelMap, SparseError, kernel_offsets
from .functional import sparse_conv, SparseConvFunction
from .layers import (ConvBN, ConvBNReLU, SparseActivation, SparseBatchNorm, SparseConv3d,
                     SparsePool, SparseReLU, SparseUpsample, sparse_cat)
from .minkowski import (MinkowskiTensor, MinkowskiUnavailable, from_minkowski_kernel,
                        import_minkowski, minkowski_available, to_minkowski_kernel)
from .tensor import SparseTensor

__all__ = [
    'ConvBN', 'ConvBNReLU', 'CoordinateManager', 'KernelMap', 'MinkowskiTensor',
    'MinkowskiUnavailable',
    'SparseActivation', 'SparseBatchNorm', 'SparseConv3d', 'SparseConvFunction', 'SparseError',
    'SparsePool', 'SparseReLU', 'SparseTensor', 'SparseUpsample', 'from_minkowski_kernel',
    'import_minkowski', 'kernel_offsets', 'minkowski_available', 'sparse_cat', 'sparse_conv',
    'native', 'to_minkowski_kernel',
]
