"""Domain adaptation (DA) module: 3D self-calibrated convolutions to pseudo-2D features.

A self-calibrated convolution (after SCNet, Liu et al., CVPR 2020) feeds two branches, each from a
1x1x1 convolution of all input channels (as SCNet's bottleneck does; ``mix=False`` slices the
input channels in two halves instead, so the branches never see each other's channels). One
branch is a plain 3x3x3 convolution. The other is calibrated: it is
average-pooled to the next coarser stride, convolved there (a larger receptive field), copied back
to its voxels, and ``sigmoid(x1 + that)`` gates a 3x3x3 convolution of ``x1``; a last convolution
maps the gated features to its share of the output channels. The two outputs are concatenated.
"""
from __future__ import annotations

import torch
from torch import nn

from cmkd_ros.sparse import (ConvBN, ConvBNReLU, SparseConv3d, SparsePool, SparseReLU,
                             SparseUpsample, sparse_cat)


def _conv_bn(in_channels: int, out_channels: int, norm: bool = True) -> nn.Module:
    if not norm:
        return SparseConv3d(in_channels, out_channels, 3, bias=True)
    return ConvBN(in_channels, out_channels, 3)


def _apply(module: nn.Module, x, relu: bool):
    """``module(x)``, then a ReLU with ``relu`` (inside the convolution of a ConvBN)."""
    if isinstance(module, ConvBN):
        return module(x, relu=relu)
    out = module(x)
    return out.replace(torch.relu(out.features)) if relu else out


class SelfCalibratedConv(nn.Module):
    """Sparse self-calibrated convolution ``(N, in_channels) -> (N, out_channels)``, same voxels.

    ``pool``: stride factor of the calibration branch. ``final``: the output convolutions carry a
    bias and no batch norm (so the module can produce features of any scale). ``mix``: the
    branch inputs are 1x1x1 convolutions (+ BN, ReLU) of all input channels, else channel halves.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: int = 2, final: bool = False,
                 mix: bool = True):
        super().__init__()
        if in_channels < 2 or out_channels < 2:
            raise ValueError(f'a self-calibrated conv needs >= 2 channels in and out, got '
                             f'{in_channels} -> {out_channels}')
        self.split = in_channels // 2
        rest = in_channels - self.split
        self.mix = nn.ModuleList([ConvBNReLU(in_channels, self.split, 1),
                                  ConvBNReLU(in_channels, rest, 1)]) if mix else None
        out_calibrated = out_channels // 2
        self.plain = _conv_bn(rest, out_channels - out_calibrated, not final)
        self.down = SparsePool('avg', pool, pool)
        self.coarse = _conv_bn(self.split, self.split)
        self.up = SparseUpsample(pool)
        self.gated = _conv_bn(self.split, self.split)
        self.project = _conv_bn(self.split, out_calibrated, not final)

    def forward(self, x, relu: bool = False):
        """``relu``: a ReLU on the output (fused into the two output convolutions)."""
        if self.mix is not None:
            x1, x2 = self.mix[0](x), self.mix[1](x)
        else:
            x1 = x.replace(x.features[:, :self.split])
            x2 = x.replace(x.features[:, self.split:])
        # 1. Calibration: coarse context back on the voxels, a sigmoid gate per channel.
        context = self.up(self.coarse(self.down(x1)))
        gate = torch.sigmoid(x1.features + context.features)
        gated = self.gated(x1)
        y1 = _apply(self.project, gated.replace(gated.features * gate), relu)
        # 2. Plain branch, then the two halves side by side.
        return sparse_cat(y1, _apply(self.plain, x2, relu))


class DAModule(nn.Module):
    """``layers`` self-calibrated convolutions (ReLU between): ``(N, C) -> (N, D)``.

    ``pool``: stride factor of every layer's calibration branch (SCNet: 4). ``hidden``: output
    width of all but the last layer (0 = D); narrower is cheaper. ``mix``: see
    :class:`SelfCalibratedConv`.
    """

    def __init__(self, in_channels: int, out_channels: int, layers: int = 3, pool: int = 2,
                 hidden: int = 0, mix: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f'the DA module needs >= 1 layer, got {layers}')
        hidden = hidden or out_channels  # width between the layers
        blocks = []
        width = in_channels
        for i in range(layers):
            last = i == layers - 1
            blocks.append(SelfCalibratedConv(width, out_channels if last else hidden, pool,
                                             final=last, mix=mix))
            if not last:
                blocks.append(SparseReLU())
            width = hidden
        self.layers = nn.Sequential(*blocks)

    def forward(self, x):
        layers = list(self.layers)
        for i, layer in enumerate(layers):
            if isinstance(layer, SparseReLU):
                continue  # fused into the layer before it
            x = layer(x, relu=i + 1 < len(layers) and isinstance(layers[i + 1], SparseReLU))
        return x
