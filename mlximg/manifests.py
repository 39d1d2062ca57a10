"""Model manifests (models/*.json): which repo a short name means, its components and generation defaults.

`resolve` turns the user's `model` argument (manifest name, local folder or Hugging Face repo id) into a
manifest, without loading anything, so a bad name fails before any heavy work.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .loading import is_repo_id, read_json

MODELS_DIR = Path(os.environ.get("MLXIMG_MODELS_DIR", Path(__file__).resolve().parent.parent / "models"))
# diffusers pipeline class -> our family.
FAMILIES = {"ZImagePipeline": "zimage", "Flux2KleinPipeline": "flux2", "Flux2Pipeline": "flux2"}
# Without a manifest: the diffusers pipelines' own defaults.
FAMILY_DEFAULTS = {
    "zimage": {"steps": 50, "guidance": 5.0, "width": 1024, "height": 1024},
    "flux2": {"steps": 50, "guidance": 4.0, "width": 1024, "height": 1024},
}


@dataclass
class Manifest:
    name: str
    family: str
    repo: str | None = None  # Hugging Face repo id
    path: Path | None = None  # a local folder instead of a repo (in a manifest: relative to models/)
    components: list[str] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    teacache: dict | None = None  # TeaCache settings for generate(teacache=True); None: the timestep default


def known_manifests() -> dict[str, Manifest]:
    manifests = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        folder = MODELS_DIR / data["path"] if "path" in data else None
        manifests[data["name"]] = Manifest(data["name"], data["family"], repo=data.get("repo"), path=folder,
                                           components=data.get("components", []), defaults=data.get("defaults", {}),
                                           teacache=data.get("teacache"))
    return manifests


def family_of(folder: Path) -> str:
    """The family named by a diffusers folder's model_index.json."""
    class_name = read_json(Path(folder) / "model_index.json").get("_class_name")
    if class_name not in FAMILIES:
        raise ValueError(f"{folder}: unsupported pipeline {class_name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[class_name]


def resolve(model: str | Path) -> Manifest:
    """A manifest name, a local diffusers folder, or a repo id (with its manifest's defaults when it has one)."""
    manifests = known_manifests()
    if str(model) in manifests:
        return manifests[str(model)]
    path = Path(model).expanduser()
    if path.is_dir():
        family = family_of(path)
        return Manifest(path.name, family, path=path, defaults=dict(FAMILY_DEFAULTS[family]))
    for manifest in manifests.values():
        if manifest.repo == str(model):
            return manifest
    if is_repo_id(str(model)) and not path.exists():
        # An unknown repo: its family is read from model_index.json once downloaded.
        return Manifest(str(model), family="", repo=str(model))
    raise ValueError(f"unknown model {str(model)!r}: not a model name ({', '.join(manifests)}), "
                     f"a local diffusers folder, or a Hugging Face repo id")
