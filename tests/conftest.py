"""Shared fixtures: small random MFAs and images in float64 for exactness checks."""
from __future__ import annotations

import pytest
import torch

from labkit.mfa import MFA


def random_mfa(B=3, K=2, L=2, C=2, H=5, W=5, *, seed=0, dtype=torch.float64, factor_scale=0.3) -> MFA:
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(B, K, generator=g, dtype=dtype), 1)
    m = torch.randn(B, K, C, H, W, generator=g, dtype=dtype)
    A = factor_scale * torch.randn(B, K, L, C, H, W, generator=g, dtype=dtype)
    d = torch.rand(B, K, C, H, W, generator=g, dtype=dtype) + 0.1
    return MFA(w, m, A, d)


@pytest.fixture
def make_mfa():
    return random_mfa


def pytest_configure(config):
    # Two cores here: keep intra-op threads at the core count, never oversubscribe.
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def eager_misconv():
    """MisConv's fast path compiles with torch.compile on first use (tens of seconds); the eager path
    computes the same function (tests/test_misconv*.py hold them equal), so slow-to-compile tests use it."""
    from labkit import misconv

    before = misconv.fast_default()
    misconv.set_fast_default(False)
    yield
    misconv.set_fast_default(before)


def pytest_report_header(config):
    # one line at the top of the run: whether the real-browser tests can run here, else how to get Chromium
    from tests.test_browser import find_chromium, skip_reason

    reason = skip_reason()
    return f"browser tests: {'Chromium at ' + str(find_chromium()) if reason is None else 'will skip, ' + reason}"


@pytest.fixture
def one_thread():
    """One intra-op thread: two OpenMP threads on a busy 2-core machine spin-wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dmfa_recipe(**changes):
    """A DMFA training recipe for tests: the quick profile's (``DensityConfig``'s defaults) in
    float32, with ``changes`` (any :class:`labkit.models.dmfa_training.DMFARecipe` field)."""
    import dataclasses

    from labkit.studies.configs import DensityConfig
    from labkit.studies.density_experiment import recipe_from

    return dataclasses.replace(recipe_from(DensityConfig(precision="32")), **changes)
