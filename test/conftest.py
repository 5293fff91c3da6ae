"""Shared pytest fixtures: the real sample data folder and a scratch directory."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get('CMKD_DATA_DIR', REPO.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def data_dir() -> pathlib.Path:
    """Folder with the real sample frames (nuscenes_sample/, kitti_000008/); set CMKD_DATA_DIR."""
    if not (DATA_DIR / 'nuscenes_sample' / 'calibration.json').exists():
        raise FileNotFoundError(f'sample data not found in {DATA_DIR}; set CMKD_DATA_DIR')
    return DATA_DIR


def _devices():
    """cpu, plus cuda where a GPU is visible: CI (no GPU) runs the CPU cases, a GPU both."""
    import torch
    return ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> str:
    """Torch device the test runs on (the cuda case exists only where CUDA is available)."""
    return request.param


@pytest.fixture
def single_torch_thread():
    """Correctness tests run on one torch thread: robust timing on a shared, busy machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
