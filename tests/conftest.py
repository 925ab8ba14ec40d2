import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Tests are small: more threads only add contention on the 2-core CI machine.
    torch.manual_seed(0)
    yield
