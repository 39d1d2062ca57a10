"""A LoRA file as an adapter of one loaded transformer: every tensor mapped to a module of the model, or an error
naming those that are not, before any generation; and the set of adapters a pipeline applies, with their scales,
kept through its tracker (owner "lora:<file>") and released when they are taken off."""

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..runtime import Tracker
from .deltas import lokr_deltas, lora_deltas
from .keys import Module, Parsed, likely_family, parse
from .layers import apply_adapters, features, linear_layers
from .names import FAMILIES, Target
from .source import LoRA, locate, read

FAMILY_NAMES = {"zimage": "Z-Image", "flux2": "FLUX.2"}
COMBINED = "lora:combined"  # the tracker's owner of the adapters' scaled, stacked projections
_STACKS = ("layers", "noise_refiner", "context_refiner", "transformer_blocks", "single_transformer_blocks")


@dataclass
class Adapter:
    name: str
    path: Path
    deltas: dict  # module path -> delta

    @property
    def arrays(self) -> list[mx.array]:
        return [a for delta in self.deltas.values() for a in delta.arrays()]


class Resolver:
    """Module names as files spell them -> the model's diffusers module paths."""

    def __init__(self, model: nn.Module, family: str):
        self.layers = linear_layers(model)
        self.original, names = FAMILIES[family]
        depths = {stack: len(model[stack]) for stack in _STACKS if stack in model}
        spelled = {}
        for name in [*self.layers, *names(depths)]:
            spelled.setdefault(name.replace(".", "_"), set()).add(name)
        self.underscored = {key: names.pop() for key, names in spelled.items() if len(names) == 1}

    def targets(self, module: Module) -> list[Target] | None:
        name = self.underscored.get(module.name) if module.underscored else module.name
        if name is None:
            return None
        return [Target(name)] if name in self.layers else self.original(name)


