"""Shared pytest fixtures. Helpers that are not fixtures live in ``flow_helpers.py``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

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


@pytest.fixture(scope="session", autouse=True)
def torch_single_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite (and its subprocesses), restored after.

    The flow tests run many small ops; on a busy 2-core machine torch's thread pool spends most of its
    time waiting for the other core (measured: the same tests took 150 s with 2 threads under load and
    17 s with 1).
    """
    previous, previous_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    # Forced, not defaulted: the crash tests compare a CLI subprocess's metrics with an in-process run,
    # and a different thread count changes float reductions (a user's OMP_NUM_THREADS=2 broke that).
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if previous_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_env


@pytest.fixture
def benchmark_module() -> Callable[[str], ModuleType]:
    """Import ``benchmarks.NAME`` of the source checkout; skip the test where there is none."""
    root = Path(__file__).resolve().parents[1]

    def load(name: str) -> ModuleType:
        if not (root / "benchmarks" / f"{name}.py").is_file():
            pytest.skip("no benchmarks/ folder (not a source checkout)")
        sys.path.insert(0, str(root))
        try:
            return importlib.import_module(f"benchmarks.{name}")
        finally:
            sys.path.remove(str(root))

    return load
