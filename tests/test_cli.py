"""`mlximg info` in a fresh process: the BLAS preload only works before mlx is first imported."""

import os
import subprocess
import sys

import pytest

from mlximg.runtime.blas import find_openblas


def run_info(**env) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "mlximg", "info"], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return {line[:14].strip(): line[14:].strip() for line in result.stdout.splitlines()}


def test_info_reports_backend_dtype_and_blas():
    info = run_info()
    assert info["backend"] in ("cpu", "metal", "cuda")
    assert info["compute dtype"] == ("float32" if info["backend"] == "cpu" else "bfloat16")
    if sys.platform.startswith("linux") and find_openblas():
        assert info["blas"].startswith("system OpenBLAS"), info["blas"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_blas_preload_can_be_disabled():
    assert run_info(MLXIMG_SYSTEM_BLAS="0")["blas"] == "bundled reference BLAS (disabled by MLXIMG_SYSTEM_BLAS=0)"


def test_dtype_override_and_bad_dtype():
    assert run_info(MLXIMG_DTYPE="bfloat16")["compute dtype"] == "bfloat16"
    result = subprocess.run([sys.executable, "-m", "mlximg", "info"], capture_output=True, text=True,
                            env={**os.environ, "MLXIMG_DTYPE": "float8"})
    assert result.returncode != 0 and "unknown dtype 'float8'" in result.stderr