def _metadata_scale(metadata: dict, path: str) -> float:
    """lora_alpha / r from diffusers' adapter config in the file (its rank and alpha patterns included), as PEFT
    scales a layer; 1 without one."""
    config = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    if "r" not in config or "lora_alpha" not in config:
        return 1.0

    def pick(pattern: dict, default):
        for key, value in (pattern or {}).items():
            if (re.match(key, path) if key.startswith("^") else path == key or path.endswith(f".{key}")):
                return value
        return default

    rank, alpha = pick(config.get("rank_pattern"), config["r"]), pick(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _refused(kinds: set[str], what: str) -> None:
    if "dora" in kinds:
        raise ValueError(f"{what}: DoRA (dora_scale / lora_magnitude_vector) is not supported")
    if "diff" in kinds:
        raise ValueError(f"{what}: full-weight patches (.diff / .diff_b) are not supported (diffusers refuses them too)")


def _deltas(parsed: Parsed, resolver: Resolver, metadata: dict, source: str) -> tuple[dict, list[str]]:
    """The deltas by module path, and the keys that match nothing."""
    deltas, unmatched = {}, list(parsed.unknown)
    for module, entries in parsed.modules.items():
        keys = [key for key, _ in entries.values()]
        targets = resolver.targets(module)
        if targets is None or any(t.path not in resolver.layers for t in targets):
            unmatched += keys
            continue
        what = f"LoRA {source}, module {module.name}"
        kinds = set(entries)
        _refused(kinds, what)
        tensors = {kind: value for kind, (_, value) in entries.items()}
        if any(kind.startswith("lokr") for kind in kinds):
            made = lokr_deltas(tensors, targets, what)
        elif "alpha" in kinds and not kinds & {"lora_A", "lora_B"}:
            unmatched += keys  # an alpha without its weights
            continue
        else:
            made = lora_deltas(tensors, targets, what, _metadata_scale(metadata, targets[0].path))
        for path, delta in made.items():
            if path in deltas:
                raise ValueError(f"LoRA {source}: module {path} is adapted twice (by fused and separate tensors)")
            deltas[path] = delta
    return deltas, unmatched


def _check_shapes(deltas: dict, resolver: Resolver, source: str) -> None:
    for path, delta in deltas.items():
        model_shape = features(resolver.layers[path])
        if tuple(delta.shape) != model_shape:
            raise ValueError(f"LoRA {source}: {path} is {tuple(delta.shape)} (out, in) in the adapter but "
                             f"{model_shape} in this model: a LoRA for another model or size")


def load_adapter(lora: LoRA, model: nn.Module, family: str, dtype: mx.Dtype) -> Adapter:
    """Read, convert and check `lora` against the transformer `model` (whose weights need not be read)."""
    path = locate(lora.path)
    tensors, metadata = read(path)
    if not tensors:
        raise ValueError(f"LoRA {path}: the file holds no tensors")
    parsed = parse(tensors)
    if parsed.text_encoder and not lora.skip_text_encoder:
        raise ValueError(f"LoRA {path}: {len(parsed.text_encoder)} tensors adapt the text encoder (e.g. "
                         f"{parsed.text_encoder[0]}), which mlximg does not adapt; pass skip_text_encoder=True "
                         "(--lora-skip-text-encoder) to apply the rest")
    resolver = Resolver(model, family)
    deltas, unmatched = _deltas(parsed, resolver, metadata, str(path))
    if unmatched:
        guess = likely_family(list(tensors))
        hint = f"; it looks like a LoRA for {guess}" if guess and guess != FAMILY_NAMES[family] else ""
        raise ValueError(f"LoRA {path}: {len(unmatched)} of its {len(tensors)} tensors match nothing in this "
                         f"{FAMILY_NAMES[family]} transformer{hint}: {sorted(unmatched)[:5]}"
                         f"{' ...' if len(unmatched) > 5 else ''}")
    _check_shapes(deltas, resolver, str(path))
    for delta in deltas.values():  # the compute dtype, as PEFT casts to the layer's (alpha folded before)
        for name, value in vars(delta).items():
            if isinstance(value, mx.array):
                setattr(delta, name, value.astype(dtype))
    return Adapter(path.name, path, deltas)


def _owner(key: tuple) -> str:
    path, skip_text_encoder = key
    return f"lora:{path}" + (" (text encoder skipped)" if skip_text_encoder else "")


class Adapters:
    """The adapters a pipeline applies: loaded once per file, kept through `tracker`, applied with scales."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.loaded: dict[tuple, Adapter] = {}
        self.active: list[tuple[LoRA, Adapter]] = []

    def set(self, loras: list[LoRA], model: nn.Module, family: str, dtype: mx.Dtype) -> None:
        """Apply exactly `loras` to `model` (an empty list takes them all off); files already loaded are reused,
        so a new scale costs nothing, and adapters no longer used are released."""
        active = []
        for lora in loras:
            key = (str(locate(lora.path).resolve()), lora.skip_text_encoder)
            if key not in self.loaded:
                adapter = load_adapter(lora, model, family, dtype)
                self.tracker.keep(adapter.arrays, owner=_owner(key))
                self.loaded[key] = adapter
            active.append((key, lora, self.loaded[key]))
        pairs = {}
        for _, lora, adapter in active:
            for path, delta in adapter.deltas.items():
                pairs.setdefault(path, []).append((delta, lora.scale))
        if COMBINED in self.tracker.owners():
            self.tracker.release(COMBINED)
        made = apply_adapters(model, pairs)
        if made:
            self.tracker.keep(made, owner=COMBINED)
        for key in set(self.loaded) - {key for key, _, _ in active}:
            del self.loaded[key]
            self.tracker.release(_owner(key))
        self.active = [(lora, adapter) for _, lora, adapter in active]

    def report(self) -> list[dict]:
        """What image.info["parameters"] records of each adapter."""
        return [{"name": lora.name, "scale": lora.scale, "layers": len(adapter.deltas)} for lora, adapter in self.active]
