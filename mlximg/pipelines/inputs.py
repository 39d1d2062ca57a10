"""Generation arguments: validated before any heavy loading, and the initial noise."""

import secrets

import mlx.core as mx
import numpy as np


def check_size(width: int, height: int, multiple: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < multiple or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple) if isinstance(value, (int, float)) else multiple
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r} (nearest valid: {nearest})")


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def check_guidance(guidance: float) -> None:
    if not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"guidance must be a non-negative number, got {guidance!r}")


def check_prompts(prompt, negative_prompt, uses_cfg: bool, why_no_cfg: str) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    if negative_prompt and not uses_cfg:
        # Dropping it silently would hide that it has no effect.
        raise ValueError(f"negative_prompt has no effect without classifier-free guidance ({why_no_cfg})")


def resolve_arguments(defaults: dict, width, height, steps, guidance, size_multiple: int) -> tuple:
    """Fill unset arguments from the model's defaults and validate them; cheap, so it runs before any loading."""
    width = width if width is not None else defaults.get("width", 1024)
    height = height if height is not None else defaults.get("height", 1024)
    steps = steps if steps is not None else defaults["steps"]
    guidance = guidance if guidance is not None else defaults["guidance"]
    check_size(width, height, size_multiple)
    check_steps(steps)
    check_guidance(guidance)
    return width, height, steps, guidance


def initial_noise(shape: tuple[int, ...], seed: int | None, latents=None) -> tuple[mx.array, int | None]:
    """The starting latents in float32: `latents` as given (numpy or mx, the diffusers layout), else seeded noise.

    Returns them with the seed used (None when latents were given).
    """
    if latents is not None:
        latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, mx.array) else latents
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.astype(mx.float32), None
    if seed is None:
        seed = secrets.randbits(32)
    return mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed)), seed


def to_image(decoded: mx.array):
    """Decoded (1, H, W, 3) in [-1, 1] -> PIL image, rounded as diffusers' image processor does."""
    from PIL import Image

    pixels = np.clip(np.array(decoded[0].astype(mx.float32)) / 2 + 0.5, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
