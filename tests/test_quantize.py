"""The quantize script / `mlximg quantize`: sharded conversion, atomic output, no overwrite without --force, no
complete-looking output after an interruption; and clear errors for bad FP8 checkpoints."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from test_zimage_pipeline import build_reference

from mlximg.loading import load_safetensors, weight_files
from mlximg.models.zimage import load_zimage_transformer
from mlximg.quant import convert as convert_module
from mlximg.quant.convert import convert

INDEX = "diffusion_pytorch_model.safetensors.index.json"
quiet = lambda line: None  # noqa: E731


def shard(component: Path, parts: int = 2) -> None:
    """Split a component's single safetensors file into `parts` shards with an index, as large models ship."""
    (path,) = weight_files(component)
    weights = mx.load(str(path))
    keys = sorted(weights)
    weight_map = {}
    for i in range(parts):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[i::parts]
        mx.save_safetensors(str(component / name), {k: weights[k] for k in chunk})
        weight_map.update({k: name for k in chunk})
    path.unlink()
    (component / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize") / "zimage"
    build_reference(folder)
    shard(folder / "transformer")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sharded_conversion_writes_an_index_and_leaves_the_source_alone(source, tmp_path):
    before = snapshot(source)
    lines = []
    dst = convert(source, tmp_path / "out", log=lines.append)
    assert snapshot(source) == before
    index = json.loads((dst / "transformer" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and all((dst / "transformer" / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(load_safetensors(weight_files(dst / "transformer")))
    assert any("MiB ->" in line for line in lines) and any("reloaded" in line for line in lines)
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_existing_destination_needs_force(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        convert(source, dst, log=quiet)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(source, dst, force=True, log=quiet)
    assert not (dst / "keep.txt").exists() and (dst / "transformer" / INDEX).is_file()
    assert not list(tmp_path.glob(".out.*"))


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    real_write, calls = convert_module.write_shard, []

    def fail_on_second(path, weights, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        real_write(path, weights, metadata)

    monkeypatch.setattr(convert_module, "write_shard", fail_on_second)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, log=quiet)
    assert len(calls) == 2
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))
    # With --force over an existing model, a failure keeps the old one.
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, force=True, log=quiet)
    assert (dst / "old.txt").read_text() == "old" and not list(tmp_path.glob(".out.*"))


def test_script_and_cli(source, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "quantize.py"
    result = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "a")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "transformer:" in result.stdout and "MiB ->" in result.stdout
    again = subprocess.run([sys.executable, "-m", "mlximg", "quantize", str(source), str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    refused = subprocess.run([sys.executable, "-m", "mlximg", "quantize", str(tmp_path / "a"), str(tmp_path / "b")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "already quantized" in refused.stderr


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("fp8") / "zimage-fp8", log=quiet)


def broken_copy(quantized: Path, tmp_path: Path, config=None, edit=None) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(quantized, folder)
    component = folder / "transformer"
    if config is not None:
        path = component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "quantization": config}))
    if edit is not None:
        for path in weight_files(component):
            weights = dict(mx.load(str(path)))
            if edit(weights):
                mx.save_safetensors(str(path), weights)
    return folder


@pytest.mark.parametrize("config, message", [
    ({"mode": "affine", "bits": 8, "group_size": 32}, "unsupported quantization mode 'affine'"),
    ({"mode": "nvfp4", "bits": 4, "group_size": 16}, "unsupported quantization mode 'nvfp4'"),
    ({"bits": 8, "group_size": 32}, "unsupported quantization mode 'affine'"),  # mlx-lm's default mode
    ({"mode": "mxfp8", "bits": 4, "group_size": 32}, "config.json says bits=4"),
    ({"mode": "mxfp8", "bits": 8, "group_size": 64}, "config.json says group_size=64"),
])
def test_bad_quantization_config(quantized, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        load_zimage_transformer(broken_copy(quantized, tmp_path, config=config))


def _drop(key):
    return lambda weights: weights.pop(key, None) is not None


def _regroup(weights):
    """Scales for groups of 64: what a mismatched group size looks like on disk."""
    key = "layers.0.attention.to_q.scales"
    if key not in weights:
        return False
    weights[key] = weights[key][:, ::2]
    return True


def _quantize_final_layer(weights):
    key = "all_final_layer.2-1.linear.weight"
    if key not in weights:
        return False
    weights[key], weights[key.replace(".weight", ".scales")] = mx.quantize(
        weights[key], group_size=32, bits=8, mode="mxfp8")[:2]
    return True


@pytest.mark.parametrize("edit, message", [
    (_drop("layers.0.attention.to_q.scales"), r"layers.0.attention.to_q.weight holds packed mxfp8 codes but "
                                              r"layers.0.attention.to_q.scales is missing"),
    (_regroup, r"layers.0.attention.to_q.scales has shape \(64, 1\), but input width 64 in groups of 32"),
    (_quantize_final_layer, "layer 'all_final_layer.2-1.linear' is quantized, but the FP8 policy keeps it"),
])
def test_bad_quantized_weights(quantized, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_zimage_transformer(broken_copy(quantized, tmp_path, edit=edit), fp8="matmul")
