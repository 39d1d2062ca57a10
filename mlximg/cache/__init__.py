"""Step caching for the denoising loop: TeaCache (skip whole transformer forwards) and StepCache (reuse the
middle blocks' residual between refresh steps). Both are model-agnostic; the transformers call them through
optional `teacache=` / `stepcache=` arguments and compute exactly as before when those are None."""

from .config import resolve_stepcache, resolve_teacache
from .stepcache import StepCache, StepCacheConfig, run_blocks
from .teacache import TeaCache, TeaCacheConfig, step_forward

__all__ = ["StepCache", "StepCacheConfig", "TeaCache", "TeaCacheConfig", "resolve_stepcache", "resolve_teacache",
           "run_blocks", "step_forward"]
