"""Compiled CPU kernels of the torch sparse backend (optional; C++ with OpenMP).

``csrc/sparse_native.cpp`` builds kernel maps from packed coordinates and runs a fused
gather-GEMM-scatter convolution (each thread owns blocks of output rows). ``scripts/install.sh``
compiles it (``scripts/build_native.sh``) once per torch version, Python, machine and source
into ``${CMKD_NATIVE_CACHE:-~/.cache/cmkd_ros/native}/<key>/<source hash>/``, and
:func:`module` loads that build when it exists. Without it (no compiler, another torch) the
pure-PyTorch code of :mod:`.coords` and :mod:`.functional` runs: the reference, with the same
results (tested).

``CMKD_SPARSE_NATIVE``: ``auto`` (default: use a build when there is one), ``0`` (never),
``1`` (a missing build raises). :func:`disabled` turns the kernels off for a block of code.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import threading

import torch

NAME = 'cmkd_sparse_native'
SOURCE = pathlib.Path(__file__).with_name('csrc') / 'sparse_native.cpp'
CFLAGS = ['-O3', '-fopenmp', '-Wno-psabi']
LDFLAGS = ['-fopenmp']
MODES = ('auto', '0', '1')

_lock = threading.Lock()
_state: dict = {}  # 'module' (or None) and 'why' once loading was tried
_off = [0]  # disabled() depth


def block_rows(num_out: int) -> int:
    """Output rows per block of the compiled convolution (a thread's unit of work, its sums in
    cache): 512, fewer (a power of two, >= 64) for small outputs so that there are about 8
    blocks to share out."""
    return max(64, min(512, 1 << max(0, (num_out // 8).bit_length() - 1)))


class NativeUnavailable(RuntimeError):
    """CMKD_SPARSE_NATIVE=1 but the compiled kernels are not built for this environment."""


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get('CMKD_NATIVE_CACHE')
                        or pathlib.Path.home() / '.cache' / 'cmkd_ros' / 'native')


def build_key() -> str:
    """``torch-<version>-<cpython tag>-<machine>/<source hash>``: what a build depends on."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(' '.join(CFLAGS + LDFLAGS).encode())
    return (f'torch-{torch.__version__}-{sys.implementation.cache_tag}-{platform.machine()}/'
            f'{digest.hexdigest()[:16]}')


def library_path() -> pathlib.Path:
    return cache_root() / build_key() / f'{NAME}.so'


def mode() -> str:
    value = os.environ.get('CMKD_SPARSE_NATIVE', 'auto').strip().lower() or 'auto'
    if value not in MODES:
        raise ValueError(f'CMKD_SPARSE_NATIVE must be one of {MODES}, got {value!r}')
    return value


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the kernels into the cache (nothing to do when this source is built); the path of
    the shared library. Needs a C++ compiler with OpenMP and ninja (torch.utils.cpp_extension)."""
    from torch.utils import cpp_extension
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='build-', dir=target.parent) as tmp:
        cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=tmp, verbose=verbose,
                           is_python_module=True)
        built = pathlib.Path(tmp) / f'{NAME}.so'
        partial = target.with_suffix(f'.{os.getpid()}.tmp')
        shutil.copyfile(built, partial)
        os.replace(partial, target)  # atomic: a concurrent loader sees all or nothing
    return target


def _load():
    path = library_path()
    if not path.exists():
        return None, (f'not built for this environment ({path}); build it with '
                      'scripts/build_native.sh (scripts/install.sh runs it)')
    spec = importlib.util.spec_from_file_location(NAME, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded, f'loaded from {path}'


def module():
    """The compiled kernels, or None when they are off, not built, or inside :func:`disabled`.

    ``CMKD_SPARSE_NATIVE=1`` and no build: raises :class:`NativeUnavailable`."""
    if _off[0]:
        return None
    if 'module' not in _state:
        with _lock:
            if 'module' not in _state:
                choice = mode()
                if choice == '0':
                    _state.update(module=None, why='off (CMKD_SPARSE_NATIVE=0)')
                else:
                    try:
                        loaded, why = _load()
                    except (ImportError, OSError) as error:  # e.g. built for another torch
                        loaded, why = None, f'failed to load: {error}'
                    _state.update(module=loaded, why=why)
    if _state['module'] is None and mode() == '1':
        raise NativeUnavailable(f'CMKD_SPARSE_NATIVE=1 but the compiled sparse kernels are '
                                f'unavailable: {_state["why"]}')
    return _state['module']


def status() -> str:
    """One line: whether the compiled kernels are in use, and why."""
    try:
        loaded = module()
    except NativeUnavailable as error:
        return str(error)
    if _off[0]:
        return 'off (inside native.disabled())'
    if loaded is None:
        return 'not in use: ' + _state['why']
    # use_float32_kernels('') names no variant, so it switches nothing and only says which
    # runs; builds from before it lack the function
    variant = getattr(loaded, 'use_float32_kernels', None)
    return 'in use: ' + _state['why'] + (f' ({variant("")} float32 kernels)' if variant else '')


def available() -> bool:
    try:
        return module() is not None
    except NativeUnavailable:
        return False


@contextlib.contextmanager
def disabled():
    """Run the pure-PyTorch reference code in this block (all threads)."""
    with _lock:
        _off[0] += 1
    try:
        yield
    finally:
        with _lock:
            _off[0] -= 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Build or check the compiled sparse kernels.')
    parser.add_argument('--build', action='store_true', help='compile them (cached)')
    parser.add_argument('--verbose', action='store_true', help='show the compiler commands')
    args = parser.parse_args(argv)
    if args.build:
        print(f'[native] {build(args.verbose)}')
    print(f'[native] {status()}')
    return 0


