"""Student models: voxelization, MinkUNet, DA module, ``Student``, checkpoints."""
from .augment import Compose, RandomFlip, RandomJitter, RandomRotationZ, RandomScale
from .checkpoint import CheckpointError, FORMAT_VERSION, load_checkpoint, save_checkpoint
from .da_module import DAModule, SelfCalibratedConv
from .minkunet import ARCHS, MinkUNet, build_minkunet
from .student import (PRECISIONS, Student, StudentConfig, build_student, fast_bfloat16,
                      native_bfloat16, precision_context, resolve_backend, resolve_device,
                      resolve_precision)
from .voxelize import (POINT_FEATURE_KINDS, VoxelizeError, feature_channels, point_features,
                       sparse_collate, voxelize)

__all__ = [
    'ARCHS', 'CheckpointError', 'Compose', 'DAModule', 'FORMAT_VERSION', 'MinkUNet',
    'POINT_FEATURE_KINDS', 'PRECISIONS', 'RandomFlip', 'RandomJitter', 'RandomRotationZ',
    'RandomScale', 'SelfCalibratedConv', 'Student', 'StudentConfig', 'VoxelizeError',
    'build_minkunet', 'build_student', 'fast_bfloat16', 'feature_channels', 'load_checkpoint',
    'native_bfloat16',
    'point_features', 'precision_context', 'resolve_backend', 'resolve_device',
    'resolve_precision', 'save_checkpoint', 'sparse_collate', 'voxelize',
]
