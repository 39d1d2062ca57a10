"""TeaCache: decide per denoising step whether the transformer runs or its cached result is reused.

Three signals (the first two from Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model"; the third is ParaAttention's first-block cache):
- "timestep": |t - t_prev|, rescaled; a skipped step reuses the whole cached model output (no forward at all).
- "modulated": the relative L1 change of the first block's modulated input, rescaled by a per-model polynomial;
  the model caches the residual of its block stack, so a skipped step runs only the embedders, the first
  block's modulation and the final layer, on `input + cached_residual`.
- "first_block": the relative L1 change of the first block's residual (its image output minus its input) since
  the last computed step; a skipped step runs the first block and adds the cached residual of all the others.
For the first two the rescaled changes accumulate until they reach the threshold; then the step is computed and
the sum restarts. "first_block" compares each step's change alone with the threshold, against the residual of
the last computed step (so a run of small changes cannot drift unnoticed).
With CFG the cache holds one entry per context (positive, negative) and the pipeline recombines guidance after
the cache, every step, so a cached result never carries a stale guidance scale.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..configs import at_least, check_fields, from_dict
from ..runtime import Tracker

MODES = ("timestep", "modulated", "first_block")
IN_MODEL = ("modulated", "first_block")  # the modes the model's BlockRunner decides (cache/runner.py)
OWNER = "teacache"


@dataclass
class TeaCacheConfig:
    """`coefficients`: the rescaling polynomial, highest degree first (numpy.polyval); `signal_range`: the
    (low, high) signal change seen in calibration, which the polynomial's input is clamped to."""

    threshold: float = at_least(0, default=0.1)
    mode: str = "timestep"
    coefficients: tuple[float, ...] = (1.0, 0.0)
    signal_range: tuple[float, float] | None = None
    first_steps: int = at_least(1, default=1)  # always computed
    compute_last: bool = True
    max_consecutive_skips: int = at_least(0, default=3)
    calibrated: bool = field(default=False, compare=False)  # informational: coefficients fitted for this model

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"teacache mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.coefficients, (list, tuple)) or not self.coefficients:
            raise ValueError(f"teacache coefficients must be finite numbers, got {list(self.coefficients)!r}")
        check_fields(self, "teacache ")
        if self.signal_range is not None and not self.signal_range[0] <= self.signal_range[1]:
            raise ValueError(f"teacache signal_range must be (low, high) with low <= high, got "
                             f"{list(self.signal_range)!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TeaCacheConfig":
        return from_dict(cls, values, "teacache", strict=True)

    def describe(self) -> dict:
        return {"mode": self.mode, "threshold": self.threshold, "calibrated": self.calibrated}

    def start(self, num_steps: int, tracker: Tracker) -> "TeaCache":
        """This config's per-run state (a subclass may return its own kind: scripts/calibrate_teacache.py)."""
        return TeaCache(self, num_steps, tracker)


class TeaCache:
    """Per-run state: the previous signal, the accumulated change, the cached entries and hit / miss counts."""

    def __init__(self, config: TeaCacheConfig, num_steps: int, tracker: Tracker | None = None):
        self.config = config
        self.num_steps = num_steps
        self.tracker = tracker if tracker is not None else Tracker()
        self.step = 0
        self.contexts: tuple = ("positive",)
        self.entries: dict[str, mx.array] = {}
        self.previous_signal = None
        self.accumulated = 0.0
        self.consecutive_skips = 0
        self.hits = 0  # steps that reused the cache
        self.misses = 0  # steps that ran the transformer

    # -- decisions -------------------------------------------------------------------------------------------

    def rescale(self, change: float) -> float:
        """The polynomial at `change` clamped to the calibrated range; never negative, so skips cannot bank credit."""
        if self.config.signal_range is not None:
            change = min(max(change, self.config.signal_range[0]), self.config.signal_range[1])
        return max(float(np.polyval(self.config.coefficients, change)), 0.0)

    def decide(self, step: int, change: float | None, available: bool = True) -> bool:
        """Compute step `step` (True) or reuse the cache (False), given the signal's change since the last step."""
        config = self.config
        forced = (step < config.first_steps or change is None or not available
                  or (config.compute_last and step == self.num_steps - 1)
                  or self.consecutive_skips >= config.max_consecutive_skips)
        if not forced:
            rescaled = self.rescale(change)
            self.accumulated = rescaled if config.mode == "first_block" else self.accumulated + rescaled
        compute = forced or self.accumulated >= config.threshold
        if compute:
            self.accumulated = 0.0
            self.consecutive_skips = 0
            self.misses += 1
        else:
            self.consecutive_skips += 1
            self.hits += 1
        return compute

    def change(self, signal) -> float | None:
        """|t - t_prev| for a timestep; mean |x - x_prev| / mean |x_prev| for an array signal."""
        previous = self.previous_signal
        if previous is None or getattr(signal, "shape", ()) != getattr(previous, "shape", ()):
            return None
        if self.config.mode == "timestep":
            return abs(float(signal) - float(previous))
        scale = mx.mean(mx.abs(previous.astype(mx.float32)))
        difference = mx.mean(mx.abs(signal.astype(mx.float32) - previous.astype(mx.float32)))
        return (difference / mx.maximum(scale, 1e-12)).item()

    # -- the hooks the pipeline and the model call -----------------------------------------------------------

    def begin(self, step: int, contexts: tuple = ("positive",)) -> None:
        """Called by the pipeline before each forward: which step, and which CFG contexts the batch holds."""
        self.step, self.contexts = step, tuple(contexts)

    def reuse(self, signal):
        """The cached entry for this step's batch, or None when the step must be computed (then call `store`)."""
        change = self.change(signal)
        available = all(c in self.entries for c in self.contexts)
        compute = self.decide(self.step, change, available)
        if compute or self.config.mode != "first_block":  # first_block compares with the last computed step
            self._keep_signal(signal)
        return None if compute else self.cached()

    def store(self, value: mx.array) -> None:
        """Cache this step's result, one entry per context (batch rows in context order); frees the old ones."""
        for context, entry in zip(self.contexts, mx.split(value, len(self.contexts), axis=0)):
            self.tracker.free(self.entries.get(context))
            self.entries[context] = self.tracker.keep(entry, OWNER)

    def cached(self) -> mx.array:
        entries = [self.entries[c] for c in self.contexts]
        return entries[0] if len(entries) == 1 else mx.concatenate(entries, axis=0)

    def _keep_signal(self, signal) -> None:
        if isinstance(signal, mx.array):
            self.tracker.free(self.previous_signal)
            self.tracker.keep(signal, OWNER)
        self.previous_signal = signal

    def arrays(self) -> list[mx.array]:
        """What the step's evaluation must include, so no cached entry keeps a graph alive."""
        arrays = list(self.entries.values())
        return arrays + [self.previous_signal] if isinstance(self.previous_signal, mx.array) else arrays

    def release(self) -> int:
        """Free every cached array; returns the bytes released."""
        self.entries.clear()
        self.previous_signal = None
        return self.tracker.release(OWNER) if self.tracker.kept(OWNER) else 0

    def stats(self) -> dict:
        return {"computed": self.misses, "skipped": self.hits}


def step_forward(teacache: TeaCache | None, step: int, t: float, contexts: tuple, forward):
    """One denoising step's transformer output, `forward()`. In "timestep" mode the whole call is skipped when the
    cache allows; in the other modes the model's BlockRunner decides inside the forward."""
    if teacache is None:
        return forward()
    teacache.begin(step, contexts)
    if teacache.config.mode in IN_MODEL:
        return forward()
    cached = teacache.reuse(float(t))
    if cached is not None:
        return cached
    out = forward()
    teacache.store(out)
    return out
