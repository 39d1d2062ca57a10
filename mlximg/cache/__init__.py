"""Step caching for the denoising loop: TeaCache (skip whole transformer forwards) and StepCache (reuse the
middle blocks' residual between refresh steps). Both are model-agnostic; they reach the transformers through
one BlockRunner (runner.py), and the plain runner computes exactly as without them."""

from .config import check_caches, resolve_stepcache, resolve_teacache
from .stepcache import StepCache, StepCacheConfig, run_blocks
from .teacache import TeaCache, TeaCacheConfig, step_forward

__all__ = ["StepCache", "StepCacheConfig", "TeaCache", "TeaCacheConfig", "check_caches", "resolve_stepcache",
           "resolve_teacache", "run_blocks", "step_forward"]
