"""Sparse layers: one set of parameters for both backends.

Each layer holds its parameters in the backend-independent layout (convolution weight
``(k^3, Cin, Cout)``, kernel offsets z fastest, as a dense ``conv3d`` weight flattened) and calls
the operations of the tensor it receives: a :class:`~cmkd_ros.sparse.tensor.SparseTensor`
(pure PyTorch) or a :class:`~cmkd_ros.sparse.minkowski.MinkowskiTensor` (MinkowskiEngine).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .coords import SparseError
from .functional import autocast_dtype
from .tensor import POOL_KINDS


class SparseConv3d(nn.Module):
    """Sparse 3D convolution; ``stride > 1`` downsamples, ``transposed`` upsamples.

    Weight ``(k^3, in_channels, out_channels)``; bias ``(out_channels,)`` or None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, bias: bool = False,
                 transposed: bool = False):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise SparseError(f'channels must be >= 1, got {in_channels} -> {out_channels}')
        if kernel_size < 1 or stride < 1 or dilation < 1:
            raise SparseError(f'kernel_size, stride, dilation must be >= 1, got '
                              f'{kernel_size}, {stride}, {dilation}')
        if transposed and stride < 2:
            raise SparseError('a transposed convolution needs stride >= 2')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.transposed = transposed
        volume = kernel_size ** 3
        self.weight = nn.Parameter(torch.empty(volume, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan = (self.out_channels if self.transposed else self.in_channels) * self.weight.shape[0]
        bound = 1.0 / math.sqrt(fan)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x):
        return x.conv(self.weight, self.kernel_size, self.stride, self.dilation, self.transposed,
                      bias=self.bias)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, dilation={self.dilation}, transposed={self.transposed}, '
                f'bias={self.bias is not None}')


class SparseBatchNorm(nn.BatchNorm1d):
    """Batch normalization of the features ``(N, C)``."""

    def forward(self, x):
        return x.replace(super().forward(x.features))


class SparseActivation(nn.Module):
    """Any elementwise activation (default ReLU) applied to the features."""

    def __init__(self, activation: nn.Module | None = None):
        super().__init__()
        self.activation = nn.ReLU() if activation is None else activation

    def forward(self, x):
        return x.replace(self.activation(x.features))


class SparseReLU(SparseActivation):
    def __init__(self):
        super().__init__(nn.ReLU())


class SparsePool(nn.Module):
    """Max or average pooling (the average over present voxels) with a stride >= 2."""

    def __init__(self, kind: str = 'max', kernel_size: int = 2, stride: int = 2):
        super().__init__()
        if kind not in POOL_KINDS:
            raise SparseError(f'pool kind must be one of {POOL_KINDS}, got {kind!r}')
        if stride < 2:
            raise SparseError(f'pooling stride must be >= 2, got {stride}')
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride

    def forward(self, x):
        return x.pool(self.kind, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f'{self.kind}, kernel_size={self.kernel_size}, stride={self.stride}'


class SparseUpsample(nn.Module):
    """Nearest upsampling: each voxel's features copied to its children at ``stride / factor``."""

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor < 2:
            raise SparseError(f'upsampling factor must be >= 2, got {factor}')
        self.factor = factor

    def forward(self, x):
        return x.upsample_nearest(self.factor)


def sparse_cat(*tensors):
    """Channel concatenation of sparse tensors on the same coordinates (skip connections)."""
    if not tensors:
        raise SparseError('sparse_cat needs at least one tensor')
    out = tensors[0]
    for other in tensors[1:]:
        out = out.cat(other)
    return out


class ConvBN(nn.Sequential):
    """Sparse convolution, batch norm, optional ReLU (modules ``0``, ``1``, ``2``).

    In eval mode the batch norm is folded into the convolution (scaled weight, one bias), so a
    layer is one pass over the features instead of three.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, transposed: bool = False, relu: bool = False):
        layers = [SparseConv3d(in_channels, out_channels, kernel_size, stride,
                               transposed=transposed),
                  SparseBatchNorm(out_channels)]
        if relu:
            layers.append(SparseReLU())
        super().__init__(*layers)

    def folded(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the convolution with the eval-mode batch norm folded in (in
        float32 arithmetic, then cast to ``dtype`` when given).

        Without gradients the result is cached per dtype until a parameter changes (version
        counters) or the layer runs in training mode, so inference does not refold (or recast)
        every layer per scan.
        """
        conv, bn = self[0], self[1]
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = None
        if not torch.is_grad_enabled():
            key = tuple((id(t), t._version, t.device, t.dtype) for t in sources if t is not None)
            cached = self.__dict__.get('_folded', {}).get(dtype)
            if cached is not None and cached[0] == key:
                return cached[1]
        if dtype is not None:
            result = tuple(t.to(dtype) for t in self.folded())
        else:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            result = (conv.weight * scale, shift)
        if key is not None:
            self.__dict__.setdefault('_folded', {})[dtype] = (key, result)
        return result

    def forward(self, x, residual=None, relu: bool = False):
        """``bn(conv(x)) + residual``, then the layer's activation (a ReLU also with ``relu``);
        ``residual`` a tensor on the output coordinates, or None. At inference the compiled
        kernels add the residual and apply the ReLU inside the convolution."""
        conv, bn = self[0], self[1]
        own_relu = len(self) > 2 and isinstance(self[2], SparseReLU)
        if self.training or bn.training or bn.running_mean is None:
            # Training updates the running statistics in place without bumping their version
            # counters: drop the folded cache.
            self.__dict__.pop('_folded', None)
            out = bn(conv(x))
            if residual is not None:
                out = out.replace(out.features + residual.features)
            if len(self) > 2:
                out = self[2](out)
            return out.replace(torch.relu(out.features)) if relu and not own_relu else out
        weight, bias = self.folded(autocast_dtype(x.device.type))
        if len(self) > 2 and not own_relu:  # another activation module
            out = self[2](x.conv(weight, conv.kernel_size, conv.stride, conv.dilation,
                                 conv.transposed, bias=bias, residual=residual))
            return out.replace(torch.relu(out.features)) if relu else out
        return x.conv(weight, conv.kernel_size, conv.stride, conv.dilation, conv.transposed,
                      bias=bias, residual=residual, relu=relu or own_relu)


class ConvBNReLU(ConvBN):
    """Sparse convolution, batch norm, ReLU (``relu=False``: no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, transposed: bool = False, relu: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, transposed, relu)
