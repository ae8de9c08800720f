
import pytest
import torch

# One intra-op thread for every test: tiny shapes gain nothing from more, and when the two CI cores are shared
# with subprocesses, OpenMP workers would wait on descheduled peers at every op.
torch.set_num_threads(1)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
