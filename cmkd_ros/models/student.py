"""The 3D student: MinkUNet backbone, DA module (or a linear projection), shared classifier.

``Student.forward(coords (V, 4) int32 [batch, x, y, z], feats (V, F))`` returns per-voxel
``backbone (V, Cb)``, ``pseudo2d (V, D)`` (features in the 2D teacher's space) and
``logits (V, K) = classifier(pseudo2d)``, where ``classifier`` is a linear layer ``D -> K`` that
can load the teacher's 1x1 classifier and be frozen (shared weights, as in the paper). Rows
follow the input.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from cmkd_ros.config import ConfigError, setting
from cmkd_ros.sparse import (CoordinateManager, MinkowskiTensor, SparseConv3d, SparseTensor,
                             import_minkowski, minkowski_available, native)
from cmkd_ros.sparse.functional import CSR_DTYPES, autocast_dtype
from cmkd_ros.sparse.minkowski import rows_in_order

from .da_module import DAModule
from .minkunet import ARCHS, build_minkunet
from .voxelize import POINT_FEATURE_KINDS, feature_channels, point_features, voxelize

BACKENDS = ('auto', 'torch', 'minkowski')
PRECISIONS = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def native_bfloat16(device: torch.device | str = 'cpu') -> bool:
    """Whether ``device`` has bfloat16 arithmetic in hardware (CPU: AVX512-BF16 or AMX; CUDA:
    Ampere and later). Without it, bfloat16 autocast is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported',
                                                          '_is_amx_tile_supported')]
    return any(check is not None and check() for check in checks)


