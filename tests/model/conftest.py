"""Fixtures for the model tests."""
import pytest
import torch

from .helpers import load_short_md


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """The small tensors here run ~100x slower with 2 OpenMP threads on a busy 2-core machine
    (barrier spinning) than with one; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def short_md():
    """Real frames (100, 48) of tests/data/short_md_1enh.npz, float64, nm."""
    return load_short_md(torch.float64)
