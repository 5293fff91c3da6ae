"""Student checkpoints: one file with config, weights, class names and colors.

Layout (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    format: 'cmkd_ros.student'      format_version: FORMAT_VERSION
    config: to_dict(StudentConfig)  voxel_size: float
    class_names: [str] * K          class_colors: [[r, g, b]] * K (0..255)
    state_dict: {name: tensor}      extra: dict of plain values (training step, metrics, ...)

Weights are backend independent: convolution kernels are stored as ``(k^3, Cin, Cout)`` with
kernel offsets z fastest (the flattened layout of a dense ``conv3d`` weight) for both backends.
"""
from __future__ import annotations

import os
import pathlib

import torch

from cmkd_ros.config import ConfigError, build, to_dict

from .student import Student, StudentConfig, build_student

FORMAT = 'cmkd_ros.student'
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, of another format or inconsistent."""


def _check_classes(class_names, class_colors, num_classes: int) -> tuple[list, list]:
    names = [str(n) for n in class_names]
    colors = [[int(v) for v in c] for c in class_colors]
    if len(names) != num_classes or len(colors) != num_classes:
        raise CheckpointError(f'{len(names)} class names and {len(colors)} colors for a '
                              f'classifier of {num_classes} classes')
    for name, color in zip(names, colors):
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise CheckpointError(f'class {name!r}: color {color} is not [r, g, b] in 0..255')
    return names, colors


def save_checkpoint(path, student: Student, *, class_names, class_colors,
                    extra: dict | None = None) -> None:
    """Write ``student`` with its class map to ``path`` (atomically: temp file, then rename)."""
    if not isinstance(student, Student):
        raise TypeError(f'save_checkpoint needs a Student, got {type(student).__name__}')
    names, colors = _check_classes(class_names, class_colors, student.config.num_classes)
    payload = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        # Resolved widths and stem kernel: the file does not depend on a preset that may change.
        'config': {**to_dict(student.config), 'widths': list(student.backbone.widths),
                   'stem_kernel': student.backbone.stem_kernel},
        'voxel_size': float(student.config.voxel_size),
        'class_names': names,
        'class_colors': colors,
        'state_dict': {k: v.detach().cpu() for k, v in student.state_dict().items()},
        'extra': dict(extra or {}),
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, path)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to ``<path>.tmp.<pid>``, fsync, then rename over ``path``.

    The file gets the mode any new file gets (0666 less the umask); the temporary file is
    removed when saving fails (a full disk).
    """
    tmp = f'{os.fspath(path)}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: pathlib.Path, map_location) -> dict:
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle errors of a corrupt or truncated file
        raise CheckpointError(f'{path}: not a readable checkpoint (corrupt or truncated?): '
                              f'{type(exc).__name__}: {exc}') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CheckpointError(f'{path}: not a cmkd_ros student checkpoint (format '
                              f'{payload.get("format") if isinstance(payload, dict) else None!r})')
    version = payload.get('format_version')
    if version != FORMAT_VERSION:
        raise CheckpointError(f'{path}: format_version {version!r} is not supported (this '
                              f'version reads {FORMAT_VERSION})')
    missing = [k for k in ('config', 'state_dict', 'class_names', 'class_colors')
               if k not in payload]
    if missing:
        raise CheckpointError(f'{path}: missing entries {missing}')
    return payload


def load_checkpoint(path, map_location='cpu', backend: str = 'auto') -> tuple[Student, dict]:
    """Rebuild the student saved at ``path``; returns ``(student, info)`` in eval mode.

    ``info``: config (StudentConfig), class_names, class_colors, voxel_size, format_version,
    extra. ``backend`` overrides the saved backend ('auto', 'torch', 'minkowski').
    """
    path = pathlib.Path(path)
    payload = _read(path, map_location)
    try:
        config_data = dict(payload['config'])
        config_data['backend'] = backend
        # Files from before these keys hold the first DA module: channel halves, no shortcut.
        config_data.setdefault('da_mix', False)
        config_data.setdefault('da_residual', False)
        config = build(StudentConfig, config_data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f'{path}: invalid student config: {exc}') from None
    names, colors = _check_classes(payload['class_names'], payload['class_colors'],
                                   config.num_classes)
    student = build_student(config)
    expected = student.state_dict()
    state = payload['state_dict']
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f'{path}: weights do not match the saved config (missing '
                              f'{missing[:5]}, unexpected {unexpected[:5]})')
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f'{path}: {name} has shape {tuple(state[name].shape)}, the '
                                  f'config needs {tuple(tensor.shape)}')
    student.load_state_dict(state)
    if isinstance(map_location, (str, torch.device)):
        student.to(map_location)
    student.eval()
    info = {
        'config': config,
        'class_names': names,
        'class_colors': colors,
        'voxel_size': float(payload.get('voxel_size', config.voxel_size)),
        'format_version': payload['format_version'],
        'extra': payload.get('extra', {}),
    }
    return student, info
