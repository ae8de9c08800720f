import os

import pytest
import torch

# Two CPU cores on CI: keep intra-op threads bounded so parallel tests do not thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
