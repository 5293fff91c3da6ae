"""Voxelization, batching and the student's per-point input features.

``voxelize`` keeps one voxel per occupied cell (features averaged) and the inverse map that
carries per-voxel predictions back to every point. Arrays may be numpy or torch; the outputs are
of the same kind as ``xyz``.
"""
from __future__ import annotations

import numpy as np
import torch

# kind -> (number of channels, description)
POINT_FEATURE_KINDS = {
    'constant': (1, '[1]: geometry only'),
    'height': (2, '[1, z]: geometry and height (m) in the LiDAR frame'),
    'intensity': (2, '[1, log1p(i) / log1p(255)]: intensity in 0..1 for 0..255 sensors'),
    'intensity_height': (3, '[1, log1p(i) / log1p(255), z]'),
}
DEFAULT_POINT_FEATURES = 'height'


class VoxelizeError(ValueError):
    """Invalid points, features or voxel size."""


def _as_tensor(array, name: str, dtype=torch.float32) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(dtype)
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    raise VoxelizeError(f'{name} must be a numpy array or torch tensor, got '
                        f'{type(array).__name__}')


def feature_channels(kind: str) -> int:
    """Number of channels of ``point_features(..., kind=kind)``."""
    if kind not in POINT_FEATURE_KINDS:
        raise VoxelizeError(f'unknown point feature kind {kind!r}; known: '
                            f'{sorted(POINT_FEATURE_KINDS)}')
    return POINT_FEATURE_KINDS[kind][0]


def point_features(xyz, intensity=None, kind: str = DEFAULT_POINT_FEATURES):
    """Student input features per point, ``(N, feature_channels(kind)) float32``.

    xyz: ``(N, 3)`` LiDAR frame, metres; intensity: ``(N,)`` raw sensor value (needed by the
    ``intensity`` kinds). The default ``height`` does not depend on a sensor's intensity scale.
    """
    channels = feature_channels(kind)
    is_numpy = not isinstance(xyz, torch.Tensor)
    pts = _as_tensor(xyz, 'xyz')
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise VoxelizeError(f'xyz must be (N, 3), got {tuple(pts.shape)}')
    cols = [torch.ones(pts.shape[0], dtype=torch.float32, device=pts.device)]
    if 'intensity' in kind:
        if intensity is None:
            raise VoxelizeError(f'point feature kind {kind!r} needs intensity values')
        inten = _as_tensor(intensity, 'intensity').to(pts.device).reshape(-1)
        if inten.shape[0] != pts.shape[0]:
            raise VoxelizeError(f'{inten.shape[0]} intensity values for {pts.shape[0]} points')
        cols.append(torch.log1p(inten.clamp(min=0)) / float(np.log1p(255.0)))
    if 'height' in kind:
        cols.append(pts[:, 2])
    out = torch.stack(cols, dim=1)
    assert out.shape[1] == channels
    return out.numpy() if is_numpy else out


def voxelize(xyz, feats, voxel_size: float):
    """Unique voxels of ``xyz`` with mean features.

    xyz: ``(N, 3) float32``, metres; feats: ``(N, F) float32``; voxel_size: metres.
    Returns coords ``(V, 3) int32`` (``floor(xyz / voxel_size)``, sorted x, y, z), vfeats
    ``(V, F)`` the mean of each voxel's points, inverse ``(N,) int64`` voxel row of each point.
    """
    if not (isinstance(voxel_size, (int, float)) and voxel_size > 0 and np.isfinite(voxel_size)):
        raise VoxelizeError(f'voxel_size must be a positive number, got {voxel_size!r}')
    is_numpy = not isinstance(xyz, torch.Tensor)
    pts = _as_tensor(xyz, 'xyz')
    values = _as_tensor(feats, 'feats', pts.dtype if pts.is_floating_point() else torch.float32)
    values = values.to(pts.device)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise VoxelizeError(f'xyz must be (N, 3), got {tuple(pts.shape)}')
    if values.ndim != 2 or values.shape[0] != pts.shape[0]:
        raise VoxelizeError(f'feats must be (N, F) with N = {pts.shape[0]}, got '
                            f'{tuple(values.shape)}')
    if pts.shape[0] == 0:
        raise VoxelizeError('no points to voxelize')
    bad = ~torch.isfinite(pts).all(1)
    if bool(bad.any()):
        raise VoxelizeError(f'{int(bad.sum())} of {pts.shape[0]} points have NaN/inf '
                            'coordinates; drop them first')
    # 1. Integer cell of every point, then a key per cell (lexicographic x, y, z).
    cells = torch.floor(pts.double() / voxel_size).to(torch.int64)
    low = cells.amin(0)
    span = cells.amax(0) - low + 1
    if float(span.double().prod()) >= 2.0 ** 62:
        raise VoxelizeError('points span too many voxels; use a larger voxel size')
    rel = cells - low
    keys = (rel[:, 0] * span[1] + rel[:, 1]) * span[2] + rel[:, 2]
    # 2. Unique cells, inverse map, and the per-voxel mean of the features.
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    first = torch.full((uniq.shape[0],), keys.shape[0], dtype=torch.int64, device=pts.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.shape[0], device=pts.device), 'amin')
    coords = cells[first].to(torch.int32)
    sums = values.new_zeros(uniq.shape[0], values.shape[1]).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=uniq.shape[0]).to(values.dtype)
    vfeats = sums / counts.unsqueeze(1)
    if is_numpy:
        return coords.numpy(), vfeats.numpy(), inverse.numpy()
    return coords, vfeats, inverse


def sparse_collate(samples):
    """Batch ``[(coords (V_i, 3) int32, feats (V_i, F)), ...]`` into coords ``(V, 4) int32``
    ``[batch, x, y, z]`` and feats ``(V, F)`` (torch tensors)."""
    samples = list(samples)
    if not samples:
        raise VoxelizeError('sparse_collate needs at least one sample')
    coords_out, feats_out = [], []
    for b, (coords, feats) in enumerate(samples):
        c = _as_tensor(coords, f'coords[{b}]', torch.int32)
        f = _as_tensor(feats, f'feats[{b}]', torch.float32)
        if c.ndim != 2 or c.shape[1] != 3 or f.ndim != 2 or f.shape[0] != c.shape[0]:
            raise VoxelizeError(f'sample {b}: need coords (V, 3) and feats (V, F), got '
                                f'{tuple(c.shape)} and {tuple(f.shape)}')
        batch = torch.full((c.shape[0], 1), b, dtype=torch.int32, device=c.device)
        coords_out.append(torch.cat([batch, c], dim=1))
        feats_out.append(f)
    widths = {f.shape[1] for f in feats_out}
    if len(widths) != 1:
        raise VoxelizeError(f'samples have different feature widths {sorted(widths)}')
    return torch.cat(coords_out), torch.cat(feats_out)
