"""What `generate(teacache=..., stepcache=...)` accepts: None / False (off), True (the defaults: for TeaCache the
model manifest's "teacache" entry), a dict of settings over those defaults, or a config object."""

from .stepcache import StepCacheConfig
from .teacache import TeaCacheConfig

# Without a manifest entry: the timestep signal, which needs no per-model calibration.
DEFAULT_TEACACHE = {"mode": "timestep", "threshold": 0.1, "coefficients": [1.0, 0.0]}


def resolve_teacache(value, manifest_defaults: dict | None = None) -> TeaCacheConfig | None:
    if value is None or value is False:
        return None
    if isinstance(value, TeaCacheConfig):
        return value
    # A manifest entry may say where its numbers come from; that is not a setting.
    defaults = {k: v for k, v in (manifest_defaults or DEFAULT_TEACACHE).items() if k not in ("source", "note")}
    if value is True:
        return TeaCacheConfig.from_dict(defaults)
    if isinstance(value, dict):
        return TeaCacheConfig.from_dict({**defaults, **value})
    raise ValueError(f"teacache must be True, False, a dict or a TeaCacheConfig, got {value!r}")


def resolve_stepcache(value) -> StepCacheConfig | None:
    if value is None or value is False:
        return None
    if isinstance(value, StepCacheConfig):
        return value
    if value is True:
        return StepCacheConfig()
    if isinstance(value, dict):
        return StepCacheConfig.from_dict(value)
    raise ValueError(f"stepcache must be True, False, a dict or a StepCacheConfig, got {value!r}")


def check_caches(teacache: TeaCacheConfig | None, stepcache: StepCacheConfig | None) -> None:
    """Refuse combinations that cannot work together, before any model work."""
    if teacache is not None and stepcache is not None and teacache.mode == "first_block":
        raise ValueError("teacache mode 'first_block' cannot be combined with stepcache: a step the first-block "
                         "cache reuses runs no middle blocks for StepCache to refresh; choose one")
