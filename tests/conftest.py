
import pytest
import torch

# One intra-op thread for every test: tiny shapes gain nothing from more, and when the two CI cores are shared
# with subprocesses, OpenMP workers would wait on descheduled peers at every op.
torch.set_num_threads(1)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def dense():
    """The rollout tests' tiny dense model (test_rollout._model: decisive weights)."""
    from test_rollout import _model

    return _model("tiny-dense")


@pytest.fixture(scope="module")
def moe():
    """The rollout tests' tiny MoE + MLA model."""
    from test_rollout import _model

    return _model("tiny-moe")
