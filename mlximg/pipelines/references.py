"""Reference images for FLUX.2 editing, prepared as diffusers' Flux2ImageProcessor prepares them."""

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

MAX_AREA = 1024 * 1024  # larger references are scaled down to this many pixels
MIN_SIDE = 64
MAX_ASPECT = 8


def open_reference(image):
    """A PIL image from a PIL image, a file path or an (H, W, 3) / (H, W) uint8 array."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"reference image {path} does not exist")
        try:
            image = Image.open(path)
            image.load()
        except OSError as error:
            raise ValueError(f"reference image {path} cannot be read: {error}") from error
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"reference array must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"reference image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")
    return image


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
    crop_w, crop_h = width // multiple * multiple, height // multiple * multiple
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return mx.array(pixels * 2 - 1)[None]


def load_references(images, limit: int, multiple: int) -> list[mx.array]:
    """Open, check and prepare up to `limit` reference images."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) > limit:
        raise ValueError(f"{len(images)} reference images given; this model takes at most {limit}")
    opened = [open_reference(image) for image in images]
    for index, image in enumerate(opened):
        check_reference(image, index)
    return [prepare_reference(image, multiple) for image in opened]
