"""Find a model (local diffusers folder or Hugging Face repo id), read its configs and safetensors, load strictly.

Every check runs before a module is touched, so a bad checkpoint raises a clear error and loads nothing.
"""

import errno
import json
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .quant.float8 import float8_keys, fold_float8
from .quant.format import CONFIG_KEY, Quantization, check_quantized, dequantize_weights, quantize_weights
from .quant.modules import quantize_structure
from .quant.options import QuantOptions
from .quant.policy import layer_policy

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def resolve_model(model: str | Path, components: Iterable[str] | None = None, download_gb: float | None = None) -> Path:
    """A local folder as is; a repo id through the Hugging Face cache, downloading only `components` (the
    download's approximate size, `download_gb`, goes into the message when it cannot be had)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"model {str(model)!r} is a file; expected a diffusers-layout folder")
    if not is_repo_id(str(model)):
        raise FileNotFoundError(f"model {str(model)!r}: no such folder, and not a Hugging Face repo id (owner/name)")
    from .hub import download

    return download(str(model), components, download_gb)


def broken_link(path: Path) -> str | None:
    """'a symlink loop' or 'a dangling symlink' when `path` is a symlink that leads nowhere, else None."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python's word for a loop before 3.13
        return "a symlink loop"
    except OSError as error:
        return "a symlink loop" if error.errno == errno.ELOOP else "a dangling symlink"
    return None


def read_json(path: Path):
    path = Path(path)
    if (link := broken_link(path)) is not None:
        raise FileNotFoundError(f"{path} is {link}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (configs, model_index.json)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def check_json_files(folder: Path) -> None:
    """Every JSON file of a folder (a tokenizer's) parses, so a corrupt one is named before any heavy import."""
    for path in sorted(Path(folder).glob("*.json")):
        read_json(path)


def component_dir(model_dir: Path, component: str) -> Path:
    folder = Path(model_dir) / component
    if (link := broken_link(folder)) is not None:
        raise FileNotFoundError(f"{model_dir}: component folder {component!r} is {link}")
    if not folder.is_dir():
        present = sorted(p.name for p in Path(model_dir).iterdir() if p.is_dir())
        raise FileNotFoundError(f"{model_dir}: missing component folder {component!r} (found: {present})")
    return folder


def read_config(component_folder: Path) -> dict:
    return read_json_object(Path(component_folder) / "config.json")


def weight_files(component_folder: Path) -> list[Path]:
    """The safetensors files of a component: the shards named by its index file, or every *.safetensors."""
    folder = Path(component_folder)
    for name in _INDEX_NAMES:
        index_path = folder / name
        if index_path.is_file():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} has no weight_map")
            if not all(isinstance(shard, str) for shard in weight_map.values()):
                raise ValueError(f"{index_path}: weight_map values must be file names")
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.exists()]
            if missing:
                raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
            return [check_weight_file(shard) for shard in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    return [check_weight_file(path) for path in files]


def check_weight_file(path: Path) -> Path:
    if (link := broken_link(path)) is not None:
        raise FileNotFoundError(f"{path} is {link}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file (a folder?); expected safetensors weights")
    return path


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


def check_dtypes(module: nn.Module, weights: dict[str, mx.array], name: str) -> None:
    """Float parameters need floating-point tensors (any width: they are cast), packed quantized ones their exact
    integer dtype; an int32 or bool tensor where a float weight belongs would load and give a wrong image."""
    expected = dict(tree_flatten(module.parameters()))
    for key, value in weights.items():
        want = expected.get(key)
        if want is None or value.dtype == want.dtype:
            continue
        if not (mx.issubdtype(want.dtype, mx.floating) and mx.issubdtype(value.dtype, mx.floating)):
            kind = "a floating-point" if mx.issubdtype(want.dtype, mx.floating) else f"a {want.dtype}"
            raise ValueError(f"{name}: {key} has dtype {value.dtype}; the model needs {kind} tensor there")


def load_weights_strict(module: nn.Module, weights: dict[str, mx.array], name: str) -> nn.Module:
    """Load `weights` into `module`; any missing or unexpected key, shape or dtype mismatch raises naming it."""
    check_dtypes(module, weights, name)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        detail = " ".join(str(error).split())  # MLX puts the keys on a line of their own
        raise ValueError(f"{name}: checkpoint does not match the model: {detail}") from error
    return module


def read_weights(folder: Path) -> tuple[dict[str, mx.array], bool]:
    """A component's weights, lazily, with third-party float8 weights folded with their scales into float32;
    the flag says whether there were any."""
    files = weight_files(folder)
    weights = load_safetensors(files)
    keys = float8_keys((path, check_safetensors(path)) for path in files)
    return (fold_float8(weights, keys, str(folder)) if keys else weights), bool(keys)


def load_quantizable(module: nn.Module, weights: dict[str, mx.array], config: dict, component: str, name: str,
                     dtype: mx.Dtype | None = None, *, fp8: QuantOptions | None = None) -> nn.Module:
    """Strict load of float, quantized (config "quantization") or folded float8 weights, as `fp8` says.

    Quantized weights run on `fp8.execution` (matmul: QuantizedLinear; dequantize: float weights; layerwise:
    quantized in memory, dequantized per call). A float checkpoint with `fp8.quantize`, and folded float8
    weights on the matmul path, are quantized per the policy from the checkpoint's own precision before any cast
    (one rounding, as `mlximg quantize`), then load as a quantized checkpoint does.
    """
    fp8 = fp8 or QuantOptions()  # made per call: the execution path may come from MLXIMG_FP8
    policy = layer_policy(component, config)
    quantization = Quantization.from_config(config)
    if quantization is None and fp8.quantize is not None:
        quantization = fp8.quantize
    elif quantization is None and fp8.float8_checkpoint and fp8.execution == "matmul":
        quantization = Quantization()
    if quantization is not None and CONFIG_KEY not in config:
        weights = quantize_weights(weights, policy, quantization)
    if quantization is not None:
        layers = check_quantized(weights, quantization, policy, name)
        if fp8.execution == "dequantize":
            weights = dequantize_weights(weights, layers, quantization)
        else:
            quantize_structure(module, layers, quantization, layerwise=fp8.execution == "layerwise")
    return load_weights_strict(module, cast_floating(weights, dtype), name)


def load_checkpoint(module: nn.Module, folder: Path, config: dict, component: str,
                    sanitize: Callable[[dict], dict] | None = None, dtype: mx.Dtype | None = None, *,
                    fp8: QuantOptions | None = None) -> nn.Module:
    """Read a component folder's weights (lazily), `sanitize` their keys, and load them into `module` (see
    load_quantizable); whether they are third-party float8 is read from the safetensors headers."""
    weights, float8 = read_weights(folder)
    if sanitize is not None:
        weights = sanitize(weights)
    return load_quantizable(module, weights, config, component, f"{folder}", dtype,
                            fp8=replace(fp8 or QuantOptions(), float8_checkpoint=float8))


def load_component(
    model_dir: Path, component: str, build: Callable[[dict], nn.Module],
    sanitize: Callable[[dict], dict] | None = None, dtype: mx.Dtype | None = None, *, fp8: QuantOptions | None = None,
) -> nn.Module:
    """Build a component's module from its config.json and load its weights (lazily, cast to `dtype`); FP8 and
    float8 checkpoints load as `fp8` says (see load_quantizable)."""
    folder = component_dir(model_dir, component)
    config = read_config(folder)
    try:
        module = build(config)
    except ValueError as error:
        raise ValueError(f"{folder / 'config.json'}: {error}") from error
    return load_checkpoint(module, folder, config, component, sanitize, dtype, fp8=fp8)
