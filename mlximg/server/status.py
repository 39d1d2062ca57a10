"""The server process's memory, for its status page: resident set size, and MLX's active, cached and peak bytes."""

import os
import resource
import sys

import mlx.core as mx


def resident_bytes() -> int | None:
    """The process's current resident set (Linux /proc); None where it cannot be read cheaply."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def memory() -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"rss": resident_bytes(), "peak_rss": peak, "mlx_active": mx.get_active_memory(),
            "mlx_cache": mx.get_cache_memory(), "mlx_peak": mx.get_peak_memory()}
