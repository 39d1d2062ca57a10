"""Tensor parallelism through one small protocol: a model lists which of its linears split their outputs across
ranks ("all-to-sharded": q, k, v, the MLP's input) and which their inputs ("sharded-to-all": the attention's and
the MLP's output, followed by one all-reduce), and which head counts become per-rank counts. Each layer is read
and cut to this rank's shard one at a time, so a rank never holds more than its shards and one whole tensor."""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

COLUMNS, ROWS = "all-to-sharded", "sharded-to-all"


@dataclass
class TensorPlan:
    # (module path, sharding, segments: a count of equal parts or the split points of fused projections, each
    # part shared out across ranks)
    linears: list[tuple[str, str, int | list[int]]] = field(default_factory=list)
    heads: list[tuple[str, str]] = field(default_factory=list)  # (module path, attribute divided by the size)

    def columns(self, *paths: str, segments: int | list[int] = 1) -> None:
        self.linears += [(path, COLUMNS, segments) for path in paths]

    def rows(self, *paths: str, segments: int | list[int] = 1) -> None:
        self.linears += [(path, ROWS, segments) for path in paths]

    def divide(self, path: str, *attributes: str) -> None:
        self.heads += [(path, attribute) for attribute in attributes]


def _walk(module, path: str):
    """The parent of `path` and the last name (a key, or a list index)."""
    parts = path.split(".")
    parent = module
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    return parent, parts[-1]


def _get(module, path: str):
    parent, name = _walk(module, path)
    return parent[int(name)] if isinstance(parent, list) else parent[name]


def _set(module, path: str, value) -> None:
    parent, name = _walk(module, path)
    if isinstance(parent, list):
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def _width(layer: nn.Module, sharding: str) -> int:
    """The layer's output width (split by COLUMNS) or input width (ROWS), unpacked."""
    if sharding == COLUMNS:
        return layer["weight"].shape[0]
    return layer["weight"].shape[-1] if isinstance(layer, nn.Linear) else layer["scales"].shape[-1] * layer.group_size


def _fractions(layer: nn.Module, sharding: str, segments: int | list[int]) -> int | list[int] | list[float]:
    """Split points of a quantized layer as fractions of its width, so that its packed tensors split at the same
    places (MLX floors fraction x width: the nudge keeps an exact point from landing one below)."""
    if isinstance(segments, int) or isinstance(layer, nn.Linear):
        return segments
    return [point / _width(layer, sharding) + 1e-9 for point in segments]


def _parts(width: int, segments, full: int) -> list[float]:
    """The widths of a tensor's segments (`full`: the layer's unpacked width, which integer points refer to)."""
    if isinstance(segments, int):
        return [width / segments] * segments
    points = [0, *(int(s * width) if isinstance(s, float) else s * width // full for s in segments), width]
    return [b - a for a, b in zip(points, points[1:])]


def check_plan(module: nn.Module, plan: TensorPlan, size: int, what: str) -> None:
    """Every split must be whole: head counts and each segment's width divisible by the number of ranks."""
    for path, attribute in plan.heads:
        counts = getattr(_get(module, path), attribute)
        if any(count % size for count in (counts if isinstance(counts, list) else [counts])):
            raise ValueError(f"{what}: {path}.{attribute} is {counts}, which {size} ranks cannot split evenly")
    for path, sharding, segments in plan.linears:
        layer = _get(module, path)
        fractions, full = _fractions(layer, sharding, segments), _width(layer, sharding)
        for name in ("weight", "scales", "biases"):  # packed quantized weights split with their scales
            if name in layer:
                width = layer[name].shape[0 if sharding == COLUMNS else -1]
                if any(part % size for part in _parts(width, fractions, full)):
                    raise ValueError(f"{what}: {path}.{name} of width {width} (segments {segments}) cannot be "
                                     f"split evenly across {size} ranks")


def shard_module(module: nn.Module, group: mx.distributed.Group, what: str) -> nn.Module:
    """Replace the planned linears of `module` (weights loaded lazily) by this rank's shards, in place."""
    plan = module.tensor_parallel_plan()
    size = group.size()
    check_plan(module, plan, size, what)
    for path, sharding, segments in plan.linears:
        layer = _get(module, path)
        sharded = shard_linear(layer, sharding, segments=_fractions(layer, sharding, segments), group=group)
        mx.eval(sharded.parameters())  # this layer read and cut now; the whole tensors go with the old layer
        _set(module, path, sharded)
    for path, attribute in plan.heads:
        owner, value = _get(module, path), getattr(_get(module, path), attribute)
        setattr(owner, attribute, [v // size for v in value] if isinstance(value, list) else value // size)
    return module
