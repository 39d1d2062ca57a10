"""StepCache: DeepCache-style block caching across denoising steps.

On a refresh step every block runs and the middle blocks' residual (h after them - h before them) is kept; on
the other steps the first blocks run, the kept residual stands in for the middle blocks, and the last blocks run.
Slots: one array per key (`get` / `set`) and a second stream for dual-stream models (`get2` / `set2`, FLUX.2's
text stream). Arrays are kept by a Tracker (owner "stepcache") and freed when replaced or released.
"""

from dataclasses import dataclass

import mlx.core as mx

from ..configs import at_least, check_fields, from_dict
from ..runtime import Tracker

OWNER = "stepcache"


@dataclass
class StepCacheConfig:
    """Refresh every `interval` steps (1: every step, no reuse); the first and last blocks of each span always run."""

    interval: int = at_least(1, default=3)
    first_blocks: int = at_least(0, default=1)
    last_blocks: int = at_least(0, default=1)

    def __post_init__(self):
        check_fields(self, "stepcache ")

    @classmethod
    def from_dict(cls, values: dict) -> "StepCacheConfig":
        return from_dict(cls, values, "stepcache", strict=True)

    def describe(self) -> dict:
        return {"interval": self.interval, "first_blocks": self.first_blocks, "last_blocks": self.last_blocks}

    def start(self, tracker: Tracker) -> "StepCache":
        """This config's per-run state."""
        return StepCache(self, tracker)


class StepCache:
    def __init__(self, config: StepCacheConfig | None = None, tracker: Tracker | None = None):
        self.config = config or StepCacheConfig()
        self.tracker = tracker if tracker is not None else Tracker()
        self._slots: dict = {}  # (stream, key) -> array
        self.refresh = True
        self.refresh_steps = 0
        self.blocks_computed = 0
        self.blocks_skipped = 0

    @staticmethod
    def should_refresh(step: int, interval: int) -> bool:
        if interval < 1:
            raise ValueError(f"stepcache interval must be >= 1, got {interval!r}")
        return step % interval == 0

    def begin(self, step: int) -> None:
        """Called by the pipeline before each forward."""
        self.refresh = self.should_refresh(step, self.config.interval)
        self.refresh_steps += self.refresh

    # -- slots -----------------------------------------------------------------------------------------------

    def get(self, key):
        return self._slots.get((1, key))

    def set(self, key, value: mx.array) -> None:
        self._put((1, key), value)

    def get2(self, key):
        return self._slots.get((2, key))

    def set2(self, key, value: mx.array) -> None:
        self._put((2, key), value)

    def _put(self, slot, value: mx.array) -> None:
        self.tracker.free(self._slots.get(slot))  # the replaced array goes once its graph is evaluated
        self._slots[slot] = self.tracker.keep(value, OWNER)

    def arrays(self) -> list[mx.array]:
        return list(self._slots.values())

    def release(self) -> int:
        self._slots.clear()
        return self.tracker.release(OWNER) if self.tracker.kept(OWNER) else 0

    def stats(self) -> dict:
        return {"refresh_steps": self.refresh_steps, "blocks_computed": self.blocks_computed,
                "blocks_skipped": self.blocks_skipped}

    # -- block spans -----------------------------------------------------------------------------------------

    def middle(self, n: int) -> tuple[int, int]:
        """[start, stop) of the blocks whose residual is cached, in a span of n blocks."""
        start = min(self.config.first_blocks, n)
        return start, max(start, n - self.config.last_blocks)

    def residual(self, key, h):
        """The kept residual for `key` if this step reuses it and it fits `h` (an array or an (image, text) pair)."""
        if self.refresh:
            return None
        if isinstance(h, tuple):
            cached = (self.get(key), self.get2(key))
            fits = all(c is not None and c.shape == x.shape for c, x in zip(cached, h))
        else:
            cached = self.get(key)
            fits = cached is not None and cached.shape == h.shape
        return cached if fits else None

    def keep_residual(self, key, before, after) -> None:
        if isinstance(after, tuple):
            self.set(key, after[0] - before[0])
            self.set2(key, after[1] - before[1])
        else:
            self.set(key, after - before)


def _run(blocks, indices, h, call, on_block, cache):
    for i in indices:
        h = call(blocks[i], h)
        if on_block is not None:
            on_block(i, h)
    if cache is not None:
        cache.blocks_computed += len(indices)
    return h


def run_blocks(blocks: list, h, call, on_block=None, cache: StepCache | None = None, key: str = "blocks"):
    """Run `blocks` over `h` (an array, or a pair of arrays for dual-stream blocks): `h = call(block, h)`, then
    `on_block(index, h)`. With a StepCache, the middle blocks' residual is reused on non-refresh steps."""
    n = len(blocks)
    start, stop = cache.middle(n) if cache is not None else (n, n)
    h = _run(blocks, range(start), h, call, on_block, cache)
    if start < stop:
        residual = cache.residual(key, h)
        if residual is not None:
            h = tuple(x + r for x, r in zip(h, residual)) if isinstance(h, tuple) else h + residual
            cache.blocks_skipped += stop - start
        else:
            before = h
            h = _run(blocks, range(start, stop), h, call, on_block, cache)
            cache.keep_residual(key, before, h)
    return _run(blocks, range(stop, n), h, call, on_block, cache)
