"""Per-phase wall time and memory: `with phases.phase("encode"): ...`.

MLX is lazy: a phase measures the work evaluated inside it, so evaluate the phase's outputs before it ends.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class PhaseStats:
    name: str
    seconds: float
    active_before: int  # bytes held by live arrays when the phase began
    active_after: int
    peak: int  # highest active bytes during the phase


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


class PhaseLog:
    """Records a PhaseStats per phase. Phases may nest; an outer phase's peak includes its inner phases'."""

    def __init__(self):
        self.records: list[PhaseStats] = []
        self._running_peaks: list[int] = []

    @contextmanager
    def phase(self, name: str):
        if self._running_peaks:
            # MLX has one peak counter: bank the enclosing phase's peak before resetting it.
            self._running_peaks[-1] = max(self._running_peaks[-1], mx.get_peak_memory())
        self._running_peaks.append(0)
        mx.reset_peak_memory()
        active_before = mx.get_active_memory()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            peak = max(self._running_peaks.pop(), mx.get_peak_memory())
            if self._running_peaks:
                self._running_peaks[-1] = max(self._running_peaks[-1], peak)
            self.records.append(PhaseStats(name, seconds, active_before, mx.get_active_memory(), peak))

    def get(self, name: str) -> PhaseStats:
        """The latest record of the phase `name`."""
        for record in reversed(self.records):
            if record.name == name:
                return record
        raise KeyError(f"no phase named {name!r}; recorded: {[r.name for r in self.records]}")

    def clear(self) -> None:
        self.records.clear()

    def table(self) -> str:
        """One row per phase name, in order of first appearance; a phase run n times (a decode per image, a
        preview per step) shows "x n", its total time, its highest peak and its last active bytes."""
        groups: dict[str, list[PhaseStats]] = {}
        for record in self.records:
            groups.setdefault(record.name, []).append(record)
        lines = [f"{'phase':<14}{'seconds':>10}{'peak MiB':>12}{'active MiB':>12}"]
        for name, records in groups.items():
            label = name if len(records) == 1 else f"{name} x{len(records)}"
            seconds, peak = sum(r.seconds for r in records), max(r.peak for r in records)
            lines.append(f"{label:<14}{seconds:>10.3f}{_mib(peak):>12}{_mib(records[-1].active_after):>12}")
        return "\n".join(lines)
