"""`pip install .` without -e: the built wheel carries the manifests and the embedded model, so the README's main
command works from any folder. Built here, installed into a fresh virtual environment (which borrows this one's
dependencies, so nothing is downloaded), and run from an empty folder."""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*command, cwd=None):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_wheel_installs_and_generates_with_the_embedded_model(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for name in ("mlximg", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mlximg-*.whl")
    # Every module ships: an editable install's import hook would hide a missing package in the run below.
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "mlximg").rglob("*.py")}
    assert modules <= shipped, sorted(modules - shipped)
    venv.create(tmp_path / "env", system_site_packages=True, with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "-q", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    location = run(python, "-c", "import mlximg, mlximg.manifests as m; print(mlximg.__file__); print(m.MODELS_DIR)",
                   cwd=elsewhere).split()
    assert all(str(tmp_path / "env") in line for line in location), location  # the wheel's copy, not the checkout
    run(tmp_path / "env" / "bin" / "mlximg", "generate", "a handwritten seven", "--model", "z-image-digits",
        "-o", "seven.png", cwd=elsewhere)
    assert Image.open(elsewhere / "seven.png").size == (32, 32)
