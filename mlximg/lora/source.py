"""Which LoRA a user means and its tensors: a `.safetensors` file, a folder holding one, or a Hugging Face repo id
with a file in it (from the cache when offline), each with a scale; read after checking the file's header."""

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..loading import check_safetensors, is_repo_id

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' adapter config (r, lora_alpha, ...) in the file's header


@dataclass(frozen=True)
class LoRA:
    """One adapter to apply: `path` (file, folder or "owner/repo[/file.safetensors]"), its `scale`, and whether
    text-encoder tensors in the file may be skipped (they are an error otherwise)."""

    path: str
    scale: float = 1.0
    skip_text_encoder: bool = False

    def __post_init__(self):
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ValueError(f"a LoRA is given by a path or a repo id, got {self.path!r}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"LoRA {self.path}: scale must be a finite number, got {scale!r}")
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "scale", float(scale))

    @property
    def name(self) -> str:
        return Path(self.path).name


def as_lora(value) -> LoRA:
    """A LoRA from a LoRA, a path, or a (path, scale) pair."""
    if isinstance(value, LoRA):
        return value
    if isinstance(value, (str, Path)):
        return LoRA(str(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return LoRA(str(value[0]), value[1])
    raise ValueError(f"a LoRA is a path, a (path, scale) pair or a mlximg.LoRA, got {value!r}")


def parse_cli_lora(text: str) -> LoRA:
    """`PATH[:SCALE]` as the CLI takes it."""
    path, _, scale = text.rpartition(":")
    if path and _is_number(scale):
        return LoRA(path, float(scale))
    return LoRA(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def locate(source: str) -> Path:
    """The safetensors file `source` names."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"LoRA {path}: only .safetensors files are read (a .bin / .pt file can run code when "
                             "loaded); convert it first")
        return path
    if path.is_dir():
        return _file_in_folder(path)
    parts = str(source).split("/")
    if len(parts) >= 2 and is_repo_id("/".join(parts[:2])):
        return _download("/".join(parts[:2]), "/".join(parts[2:]) or DIFFUSERS_FILE)
    raise FileNotFoundError(f"LoRA {source!r}: no such file or folder, and not a Hugging Face repo id "
                            "(owner/name[/file.safetensors])")


def _file_in_folder(folder: Path) -> Path:
    if (folder / DIFFUSERS_FILE).is_file():
        return folder / DIFFUSERS_FILE
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = [f.name for f in files] or "none"
        raise FileNotFoundError(f"LoRA folder {folder}: expected one .safetensors file (or {DIFFUSERS_FILE}), "
                                f"found {found}; name the file")
    return files[0]


def _download(repo_id: str, filename: str) -> Path:
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # not in the cache
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"LoRA {repo_id}/{filename} is not downloaded, and the Hugging Face hub is "
                                    "offline (HF_HUB_OFFLINE)") from None
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:
        raise FileNotFoundError(f"LoRA {repo_id}/{filename}: the download failed: {error}") from error


def read(path: Path) -> tuple[dict[str, mx.array], dict]:
    """The file's tensors (lazily) and diffusers' adapter config from its header ({} when it has none)."""
    header = check_safetensors(path)
    try:
        tensors = mx.load(str(path))
    except Exception as error:
        raise ValueError(f"LoRA {path}: cannot read safetensors: {error}") from error
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"LoRA {path}: its {METADATA_KEY} is not valid JSON: {error}") from error
    return tensors, metadata if isinstance(metadata, dict) else {}