def dense(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a linear layer on per-voxel features ``(V, C)``; on the CPU under
    autocast with V padded to a bucket (:func:`padded_rows`). oneDNN builds a 16-bit GEMM for
    each row count and caches up to 1,024 of them with their buffers: as every scan has its
    own voxel count, a node grew by about 1.6 MB a scan (docs/results.md, Soak). Buckets bound
    the GEMMs to a few per sensor, each built once (float32 instead cost 7 ms a scan)."""
    if x.device.type != 'cpu' or autocast_dtype('cpu') is None:
        return layer(x)
    rows = x.shape[0]
    return layer(torch.nn.functional.pad(x, (0, 0, 0, padded_rows(rows) - rows)))[:rows]


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of 1,024 or of 1/16 of its power of two if larger:
    at most 16 sizes per octave, at most 1,023 rows or 6.25 % of padding."""
    step = max(1024, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // step) * step


def resolve_device(name: str | torch.device = 'auto', index: int | None = None) -> torch.device:
    """The torch device of a ``device`` setting: ``auto`` (CUDA when available, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``index`` picks the GPU of a bare ``cuda`` or
    ``auto`` (a DDP process's local rank). CUDA asked for and absent (or ``N`` beyond the GPUs
    present) raises ConfigError."""
    try:
        device = torch.device(name if name != 'auto' else
                              'cuda' if torch.cuda.is_available() else 'cpu')
    except (RuntimeError, TypeError):
        raise ConfigError(f'device: {name!r} is not auto, cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):
        raise ConfigError(f'device: {name!r} is not auto, cpu, cuda or cuda:N')
    if device.type == 'cpu':
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f'device: {str(name)!r} requested but CUDA is not available')
    if device.index is None and index is not None:
        device = torch.device('cuda', index)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f'device: {str(device)!r} requested but only '
                          f'{torch.cuda.device_count()} CUDA device(s) are present')
    return device


def fast_bfloat16(device: torch.device | str = 'cpu') -> bool:
    """Whether bfloat16 inference of the torch backend beats float32 on ``device``: a CPU with
    bfloat16 instructions (:func:`native_bfloat16`); with the compiled sparse kernels only one
    with AMX tiles (elsewhere they compute bfloat16 in float32, after a conversion)."""
    if torch.device(device).type != 'cpu':
        return False  # GPUs: no gain measured (kernel launches and maps dominate)
    if native.available():
        amx = getattr(torch.cpu, '_is_amx_tile_supported', None)
        return amx is not None and bool(amx())
    return native_bfloat16('cpu')


def resolve_precision(precision: str, device: torch.device | str = 'cpu',
                      backend: str = 'torch') -> str:
    """``auto`` -> ``bfloat16`` where it is faster (:func:`fast_bfloat16`) with the torch
    backend, else ``float32``; other names pass through."""
    if precision != 'auto':
        return precision
    return 'bfloat16' if fast_bfloat16(device) and backend == 'torch' else 'float32'


def precision_context(precision: str, device: torch.device | str = 'cpu',
                      backend: str = 'torch'):
    """Context for inference arithmetic in ``precision`` on ``device``: nothing for float32,
    else autocast (weights stay float32; convolutions, GEMMs and gathers run in 16 bits; on
    the CPU the linear heads on padded rows: :func:`dense`).
    float16 is CUDA only (CPUs have no fast float16 GEMM; bfloat16 is the CPU choice), and
    16-bit arithmetic needs the torch backend (``backend`` as resolved for ``device``).
    ``auto``: :func:`resolve_precision`."""
    precision = resolve_precision(precision, device, backend)
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {sorted(PRECISIONS) + ["auto"]}, got '
                         f'{precision!r}')
    device_type = torch.device(device).type
    if precision == 'float16' and device_type != 'cuda':
        raise ValueError('precision float16 needs a CUDA device; use bfloat16 on the CPU')
    if precision != 'float32' and backend != 'torch':
        raise ValueError(f'precision {precision} needs the torch backend; MinkowskiEngine '
                         'runs float32 only (load the student with backend=torch)')
    if precision == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=PRECISIONS[precision])


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The 3D student network (saved inside every checkpoint)."""

    arch: str = setting('minkunet18', 'backbone preset: small (CPU real time), minkunet14/18/34',
                        choices=tuple(ARCHS))
    widths: tuple[int, ...] = setting(
        (), '9 channel widths (stem, 4 encoder, 4 decoder) overriding the preset; [] = preset',
        ge=1)
    stem_kernel: int = setting(0, 'stem convolution kernel size; 0 = the preset (small 3, '
                               'others 5)', ge=0, le=7)
    point_features: str = setting('height', 'per-point input features: ' + ', '.join(
        f'{k} {v[1]}' for k, v in POINT_FEATURE_KINDS.items()), choices=tuple(POINT_FEATURE_KINDS))
    in_channels: int = setting(0, 'input channels; 0 = implied by point_features', ge=0)
    voxel_size: float = setting(0.1, 'voxel edge length (m)', gt=0.0)
    feature_dim: int = setting(256, 'D: the 2D teacher feature dimension (pseudo-2D features)',
                               ge=2)
    num_classes: int = setting(16, 'K: number of classes of the shared classifier', ge=1)
    use_da: bool = setting(True, 'self-calibrated DA module (else a linear projection to D)')
    da_layers: int = setting(3, 'self-calibrated convolution layers in the DA module', ge=1)
    da_width: int = setting(0, 'width between the DA layers; 0 = feature_dim (narrower is '
                            'faster)', ge=0)
    da_pool: int = setting(2, 'pooling rate of the calibration branch of each DA layer (SCNet '
                           'and the paper: 4; checkpoints without this key: 2)', ge=2, le=8)
    da_mix: bool = setting(True, 'DA layers feed both branches from 1x1x1 convolutions of all '
                           'channels (false: channel halves, two separate towers; checkpoints '
                           'without this key)')
    da_residual: bool = setting(True, 'add a linear projection of the backbone features to the '
                                'DA output, so the DA module learns a residual (false: the DA '
                                'module alone; checkpoints without this key)')
    backend: str = setting('auto', 'sparse convolution backend: torch, minkowski, or auto '
                           '(MinkowskiEngine on CUDA when it imports, else torch)',
                           choices=BACKENDS)

    def validate(self) -> None:
        if self.widths and len(self.widths) != 9:
            raise ConfigError(f'widths: expected 9 values (stem, 4 encoder, 4 decoder) or [], '
                              f'got {len(self.widths)}')
        if self.stem_kernel not in (0, 1, 3, 5, 7):
            raise ConfigError(f'stem_kernel: must be 0 (preset) or odd 1..7, got '
                              f'{self.stem_kernel}')
        if self.da_width == 1:
            raise ConfigError('da_width: a self-calibrated layer needs >= 2 channels (or 0 = '
                              'feature_dim)')
        implied = feature_channels(self.point_features)
        if self.in_channels not in (0, implied):
            raise ConfigError(f'in_channels: {self.in_channels} disagrees with point_features '
                              f'{self.point_features!r} ({implied} channels)')

    @property
    def input_channels(self) -> int:
        return self.in_channels or feature_channels(self.point_features)


def resolve_backend(backend: str, device: torch.device | str = 'cpu') -> str:
    """'torch' or 'minkowski' for a configured backend on ``device``.

    'auto' picks MinkowskiEngine only on CUDA (when it imports with CUDA support): on CPU the
    torch backend is faster (benchmarks/bench_student.py).
    """
    if backend not in BACKENDS:
        raise ConfigError(f'backend: {backend!r} is not one of {list(BACKENDS)}')
    if backend == 'minkowski':
        import_minkowski()  # raises MinkowskiUnavailable with the install hint
        return 'minkowski'
    if backend == 'torch':
        return 'torch'
    if torch.device(device).type == 'cuda' and minkowski_available():
        if getattr(import_minkowski(), 'is_cuda_available', lambda: False)():
            return 'minkowski'
    return 'torch'


# Convolution weights from which a network in 16-bit arithmetic takes every thread back once
# its kernel maps are built (the small preset has 1.0 M, MinkUNet14 11.6 M, MinkUNet18 with DA
# 25.8 M).
WIDE_NETWORK_CONV_WEIGHTS = 4_000_000


class Student(nn.Module):
    """MinkUNet + (DA module | linear projection) + shared linear classifier."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.backend = config.backend
        self.backbone = build_minkunet(config.arch, config.input_channels, config.widths,
                                       config.stem_kernel or None)
        width = self.backbone.out_channels
        if config.use_da:
            self.projection = DAModule(width, config.feature_dim, config.da_layers,
                                       pool=config.da_pool, hidden=config.da_width,
                                       mix=config.da_mix)
            if config.da_residual:
                self.shortcut = nn.Linear(width, config.feature_dim)
        else:
            self.projection = nn.Linear(width, config.feature_dim)
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def voxel_size(self) -> float:
        return self.config.voxel_size

    def set_backend(self, backend: str) -> None:
        """Switch the sparse backend ('auto', 'torch', 'minkowski'); weights are shared."""
        resolve_backend(backend)
        self.backend = backend

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, manager=None) -> dict:
        """coords ``(V, 4) int32 [batch, x, y, z]``, feats ``(V, F)`` -> dict of ``(V, .)``.

        ``manager``: a :class:`~cmkd_ros.sparse.CoordinateManager` of these coordinates with its
        kernel maps already built (:meth:`prepare`); torch backend only.
        """
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f'coords must be (V, 4) [batch, x, y, z], got {tuple(coords.shape)}')
        if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f'feats must be (V, F) with V = {coords.shape[0]}, got '
                             f'{tuple(feats.shape)}')
        if feats.shape[1] != self.config.input_channels:
            raise ValueError(f'feats has {feats.shape[1]} channels; this student takes '
                             f'{self.config.input_channels} ({self.config.point_features!r})')
        backend = resolve_backend(self.backend, feats.device)
        coords = coords.to(device=feats.device, dtype=torch.int32)
        maps_ahead = contextlib.nullcontext()
        if backend == 'minkowski':
            x = MinkowskiTensor(feats, coords)
        elif manager is not None:
            x = SparseTensor(feats, manager=manager)
        else:
            manager = CoordinateManager(coords)
            maps_ahead = self._maps_in_background(manager, feats)
            x = SparseTensor(feats, manager=manager)
        with maps_ahead:
            out = self._heads(x, coords, backend)
        if backend == 'torch':  # what prepare() builds ahead for the next scan
            self.__dict__['_map_requests'] = x.manager.map_requests()
        return out

    @contextlib.contextmanager
    def _maps_in_background(self, manager: CoordinateManager, feats: torch.Tensor):
        """On a CPU with 2+ torch threads, at inference, once a forward pass has shown which
        kernel maps the network uses: a second thread builds them while the network runs in
        this one, which lends it one of its torch threads. It takes the thread back once the
        maps are done, except a narrow network in 16-bit arithmetic on the pure-PyTorch path:
        its serial scatters and small GEMMs ran faster on one thread fewer
        (docs/sparse_backends.md)."""
        requests = self.__dict__.get('_map_requests')
        if (not requests or torch.get_num_threads() < 2 or feats.device.type != 'cpu'
                or torch.is_grad_enabled()):
            yield
            return
        if '_conv_weights' not in self.__dict__:
            self.__dict__['_conv_weights'] = sum(
                m.weight.numel() for m in self.modules() if isinstance(m, SparseConv3d))
        dtype = autocast_dtype('cpu') or feats.dtype
        manager.prebuild_in_background(
            requests, dtype, lend_thread=True,
            give_back_early=(native.available() or  # compiled kernels: all row-parallel
                             dtype in CSR_DTYPES or  # row-parallel scatter
                             self.__dict__['_conv_weights'] >= WIDE_NETWORK_CONV_WEIGHTS))
        try:
            yield
        finally:
            manager.join_background()

    def _heads(self, x, coords: torch.Tensor, backend: str) -> dict:
        """Backbone, projection and classifier on the input sparse tensor ``x``."""
        x = self.backbone(x)

        def in_input_order(t) -> torch.Tensor:
            # torch keeps the stride-1 voxels in input order; MinkowskiEngine may not.
            return t.features if backend == 'torch' else t.features[rows_in_order(t.coords,
                                                                                  coords)]

        backbone = in_input_order(x)
        if self.config.use_da:
            pseudo2d = in_input_order(self.projection(x))
            if self.config.da_residual:
                pseudo2d = pseudo2d + dense(self.shortcut, backbone)
        else:
            pseudo2d = dense(self.projection, backbone)
        return {'backbone': backbone, 'pseudo2d': pseudo2d,
                'logits': dense(self.classifier, pseudo2d)}

    def load_classifier(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        freeze: bool = True) -> None:
        """Copy a teacher's classifier ``(K, D)`` or 1x1 conv ``(K, D, 1, 1)``, bias ``(K,)``."""
        weight = torch.as_tensor(weight)
        if weight.ndim == 4 and weight.shape[2:] == (1, 1):
            weight = weight[:, :, 0, 0]
        expected = tuple(self.classifier.weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(f'classifier weight {tuple(weight.shape)} does not match (K, D) = '
                             f'{expected}')
        if bias is not None and tuple(torch.as_tensor(bias).shape) != (expected[0],):
            raise ValueError(f'classifier bias {tuple(torch.as_tensor(bias).shape)} does not '
                             f'match (K,) = ({expected[0]},)')
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            if bias is None:
                self.classifier.bias.zero_()
            else:
                self.classifier.bias.copy_(torch.as_tensor(bias))
        self.classifier.requires_grad_(not freeze)

    @torch.no_grad()
    def shift_class_prior(self, class_weights, fraction: float) -> torch.Tensor:
        """Logits minus ``fraction * log(class_weights)`` from now on (the classifier bias):
        takes that part of a class weighting of training back out of the predictions.
        Returns the (K,) shift added to the bias."""
        weights = torch.as_tensor(class_weights, dtype=torch.float32).reshape(-1)
        bias = self.classifier.bias
        if weights.numel() != bias.numel() or bool((weights <= 0).any()):
            raise ValueError(f'class weights: need {bias.numel()} positive values, got '
                             f'{weights.tolist()}')
        shift = (-float(fraction) * torch.log(weights)).to(bias.device, bias.dtype)
        bias.add_(shift)
        return shift.cpu()

    @torch.no_grad()
    def predict(self, xyz, intensity=None,
                precision: str = 'float32') -> tuple[torch.Tensor, torch.Tensor]:
        """Per-point class ``(N,) int64`` and probability ``(N,) float32`` of one scan.

        xyz: ``(N, 3) float32`` LiDAR frame (numpy or torch); intensity ``(N,)`` when the
        configured point features use it. Runs in eval mode on the model's device, in
        ``precision`` (:func:`precision_context`). An empty scan gives empty outputs; NaN/inf
        coordinates raise (drop them first).
        """
        # the forward pass builds the kernel maps (in a second thread where it can)
        return self.predict_prepared(self.prepare(xyz, intensity, maps='none'), precision)

    @torch.no_grad()
    def prepare(self, xyz, intensity=None, maps: str = 'build') -> PreparedScan:
        """The network-independent half of :meth:`predict`: point features, voxels and (torch
        backend) the kernel maps the last forward pass used. Touches no module state, so a
        second thread can prepare the next scan while this one runs the network.

        ``maps``: 'build' them now; 'later': create their coordinate manager only, the caller
        builds them with :meth:`PreparedScan.build_maps` (e.g. while another thread already
        runs the network, which waits for each map it reaches); 'none': the forward pass
        builds them.
        """
        if maps not in ('build', 'later', 'none'):
            raise ValueError(f"maps must be 'build', 'later' or 'none', got {maps!r}")
        device = next(self.parameters()).device
        pts = torch.as_tensor(xyz, dtype=torch.float32)
        if pts.ndim == 2 and pts.shape[0] == 0:  # an empty scan has empty labels
            return PreparedScan(None, None, torch.zeros(0, dtype=torch.int64), None)
        inten = None if intensity is None else torch.as_tensor(intensity, dtype=torch.float32)
        feats = point_features(pts, inten, self.config.point_features)
        coords, vfeats, inverse = voxelize(pts, feats, self.config.voxel_size)
        batch = torch.zeros(coords.shape[0], 1, dtype=torch.int32)
        coords = torch.cat([batch, coords], dim=1).to(device)
        vfeats = vfeats.to(device)
        requests = self.__dict__.get('_map_requests')
        if maps == 'none' or not requests or resolve_backend(self.backend, device) != 'torch':
            return PreparedScan(coords, vfeats, inverse, None)
        scan = PreparedScan(coords, vfeats, inverse, CoordinateManager(coords), requests)
        if maps == 'build':
            scan.build_maps()
        return scan

    @torch.no_grad()
    def predict_prepared(self, scan: PreparedScan,
                         precision: str = 'float32') -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict` of a scan from :meth:`prepare`."""
        device = next(self.parameters()).device
        context = precision_context(precision, device, resolve_backend(self.backend, device))
        if scan.coords is None:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
        was_training = self.training
        if was_training:  # (eval() visits every module: not on every scan of a deployed model)
            self.eval()
        try:
            with context:
                out = self(scan.coords, scan.feats, manager=scan.manager)
            prob, cls = torch.softmax(out['logits'].float(), dim=1).max(dim=1)
            inverse = scan.inverse.to(cls.device)
            return cls[inverse].cpu(), prob[inverse].cpu()
        finally:
            if was_training:
                self.train()


@dataclasses.dataclass
class PreparedScan:
    """A scan ready for the network: voxel coords ``(V, 4)``, features ``(V, F)``, the voxel of
    every point ``(N,)`` and (torch backend) a coordinate manager with its kernel maps built or
    to be built (:meth:`build_maps`)."""

    coords: torch.Tensor | None
    feats: torch.Tensor | None
    inverse: torch.Tensor
    manager: CoordinateManager | None
    map_requests: list = dataclasses.field(default_factory=list)  # what build_maps builds

    def build_maps(self) -> None:
        """Build the kernel maps (and their GEMM blocks) the network will ask for."""
        if self.manager is not None and self.map_requests:
            self.manager.prebuild(self.map_requests, self.feats.dtype)


def build_student(config: StudentConfig) -> Student:
    """The student network described by ``config`` (randomly initialised)."""
    if not isinstance(config, StudentConfig):
        raise TypeError(f'build_student needs a StudentConfig, got {type(config).__name__}')
    return Student(config)
