"""Writing generated images: the format the file name's extension says, the generation parameters as metadata,
atomically (a temporary file renamed into place) and with the permissions a new file gets (the umask)."""

import io
import json
import os
import tempfile
from pathlib import Path

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95  # JPEG and WebP: near-lossless for generated images
_DESCRIPTION_TAG = 0x010E  # EXIF ImageDescription: where JPEG and WebP files carry the parameters


def image_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"output {path}: unsupported image format {suffix or '(no extension)'!r}; "
                         f"use {', '.join(FORMATS)}")
    return FORMATS[suffix]


def check_output_path(path: Path) -> None:
    """Everything that would make writing `path` fail, checked before any work, so no image is lost at the end."""
    path = Path(path)
    image_format(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name, such as {path / 'out.png'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"cannot write to the output folder {path.parent}: {error.strerror}") from error
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_options(image, image_format: str, quality: int = QUALITY) -> dict:
    parameters = image.info.get("parameters", {})
    if image_format == "PNG":
        from PIL.PngImagePlugin import PngInfo

        metadata = PngInfo()
        metadata.add_text("parameters", json.dumps(parameters))
        for key, value in parameters.items():
            metadata.add_text(key, str(value))
        return {"pnginfo": metadata}
    from PIL import Image

    exif = Image.Exif()
    exif[_DESCRIPTION_TAG] = json.dumps(parameters)
    return {"exif": exif, "quality": quality}


def write_image(image, file, image_format_name: str, quality: int = QUALITY) -> None:
    """Write `image` to an open binary file in "PNG", "JPEG" or "WEBP" (at `quality`), with its parameters."""
    image.save(file, format=image_format_name, **_save_options(image, image_format_name, quality))


def image_bytes(image, image_format_name: str = "PNG", quality: int = QUALITY) -> bytes:
    """The file `write_image` writes, in memory."""
    buffer = io.BytesIO()
    write_image(image, buffer, image_format_name, quality)
    return buffer.getvalue()


def save_image(image, path: Path) -> Path:
    """Write `image` to `path` in the format its extension names, with image.info["parameters"] as metadata."""
    path = Path(path)
    image_format_name = image_format(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_image(image, f, image_format_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_parameters(path: Path) -> dict:
    """The generation parameters written by `save_image`."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("parameters") if image.format == "PNG" else image.getexif().get(_DESCRIPTION_TAG)
    return json.loads(text) if text else {}
