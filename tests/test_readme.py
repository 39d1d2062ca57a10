"""The README's two set-up commands stay true: CI runs the test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    # The main job generates with the embedded model: no download, works offline (tests/test_digits_model.py).
    assert commands[0] == 'pip install -e . && mlximg generate "a handwritten seven" --model z-image-digits -o seven.png'


def test_ci_runs_the_readme_test_command():
    assert setup_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_installs_torch_from_the_cpu_index():
    """On a plain Linux machine `pip install torch==2.13.0` pulls the CUDA build; the README gives the CPU index."""
    text = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text


def test_ci_runs_the_mac_pass():
    """The Mac configuration (MLX's own ops, bfloat16, FP8 matmul) is tested in CI, not only on a Mac."""
    assert "python -m pytest -q --mac" in (ROOT / ".ci" / "run").read_text().splitlines()
