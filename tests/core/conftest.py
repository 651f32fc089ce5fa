"""Settings for the core tests.

The core tests run tiny models whose matmuls take microseconds. With torch's default of one
thread per core, OpenMP synchronisation dominates them, and on a busy 2-core machine it makes
them up to 100x slower (measured: 1 s instead of 10 ms for one tiny hypernet forward). So each
core test runs single-threaded, and the thread count is restored afterwards for the other suites.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
