# mlximg first: on Linux it preloads the system OpenBLAS, which must happen before mlx is imported.
import mlximg  # noqa: F401
import pytest


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
