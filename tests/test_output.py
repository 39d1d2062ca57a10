"""Writing the image: an output path that cannot be written is refused before any work; the extension picks the
format; files get the usual permissions; the same settings give the same bytes; a narrow terminal encoding does
not fail a finished run. On the embedded digits model."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from mlximg import cli
from mlximg.output import read_parameters

MODEL = ["--model", "z-image-digits", "--steps", "2", "--seed", "5"]


def generate(capsys, *arguments) -> tuple[int, str]:
    try:
        code = cli.main(["generate", "a handwritten seven", *MODEL, *arguments])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("mlximg.api.load", lambda *a, **k: loaded.append(a))
    (tmp_path / "folder.png").mkdir()
    cases = {
        str(tmp_path / "folder.png"): "is a folder; give a file name",
        str(tmp_path / "missing" / "out.png"): "output folder .*missing does not exist",
        str(tmp_path / "out.gif"): r"unsupported image format '.gif'; use .png, .jpg, .jpeg, .webp",
        str(tmp_path / "out"): r"unsupported image format '\(no extension\)'",
    }
    for output, message in cases.items():
        code, err = generate(capsys, "-o", output)
        assert code == 2 and err.startswith("mlximg: error: "), err
        assert re.search(message, err), err
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):
        if kwargs.get("dir") == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, err = generate(capsys, "-o", str(tmp_path / "out.png"))
    assert code == 2 and "cannot write to the output folder" in err and "Permission denied" in err
    assert loaded == [], "nothing may load before the output path is known to be writable"


@pytest.mark.parametrize("name, magic, format", [("out.png", b"\x89PNG", "PNG"), ("out.jpg", b"\xff\xd8\xff", "JPEG"),
                                                 ("out.JPEG", b"\xff\xd8\xff", "JPEG"), ("out.webp", b"RIFF", "WEBP")])
def test_the_extension_picks_the_format(tmp_path, capsys, name, magic, format):
    out = tmp_path / name
    code, err = generate(capsys, "-o", str(out))
    assert code == 0, err
    assert out.read_bytes().startswith(magic) and Image.open(out).format == format
    parameters = read_parameters(out)
    assert parameters["prompt"] == "a handwritten seven" and parameters["seed"] == 5


def test_files_get_the_usual_permissions(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        code, err = generate(capsys, "-o", str(tmp_path / "out.png"))
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644


def test_the_same_settings_give_the_same_file(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert generate(capsys, "-o", str(tmp_path / name))[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "seconds" not in str(read_parameters(tmp_path / "a.png"))


def test_a_narrow_terminal_encoding_does_not_fail_the_run(tmp_path):
    out = tmp_path / "sieben-ä.png"
    result = subprocess.run([sys.executable, "-m", "mlximg", "generate", "eine handgeschriebene Sieben, ä ö ü",
                             *MODEL, "-o", str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "wrote" in result.stdout


def test_warnings_are_one_line(tmp_path, capsys):
    long_prompt = ["generate", "seven " * 600, *MODEL, "-o", str(tmp_path / "long.png")]
    assert cli.main(long_prompt) == 0
    err = capsys.readouterr().err
    assert "mlximg: warning: a prompt is " in err and "are dropped" in err and "UserWarning" not in err
