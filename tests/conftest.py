"""Shared pytest fixtures. Helpers that are not fixtures live in ``flow_helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test in float64 with a fixed seed (zuko's setting); dtype and RNG are restored after."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)
