"""Find a model (local diffusers folder or Hugging Face repo id), read its configs and safetensors, load strictly.

Every check runs before a module is touched, so a bad checkpoint raises a clear error and loads nothing.
"""

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

from .quant.execution import fp8_execution
from .quant.float8 import float8_keys, fold_float8
from .quant.format import Quantization, check_quantized, dequantize_weights
from .quant.modules import quantize_module, quantize_structure
from .quant.policy import layer_policy

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def resolve_model(model: str | Path, components: Iterable[str] | None = None) -> Path:
    """A local folder as is; a repo id through the Hugging Face cache, downloading only `components`."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"model {str(model)!r} is a file; expected a diffusers-layout folder")
    if not is_repo_id(str(model)):
        raise FileNotFoundError(f"model {str(model)!r}: no such folder, and not a Hugging Face repo id (owner/name)")
    return _download(str(model), components)


def _download(repo_id: str, components: Iterable[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = None
    if components is not None:
        patterns = ["model_index.json", *(f"{name}/*" for name in components)]
    try:
        # The cache first, so a downloaded model works offline.
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        raise FileNotFoundError(f"model {repo_id!r}: not in the local cache and the download failed: {error}") from error


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def component_dir(model_dir: Path, component: str) -> Path:
    folder = Path(model_dir) / component
    if not folder.is_dir():
        present = sorted(p.name for p in Path(model_dir).iterdir() if p.is_dir())
        raise FileNotFoundError(f"{model_dir}: missing component folder {component!r} (found: {present})")
    return folder


def read_config(component_folder: Path) -> dict:
    return read_json(Path(component_folder) / "config.json")


def weight_files(component_folder: Path) -> list[Path]:
    """The safetensors files of a component: the shards named by its index file, or every *.safetensors."""
    folder = Path(component_folder)
    for name in _INDEX_NAMES:
        index_path = folder / name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no weight_map")
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
            return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    return files


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against its size; return the header. Catches truncation early."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: corrupt safetensors header: {error}") from error
    data_size = size - 8 - header_len
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if ends and max(ends) > data_size:
        raise ValueError(f"{path}: truncated safetensors file: tensors need {max(ends)} data bytes, file has {data_size}")
    return header


def load_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Load lazily (memory is read when an array is first evaluated); keys must be unique across shards."""
    weights: dict[str, mx.array] = {}
    for path in files:
        check_safetensors(path)
        try:
            shard = mx.load(str(path))
        except Exception as error:
            raise ValueError(f"{path}: cannot read safetensors: {error}") from error
        duplicates = weights.keys() & shard.keys()
        if duplicates:
            raise ValueError(f"{path}: keys also in another shard: {sorted(duplicates)[:5]}")
        weights.update(shard)
    return weights


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Cast floating-point arrays to `dtype`; integer arrays (packed quantized weights) stay as they are."""
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def load_weights_strict(module: nn.Module, weights: dict[str, mx.array], name: str) -> nn.Module:
    """Load `weights` into `module`; any missing or unexpected key or shape mismatch raises naming it."""
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise ValueError(f"{name}: checkpoint does not match the model: {error}") from error
    return module


def read_weights(folder: Path) -> tuple[dict[str, mx.array], bool]:
    """A component's weights, lazily, with third-party float8 weights folded with their scales into float32;
    the flag says whether there were any."""
    files = weight_files(folder)
    weights = load_safetensors(files)
    keys = float8_keys((path, check_safetensors(path)) for path in files)
    return (fold_float8(weights, keys, str(folder)) if keys else weights), bool(keys)


def load_quantizable(module: nn.Module, weights: dict[str, mx.array], config: dict, component: str, name: str,
                     dtype: mx.Dtype | None = None, fp8: str | None = None, float8: bool = False) -> nn.Module:
    """Strict load of float, FP8 (config "quantization") or folded float8 weights.

    FP8 runs on the execution path `fp8` (matmul: QuantizedLinear; dequantize: float weights; default by backend).
    Folded float8 weights are requantized to mxfp8 per the policy on the matmul path.
    """
    execution = fp8_execution(fp8)
    policy = layer_policy(component, config)
    quantization = Quantization.from_config(config)
    if quantization is not None:
        layers = check_quantized(weights, quantization, policy, name)
        if execution == "dequantize":
            weights = dequantize_weights(weights, layers, quantization)
        else:
            quantize_structure(module, layers, quantization)
    load_weights_strict(module, cast_floating(weights, dtype), name)
    if float8 and execution == "matmul":
        quantize_module(module, policy, execution)
    return module


def load_component(
    model_dir: Path, component: str, build: Callable[[dict], nn.Module],
    sanitize: Callable[[dict], dict] | None = None, dtype: mx.Dtype | None = None, fp8: str | None = None,
) -> nn.Module:
    """Build a component's module from its config.json and load its weights (lazily, cast to `dtype`); FP8 and
    float8 checkpoints run on the execution path `fp8` (see load_quantizable)."""
    folder = component_dir(model_dir, component)
    config = read_config(folder)
    module = build(config)
    weights, float8 = read_weights(folder)
    if sanitize is not None:
        weights = sanitize(weights)
    return load_quantizable(module, weights, config, component, f"{folder}", dtype, fp8, float8)
