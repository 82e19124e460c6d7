import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops; one thread avoids OpenMP hand-offs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
