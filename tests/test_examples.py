"""The example scripts (scripts/examples/) run end to end as a user runs them, each in an empty folder."""

import subprocess
import sys
from pathlib import Path

import pytest
from oracle import require_oracle

EXAMPLES = Path(__file__).resolve().parent.parent / "scripts" / "examples"


def run_example(name: str, cwd: Path, *arguments: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *arguments], capture_output=True, text=True,
                            cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    return result.stdout


@pytest.mark.parametrize("name, arguments, expected, files", [
    ("text_to_image.py", ["a handwritten five", "five.jpg"], "wrote five.jpg: 32x32, 20 steps", ["five.jpg"]),
    ("several_seeds.py", ["sheet.png"], "12 images, seeds 100..111", ["sheet.png"]),
    ("teacache.py", [], "teacache threshold 0.3", []),
    ("fp8_quantize.py", [], "FP8 vs original: mean |pixel change|", []),
])
def test_example_on_the_embedded_model(tmp_path, name, arguments, expected, files):
    assert expected in run_example(name, tmp_path, *arguments)
    assert all((tmp_path / f).is_file() for f in files)


def test_flux2_editing_example_on_a_tiny_model(tmp_path):
    require_oracle()  # it builds its tiny model with diffusers
    out = run_example("flux2_edit.py", tmp_path)
    assert "from 2 references; the same seed without them gives another image: True" in out
    assert (tmp_path / "edited.png").is_file()


def test_examples_import_the_installed_package():
    for script in EXAMPLES.glob("*.py"):
        text = script.read_text()
        assert "sys.path" not in text, f"{script.name} must import the installed mlximg"
        assert text.startswith('"""'), f"{script.name} starts with what it shows"
