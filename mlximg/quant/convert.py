"""Convert a diffusers-layout model to a quantized one (mxfp8 by default; mxfp4, nvfp4, affine 4 / 8 bits),
component by component and shard by shard.

Peak memory is about one shard: each is loaded lazily, quantized, written and freed. The output is built in a
temporary folder next to DST and renamed into place only after every converted component has been reloaded through
the normal loaders and checked against the source, so an interrupted run leaves no DST that looks complete; a
killed one leaves a temporary folder that the next run on DST removes (destination.py).
"""

import errno
import json
import math
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from ..loading import _INDEX_NAMES, broken_link, check_safetensors, read_config, resolve_model, weight_files
from ..manifests import RECIPE_FILE, named_manifest
from .destination import check_apart, check_replaceable, locked, make_temporary, publish, remove_stale
from .format import CONFIG_KEY, Quantization, quantize_weights
from .options import QuantOptions
from .policy import layer_policy, quantizable

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes quantize_weights converts
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(OSError):
    """The output does not fit on DST's file system: one line for the CLI, after the temporary folder is gone."""


def write_shard(path: Path, weights: dict[str, mx.array], metadata: dict[str, str]) -> None:
    # Through a Python file: MLX writing to a path turns a full disk into a RuntimeError without errno.
    with open(path, "wb") as file:
        mx.save_safetensors(file, weights, metadata=metadata)


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
        raise ValueError(f"{src}: no quantization policy for {component} class {config.get('_class_name')!r}")
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
        raise ValueError(f"{src}: the policy matched no layer whose width divides into {quantization.mode}'s groups "
                         f"of {quantization.group_size}; nothing to quantize")
    index = _index_name(src)
    for item in src.iterdir():  # other files (generation_config.json, ...) unchanged
        if item.suffix != ".safetensors" and item.name not in ("config.json", index):
            shutil.copy2(item, dst / item.name)
    if index is not None:
        (dst / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps({**config, CONFIG_KEY: quantization.to_config()}, indent=2))
    return count


def _loaders(family_dir: Path) -> dict[str, Callable]:
    """The normal loaders, by component, keeping quantized layers quantized (nothing is dequantized or read)."""
    from ..models.flux2 import load_flux2_transformer
    from ..models.mistral3_encoder import load_mistral3_encoder
    from ..models.qwen3_encoder import load_text_encoder
    from ..models.zimage import load_zimage_transformer

    transformers = {"ZImageTransformer2DModel": load_zimage_transformer,
                    "Flux2Transformer2DModel": load_flux2_transformer}
    transformer_class = read_config(family_dir / "transformer").get("_class_name")
    encoder_type = read_config(family_dir / "text_encoder").get("model_type")
    encoder = load_mistral3_encoder if encoder_type == "mistral3" else load_text_encoder
    quantized = QuantOptions(execution="matmul")
    return {"transformer": lambda d: transformers[transformer_class](d, fp8=quantized),
            "text_encoder": lambda d: encoder(d, fp8=quantized).model}


def verify_component(src_root: Path, out_root: Path, component: str, quantization: Quantization) -> float:
    """Check the converted component: the normal loader takes it (keys, shapes, dtypes, the recorded mode; the
    weights stay unread), and tensor by tensor, every weight equals the source's, quantized layers within the
    mode's rounding bound. One tensor is in memory at a time, so a model larger than the machine's memory
    converts too. Returns the largest relative error."""
    _loaders(src_root)[component](out_root)  # built lazily and dropped
    source = _lazy_tensors(src_root / component)
    converted = _lazy_tensors(out_root / component)
    worst = 0.0
    for key in [k for k in converted if not k.endswith((".scales", ".biases"))]:
        layer = key.removesuffix(".weight")
        if key not in source:
            raise ValueError(f"{out_root / component}: weight {key!r} is not in the source")
        got, want = converted.pop(key), source.pop(key)
        if f"{layer}.scales" not in converted:
            if not mx.array_equal(got, want).item():
                raise ValueError(f"{out_root / component}: {key} differs from the source, which it copies")
            continue
        got = quantization.dequantize(got, converted.pop(f"{layer}.scales"), converted.pop(f"{layer}.biases", None))
        want = want.astype(mx.float32)
        error = (mx.sqrt(mx.sum((got - want) ** 2)) / mx.maximum(mx.sqrt(mx.sum(want**2)), 1e-30)).item()
        if error > quantization.rounding_bound:
            raise ValueError(f"{out_root / component}: {key} differs from the source by {error:.3g} (relative), "
                             f"more than {quantization.name} rounding ({quantization.rounding_bound})")
        worst = max(worst, error)
    if source:
        raise ValueError(f"{out_root / component}: source weights missing from the output: {sorted(source)[:5]}")
    return worst


def _lazy_tensors(folder: Path) -> dict[str, mx.array]:
    """A component's tensors, unread until used (so popping each after use keeps one in memory)."""
    tensors = {}
    for shard in weight_files(folder):
        tensors.update(mx.load(str(shard)))
    return tensors


def source_tree(folder: Path, inside: tuple[Path, ...] = ()) -> list[Path]:
    """Every file and folder under `folder`, parents first, following symlinks (the HF cache's snapshots link to
    blobs). A link that leads nowhere, or back to a folder it is inside (a loop), is an error naming it."""
    inside = (*inside, folder.resolve())
    tree = []
    for path in sorted(folder.iterdir()):
        if (link := broken_link(path)) is not None:
            raise ValueError(f"{path} is {link}")
        tree.append(path)
        if path.is_dir():
            if path.resolve() in inside:
                raise ValueError(f"{path} is a symlink loop: it leads back to {path.resolve()}, a folder it is in")
            tree += source_tree(path, inside)
    return tree


