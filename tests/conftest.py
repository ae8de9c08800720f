import os

import pytest
import torch

# One intra-op thread: tiny test models gain nothing from more, and CI shares 2 cores with subprocesses.
torch.set_num_threads(1)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
