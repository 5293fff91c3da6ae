"""MinkUNet: a sparse residual U-Net (the 14/18/34 family and a small CPU real-time variant).

Layout (as in MinkowskiEngine's examples): a stem convolution at stride 1; four encoder stages,
each a 2x2x2 stride-2 convolution then residual blocks; four decoder stages, each a 2x2x2
transposed convolution back to the cached finer voxels, concatenation with the encoder features
at that stride, then residual blocks. The output lies on the input voxels (stride 1).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from cmkd_ros.sparse import ConvBN, ConvBNReLU, sparse_cat


@dataclasses.dataclass(frozen=True)
class MinkUNetSpec:
    """Widths ``(stem, enc1..enc4, dec1..dec4)``, residual blocks per stage (8), stem kernel."""

    widths: tuple
    blocks: tuple
    stem_kernel: int


ARCHS = {
    'small': MinkUNetSpec((16, 16, 32, 48, 64, 48, 32, 32, 32), (1,) * 8, 3),
    'minkunet14': MinkUNetSpec((32, 32, 64, 128, 256, 256, 128, 96, 96), (1,) * 8, 5),
    'minkunet18': MinkUNetSpec((32, 32, 64, 128, 256, 256, 128, 96, 96), (2,) * 8, 5),
    'minkunet34': MinkUNetSpec((32, 32, 64, 128, 256, 256, 128, 96, 96),
                               (2, 3, 4, 6, 2, 2, 2, 2), 5),
}


class BasicBlock(nn.Module):
    """Two 3x3x3 submanifold convolutions with batch norm and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, 3)
        self.conv2 = ConvBNReLU(out_channels, out_channels, 3)
        self.shortcut = (None if in_channels == out_channels
                         else ConvBN(in_channels, out_channels, 1))

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x), residual=skip)  # + skip, then ReLU


def _stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class MinkUNet(nn.Module):
    """Sparse U-Net; ``forward(x)`` returns features ``(N, out_channels)`` on x's voxels."""

    def __init__(self, in_channels: int, widths: tuple, blocks: tuple, stem_kernel: int = 5):
        super().__init__()
        if len(widths) != 9 or len(blocks) != 8:
            raise ValueError(f'MinkUNet needs 9 widths (stem, 4 encoder, 4 decoder) and 8 block '
                             f'counts, got {len(widths)} and {len(blocks)}')
        if min(widths) < 1 or min(blocks) < 1 or in_channels < 1:
            raise ValueError(f'widths, blocks and in_channels must be >= 1: {widths}, {blocks}')
        self.widths, self.stem_kernel = tuple(widths), stem_kernel
        stem, enc, dec = widths[0], widths[1:5], widths[5:9]
        self.stem = ConvBNReLU(in_channels, stem, stem_kernel)
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        prev = stem
        skip_widths = [stem]
        for i in range(4):
            self.down.append(ConvBNReLU(prev, prev, 2, stride=2))
            self.encoder.append(_stage(prev, enc[i], blocks[i]))
            prev = enc[i]
            skip_widths.append(prev)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for j in range(4):
            self.up.append(ConvBNReLU(prev, dec[j], 2, stride=2, transposed=True))
            skip = skip_widths[3 - j]
            self.decoder.append(_stage(dec[j] + skip, dec[j], blocks[4 + j]))
            prev = dec[j]
        self.out_channels = prev

    def forward(self, x):
        x = self.stem(x)
        skips = [x]
        for down, stage in zip(self.down, self.encoder):
            x = stage(down(x))
            skips.append(x)
        for j, (up, stage) in enumerate(zip(self.up, self.decoder)):
            x = stage(sparse_cat(up(x), skips[3 - j]))
        return x


def build_minkunet(arch: str, in_channels: int, widths: tuple = (),
                   stem_kernel: int | None = None) -> MinkUNet:
    """A MinkUNet preset (``ARCHS``), optionally with other widths or stem kernel size."""
    if arch not in ARCHS:
        raise ValueError(f'unknown MinkUNet arch {arch!r}; known: {sorted(ARCHS)}')
    spec = ARCHS[arch]
    return MinkUNet(in_channels, tuple(widths) or spec.widths, spec.blocks,
                    stem_kernel or spec.stem_kernel)
