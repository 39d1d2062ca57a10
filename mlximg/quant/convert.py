"""Convert a diffusers-layout model to FP8 (mxfp8), component by component and shard by shard.

Peak memory is about one shard: each is loaded lazily, quantized, written and freed. The output is built in a
temporary folder next to DST and renamed into place only after every converted component has been reloaded through
the normal loaders and checked against the source, so an interrupted run leaves no DST that looks complete.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..loading import _INDEX_NAMES, check_safetensors, read_config, resolve_model, weight_files
from .format import CONFIG_KEY, Quantization, quantize_weights
from .policy import layer_policy

# E4M3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 of a value (relative), so a layer's relative
# Frobenius error is below it whatever the weights; a larger one means a wrong conversion, not FP8 rounding.
FP8_RELATIVE_ERROR = 2.0**-4


def write_shard(path: Path, weights: dict[str, mx.array], metadata: dict[str, str]) -> None:
    mx.save_safetensors(str(path), weights, metadata=metadata)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _index_name(folder: Path) -> str | None:
    return next((name for name in _INDEX_NAMES if (folder / name).is_file()), None)


def convert_component(src: Path, dst: Path, component: str, quantization: Quantization) -> int:
    """Quantize one component folder's policy layers into `dst`; returns the number of layers quantized."""
    config = read_config(src)
    if CONFIG_KEY in config:
        raise ValueError(f"{src} is already quantized ({config[CONFIG_KEY]})")
    policy = layer_policy(component, config)
    if policy is None:
        raise ValueError(f"{src}: no FP8 policy for {component} class {config.get('_class_name')!r}")
    dst.mkdir()
    weight_map, total, count = {}, 0, 0
    for shard in weight_files(src):
        check_safetensors(shard)
        quantized = quantize_weights(mx.load(str(shard)), policy, quantization)
        count += sum(key.endswith(".scales") for key in quantized)
        write_shard(dst / shard.name, quantized, quantization.metadata())
        weight_map.update({key: shard.name for key in quantized})
        total += sum(v.nbytes for v in quantized.values())
        del quantized
        mx.clear_cache()
    if count == 0:
        raise ValueError(f"{src}: the FP8 policy matched no layer; nothing to quantize")
    index = _index_name(src)
    for item in src.iterdir():  # other files (generation_config.json, ...) unchanged
        if item.suffix != ".safetensors" and item.name not in ("config.json", index):
            shutil.copy2(item, dst / item.name)
    if index is not None:
        (dst / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps({**config, CONFIG_KEY: quantization.to_config()}, indent=2))
    return count


def _loaders(family_dir: Path) -> dict[str, Callable]:
    """The normal loaders (dequantize path, float weights), by component, returning the MLX module."""
    from ..models.flux2 import load_flux2_transformer
    from ..models.mistral3_encoder import load_mistral3_encoder
    from ..models.qwen3_encoder import load_text_encoder
    from ..models.zimage import load_zimage_transformer

    transformers = {"ZImageTransformer2DModel": load_zimage_transformer,
                    "Flux2Transformer2DModel": load_flux2_transformer}
    transformer_class = read_config(family_dir / "transformer").get("_class_name")
    encoder_type = read_config(family_dir / "text_encoder").get("model_type")
    encoder = load_mistral3_encoder if encoder_type == "mistral3" else load_text_encoder
    return {"transformer": lambda d: transformers[transformer_class](d, fp8="dequantize"),
            "text_encoder": lambda d: encoder(d, fp8="dequantize").model}


def verify_component(src_root: Path, out_root: Path, component: str) -> float:
    """Reload the converted component with the normal loader; every weight must equal the source's, quantized
    layers within FP8's rounding bound. Returns the largest relative error."""
    from ..loading import load_safetensors

    module = _loaders(src_root)[component](out_root)
    source = load_safetensors(weight_files(src_root / component))
    if hasattr(module, "sanitize"):
        source = module.sanitize(source)
    worst = 0.0
    for path, value in tree_flatten(module.parameters()):
        if path not in source:
            raise ValueError(f"{out_root / component}: reloaded weight {path!r} is not in the source")
        got, want = np.array(value.astype(mx.float32)), np.array(source[path].astype(mx.float32))
        error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
        if error > FP8_RELATIVE_ERROR:
            raise ValueError(f"{out_root / component}: {path} differs from the source by {error:.3g} (relative), "
                             f"more than FP8 rounding ({FP8_RELATIVE_ERROR})")
        worst = max(worst, error)
    return worst


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing `dst` (--force) is removed only after the move succeeded."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
        os.replace(dst, old / dst.name)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old)


def convert(src: str | Path, dst: str | Path, force: bool = False, text_encoder: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Write an FP8 copy of model `src` (folder or repo id) to `dst`: the transformer (and with `text_encoder`
    the text encoder) quantized per the policy; every other component copied unchanged. `src` is never modified."""
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    src_root = resolve_model(src).resolve()
    if dst == src_root or src_root in dst.parents:
        raise ValueError(f"destination {dst} must lie outside the source {src_root}")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"destination folder {dst.parent} does not exist")
    components = ("transformer", "text_encoder") if text_encoder else ("transformer",)
    quantization = Quantization()
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        for item in sorted(src_root.iterdir()):
            if item.name in components:
                count = convert_component(item, tmp / item.name, item.name, quantization)
                log(f"{item.name}: quantized {count} layers to {quantization.mode}")
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)  # follows the HF cache's symlinks
            else:
                shutil.copy2(item, tmp / item.name)
        for component in components:
            worst = verify_component(src_root, tmp, component)
            log(f"{component}: reloaded; largest relative weight error {worst:.4f} (bound {FP8_RELATIVE_ERROR})")
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for component in components:
        before, after = folder_size(src_root / component), folder_size(dst / component)
        log(f"{component}: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.0%})")
    log(f"total: {folder_size(src_root) / 2**20:.2f} MiB -> {folder_size(dst) / 2**20:.2f} MiB; wrote {dst}")
    return dst
