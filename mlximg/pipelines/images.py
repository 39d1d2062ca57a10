"""Images users pass in (PIL images, file paths or arrays), read by their real value range: 16-bit and float
images scaled to 8 bits instead of clipped to white or black, and anything else refused with a clear error."""

import warnings
from pathlib import Path

import numpy as np

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), about 89.5 Mpx
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(f"{what} is {width}x{height} ({width * height / 1e6:.0f} Mpx); images of more than "
                         f"{MAX_PIXELS / 1e6:.1f} Mpx are refused (scale it down first)")


def _open_file(path: Path, what: str):
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            _check_pixels(*image.size, f"{what} {path}")
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ValueError(f"{what} {path} is too large: {error}") from error
    except OSError as error:
        raise ValueError(f"{what} {path} cannot be read: {error}") from error
    return image


def _scaled_to_8_bit(values: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is, uint16 by its 16-bit range, floats by [0, 1]; other dtypes or ranges are refused."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.uint16:
        return np.round(values / 257.0).astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(f"{what} holds NaN or inf values")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise ValueError(f"{what} is floating-point with values in [{low:g}, {high:g}]; expected [0, 1]")
        return np.round(values * 255).astype(np.uint8)
    raise ValueError(f"{what} has dtype {values.dtype}; expected uint8 (0-255), uint16 (0-65535) or floats in [0, 1]")


def _from_array(values: np.ndarray, what: str):
    from PIL import Image

    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] not in (3, 4)):
        raise ValueError(f"{what} array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{what} array is empty, shape {values.shape}")
    _check_pixels(values.shape[1], values.shape[0], what)
    return Image.fromarray(_scaled_to_8_bit(values, what))


def _eight_bit(image, what: str):
    """16-bit and 32-bit integer or float modes (PNG, TIFF) as 8-bit greyscale, by their range."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scaled_to_8_bit(np.asarray(image).astype(np.uint16), what))
    if image.mode == "I":  # 32-bit integers: 8- or 16-bit data as the largest value says
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{what} holds 32-bit integers in [{values.min()}, {values.max()}]; expected 8 or 16 bit")
        eight_bit = values.astype(np.uint8) if values.max() <= 255 else _scaled_to_8_bit(values.astype(np.uint16), what)
        return Image.fromarray(eight_bit)
    if image.mode == "F":
        return Image.fromarray(_scaled_to_8_bit(np.asarray(image), what))
    return image


def open_image(image, what: str = "image"):
    """A PIL image from a PIL image, a file path or an array (uint8, uint16 or floats in [0, 1])."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = _open_file(Path(image).expanduser(), what)
    elif isinstance(image, np.ndarray):
        return _from_array(image, what)
    elif isinstance(image, Image.Image):
        _check_pixels(*image.size, what)
    else:
        raise ValueError(f"{what} must be a PIL image, a path or an array, got {type(image).__name__}")
    return _eight_bit(image, what)
