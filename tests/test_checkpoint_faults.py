"""A broken model folder is reported by `load()`, in about a second and before any weight is read, with the file
and the field or key at fault: wrong dtypes, broken components, bad configs, symlink loops. On copies of the
embedded digits model (no oracle needed)."""

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlximg

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "z-image-digits"


@pytest.fixture
def folder(tmp_path) -> Path:
    copy = tmp_path / "digits"
    shutil.copytree(DIGITS, copy)
    return copy


def edit_weights(folder: Path, component: str, edit) -> None:
    (path,) = (folder / component).glob("*.safetensors")
    weights = dict(mx.load(str(path)))
    edit(weights)
    mx.save_safetensors(str(path), weights)


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("component, key, dtype", [
    ("transformer", "layers.0.attention.to_q.weight", mx.int32),
    ("transformer", "x_pad_token", mx.bool_),
    ("vae", "decoder.conv_in.weight", mx.int8),
    ("text_encoder", "layers.0.mlp.up_proj.weight", mx.uint32),
])
def test_an_integer_tensor_where_a_float_weight_belongs_is_refused(folder, component, key, dtype):
    def cast(weights):
        name = next(k for k in weights if k.endswith(key))
        weights[name] = weights[name].astype(dtype)

    edit_weights(folder, component, cast)
    with pytest.raises(ValueError, match=rf"{key} has dtype {dtype}; the model needs a floating-point tensor"):
        mlximg.load(str(folder))


@pytest.mark.parametrize("component, edit, message", [
    ("vae", lambda w: w.pop("decoder.conv_out.bias"), r"vae.*decoder\.conv_out\.bias"),
    ("vae", lambda w: w.update({"decoder.conv_out.bias": w["decoder.conv_out.bias"][:1]}), r"vae.*shape"),
    ("transformer", lambda w: w.update({"extra.weight": mx.zeros((2, 2))}), r"transformer.*extra\.weight"),
])
def test_a_broken_component_is_reported_at_load(folder, component, edit, message):
    edit_weights(folder, component, edit)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        mlximg.load(str(folder))
    assert time.perf_counter() - start < 30  # generous: the point is that nothing is generated first


def test_load_reads_no_weights(folder):
    """The checks at load build modules lazily: no weight is in memory until a run needs it."""
    mx.clear_cache()
    before = mx.get_active_memory()
    pipeline = mlximg.load(str(folder))
    assert mx.get_active_memory() - before < 2**16, "load() read weights"
    assert pipeline.loaded == {}


@pytest.mark.parametrize("file, edit, message", [
    ("transformer/config.json", lambda c: {**c, "n_heads": 0}, r"transformer/config.json: n_heads must be an "
                                                               r"integer >= 1, got 0"),
    ("transformer/config.json", lambda c: {**c, "dim": "128"}, r"transformer/config.json: dim must be an integer "
                                                               r">= 1, got '128'"),
    ("transformer/config.json", lambda c: [c], r"transformer/config.json: expected a JSON object, got list"),
    ("transformer/config.json", lambda c: {**c, "norm_eps": float("inf")}, r"norm_eps must be a finite number"),
    ("transformer/config.json", lambda c: {**c, "axes_dims": [8, 12]}, r"axes_dims \[8, 12\] .* 3 entries"),
    ("vae/config.json", lambda c: {**c, "block_out_channels": [32, "x"]}, r"vae/config.json: block_out_channels "
                                                                          r"entries must be an integer >= 1"),
    ("vae/config.json", lambda c: {**c, "scaling_factor": 0}, r"scaling_factor must not be 0"),
    ("text_encoder/config.json", lambda c: {**c, "num_attention_heads": 0}, r"text_encoder/config.json: "
                                                                            r"num_attention_heads must be an integer"),
    ("text_encoder/config.json", lambda c: {**c, "hidden_size": 1.5}, r"hidden_size must be an integer"),
    ("scheduler/scheduler_config.json", lambda c: {**c, "shift": "3"}, r"scheduler_config.json: shift must be a "
                                                                       r"finite number >= 0, got '3'"),
    ("model_index.json", lambda c: {**c, "_class_name": "Flux2KleinPipeline"},
     r"model_index.json names Flux2KleinPipeline, but transformer/config.json is a 'ZImageTransformer2DModel'"),
])
def test_bad_configs_name_the_file_and_the_field(folder, file, edit, message):
    edit_json(folder / file, edit)
    with pytest.raises(ValueError, match=message):
        mlximg.load(str(folder))


@pytest.mark.parametrize("file", ["scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                                  "tokenizer/tokenizer_config.json", "vae/config.json"])
def test_invalid_json_names_the_file(folder, file):
    (folder / file).write_text('{"truncated": ')
    with pytest.raises(ValueError, match=rf"{file} is not valid JSON"):
        mlximg.load(str(folder))


def test_symlink_loops_and_folders_named_like_files(folder):
    shutil.rmtree(folder / "vae")
    os.symlink(folder / "vae", folder / "vae")  # a link to itself
    with pytest.raises(FileNotFoundError, match="component folder 'vae' is a symlink loop"):
        mlximg.load(str(folder))
    (folder / "vae").unlink()
    shutil.copytree(DIGITS / "vae", folder / "vae")
    (path,) = (folder / "transformer").glob("*.safetensors")
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors is not a file \(a folder\?\)"):
        mlximg.load(str(folder))


def test_a_nan_in_the_checkpoint_is_not_a_load_error(folder):
    """Values are not read at load (that would read every weight); a NaN is caught by the run (test_arguments)."""
    def poison(weights):
        value = np.array(weights["x_pad_token"].astype(mx.float32))
        value[0, 0] = np.nan
        weights["x_pad_token"] = mx.array(value)

    edit_weights(folder, "transformer", poison)
    mlximg.load(str(folder))
