"""Generation arguments: validated before any heavy loading, and the initial noise."""

import math
import numbers
import secrets

import mlx.core as mx
import numpy as np

from .limits import MAX_STEPS, SizeLimits

SEED_LIMIT = 2**64  # seeds are unsigned 64-bit, as torch generators take them


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_size(width: int, height: int, limits: SizeLimits) -> None:
    multiple = limits.multiple
    for name, value in (("width", width), ("height", height)):
        if not _integer(value) or value < multiple or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple) if _real(value) and math.isfinite(value) \
                else multiple
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r} (nearest valid: {nearest})")
    limits.check(width, height)


def check_steps(steps) -> int:
    if not _integer(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS}, got {steps}")
    return int(steps)


def check_number(value, name: str, minimum: float = 0.0) -> float:
    """A finite real number >= minimum (guidance, cfg_truncation, ...): NaN would silently switch CFG off."""
    if not _real(value) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if not _integer(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)


def check_prompts(prompt, negative_prompt, uses_cfg: bool, why_no_cfg: str) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    if negative_prompt and not uses_cfg:
        # Dropping it silently would hide that it has no effect.
        raise ValueError(f"negative_prompt has no effect without classifier-free guidance ({why_no_cfg})")


def resolve_arguments(defaults: dict, width, height, steps, guidance, limits: SizeLimits) -> tuple:
    """Fill unset arguments from the model's defaults and validate them; cheap, so it runs before any loading."""
    width = width if width is not None else defaults.get("width", 1024)
    height = height if height is not None else defaults.get("height", 1024)
    steps = steps if steps is not None else defaults["steps"]
    guidance = guidance if guidance is not None else defaults["guidance"]
    check_size(width, height, limits)
    return int(width), int(height), check_steps(steps), check_number(guidance, "guidance")


def check_latents(latents, shape: tuple[int, ...]) -> mx.array:
    """Given starting latents (numpy or mx, the diffusers layout) as float32, of `shape` and finite."""
    latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, mx.array) else latents
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    latents = latents.astype(mx.float32)
    if not mx.isfinite(latents).all().item():
        raise ValueError("latents contain NaN or inf")
    return latents


def initial_noise(shape: tuple[int, ...], seed: int | None, latents=None) -> tuple[mx.array, int | None]:
    """The starting latents in float32: `latents` as given, else seeded noise.

    Returns them with the seed used (None when latents were given).
    """
    if latents is not None:
        return check_latents(latents, shape), None
    seed = check_seed(seed)
    if seed is None:
        seed = secrets.randbits(32)
    return mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed)), seed


def to_image(decoded: mx.array):
    """Decoded (1, H, W, 3) in [-1, 1] -> PIL image, rounded as diffusers' image processor does."""
    from PIL import Image

    pixels = np.clip(np.array(decoded[0].astype(mx.float32)) / 2 + 0.5, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
