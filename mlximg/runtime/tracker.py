"""Explicit lifetimes for the arrays that must outlive an evaluation.

Python frees an MLX array when its last reference goes, and `mx.eval` detaches the graph that produced its
outputs, so intermediates go by themselves. What a diffusion run must control is the opposite: multi-GB
component weights and caches that stay alive until released on purpose. The tracker names them by owner
("text_encoder", "transformer", "teacache"), measures them, and releases an owner's arrays in place, so a
stray reference to a released module holds no memory.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map


def nbytes(value) -> int:
    """Bytes held by the arrays of a module, a tree of arrays or an array."""
    if isinstance(value, mx.array):
        return value.nbytes
    if isinstance(value, nn.Module):
        value = value.parameters()
    return sum(leaf.nbytes for _, leaf in tree_flatten(value) if isinstance(leaf, mx.array))


def _empty_in_place(value) -> None:
    if isinstance(value, nn.Module):
        value.update(tree_map(lambda a: mx.zeros((0,), a.dtype), value.parameters()))
    elif isinstance(value, (dict, list)):
        value.clear()


class Tracker:
    """A registry of kept arrays, grouped by owner."""

    def __init__(self):
        self._owners: dict[str, list] = {}

    def keep(self, value, owner: str):
        """Keep `value` (a module, a tree of arrays or an array) alive under `owner`; returns `value`."""
        self._owners.setdefault(owner, []).append(value)
        return value

    def free(self, value) -> None:
        """Stop keeping `value`. Its memory goes when nothing else refers to it (a pending graph may)."""
        if value is None:
            return
        for owner, values in self._owners.items():
            for i, kept in enumerate(values):
                if kept is value:
                    del values[i]
                    if not values:
                        del self._owners[owner]
                    return
        raise ValueError(f"free(): {type(value).__name__} is not kept by this tracker")

    def eval(self, *outputs, clear_cache: bool = False):
        """Evaluate `outputs`; afterwards only kept arrays and the outputs hold memory.

        `clear_cache` also returns MLX's buffer cache (freed buffers kept for reuse) to the system, which is
        worth it at phase boundaries but not inside a loop, where the next step reuses those buffers.
        """
        mx.eval(*outputs)
        if clear_cache:
            mx.clear_cache()
        return outputs[0] if len(outputs) == 1 else outputs

    def release(self, owner: str) -> int:
        """Release everything kept under `owner`, emptying modules and containers in place; returns the bytes."""
        if owner not in self._owners:
            raise ValueError(f"release(): nothing is kept under {owner!r}; owners: {sorted(self._owners)}")
        values = self._owners.pop(owner)
        released = sum(nbytes(value) for value in values)
        for value in values:
            _empty_in_place(value)
        del values
        mx.clear_cache()
        return released

    def kept(self, owner: str) -> list:
        return list(self._owners.get(owner, ()))

    def nbytes(self, owner: str | None = None) -> int:
        owners = [owner] if owner is not None else list(self._owners)
        return sum(nbytes(value) for name in owners for value in self._owners.get(name, ()))

    def owners(self) -> dict[str, int]:
        """Bytes kept per owner."""
        return {name: self.nbytes(name) for name in self._owners}
