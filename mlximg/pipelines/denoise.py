"""The denoising loop every pipeline runs, shaped like mlx-examples' flux sampler: a generator that takes the
scheduler's steps and yields each step's state; the caller shows it, previews it or stops early.

A family supplies a Denoiser: how its transformer runs for a batch at one step, and how the output becomes a
velocity (sign, time convention, guidance) in the layout it denoises in. The loop owns what they share: the
caches (TeaCache may skip a forward; both reach the model through one BlockRunner), classifier-free guidance
contexts, inpainting's blend after each step, one evaluation per step, the check that the latents stay finite,
and the progress bar.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..cache import StepCacheConfig, TeaCacheConfig, step_forward
from ..cache.runner import BlockRunner
from ..runtime import Tracker
from ..schedulers import FlowMatchEulerScheduler
from .init_image import Inpaint


@dataclass
class Schedule:
    sigmas: np.ndarray  # steps + 1 float32 sigmas, ending in 0
    times: np.ndarray  # the transformer's time at each step, in [0, 1] (TeaCache's timestep signal)
    timesteps: np.ndarray  # the scheduler's float32 timesteps (sigma x 1000), which the pipelines round from


class Denoiser(Protocol):
    def contexts(self, step: int) -> tuple[str, ...]:
        """("positive",), or ("positive", "negative") where guidance runs at this step."""

    def pack(self, latents: mx.array) -> mx.array:
        """Diffusers' NCHW latents -> the layout the loop steps in."""

    def unpack(self, x: mx.array) -> mx.array:
        """The inverse of `pack`."""

    def forward(self, x: mx.array, step: int, contexts: tuple[str, ...], runner: BlockRunner) -> mx.array:
        """The transformer's output at `step` for the batch of `contexts` (positive rows first)."""

    def velocity(self, out: mx.array, contexts: tuple[str, ...], step: int) -> mx.array:
        """The float32 velocity of the Euler step from the output of `forward`."""


@dataclass
class StepState:
    """After a step: `step` of `steps` done, the latents (B, C, h, w) in diffusers' layout, evaluated, and how many
    transformer forwards ran so far and what the caches did."""

    step: int
    steps: int
    latents: mx.array
    report: dict


def _report(steps_done: int, teacache, stepcache) -> dict:
    forwards = teacache.stats() if teacache is not None else {"computed": steps_done, "skipped": 0}
    report = {"forwards": forwards}
    for name, cache in (("teacache", teacache), ("stepcache", stepcache)):
        if cache is not None:
            report[name] = {**cache.config.describe(), **cache.stats()}
    return report


def denoise(denoiser: Denoiser, latents: mx.array, schedule: Schedule, scheduler: FlowMatchEulerScheduler,
            tracker: Tracker, *, teacache: TeaCacheConfig | None = None, stepcache: StepCacheConfig | None = None,
            check: Callable[[mx.array, int, int], None] | None = None, progress: bool = False,
            inpaint: Inpaint | None = None) -> Iterator[StepState]:
    """Denoise `latents` (NCHW, float32) along `schedule`, yielding a StepState after each step. `check(x, step,
    steps)` may raise to end the run (the pipelines stop at non-finite latents); `inpaint` (in the Denoiser's
    layout) puts back what the mask keeps after each step. The caches are this run's, kept through `tracker`
    and released when the loop ends, however it ends."""
    steps = len(schedule.times)
    tea = teacache.start(steps, tracker) if teacache is not None else None
    block = stepcache.start(tracker) if stepcache is not None else None
    runner = BlockRunner(tea, block)
    x = denoiser.pack(latents)
    try:
        for i in tqdm(range(steps), disable=not progress, desc="denoise"):
            if block is not None:
                block.begin(i)
            contexts = denoiser.contexts(i)
            # The cache holds each context's prediction; guidance is combined after it, every step.
            out = step_forward(tea, i, schedule.times[i], contexts, lambda: denoiser.forward(x, i, contexts, runner))
            x = scheduler.step(denoiser.velocity(out, contexts, i), x, schedule.sigmas[i], schedule.sigmas[i + 1])
            if inpaint is not None:
                x = inpaint.blend(x, schedule.sigmas[i + 1])
            # Cached arrays are evaluated with the step, so that none of them holds on to the step's graph.
            cached = [a for cache in (tea, block) if cache is not None for a in cache.arrays()]
            tracker.eval(x, *cached)
            if check is not None:
                check(x, i, steps)
            yield StepState(i + 1, steps, denoiser.unpack(x), _report(i + 1, tea, block))
    finally:
        for cache in (tea, block):
            if cache is not None:
                cache.release()
