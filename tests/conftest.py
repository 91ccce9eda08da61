import numpy as np
import pytest

from retriever.build import build_index
from retriever.datasets import synthetic
from retriever.index import IVFPQParams


@pytest.fixture(scope="session")
def small_data():
    """20k clustered 32-d vectors and 200 queries (l2)."""
    return synthetic(n=20_000, dim=32, nqueries=200, seed=0)


@pytest.fixture(scope="session", params=["l2", "ip", "cos"])
def small_index(request, small_data):
    """A 64-list, 8-sub-quantizer index of ``small_data`` for each metric."""
    params = IVFPQParams(request.param, small_data.dim, nlist=64, m=8)
    return build_index(small_data.base, params, train_size=10_000, seed=7)


@pytest.fixture(scope="session")
def l2_index(small_data):
    return build_index(small_data.base, IVFPQParams("l2", small_data.dim, nlist=64, m=8), train_size=10_000, seed=7)


@pytest.fixture
def rng():
    return np.random.default_rng(123)
