"""ROS-free core of the segment node: label a decoded point cloud with a student.

:class:`SegmentPipeline` is what the node runs on each scan (``prepare``, then ``infer``); the
node only adds messages, threads and diagnostics. Benchmarks and tests call the same pipeline
(or :func:`segment_array`, its one-call form) without rclpy. ``cmkd evaluate-bag`` scores the
node process itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cmkd_ros.classes import IGNORE_INDEX, ClassMap
from cmkd_ros.config import PRECISION_CHOICES, ConfigError, setting
from cmkd_ros.conversions import scalar_field, xyz_from_cloud
from cmkd_ros.pipelines.intake import Report, finite_xyz

OUTPUT_FIELDS = ('class_id', 'probability', 'rgb')
# Largest cloud a node takes by default (parameter max_points): above a 128-beam LiDAR's scan
# (128 x 2048 = 262,144 points), far above nuScenes' 32 beams (about 35,000).
MAX_POINTS = 300_000

# predictor(xyz (N, 3) float32 LiDAR frame, intensity (N,) float32)
#   -> class_id (N,) integer, probability (N,) float
Predictor = Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]


@dataclass(frozen=True)
class SegmentNodeConfig:
    """Parameters of the segment node (ROS parameters of the same names)."""

    checkpoint: str = setting('', 'student checkpoint file written by cmkd train (required)')
    device: str = setting('cpu', 'torch device for inference: cpu, cuda or cuda:N')
    num_threads: int = setting(0, 'torch CPU threads of the network (0: auto, the available '
                               'cores minus the one preparing the scans when pipelined, but '
                               "both of two cores in float32; else torch's default)", ge=0)
    precision: str = setting('auto', 'inference arithmetic: float32; bfloat16 (faster on '
                             'CPUs with AMX, or with AVX512-BF16 without the compiled sparse '
                             'kernels; not on GPUs; labels nearly identical, see '
                             'docs/nodes.md); float16 (CUDA only); auto: bfloat16 where it is '
                             'faster, else float32', choices=PRECISION_CHOICES)
    range_min: float = setting(0.0, 'points closer than this to the LiDAR (m) are not '
                               'segmented (class_id 255)', ge=0.0)
    range_max: float = setting(200.0, 'points farther than this from the LiDAR (m) are not '
                               'segmented (class_id 255)', gt=0.0)
    classes: tuple[str, ...] = setting(default_factory=tuple, help='class names to publish; '
                                       'points of other classes get class_id 255 and '
                                       'probability 0 (empty: all classes)')
    min_probability: float = setting(0.0, 'predictions below this probability get class_id '
                                     '255', ge=0.0, le=1.0)
    always_process: bool = setting(False, 'segment even when nobody subscribes to the output '
                                   '(benchmarks); normally inference is skipped then')
    diagnostics_period_s: float = setting(1.0, 'period of the /diagnostics status (s)', gt=0.0)
    max_points: int = setting(MAX_POINTS, 'clouds with more points are skipped unread '
                              '(warning too_many_points): bounds the time and memory one '
                              'message can cost; the default admits a 128-beam LiDAR '
                              '(about 262,000 points) (0: no limit)', ge=0)
    pipeline: bool = setting(True, 'a second thread decodes and voxelizes each scan, then '
                             'builds its kernel maps while the network already runs on it: '
                             'lower latency and more scans per second on multi-core CPUs')

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError('checkpoint: a student checkpoint path is required')
        if self.range_max <= self.range_min:
            raise ConfigError(f'range_max ({self.range_max}) must be > range_min '
                              f'({self.range_min})')
        if not (self.device == 'cpu' or self.device == 'cuda' or
                (self.device.startswith('cuda:') and self.device[5:].isdigit())):
            raise ConfigError(f'device: {self.device!r} is not cpu, cuda or cuda:N')
        if self.precision == 'float16' and self.device == 'cpu':
            raise ConfigError('precision: float16 needs a CUDA device; use bfloat16 on the CPU')


def network_threads(num_threads: int, pipeline: bool, precision: str = 'float32') -> int:
    """Torch threads of the network: ``num_threads``, or for 0 (pipelined) the cores this
    process may use minus the one the preparing thread keeps busy, except that a float32
    network on two cores takes both (0 = torch's default when not pipelined).

    On two cores a float32 scan of the small student needs most of one core's 100 ms (10 Hz),
    so the network gains more from the second core than the preparing thread (about a sixth
    of a core) loses; in 16 bits one core suffices and a second network thread only adds
    contention when another process takes a core (docs/results.md#segment_node-real-time).
    """
    if num_threads > 0 or not pipeline:
        return num_threads
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    cores = cores or 1
    if precision == 'float32':
        return max(min(cores, 2), cores - 1)
    return max(1, cores - 1)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed heap memory in the process instead of handing it back to the OS (glibc).

    A scan's temporaries (about 20 MB) are freed after every scan; with glibc's defaults the
    larger ones are unmapped or trimmed and faulted back in, zeroed, by the next scan (about
    5,000 page faults per nuScenes-size scan here). Blocks under ``mmap_threshold`` now come
    from the heap, and up to ``trim_threshold`` of free heap stays mapped. Process-wide; True
    where it took effect (glibc), False elsewhere (other C libraries: unchanged).
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt     # the C library this process already uses
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and
                mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def packed_rgb(colors: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) float32 holding 0x00RRGGBB (PCL / RViz ``rgb`` convention)."""
    colors = np.asarray(colors, dtype=np.uint32).reshape(-1, 3)
    packed = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N,) packed float32 ``rgb`` -> (N, 3) uint8 RGB."""
    packed = np.ascontiguousarray(rgb, dtype=np.float32).view(np.uint32)
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255],
                    axis=1).astype(np.uint8)


def output_dtype(input_dtype: np.dtype) -> np.dtype:
    """Input fields (packed, existing class_id/probability/rgb replaced) + the three outputs."""
    parts = []
    for name in input_dtype.names or ():
        if name in OUTPUT_FIELDS:
            continue
        sub = input_dtype.fields[name][0]
        parts.append((name, sub.base, sub.shape) if sub.subdtype else (name, sub))
    parts += [('class_id', np.uint8), ('probability', np.float32), ('rgb', np.float32)]
    return np.dtype(parts)


def class_filter(class_map: ClassMap, names: tuple[str, ...]) -> np.ndarray | None:
    """(256,) bool lookup of the class ids to publish; None when every class is published."""
    if not names:
        return None
    allowed = np.zeros(256, dtype=bool)
    for name in names:
        allowed[class_map.index(name)] = True
    return allowed


def segment_array(points: np.ndarray, predictor: Predictor, class_map: ClassMap,
                  config: SegmentNodeConfig) -> np.ndarray:
    """Label a decoded cloud: (N,) structured array in -> (N,) array with outputs appended.

    Every input point is kept in order. Points with a non-finite coordinate, outside
    [range_min, range_max] or of an unpublished class get class_id 255, probability 0 and the
    ignore color. Raises ConversionError when the cloud has no x, y, z.
    """
    xyz, rows, intensity = select_points(points, config)
    pred = prob = None
    if rows.size:
        pred, prob = predictor(xyz, intensity)
    return label_points(points, rows, pred, prob, class_map, config)


def select_points(points: np.ndarray, config: SegmentNodeConfig,
                  finite: tuple[np.ndarray, np.ndarray] | None = None) -> tuple:
    """The points to segment: ``(xyz (M, 3) float32, rows (M,) into points, intensity (M,))``,
    finite and within [range_min, range_max] (intensity 0 when the cloud has none, or not one
    value per point, or a non-finite one). ``finite``: ``(xyz, rows)`` of the finite points
    when already known (:func:`cmkd_ros.pipelines.intake.finite_xyz`)."""
    # 1. finite points (LiDAR frame), 2. range crop.
    xyz, rows = finite if finite is not None else xyz_from_cloud(points, drop_invalid=True)
    if rows.size:
        x = xyz.astype(np.float64)                  # float32 squares overflow
        dist2 = np.einsum('ij,ij->i', x, x)         # squared ranges: no square roots
        in_range = (dist2 >= config.range_min ** 2) & (dist2 <= config.range_max ** 2)
        xyz, rows = xyz[in_range], rows[in_range]
    intensity = scalar_field(points, 'intensity', np.float32)
    if intensity is None:
        intensity = np.zeros(rows.size, dtype=np.float32)
    else:
        intensity = np.nan_to_num(intensity[rows], nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(xyz), rows, intensity


def label_points(points: np.ndarray, rows: np.ndarray, pred: Any, prob: Any,
                 class_map: ClassMap, config: SegmentNodeConfig) -> np.ndarray:
    """The output array of :func:`segment_array` from the predictions for ``points[rows]``."""
    out = np.zeros(points.shape[0], dtype=output_dtype(points.dtype))
    for name in out.dtype.names[:-3]:
        out[name] = points[name]
    class_id = np.full(points.shape[0], IGNORE_INDEX, dtype=np.uint8)
    probability = np.zeros(points.shape[0], dtype=np.float32)
    if rows.size:
        pred = _to_numpy(pred).astype(np.int64).reshape(-1)
        prob = _to_numpy(prob).astype(np.float32).reshape(-1)
        if pred.shape[0] != rows.size or prob.shape[0] != rows.size:
            raise ValueError(f'predictor returned {pred.shape[0]} labels / {prob.shape[0]} '
                             f'probabilities for {rows.size} points')
        valid = (pred >= 0) & (pred < class_map.num_classes) & (prob >= config.min_probability)
        allowed = class_filter(class_map, config.classes)
        if allowed is not None:
            valid &= allowed[np.clip(pred, 0, 255)]
        class_id[rows[valid]] = pred[valid].astype(np.uint8)
        probability[rows[valid]] = prob[valid]
    out['class_id'] = class_id
    out['probability'] = probability
    out['rgb'] = packed_rgb(class_map.palette())[class_id]    # a 256-entry table per id
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- the student

def load_predictor(path: str, device: str, precision: str = 'float32',
                   pipelined: bool = True) -> tuple['StudentPredictor', ClassMap]:
    """(predict(xyz, intensity) -> (class_id, probability), ClassMap) from a student checkpoint
    (inference in ``precision``: float32, bfloat16, float16 or auto; ``pipelined``: see
    :class:`StudentPredictor`). Torch threads are the caller's (:class:`SegmentPipeline` sets
    them from the resolved precision)."""
    from cmkd_ros.models import resolve_device
    from cmkd_ros.models.checkpoint import load_checkpoint
    student, info = load_checkpoint(path, map_location=resolve_device(device))
    class_map = ClassMap(tuple(info['class_names']), tuple(map(tuple, info['class_colors'])))
    return StudentPredictor(student, precision, pipelined), class_map


class StudentPredictor:
    """``predictor(xyz, intensity)`` of a student, split for the pipelined worker: ``prepare``
    (voxels; no model state), then ``infer`` (the network) while the preparing thread runs
    ``build_maps`` (the kernel maps; the network waits for each one it reaches). Not
    pipelined, the network builds the maps itself, in a second thread where it can."""

    def __init__(self, student, precision: str = 'float32', pipelined: bool = True):
        from cmkd_ros.models import precision_context, resolve_backend, resolve_precision
        device = next(student.parameters()).device
        backend = resolve_backend(student.backend, device)
        precision = resolve_precision(precision, device, backend)  # auto -> what this CPU has
        precision_context(precision, device, backend)  # checks
        self.student = student
        self.precision = precision
        self.pipelined = pipelined

    def prepare(self, xyz: np.ndarray, intensity: np.ndarray):
        import torch
        with torch.inference_mode():
            return self.student.prepare(xyz, intensity,
                                        maps='later' if self.pipelined else 'none')

    def build_maps(self, prepared) -> None:
        import torch
        with torch.inference_mode():
            prepared.build_maps()

    def infer(self, prepared):
        import torch
        with torch.inference_mode():
            return self.student.predict_prepared(prepared, self.precision)

    def __call__(self, xyz: np.ndarray, intensity: np.ndarray):
        prepared = self.prepare(xyz, intensity)
        self.build_maps(prepared)
        return self.infer(prepared)


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class SegmentJob:
    """One scan between :meth:`SegmentPipeline.prepare` and :meth:`SegmentPipeline.infer`."""

    points: np.ndarray              # (N,) decoded input, every point
    rows: np.ndarray                # (M,) int64 rows of points to segment
    prepared: Any = None            # the student's prepared scan (None when M == 0)


class SegmentPipeline:
    """The segment node's work on one decoded scan: ``prepare`` (intake checks, point
    selection, voxels), ``build_maps`` (kernel maps, may overlap ``infer``), ``infer`` (network,
    labels). Calling it does the three in turn.

    Built from a :class:`SegmentNodeConfig`: loads the student and its class map (a ValueError
    for a device without CUDA, a bad checkpoint or an unknown class name). Warnings
    ``empty_cloud`` and ``nan_points`` go to ``report``.
    """

    def __init__(self, config: SegmentNodeConfig, report: Report):
        if config.device == 'cpu':
            keep_freed_memory()  # no page faults on each scan's temporaries
        self.predictor, self.class_map = load_predictor(
            config.checkpoint, config.device, config.precision, config.pipeline)
        self.threads = network_threads(config.num_threads, config.pipeline,
                                       self.predictor.precision)
        if self.threads > 0:  # for this thread; the node's workers set their own
            import torch
            torch.set_num_threads(self.threads)
        self.report = report
        self.config = config
        self.configure(config)            # unknown class names raise here

    def configure(self, config: SegmentNodeConfig) -> None:
        """Take runtime settings (range, classes, min_probability); ValueError for a class name
        the checkpoint does not have (the settings are then left unchanged)."""
        class_filter(self.class_map, config.classes)
        self.config = config

    def prepare(self, points: np.ndarray) -> SegmentJob:
        """Job of a decoded (N,) scan; an empty scan makes an empty job (labeled empty)."""
        config = self.config
        if points.shape[0] == 0:
            self.report.warn('empty_cloud', 'received an empty cloud; publishing it empty')
        finite = finite_xyz(points, self.report, 'labeled 255')
        xyz, rows, intensity = select_points(points, config, finite)
        prepared = self.predictor.prepare(xyz, intensity) if rows.size else None
        return SegmentJob(points, rows, prepared)

    def build_maps(self, job: SegmentJob) -> None:
        if job.prepared is not None:
            self.predictor.build_maps(job.prepared)

    def infer(self, job: SegmentJob) -> np.ndarray:
        """(N,) labeled array of the job's scan (see :func:`segment_array`)."""
        pred = prob = None
        if job.prepared is not None:
            pred, prob = self.predictor.infer(job.prepared)
        return label_points(job.points, job.rows, pred, prob, self.class_map, self.config)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        job = self.prepare(points)
        self.build_maps(job)
        return self.infer(job)
