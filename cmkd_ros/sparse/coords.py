"""Coordinate hashing and kernel maps for the pure-PyTorch sparse backend.

Coordinates are integer voxel indices ``(N, 4) int32 [batch, x, y, z]``. A tensor at tensor
stride ``s`` keeps coordinates in stride-1 units that are multiples of ``s`` (MinkowskiEngine's
convention): downsampling by ``r`` maps ``c`` to ``floor(c / (s r)) * s r``.

Each coordinate is packed into one int64 key, ``batch << 54 | x' << 36 | y' << 18 | z'`` with
``x' = x - origin_x`` (origin = minimum minus a margin), so that adding a kernel offset to a
coordinate adds a constant to its key and sorted keys are lexicographic ``(batch, x, y, z)``.
Submanifold maps of odd kernels search whole (x, y) columns in the sorted keys; other neighbour
lookups probe a hash table of the keys of the target stride (:class:`_HashIndex`).
Every coordinate set and kernel map is built once per ``CoordinateManager`` (one per input
batch) and reused by all layers that need it. A second thread may build the maps a network will
ask for (:meth:`CoordinateManager.prebuild_in_background`) while the network runs: each map is
claimed by the first thread that needs it, and the other waits for it instead of building it
again.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref

import torch

from . import native
from .functional import average_matrix, blocked_pairs, native_layout, scatter_matrix

AXIS_BITS = 18
BATCH_BITS = 63 - 3 * AXIS_BITS  # 9 bits: up to 512 scans per batch
MARGIN = 1 << (AXIS_BITS - 2)  # room for kernel offsets and floor rounding below the minimum
MAX_EXTENT = (1 << AXIS_BITS) - 2 * MARGIN  # coordinate range per axis (131,072 voxels)
_MASK = (1 << AXIS_BITS) - 1


def _floor_div(values: torch.Tensor, divisor: int) -> torch.Tensor:
    """``floor(values / divisor)`` of int64 values (an arithmetic shift for powers of two)."""
    if divisor & (divisor - 1) == 0:
        return values >> (divisor.bit_length() - 1)
    return torch.div(values, divisor, rounding_mode='floor')


class SparseError(ValueError):
    """Invalid sparse coordinates, strides or layer arguments."""


def kernel_offsets(kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Kernel offsets ``(k^3, 3) int64`` in units of the input stride, z fastest.

    Odd sizes are centred (``-(k // 2) .. k // 2``), even sizes start at 0 (``0 .. k - 1``), as in
    MinkowskiEngine. Row ``(i * k + j) * k + l`` is offset ``(r[i], r[j], r[l])``, matching the
    flattened ``(k, k, k)`` spatial axes of a dense ``conv3d`` weight indexed ``[x, y, z]``.
    """
    if kernel_size < 1:
        raise SparseError(f'kernel_size must be >= 1, got {kernel_size}')
    start = -(kernel_size // 2) if kernel_size % 2 else 0
    steps = [(start + i) * dilation for i in range(kernel_size)]
    return torch.tensor(list(itertools.product(steps, steps, steps)), dtype=torch.int64)


@dataclasses.dataclass
class KernelMap:
    """Input/output row pairs of a sparse convolution, grouped by kernel offset.

    ``in_rows``/``out_rows`` are ``(P,) int64``; group ``g`` owns ``[bounds[g], bounds[g+1])`` and
    uses weight slice ``kernel_index[g]`` of a ``(volume, Cin, Cout)`` weight. ``identity`` is the
    weight slice whose pairs are ``(i, i)`` for every row (the centre of a submanifold
    convolution; not stored in the pair arrays), or -1.
    """

    in_rows: torch.Tensor
    out_rows: torch.Tensor
    bounds: list
    kernel_index: list
    volume: int
    num_in: int
    num_out: int
    identity: int = -1

    def transposed(self) -> KernelMap:
        """The same pairs with inputs and outputs exchanged (for transposed convolutions and
        input gradients). Made once: ``m.transposed().transposed() is m``.

        The map holds its transpose; the transpose refers back weakly (``transpose_source``),
        so the two make no reference cycle: a cycle kept each scan's maps and their tensors
        alive until Python's cyclic collector happened to run, a growing heap in the segment
        node (docs/history.md#soak)."""
        flipped = self.__dict__.get('_transposed')
        if flipped is None:
            flipped = self.transpose_source()
        if flipped is None:
            flipped = dataclasses.replace(self, in_rows=self.out_rows, out_rows=self.in_rows,
                                          num_in=self.num_out, num_out=self.num_in)
            flipped.__dict__['_transpose_of'] = weakref.ref(self)
            self.__dict__['_transposed'] = flipped
        return flipped

    def transpose_source(self) -> KernelMap | None:
        """The map this one is the transpose of, while it exists (blocked_pairs reuses its
        blocks), else None."""
        source = self.__dict__.get('_transpose_of')
        return None if source is None else source()

    @property
    def num_pairs(self) -> int:
        return int(self.in_rows.numel()) + (self.num_out if self.identity >= 0 else 0)


_PRODUCTS = ('_blocked', '_scatter', '_average', '_native')  # what functional.py caches on a map

_HASH_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 (Fibonacci hashing) as int64
_EMPTY = -1  # packed keys are >= 0


class _HashIndex:
    """Open-addressing hash table (linear probing, load <= 1/4) of unique int64 keys -> rows.

    Built and probed with whole-tensor operations: every round places or probes all pending
    keys at once, so the number of rounds is the longest probe sequence (a few at this load).
    """

    def __init__(self, keys: torch.Tensor):
        n = keys.numel()
        self.bits = max(4, int(n * 4 - 1).bit_length())
        size = 1 << self.bits
        self.mask = size - 1
        self.table = torch.full((size,), _EMPTY, dtype=torch.int64, device=keys.device)
        self.rows = torch.zeros(size, dtype=torch.int64, device=keys.device)
        slot = self._hash(keys)
        pending = torch.arange(n, device=keys.device)
        while pending.numel():
            # 1. Pending keys whose slot is free try to claim it; one writer per slot wins.
            s = slot[pending]
            free = self.table[s] == _EMPTY
            cand, cs = pending[free], s[free]
            self.table[cs] = keys[cand]
            won = self.table[cs] == keys[cand]
            self.rows[cs[won]] = cand[won]
            # 2. Keys that found the slot taken, or lost the race, probe the next slot.
            pending = torch.cat([pending[~free], cand[~won]])
            slot[pending] = (slot[pending] + 1) & self.mask

    def _hash(self, keys: torch.Tensor) -> torch.Tensor:
        return ((keys * _HASH_MULT) >> (64 - self.bits)) & self.mask

    def lookup(self, query: torch.Tensor) -> torch.Tensor:
        """Row of each key in ``query`` (1-D int64), -1 where absent."""
        slot = self._hash(query)
        found = self.table[slot]
        occupied = found != _EMPTY
        hit = occupied & (found == query)
        result = torch.where(hit, self.rows[slot], torch.full_like(query, -1))
        pending = (occupied & ~hit).nonzero().squeeze(1)
        while pending.numel():
            # Probe the next slot until the key or an empty slot (absent) is found.
            s = (slot[pending] + 1) & self.mask
            slot[pending] = s
            found = self.table[s]
            occupied = found != _EMPTY
            hit = occupied & (found == query[pending])
            result[pending[hit]] = self.rows[s[hit]]
            pending = pending[occupied & ~hit]
        return result


class _CoordinateSet:
    """Coordinates at one tensor stride with their keys and a hash index (built on demand)."""

    def __init__(self, coords: torch.Tensor, keys: torch.Tensor, is_sorted: bool = False):
        self.coords = coords
        self.keys = keys
        self._index = None
        self._sorted = (keys, None) if is_sorted else None

    def sorted(self) -> tuple:
        """(sorted keys, row of each sorted key or None when the rows are already sorted)."""
        if self._sorted is None:
            keys = self.keys
            if keys.numel() < 2 or bool((keys[1:] > keys[:-1]).all()):
                self._sorted = (keys, None)  # e.g. voxelize() output: already in key order
            else:
                self._sorted = torch.sort(keys)
        return self._sorted

    def lookup(self, query: torch.Tensor) -> torch.Tensor:
        """Row of each query key, -1 where absent; ``query`` any shape int64."""
        if self._index is None:
            self._index = _HashIndex(self.keys)
        return self._index.lookup(query.reshape(-1)).reshape(query.shape)


class CoordinateManager:
    """Coordinate sets per tensor stride and kernel maps, built once and cached.

    Created from the stride-1 coordinates of a batch; every sparse tensor derived from that input
    shares it, so a kernel map is built once per (stride, kernel, dilation) and reused.
    """

    def __init__(self, coords: torch.Tensor):
        if not isinstance(coords, torch.Tensor) or coords.ndim != 2 or coords.shape[1] != 4:
            raise SparseError('coords must be a (N, 4) integer tensor [batch, x, y, z], got '
                              f'{getattr(coords, "shape", type(coords))}')
        if coords.dtype not in (torch.int32, torch.int64):
            raise SparseError(f'coords must be int32 or int64, got {coords.dtype}')
        if coords.shape[0] == 0:
            raise SparseError('coords is empty: a sparse tensor needs at least one voxel')
        coords = coords.to(torch.int32).contiguous()
        self.device = coords.device
        kernels = self._kernels()
        if kernels is not None:
            bounds = kernels.coord_bounds(coords)  # (2, 4): minima, maxima
            lo, hi = bounds[0, 1:], bounds[1, 1:]
            bmin, bmax = int(bounds[0, 0]), int(bounds[1, 0])
        else:
            batch = coords[:, 0]
            lo = coords[:, 1:].amin(0).to(torch.int64)
            hi = coords[:, 1:].amax(0).to(torch.int64)
            bmin, bmax = int(batch.min()), int(batch.max())
        if bmin < 0 or bmax >= (1 << BATCH_BITS):
            raise SparseError(f'batch indices must lie in [0, {1 << BATCH_BITS}), got '
                              f'[{bmin}, {bmax}]')
        extent = int((hi - lo).max())
        if extent >= MAX_EXTENT:
            raise SparseError(f'coordinates span {extent} voxels on one axis; at most '
                              f'{MAX_EXTENT - 1} are supported (use a larger voxel size)')
        self.origin = (lo - MARGIN).contiguous()  # (3,) int64
        self._sets: dict[int, _CoordinateSet] = {}
        self._parents: dict[tuple, tuple] = {}
        self._maps: dict[tuple, KernelMap] = {}
        self._claims: dict[tuple, threading.Event] = {}  # set when the claimed map is done
        self._claim_lock = threading.Lock()
        self._progress = threading.Condition(self._claim_lock)  # notified when a map is done
        self._in_flight = 0  # queued maps taken by a thread and not finished
        self._queued: list = []  # (key, transposed, product builders) that prebuild will make
        self._asked: dict[tuple, None] = {}  # kernel_map keys in the order first asked for
        self._background = None  # prebuild_in_background's thread
        self._lent = None  # (thread id, its torch threads, give back early) while lent
        keys = self.pack(coords)
        # Sorted keys (kept for the kernel maps) show duplicates as equal neighbours.
        fine = _CoordinateSet(coords, keys)
        ordered = fine.sorted()[0]
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise SparseError('coords contain duplicate voxels; voxelize first')
        self._sets[1] = fine

    # -- keys -------------------------------------------------------------------------------
    def pack(self, coords: torch.Tensor) -> torch.Tensor:
        """int64 keys of ``(N, 4)`` coordinates (stride-1 units)."""
        kernels = self._kernels()
        if kernels is not None:
            return kernels.pack(coords.to(torch.int32), self.origin)
        c = coords.to(torch.int64)
        xyz = c[:, 1:] - self.origin
        return ((c[:, 0] << (3 * AXIS_BITS)) | (xyz[:, 0] << (2 * AXIS_BITS))
                | (xyz[:, 1] << AXIS_BITS) | xyz[:, 2])

    def unpack(self, keys: torch.Tensor) -> torch.Tensor:
        """``(N, 4) int32`` coordinates of int64 keys."""
        kernels = self._kernels()
        if kernels is not None:
            return kernels.unpack(keys, self.origin)
        out = torch.stack([keys >> (3 * AXIS_BITS), (keys >> (2 * AXIS_BITS)) & _MASK,
                           (keys >> AXIS_BITS) & _MASK, keys & _MASK], dim=1)
        out[:, 1:] += self.origin
        return out.to(torch.int32)

    @staticmethod
    def key_delta(offsets: torch.Tensor) -> torch.Tensor:
        """Key increments ``(K,) int64`` of coordinate offsets ``(K, 3)`` (no batch change)."""
        o = offsets.to(torch.int64)
        return (o[:, 0] << (2 * AXIS_BITS)) + (o[:, 1] << AXIS_BITS) + o[:, 2]

    def _kernels(self):
        """The compiled kernels for this manager's device (CPU only), or None."""
        return native.module() if self.device.type == 'cpu' else None

    # -- coordinate sets ------------------------------------------------------------------------
    def coordinates(self, stride: int) -> torch.Tensor:
        """``(N_s, 4) int32`` coordinates at tensor stride ``stride`` (built on first use)."""
        return self._set(stride).coords

    def find(self, coords: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """Row at ``stride`` of each coordinate ``(M, 4)``, -1 where absent: ``(M,) int64``."""
        c = coords.to(device=self.device, dtype=torch.int64)
        xyz = c[:, 1:] - self.origin
        inside = ((xyz >= 0) & (xyz <= _MASK)).all(1) & (c[:, 0] >= 0) & (
            c[:, 0] < (1 << BATCH_BITS))
        rows = self._set(stride).lookup(self.pack(torch.where(inside.unsqueeze(1), c, 0 * c)))
        return torch.where(inside, rows, torch.full_like(rows, -1))

    def has_stride(self, stride: int) -> bool:
        return stride in self._sets

    def _set(self, stride: int) -> _CoordinateSet:
        if stride not in self._sets:
            raise SparseError(f'no coordinates at tensor stride {stride}; known strides: '
                              f'{sorted(self._sets)} (strided layers create coarser ones)')
        return self._sets[stride]

    def parents(self, stride: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Downsample ``stride`` by ``factor``: (parent row ``(N_s,) int64``, child offset code).

        Creates the coordinates at ``stride * factor`` (sorted by key). The child code of row
        ``i`` is ``(a * f + b) * f + c`` with ``(a, b, c) = (x - parent_x) / stride, ...``.
        """
        key = (stride, factor)
        if key not in self._parents:
            if factor < 2:
                raise SparseError(f'downsampling factor must be >= 2, got {factor}')
            fine = self._set(stride)
            coarse_stride = stride * factor
            kernels = self._kernels()
            if kernels is not None:
                uniq, inverse, code = kernels.downsample(fine.keys, self.origin, stride, factor)
            else:
                c = fine.coords.to(torch.int64)
                parent_xyz = _floor_div(c[:, 1:], coarse_stride) * coarse_stride
                rem = _floor_div(c[:, 1:] - parent_xyz, stride)
                code = (rem[:, 0] * factor + rem[:, 1]) * factor + rem[:, 2]
                parent = torch.cat([c[:, :1], parent_xyz], dim=1)
                uniq, inverse = torch.unique(self.pack(parent), sorted=True,
                                             return_inverse=True)
            if coarse_stride not in self._sets:
                self._sets[coarse_stride] = _CoordinateSet(self.unpack(uniq), uniq,
                                                           is_sorted=True)
            elif self._sets[coarse_stride].keys.numel() != uniq.numel():
                raise SparseError(f'stride {coarse_stride} reached from stride {stride} with '
                                  f'factor {factor} disagrees with its existing coordinates')
            self._parents[key] = (inverse, code)
        return self._parents[key]

    # -- kernel maps ------------------------------------------------------------------------
    def map_requests(self) -> list:
        """What this manager built: ``(kernel_map key, names of the cached products)``, for
        :meth:`prebuild` on the next batch (a network asks for the same maps every time), in
        the order :meth:`kernel_map` was first asked for them."""
        order = list(self._asked) + [key for key in self._maps if key not in self._asked]
        return [(key, tuple(sorted(k for k in self._maps[key].__dict__ if k in _PRODUCTS)))
                for key in order if key in self._maps]

    def prebuild(self, requests: list, dtype: torch.dtype = torch.float32) -> None:
        """Build the maps (and their GEMM blocks and scatter matrices for ``dtype``) of
        ``requests``, in their order (the order a network asked for them)."""
        build = {'_blocked': blocked_pairs, '_scatter': lambda m: scatter_matrix(m, dtype),
                 '_average': lambda m: average_matrix(m, dtype), '_native': native_layout}
        with self._claim_lock:
            self._queued.extend((key[:4], len(key) > 4, [build[name] for name in products])
                                for key, products in requests)
        while self._queued:
            if not self._build_queued():
                self._wait_for_progress()

    def prebuild_in_background(self, requests: list, dtype: torch.dtype = torch.float32,
                               lend_thread: bool = False,
                               give_back_early: bool = True) -> threading.Thread:
        """:meth:`prebuild` in a started daemon thread (one torch thread) while the caller runs
        the network on this manager; end with :meth:`join_background`. A thread that needs a
        map another one is building helps with the queued ones meanwhile. Errors are left to
        the thread that needs the map (it builds it again and raises).

        ``lend_thread``: the calling thread runs one torch thread fewer while the maps are
        built and, with ``give_back_early``, gets it back at its first :meth:`kernel_map` call
        after they are done, else at :meth:`join_background`.
        """
        if lend_thread and torch.get_num_threads() > 1:
            self._lent = (threading.get_ident(), torch.get_num_threads(), give_back_early)
            torch.set_num_threads(self._lent[1] - 1)

        def run():
            torch.set_num_threads(1)
            try:
                self.prebuild(requests, dtype)
            except Exception:  # noqa: BLE001 - the network's thread rebuilds the map and raises
                with self._claim_lock:
                    self._queued.clear()
        thread = threading.Thread(target=run, name='cmkd_kernel_maps', daemon=True)
        thread.start()
        self._background = thread
        return thread

    def join_background(self) -> None:
        """Wait for :meth:`prebuild_in_background` and give back a lent thread."""
        if self._background is not None:
            self._background.join()
        self._give_back_thread()

    def _give_back_thread(self) -> None:
        lent = self._lent
        if lent is not None and lent[0] == threading.get_ident():
            self._lent = None
            torch.set_num_threads(lent[1])

    def _build_queued(self) -> bool:
        """Build the first queued map whose input coordinates exist; False if none can start
        (those that remain wait for a coarser coordinate set that a map in progress makes)."""
        with self._claim_lock:
            for i, (key, _, _) in enumerate(self._queued):
                if key[0] in self._sets:
                    key, transposed, products = self._queued.pop(i)
                    self._in_flight += 1
                    break
            else:
                return False
        try:
            self._kernel_map(key, transposed, products)
        finally:
            with self._claim_lock:
                self._in_flight -= 1
                self._progress.notify_all()
        return True

    def _wait_for_progress(self) -> None:
        """Wait until a map in progress is done (it may create the coordinates the queued
        ones need); raise if nothing is in progress, as none can then start."""
        with self._claim_lock:
            if not self._queued or any(key[0] in self._sets for key, _, _ in self._queued):
                return
            if not self._in_flight and all(e.is_set() for e in self._claims.values()):
                raise SparseError('queued kernel maps need coordinates that no map creates')
            self._progress.wait(timeout=0.05)

    def kernel_map(self, in_stride: int, kernel_size: int, stride: int = 1,
                   dilation: int = 1, transposed: bool = False) -> KernelMap:
        """Pairs of a convolution from ``in_stride`` to ``in_stride * stride`` (cached).

        ``transposed``: the same pairs the other way round, ``in_stride * stride -> in_stride``.
        """
        key = (in_stride, kernel_size, stride, dilation)
        self._asked.setdefault(key + (True,) if transposed else key, None)
        if self._lent is not None and self._lent[2] and not self._background.is_alive():
            self._give_back_thread()
        return self._kernel_map(key, transposed, ())

    def _kernel_map(self, key: tuple, transposed: bool, products) -> KernelMap:
        """The map of ``key``, with ``products`` (builders of its cached GEMM blocks etc.) run
        before other threads see it."""
        if transposed:  # recorded under its own key (map_requests) but made by the map
            kmap = self._kernel_map(key, False, ()).transposed()
            for build in products:
                build(kmap)
            self._maps[key + (True,)] = kmap
            return kmap
        kmap = self._maps.get(key)
        if kmap is not None:
            return kmap
        with self._claim_lock:
            done = self._claims.get(key)
            claimed = done is None
            if claimed:
                done = self._claims[key] = threading.Event()
        if not claimed:  # another thread builds it: help with queued maps, then wait
            while not done.is_set() and self._build_queued():
                pass
            done.wait()
            kmap = self._maps.get(key)
            if kmap is not None:
                return kmap
        try:
            in_stride, kernel_size, stride, dilation = key
            if stride == 1:
                kmap = self._submanifold_map(in_stride, kernel_size, dilation)
            elif kernel_size == stride and kernel_size % 2 == 0 and dilation == 1:
                kmap = self._parent_map(in_stride, stride)
            else:
                kmap = self._strided_map(in_stride, kernel_size, stride, dilation)
            for build in products:
                build(kmap)
            self._maps[key] = kmap
        finally:
            done.set()
            with self._claim_lock:
                self._progress.notify_all()
        return kmap

    def _pairs(self, target: _CoordinateSet, query: torch.Tensor, deltas: torch.Tensor) -> tuple:
        """(target rows, query rows, counts per offset) of every ``target key == query key +
        deltas[k]``, grouped by offset, query rows ascending within an offset."""
        kernels = native.module() if self.device.type == 'cpu' else None
        if kernels is not None:  # one compiled hashing pass
            in_rows, out_rows, counts = kernels.query_pairs(target.keys, query, deltas)
            return in_rows, out_rows, counts.tolist()
        return self._split(target.lookup(query.unsqueeze(0) + deltas.unsqueeze(1)))

    def _split(self, rows: torch.Tensor) -> tuple:
        """Found rows ``(K, n)`` (-1 = absent) -> (offset idx, input rows, output rows, counts)."""
        ok = rows >= 0
        k_idx, out_rows = ok.nonzero(as_tuple=True)  # ordered by offset, then output row
        counts = torch.bincount(k_idx, minlength=rows.shape[0]).tolist()
        return rows[ok], out_rows, counts

    def _submanifold_map(self, stride: int, kernel_size: int, dilation: int) -> KernelMap:
        cset = self._set(stride)
        n = cset.keys.numel()
        offsets = kernel_offsets(kernel_size, dilation) * stride
        volume = offsets.shape[0]
        if kernel_size % 2 == 0:
            deltas = self.key_delta(offsets).to(self.device)
            in_rows, out_rows, counts = self._pairs(cset, cset.keys, deltas)
            return self._grouped(in_rows, out_rows, counts, list(range(volume)), volume, n, n)
        # 1. Odd kernels are symmetric: offset k and volume-1-k are mirror images, so the pairs
        #    of one are the swapped pairs of the other; the centre is the identity.
        centre = volume // 2
        if dilation == 1:
            in_rows, out_rows, counts = self._column_half_pairs(cset, stride, kernel_size)
        else:
            deltas = self.key_delta(offsets[:centre]).to(self.device)
            in_rows, out_rows, counts = self._pairs(cset, cset.keys, deltas)
        half = len(counts)
        kmap = self._grouped(torch.cat([in_rows, out_rows]), torch.cat([out_rows, in_rows]),
                             counts + counts, list(range(half)) + [volume - 1 - k
                                                                   for k in range(half)],
                             volume, n, n)
        kmap.identity = centre
        return kmap

    def _column_half_pairs(self, cset: _CoordinateSet, stride: int, kernel_size: int) -> tuple:
        """Pairs of the first half of an odd, undilated kernel's offsets (index < centre).

        Keys sort by (batch, x, y, z), so the voxels of a neighbouring column (dx, dy) at
        z - r .. z + r are consecutive in the sorted keys: one ``searchsorted`` finds the first
        candidate, the next k - 1 sorted keys are the others, and a key's distance to the lowest
        one gives its z step. The columns before the centre are dx < 0, then dx == 0 with dy < 0,
        then the voxel's own column below it: exactly the offsets before the centre.
        """
        r = kernel_size // 2
        if r == 0:  # kernel size 1: the centre only
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, []
        keys, order = cset.sorted()
        kernels = self._kernels()
        if kernels is not None:  # the same walk, compiled: a cursor per column
            in_rows, out_rows, counts = kernels.column_pairs(keys, kernel_size, stride)
            if order is not None:
                in_rows, out_rows = order[in_rows], order[out_rows]
            return in_rows, out_rows, counts.tolist()
        n = keys.numel()
        columns = [(dx, dy) for dx in range(-r, 1) for dy in range(-r, r + 1)
                   if dx < 0 or dy <= 0]
        lowest_offsets = torch.tensor([[dx * stride, dy * stride, -r * stride]
                                       for dx, dy in columns])
        # 1. The lowest possible neighbour key of every (column, voxel) and where it would sit.
        lowest = keys.unsqueeze(0) + self.key_delta(lowest_offsets).to(self.device).unsqueeze(1)
        first = torch.searchsorted(keys, lowest)  # (C, n)
        # 2. k candidates per (column, voxel): the z step is the key distance / stride.
        steps = torch.arange(kernel_size, device=self.device)
        cand = (first.unsqueeze(2) + steps).clamp_(max=n - 1)  # (C, n, k)
        dist = keys[cand] - lowest.unsqueeze(2)
        limit = torch.full((len(columns), 1, 1), 2 * r * stride, dtype=torch.int64,
                           device=self.device)
        limit[-1] = (r - 1) * stride  # own column: below the voxel only
        hit = (dist >= 0) & (dist <= limit)
        col, out_rows, j = hit.nonzero(as_tuple=True)
        in_rows = cand[col, out_rows, j]
        # 3. Kernel index ((dx + r) k + dy + r) k + z step; group by it, output rows ascending.
        base = torch.tensor([((dx + r) * kernel_size + dy + r) * kernel_size
                             for dx, dy in columns],
                            device=self.device)
        kidx = base[col] + torch.div(dist[col, out_rows, j], stride, rounding_mode='floor')
        regroup = torch.argsort(kidx, stable=True)
        in_rows, out_rows = in_rows[regroup], out_rows[regroup]
        counts = torch.bincount(kidx, minlength=kernel_size ** 3 // 2).tolist()
        if order is not None:
            in_rows, out_rows = order[in_rows], order[out_rows]
        return in_rows, out_rows, counts

    @staticmethod
    def _grouped(in_rows, out_rows, counts, kernel_index, volume, num_in, num_out) -> KernelMap:
        bounds = [0]
        kept = []
        for k, c in zip(kernel_index, counts):
            if c:
                bounds.append(bounds[-1] + c)
                kept.append(k)
        return KernelMap(in_rows, out_rows, bounds, kept, volume, num_in, num_out)

    def _parent_map(self, in_stride: int, factor: int) -> KernelMap:
        # 2. Kernel size == stride (even): every input row feeds exactly one output, at the
        #    offset given by its position inside the parent cell.
        inverse, code = self.parents(in_stride, factor)
        volume = factor ** 3
        kernels = self._kernels()
        if kernels is not None:
            in_rows, out_rows, counts = kernels.parent_pairs(inverse, code, volume)
            counts = counts.tolist()
        else:
            in_rows = torch.argsort(code, stable=True)
            out_rows = inverse[in_rows]
            counts = torch.bincount(code, minlength=volume).tolist()
        num_out = self._sets[in_stride * factor].keys.numel()
        return self._grouped(in_rows, out_rows, counts, list(range(volume)), volume,
                             inverse.numel(), num_out)

    def _strided_map(self, in_stride: int, kernel_size: int, factor: int,
                     dilation: int) -> KernelMap:
        self.parents(in_stride, factor)
        fine = self._set(in_stride)
        coarse = self._set(in_stride * factor)
        offsets = kernel_offsets(kernel_size, dilation) * in_stride
        deltas = self.key_delta(offsets).to(self.device)
        in_rows, out_rows, counts = self._pairs(fine, coarse.keys, deltas)
        return self._grouped(in_rows, out_rows, counts, list(range(offsets.shape[0])),
                             offsets.shape[0], fine.keys.numel(), coarse.keys.numel())
