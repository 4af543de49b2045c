"""Helpers shared by the model-zoo tests."""
import pytest
import torch


def perturb_(model):
    """Moves every parameter and buffer off its init (zero-init BN gammas, unit BN statistics, zero biases), so
    every branch of every block shows in the outputs. In place; returns the model."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
            else:
                v.add_(torch.randn_like(v) * 0.02)
    return model


@pytest.fixture
def perturb():
    return perturb_


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
