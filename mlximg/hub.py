"""Models from the Hugging Face hub: a cached snapshot is used only when it holds every file a run needs; an
interrupted download is resumed when online, and named file by file when offline."""

import fnmatch
from pathlib import Path
from typing import Iterable

from .loading import read_json_object

INDEX_SUFFIX = ".safetensors.index.json"
TRY_OFFLINE = "to try mlximg offline, use the embedded model: --model z-image-digits"


def _components(folder: Path, components: Iterable[str] | None) -> list[str]:
    if components is not None:
        return list(components)
    index = read_json_object(folder / "model_index.json")
    return sorted(name for name, value in index.items() if not name.startswith("_") and isinstance(value, list))


def missing_files(folder: Path, components: Iterable[str] | None) -> list[str]:
    """What a snapshot lacks: a component folder, or the weights its config or index promises. Files appear in a
    snapshot only once fully downloaded, so a missing one is what an interrupted download left out."""
    folder = Path(folder)
    if components is None and not (folder / "model_index.json").is_file():
        return ["model_index.json"]
    missing = []
    for name in _components(folder, components):
        component = folder / name
        if not component.is_dir():
            missing.append(f"{name}/")
            continue
        for index in component.glob(f"*{INDEX_SUFFIX}"):
            shards = set(read_json_object(index).get("weight_map", {}).values())
            missing += [f"{name}/{shard}" for shard in sorted(shards) if not (component / shard).is_file()]
        has_weights = any(component.glob("*.safetensors")) or any(component.glob(f"*{INDEX_SUFFIX}"))
        if (component / "config.json").is_file() and not has_weights:
            missing.append(f"{name}/*.safetensors")
    return missing


def _patterns(components: Iterable[str] | None) -> list[str] | None:
    return None if components is None else ["model_index.json", *(f"{name}/*" for name in components)]


def download_size(repo_id: str, components: Iterable[str] | None) -> int | None:
    """The bytes a download of `components` takes, from the hub's metadata; None when the hub cannot say."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().model_info(repo_id, files_metadata=True).siblings or []
    except Exception:  # offline, gated or unknown: the caller says what it knows instead
        return None
    patterns = _patterns(components)
    return sum(f.size or 0 for f in files
               if patterns is None or any(fnmatch.fnmatch(f.rfilename, p) for p in patterns)) or None


def _not_available(repo_id: str, missing: list[str] | None, size_gb: float | None, why: str) -> FileNotFoundError:
    what = ("not downloaded" if missing is None else
            f"downloaded only in part (missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    size = f" (about {size_gb:.0f} GB)" if size_gb else ""
    return FileNotFoundError(f"model {repo_id!r}{size} is {what}, and {why}; {TRY_OFFLINE}")


def download(repo_id: str, components: Iterable[str] | None, download_gb: float | None = None) -> Path:
    """The local snapshot of `repo_id` holding `components` (None: every component in model_index.json)."""
    from huggingface_hub import constants, snapshot_download

    patterns = _patterns(components)
    missing = None
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        missing = missing_files(cached, components)
        if not missing:
            return cached
    except Exception:  # not in the cache at all
        pass
    if constants.HF_HUB_OFFLINE:
        raise _not_available(repo_id, missing, download_gb, "the Hugging Face hub is offline (HF_HUB_OFFLINE)")
    try:  # downloads what is missing, resuming partial files
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        size = download_size(repo_id, components)
        raise _not_available(repo_id, missing, size / 1e9 if size else download_gb,
                             f"the download failed: {error}") from error
    still_missing = missing_files(folder, components)
    if still_missing:
        raise _not_available(repo_id, still_missing, download_gb, "the download did not bring those files")
    return folder
