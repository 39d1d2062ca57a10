# mlximg first: on Linux it preloads the system OpenBLAS, which must happen before mlx is imported.
import os

import mlximg  # noqa: F401
import pytest

# What a Mac runs, on this CPU: MLX's own ops (no CPU kernels, no fast exp), bfloat16, FP8 as a quantized matmul.
MAC = {"MLXIMG_OPS": "mlx", "MLXIMG_DTYPE": "bfloat16", "MLXIMG_FP8": "matmul"}


def pytest_addoption(parser):
    parser.addoption("--mac", action="store_true",
                     help="the Mac pass: run the tests marked `mac` with " + " ".join(f"{k}={v}" for k, v in MAC.items()))


def pytest_configure(config):
    config.addinivalue_line("markers", "mac: a parity test that also runs in the Mac pass (bounds from the reference)")
    if config.getoption("--mac"):
        os.environ.update(MAC)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--mac"):
        selected = [item for item in items if item.get_closest_marker("mac")]
        config.hook.pytest_deselected(items=[item for item in items if item not in selected])
        items[:] = selected


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
