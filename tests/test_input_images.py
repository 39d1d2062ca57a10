"""Images users pass in are read by their real value range (16-bit and float images are not clipped to white or
black), and what cannot be read is refused clearly: odd array shapes and dtypes, decompression bombs, no images."""

import numpy as np
import pytest
from PIL import Image

from mlximg.pipelines import images
from mlximg.pipelines.images import open_image
from mlximg.pipelines.references import load_references, open_references

RAMP = np.tile(np.linspace(0, 1, 96, dtype=np.float64), (64, 1))  # a horizontal ramp, black to white


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.int16)


def expected_ramp() -> np.ndarray:
    return np.round(RAMP * 255).astype(np.int16)


def test_16_bit_greyscale_png_keeps_its_range(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert np.abs(as_array(open_image(path)) - expected_ramp()).max() <= 1
    (reference,) = load_references([path], 4, 16)
    pixels = (np.array(reference[0]) + 1) * 127.5
    assert pixels.min() < 5 and pixels.max() > 250, "not all white"


def test_float_tiff_keeps_its_range(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(RAMP.astype(np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert np.abs(as_array(open_image(path)) - expected_ramp()).max() <= 1


@pytest.mark.parametrize("array", [
    (RAMP * 255).round().astype(np.uint8)[..., None],
    np.repeat((RAMP * 65535).round().astype(np.uint16)[..., None], 3, axis=-1),
    RAMP.astype(np.float32),
], ids=["uint8 (H, W, 1)", "uint16 (H, W, 3)", "float (H, W)"])
def test_arrays_by_their_dtype(array):
    assert np.abs(as_array(open_image(array)) - expected_ramp()).max() <= 1


@pytest.mark.parametrize("array, message", [
    (np.zeros((64, 64, 2), np.uint8), r"must be \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\), got shape"),
    (np.zeros((64, 64), np.int64), "has dtype int64; expected uint8"),
    (np.full((64, 64), 2.0), r"floating-point with values in \[2, 2\]; expected \[0, 1\]"),
    (np.full((64, 64), np.nan), "holds NaN or inf"),
])
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        open_image(array, "reference image 0")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(ValueError, match=r"is 300x200 \(0 Mpx\); images of more than 0.1 Mpx are refused"):
        open_image(path, "reference image 0")
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard, turned into a clear error
    with pytest.raises(ValueError, match="big.png is too large"):
        open_image(path, "reference image 0")


def test_an_empty_list_of_references_is_refused():
    with pytest.raises(ValueError, match=r"image=\[\] holds no reference image"):
        open_references([], 4)
