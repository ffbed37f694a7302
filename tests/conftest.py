import pytest
import torch

import fusedopt


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU")
    config.addinivalue_line("markers", "slow: slow on a 2-core CPU")


requires_cuda = pytest.mark.skipif(not fusedopt.cuda_available(), reason="needs a CUDA GPU and fusedopt CUDA build")
