"""Reference images for FLUX.2 editing, prepared as diffusers' Flux2ImageProcessor prepares them."""

import math

import mlx.core as mx
import numpy as np

from .images import open_image

MAX_AREA = 1024 * 1024  # larger references are scaled down to this many pixels
MIN_SIDE = 64
MAX_ASPECT = 8


def check_reference(image, index: int) -> None:
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"reference image {index} is {width}x{height}; both sides must be at least {MIN_SIDE} px")
    if max(width / height, height / width) > MAX_ASPECT:
        raise ValueError(f"reference image {index} is {width}x{height}; the aspect ratio may be at most {MAX_ASPECT}:1")


def prepare_reference(image, multiple: int) -> mx.array:
    """Scale down to at most 1 Mpx (Lanczos), convert to RGB, center-crop to multiples of `multiple`, map to
    [-1, 1]: (1, H, W, 3). The order is diffusers' (the resize sees the original mode)."""
    from PIL import Image

    width, height = image.size
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    image = image.convert("RGB") if image.mode != "RGB" else image
    return _pixels(_center_crop(image, width // multiple * multiple, height // multiple * multiple))


def _center_crop(image, width: int, height: int):
    """Flux2ImageProcessor's crop: centred, black where the image is smaller."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _pixels(image) -> mx.array:
    return mx.array(np.asarray(image, dtype=np.float32) / 255.0 * 2 - 1)[None]


def prepare_inpaint_references(images: list, multiple: int) -> list[mx.array]:
    """References as diffusers' klein inpainting prepares them: the first as for editing, the others
    centre-cropped to its size."""
    first = prepare_reference(images[0], multiple)
    height, width = first.shape[1:3]
    return [first] + [_pixels(_center_crop(image, width, height).convert("RGB")) for image in images[1:]]


def open_references(images, limit: int) -> list:
    """Open and check up to `limit` reference images (cheap: before any model is loaded)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("image=[] holds no reference image; leave image unset for text to image")
    if len(images) > limit:
        raise ValueError(f"{len(images)} reference images given; this model takes at most {limit}")
    opened = [open_image(image, f"reference image {index}") for index, image in enumerate(images)]
    for index, image in enumerate(opened):
        check_reference(image, index)
    return opened


def load_references(images, limit: int, multiple: int) -> list[mx.array]:
    """Open, check and prepare up to `limit` reference images."""
    return [prepare_reference(image, multiple) for image in open_references(images, limit)]

