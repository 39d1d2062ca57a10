"""The process group `mlx.launch` sets up (ring over TCP, MPI, or JACCL on Macs), and what its ranks must agree
on before any work."""

import mlx.core as mx

MODES = ("tensor", "data")
BACKENDS = ("[ring]", "[mpi]", "[jaccl]", "[nccl]")  # how MLX's backends begin their errors


class PeerLost(RuntimeError):
    """Another rank is gone: its connection closed, or it stopped answering within the timeout."""


def peer_lost(error: RuntimeError, rank: int) -> PeerLost | None:
    """A collective's failure as one clear error (MLX's ring: "[ring] connection to a peer was lost")."""
    if str(error).startswith(BACKENDS):
        return PeerLost(f"rank {rank}: another rank is gone ({error})")
    return None


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


def group_for(mode: str | None) -> mx.distributed.Group | None:
    """The process group for `mode` ("tensor" or "data"; None: run alone), refused outside a launched group."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r}: choose one of {', '.join(MODES)}")
    group = world()
    if group is None:
        raise ValueError(f"distributed {mode} needs several processes: start them with mlx.launch "
                         "(mlx.launch -n 2 --backend ring -- mlximg generate ... --distributed tensor)")
    return group
