"""The process group `mlx.launch` sets up (ring over TCP, MPI, or JACCL on Macs), and what its ranks must agree
on before any work."""

import mlx.core as mx

MODES = ("tensor", "data")


class PeerLost(RuntimeError):
    """Another rank is gone: its connection closed, or it stopped answering within the timeout."""


def world() -> mx.distributed.Group | None:
    """The group this process belongs to, or None when it runs alone (no launcher, or a group of one)."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def rank_line() -> str:
    group = world()
    return "single process" if group is None else f"rank {group.rank()} of {group.size()}"


def agree(values: list[int], group: mx.distributed.Group) -> list[int]:
    """Rank 0's `values` (unsigned 32-bit, such as seeds it drew) on every rank."""
    mine = mx.array(values, dtype=mx.uint32) if group.rank() == 0 else mx.zeros((len(values),), mx.uint32)
    return mx.distributed.all_sum(mine, group=group).tolist()
