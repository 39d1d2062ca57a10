"""Bad generation arguments are refused clearly and before any heavy work: non-finite numbers, booleans for
numbers, sizes and steps beyond what a model supports, seeds outside 0..2^64-1; a run that turns non-finite
stops with its likely cause instead of saving a black image. On the embedded digits model (no oracle needed)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlximg
from mlximg.manifests import resolve
from mlximg.pipelines import limits
from mlximg.pipelines.base import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "z-image-digits"
SMALL = dict(width=32, height=32, steps=2)


@pytest.fixture(scope="module")
def pipeline():
    return mlximg.load("z-image-digits")


@pytest.mark.parametrize("arguments, message", [
    (dict(guidance=float("nan")), "guidance must be a finite number >= 0, got nan"),
    (dict(guidance=float("inf")), "guidance must be a finite number >= 0, got inf"),
    (dict(guidance=True), "guidance must be a finite number >= 0, got True"),
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(steps=2.0), "steps must be a positive integer, got 2.0"),
    (dict(steps=10**9), "steps must be at most 1000, got 1000000000"),
    (dict(cfg_truncation=float("nan")), "cfg_truncation must be a finite number >= 0, got nan"),
    (dict(cfg_truncation=-0.5), "cfg_truncation must be a finite number >= 0, got -0.5"),
    (dict(cfg_normalization=float("nan")), "cfg_normalization must be a finite number >= 0, got nan"),
    (dict(cfg_normalization=-1.0), "cfg_normalization must be a finite number >= 0, got -1.0"),
    (dict(width=8192, height=8192), "width 8192 is larger than this model supports"),
    (dict(width=float("nan")), "width must be a positive multiple of 8, got nan"),
    (dict(seed=-1), r"seed must be an integer from 0 to 2\*\*64 - 1, got -1"),
    (dict(seed=2**64), r"seed must be an integer from 0 to 2\*\*64 - 1, got 18446744073709551616"),
    (dict(seed="42"), r"seed must be an integer from 0 to 2\*\*64 - 1, got '42'"),
    (dict(seed=1.5), r"seed must be an integer from 0 to 2\*\*64 - 1, got 1.5"),
    (dict(seed=True), r"seed must be an integer from 0 to 2\*\*64 - 1, got True"),
])
def test_bad_values_are_refused(pipeline, arguments, message):
    with pytest.raises(ValueError, match=message):
        pipeline.generate("a handwritten seven", **{**SMALL, **arguments})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_latents_are_refused(pipeline, value):
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 1, 2, 3] = value
    with pytest.raises(ValueError, match="latents contain NaN or inf"):
        pipeline.generate("a handwritten seven", latents=latents, **SMALL)


def test_seeds_across_the_whole_range_work(pipeline):
    for seed in (0, 2**32, 2**64 - 1, np.uint64(2**63)):
        image = pipeline.generate("a handwritten seven", seed=seed, **SMALL)
        assert image.info["parameters"]["seed"] == int(seed)


def test_size_limits_follow_the_config():
    digits = limits.size_limits("zimage", DIGITS)
    assert (digits.multiple, digits.max_width, digits.max_height) == (8, 512, 512)  # axes_lens 64 x 2 x 4
    real = limits.size_limits("zimage", None)
    assert real.max_width == 8192
    with pytest.raises(ValueError, match="Mpx; this model family supports at most 4 Mpx"):
        limits.size_limits("flux2", None).check(4096, 2048)


def test_memory_estimate_refuses_a_run_that_cannot_fit(pipeline, monkeypatch):
    estimate = limits.estimate_peak_memory("zimage", DIGITS, 512, 512, 2, 4)
    weights = 4 * sum(v.size for name in ("transformer", "vae")
                      for v in mx.load(str(next((DIGITS / name).glob("*.safetensors")))).values())
    assert weights < estimate < 64 * weights
    monkeypatch.setattr(limits, "machine_memory", lambda: estimate - 1)
    with pytest.raises(ValueError, match="this run needs at least .* GiB, more than this machine's"):
        pipeline.generate("a handwritten seven", width=512, height=512, steps=1)
    pipeline.generate("a handwritten seven", **SMALL)  # the small run fits


def broken_copy(tmp_path: Path, component: str, edit) -> Path:
    folder = tmp_path / "digits"
    shutil.copytree(DIGITS, folder)
    (path,) = (folder / component).glob("*.safetensors")
    weights = dict(mx.load(str(path)))
    edit(weights)
    mx.save_safetensors(str(path), weights)
    return folder


def _nan_in(key: str):
    def edit(weights):
        value = np.array(weights[key].astype(mx.float32))
        value.flat[0] = np.nan
        weights[key] = mx.array(value).astype(weights[key].dtype)
    return edit


def test_a_nan_weight_stops_the_run_at_the_first_step(tmp_path):
    folder = broken_copy(tmp_path, "transformer", _nan_in("layers.1.attention.to_q.weight"))
    pipeline = mlximg.load(str(folder))
    with pytest.raises(NonFiniteError, match=r"denoising produced NaN or inf at step 1 of 5: transformer weight "
                                             r"layers.1.attention.to_q.weight holds NaN or inf"):
        pipeline.generate("a handwritten seven", width=32, height=32, steps=5)
    assert "decode" not in [r.name for r in pipeline.phases.records], "nothing decoded after the fault"


def test_a_nan_vae_weight_is_not_saved_as_a_black_image(tmp_path):
    folder = broken_copy(tmp_path, "vae", _nan_in("decoder.conv_out.bias"))
    with pytest.raises(NonFiniteError, match="the VAE decoded NaN or inf from finite latents: vae weight "
                                             "decoder.conv_out.bias holds NaN"):
        mlximg.generate("a handwritten seven", model=str(folder), **SMALL)


def test_argument_errors_come_before_heavy_imports(tmp_path):
    """A bad --width or --seed is refused without importing transformers or mlx-lm (5-13 s before)."""
    script = ("import sys\nfrom mlximg.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
              "print(code, 'transformers' in sys.modules, 'mlx_lm' in sys.modules)")
    for bad in (["--width", "100"], ["--seed", "-1"], ["--steps", "0"], ["-o", str(tmp_path / "x.gif")]):
        result = subprocess.run([sys.executable, "-c", script, "generate", "a seven", "--model", "z-image-digits",
                                 *bad], capture_output=True, text=True, cwd=tmp_path)
        assert result.stdout.split() == ["2", "False", "False"], (bad, result.stdout, result.stderr)
        assert result.stderr.startswith("mlximg: error: "), result.stderr


def test_folder_copy_runs_its_own_recipe(tmp_path):
    """A copy of the embedded model given by path uses its recipe (mlximg.json), not the family's defaults."""
    folder = tmp_path / "my-digits"
    shutil.copytree(DIGITS, folder)
    manifest = resolve(str(folder))
    recipe = json.loads((DIGITS / "mlximg.json").read_text())
    assert manifest.defaults == recipe["defaults"] and manifest.teacache == recipe["teacache"]
    image = mlximg.generate("a handwritten seven", model=str(folder), seed=1)
    assert image.size == (32, 32) and image.info["parameters"]["steps"] == recipe["defaults"]["steps"]
