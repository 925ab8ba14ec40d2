import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite runs tiny models: their small matmuls gain nothing from threads, and on a busy
    # 2-core machine OpenMP spin-waits make them many times slower. Subprocesses started by the
    # tests get OMP_NUM_THREADS=1 for the same reason.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
