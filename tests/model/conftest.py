"""Fixtures for the model tests."""
import pytest
import torch

from .helpers import load_short_md, single_torch_thread


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One torch thread for the whole package (see :func:`helpers.single_torch_thread`)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def short_md():
    """Real frames (100, 48) of tests/data/short_md_1enh.npz, float64, nm."""
    return load_short_md(torch.float64)
