"""Image bytes in and out: uploads read with PIL's limits and refused clearly, OpenAI's transparent-means-repaint
masks turned into the engine's white-means-repaint ones, and generated images encoded with their parameters."""

import base64
import io
import warnings

import numpy as np

from ..output import QUALITY, image_bytes
from ..pipelines.images import open_image
from .errors import bad_request

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(image, output_format: str, compression: int | None = None) -> bytes:
    """The image file; JPEG and WebP at `compression` (OpenAI's name for the quality, 0-100)."""
    return image_bytes(image, FORMATS[output_format], QUALITY if compression is None else compression)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read_upload(data: bytes, param: str):
    """A PIL image from uploaded bytes; not an image, a truncated one or a decompression bomb is a 400."""
    from PIL import Image

    if not data:
        raise bad_request(f"{param}: the file is empty", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return open_image(image, param)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise bad_request(f"{param}: too large: {error}", param, "invalid_image") from None
    except ValueError as error:
        raise bad_request(str(error), param, "invalid_image") from None
    except OSError as error:
        raise bad_request(f"{param}: not a readable image ({error})", param, "invalid_image") from None


def engine_mask(mask, image_size: tuple[int, int]):
    """OpenAI's mask (fully transparent pixels mark the area to repaint; it must have an alpha channel and the
    image's size) as the engine's: white = repaint, black = keep."""
    from PIL import Image

    if mask.size != image_size:
        raise bad_request(f"mask: {mask.size[0]}x{mask.size[1]} but the image is {image_size[0]}x{image_size[1]}; "
                          "they must be the same size", "mask", "invalid_mask")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise bad_request("mask: no alpha channel; fully transparent pixels mark the area to edit", "mask",
                          "invalid_mask")
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    if not (alpha == 0).any():
        raise bad_request("mask: no fully transparent pixel, so nothing to edit", "mask", "invalid_mask")
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
