"""Shared fixtures: float64 by default for numerical checks, seeded generators, the device."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def dtype() -> torch.dtype:
    return torch.float64


@pytest.fixture
def seed() -> int:
    return 1234


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests run tiny networks: one thread avoids OpenMP start-up and oversubscription on small machines.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
