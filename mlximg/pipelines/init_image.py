"""Starting from a picture: image to image (the init image noised to the first sigma of a schedule shortened by
`strength`) and inpainting (each step, the region outside the mask put back from the init image at the next
noise level), with the init image and the mask prepared as diffusers' image processors prepare them."""

import math
import numbers
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from .images import open_image


@dataclass
class InitImage:
    """An init image, its optional mask (white = repaint) and the strength, opened and checked."""

    image: object  # PIL image
    mask: object | None  # PIL image
    strength: float


def check_strength(strength) -> float:
    if (isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength)
            or not 0 < strength <= 1):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def _mask_array(mask):
    """Masks may also be boolean arrays (True = repaint)."""
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    return mask


def open_init_image(init_image, mask, strength) -> InitImage | None:
    """Open and check an init image and mask (cheap: before any model is loaded); None without an init image."""
    if init_image is None:
        if mask is not None:
            raise ValueError("mask= needs init_image=, the picture to repaint")
        if strength is not None:
            raise ValueError("strength= needs init_image=, the picture to start from")
        return None
    image = open_image(init_image, "init image")
    strength = check_strength(1.0 if strength is None and mask is not None else 0.6 if strength is None
                              else strength)
    if mask is None:
        return InitImage(image, None, strength)
    opened = open_image(_mask_array(mask), "mask")
    (width, height), (mask_width, mask_height) = image.size, opened.size
    # The mask is resized to the image: only a scale is allowed, within a pixel of rounding.
    if abs(mask_width * height - width * mask_height) > max(width, height, mask_width, mask_height):
        raise ValueError(f"the mask is {mask_width}x{mask_height} but the init image {width}x{height}: their "
                         "aspects differ, so the mask would not cover the same region")
    return InitImage(image, opened, strength)


def start_step(steps: int, strength: float) -> int:
    """The first step of a schedule of `steps` that img2img runs, as diffusers' get_timesteps; refused when
    strength x steps leaves none."""
    t_start = int(max(steps - min(steps * strength, steps), 0))
    if steps - t_start < 1:
        raise ValueError(f"strength {strength:g} x {steps} steps leaves no denoising step; raise steps or strength")
    return t_start


def truncated(schedule, strength: float):
    """The Schedule (denoise.py) from the step `strength` starts at."""
    t_start = start_step(len(schedule.times), strength)
    return replace(schedule, sigmas=schedule.sigmas[t_start:], times=schedule.times[t_start:],
                   timesteps=schedule.timesteps[t_start:])


def noised(image_latents: mx.array, noise: mx.array, sigma) -> mx.array:
    """The scheduler's scale_noise: sigma x noise + (1 - sigma) x image, in float32."""
    sigma = mx.array(np.float32(sigma))
    return sigma * noise + (1.0 - sigma) * image_latents.astype(mx.float32)


def resized(image, width: int, height: int):
    """diffusers' VaeImageProcessor.resize (default mode): Lanczos to exactly width x height."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def init_pixels(image, width: int, height: int) -> mx.array:
    """The init image as the VAE takes it: resized, RGB, in [-1, 1], (1, H, W, 3)."""
    image = resized(image, width, height)
    image = image.convert("RGB") if image.mode != "RGB" else image
    return mx.array(np.asarray(image, dtype=np.float32) / 255.0 * 2 - 1)[None]


def mask_pixels(mask, width: int, height: int) -> np.ndarray:
    """The mask as diffusers' mask processor makes it: resized in its own mode, greyscale, then 1 where it is at
    least half white, else 0: (H, W) float32."""
    values = np.asarray(resized(mask, width, height).convert("L"), dtype=np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)


def nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's interpolate(mode="nearest") of an (H, W) mask to (height, width): source index floor(i x in / out)
    in float32."""
    def index(size_in: int, size_out: int) -> np.ndarray:
        scale = np.float32(size_in) / np.float32(size_out)
        return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(int), size_in - 1)

    return mask[index(mask.shape[0], height)][:, index(mask.shape[1], width)]


def _bilinear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights as torch computes them (align_corners=False), float32."""
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    # A float32 scale, the index arithmetic rounded once (as torch's fused multiply-add does).
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0).astype(np.float32)
    low = source.astype(int)
    return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)


def bilinear(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's interpolate(mode="bilinear", align_corners=False) of an (H, W) mask to (height, width), summed in
    its order."""
    top, bottom, dy = _bilinear_weights(mask.shape[0], height)
    left, right, dx = _bilinear_weights(mask.shape[1], width)
    dy, dx = dy[:, None], dx[None, :]
    one = np.float32(1)

    def across(rows):
        return (one - dx) * rows[:, left] + dx * rows[:, right]

    return ((one - dy) * across(mask[top]) + dy * across(mask[bottom])).astype(np.float32)


@dataclass
class Inpaint:
    """What inpainting keeps, in the layout the loop steps in: the clean init latents, the run's noise and the
    mask (1 = repaint), each broadcast against the latents."""

    image: mx.array
    noise: mx.array
    mask: mx.array

    def blend(self, x: mx.array, sigma_next) -> mx.array:
        """After a step to `sigma_next`: outside the mask, the init image noised to that level."""
        kept = noised(self.image, self.noise, sigma_next)
        return (1 - self.mask) * kept + self.mask * x