def copy_tree(src_root: Path, tree: list[Path], out: Path, skip: tuple[str, ...]) -> None:
    """Copy the scanned `tree` into `out` as plain files and folders, except the top-level entries in `skip`."""
    for path in tree:
        relative = path.relative_to(src_root)
        if relative.parts[0] in skip:
            continue
        if path.is_dir():
            (out / relative).mkdir()
        else:
            shutil.copy2(path, out / relative)


def estimate_size(src_root: Path, tree: list[Path], modes: dict[str, Quantization]) -> int:
    """About the bytes of the output: each float weight the policy quantizes as its codes plus each group's scale
    (mxfp8: 0.53x of bfloat16), everything else at its source size. Reads only the safetensors headers."""
    policies = {name: layer_policy(name, read_config(src_root / name)) for name in modes}
    total = 0
    for path in tree:
        if path.is_dir():
            continue
        total += path.stat().st_size
        component = path.relative_to(src_root).parts[0]
        if component in policies and path.suffix == ".safetensors":
            total -= _saved_by_quantizing(path, policies[component], modes[component])
    return total


def _saved_by_quantizing(shard: Path, policy: re.Pattern | None, quantization: Quantization) -> int:
    saved = 0
    for key, entry in check_safetensors(shard).items():
        layer = key.removesuffix(".weight")
        if (key.endswith(".weight") and entry["dtype"] in FLOAT_DTYPES
                and quantizable(layer, tuple(entry["shape"]), policy, quantization.group_size)):
            start, end = entry["data_offsets"]
            saved += end - start - quantization.stored_bytes(math.prod(entry["shape"]))
    return saved


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _space_report(folder: Path, needed: int) -> str:
    return f"{folder}: the conversion needs about {_size(needed)}, {_size(shutil.disk_usage(folder).free)} free"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporary folder is removed; only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # A process started from a thread that blocks signals inherits that mask; the handler needs SIGTERM delivered.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGTERM, previous)


def _build(src_root: Path, tree: list[Path], dst: Path, force: bool, modes: dict[str, Quantization],
           recipe: dict | None, log: Callable[[str], None]) -> None:
    """Convert into a temporary folder, verify, move it to `dst`; on any failure remove the temporary folder."""
    tmp = make_temporary(dst)
    try:
        for name, quantization in modes.items():
            count = convert_component(src_root / name, tmp / name, name, quantization)
            log(f"{name}: quantized {count} layers to {quantization.name}")
        copy_tree(src_root, tree, tmp, skip=tuple(modes))
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
            log(f"{RECIPE_FILE}: the recipe of {recipe['name']} ({json.dumps(recipe['defaults'])})")
        for name, quantization in modes.items():
            worst = verify_component(src_root, tmp, name, quantization)
            log(f"{name}: reloaded; largest relative weight error {worst:.4f} (bound {quantization.rounding_bound})")
        publish(tmp, dst, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _source(src: str | Path) -> tuple[Path, dict | None]:
    """The source folder, and the recipe to write beside the output when `src` names a model (manifest name or
    its repo id) whose folder does not carry one: a folder given by path then runs as the named model does."""
    manifest = named_manifest(str(src))
    if manifest is None:
        return resolve_model(src).resolve(), None
    folder = manifest.path or resolve_model(manifest.repo, None, manifest.download_gb)
    return Path(folder).resolve(), None if (Path(folder) / RECIPE_FILE).is_file() else manifest.recipe()


def convert(src: str | Path, dst: str | Path, force: bool = False, text_encoder: bool | str | Quantization = False,
            log: Callable[[str], None] = print, quantization: Quantization | None = None) -> Path:
    """Write a quantized copy of model `src` (a model name, a folder or a repo id) to `dst`: the transformer in
    `quantization` (default mxfp8) and, with `text_encoder`, the text encoder (True: in the same mode; or a mode
    name / Quantization of its own), per the policy; every other component copied unchanged, and the named
    model's recipe (mlximg.json). `src` is never modified, and with `force` only an earlier model folder (or an
    empty folder) at `dst` is replaced."""
    quantization = quantization or Quantization()
    modes = {"transformer": quantization}
    if text_encoder:
        modes["text_encoder"] = (quantization if text_encoder is True else text_encoder
                                 if isinstance(text_encoder, Quantization) else Quantization.named(text_encoder))
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    src_root, recipe = _source(src)
    tree = source_tree(src_root)
    check_apart(dst, src_root, tree)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"destination folder {dst.parent} does not exist")
    if dst.exists():
        check_replaceable(dst)
    needed = estimate_size(src_root, tree, modes)
    if needed > shutil.disk_usage(dst.parent).free:
        raise NoSpaceError(f"not enough free space in {_space_report(dst.parent, needed)}")
    try:
        with _terminate_as_interrupt(), locked(dst):
            remove_stale(dst, log)
            _build(src_root, tree, dst, force, modes, recipe, log)
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        raise NoSpaceError(f"no space left on device in {_space_report(dst.parent, needed)}") from error
    for component in modes:
        before, after = folder_size(src_root / component), folder_size(dst / component)
        log(f"{component}: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.0%})")
    log(f"total: {folder_size(src_root) / 2**20:.2f} MiB -> {folder_size(dst) / 2**20:.2f} MiB; wrote {dst}")
    return dst
