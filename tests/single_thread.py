"""A fixture for test modules that run small models: ``from single_thread import one_thread  # noqa: F401``."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small inputs: one thread is as fast, and far faster while other processes keep the cores busy
    (with 2 threads on 2 busy cores a 32 px forward pass can take seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
