"""Generation arguments: validated before any heavy loading, and the initial noise."""

import math
import numbers
import secrets

import mlx.core as mx
import numpy as np

from .limits import MAX_STEPS, SizeLimits

SEED_LIMIT = 2**64  # seeds are unsigned 64-bit, as torch generators take them
MAX_IMAGES = 64  # per call: a batch runs through every forward at once


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


def seed_batch(seed, count: int) -> list[int]:
    """One seed per image: a list as given, or s, s + 1, ... from one seed (a random one when None)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds given for {count} images")
        return [check_seed(s) for s in seed]
    first = check_seed(seed)
    first = secrets.randbits(32) if first is None else first
    if first + count > SEED_LIMIT:
        raise ValueError(f"seed {first} + {count} images runs past 2**64 - 1")
    return [first + i for i in range(count)]


def prompt_batch(prompt, num_images) -> list[str]:
    """One prompt per image: each of a list of prompts (or the one prompt) `num_images` times, prompt by prompt,
    as diffusers' num_images_per_prompt orders them."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    per_prompt = 1 if num_images is None else num_images
    if not _integer(per_prompt) or per_prompt < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if len(prompts) * per_prompt > MAX_IMAGES:
        raise ValueError(f"{len(prompts) * per_prompt} images asked for; at most {MAX_IMAGES} per call")
    return [p for p in prompts for _ in range(per_prompt)]


def negative_batch(negative_prompt, prompt, num_images) -> list[str]:
    """The negative prompt of each image: one for all, or one per prompt of a list (an unset one is "")."""
    count = 1 if isinstance(prompt, str) else len(prompt)
    negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * count
    if len(negatives) != count:
        raise ValueError(f"{len(negatives)} negative prompts given for {count} prompts")
    return [n or "" for n in negatives for _ in range(1 if num_images is None else num_images)]


def check_prompts(prompt, negative_prompt, uses_cfg: bool, why_no_cfg: str) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt]
    if not all(n is None or isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt must be a string (or one per prompt), got {negative_prompt!r:.80}")
    if any(negatives) and not uses_cfg:
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


def initial_noise(shape: tuple[int, ...], seeds: list[int], latents=None) -> tuple[mx.array, list[int | None]]:
    """The starting latents (B, C, h, w) in float32: `latents` as given, else each image's noise from its own seed,
    so that an image of a batch is the image its seed gives alone. Returns them with the seeds used (None where
    the latents were given)."""
    if latents is not None:
        return check_latents(latents, shape), [None] * shape[0]
    noise = [mx.random.normal((1, *shape[1:]), dtype=mx.float32, key=mx.random.key(seed)) for seed in seeds]
    return (noise[0] if len(noise) == 1 else mx.concatenate(noise)), seeds


def to_image(decoded: mx.array):
    """Decoded (1, H, W, 3) in [-1, 1] -> PIL image, rounded as diffusers' image processor does."""
    from PIL import Image

    pixels = np.clip(np.array(decoded[0].astype(mx.float32)) / 2 + 0.5, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
