"""Model manifests (models/*.json): which repo a short name means, its components and generation defaults.

`resolve` turns the user's `model` argument (manifest name, local folder or Hugging Face repo id) into a
manifest, without loading anything, so a bad name fails before any heavy work. A model folder may carry its own
recipe (defaults, TeaCache settings) in `mlximg.json` beside model_index.json: the embedded model does, and
`mlximg quantize` writes one, so a folder given by path runs as its named model does.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .loading import is_repo_id, read_json_object

RECIPE_FILE = "mlximg.json"
DEFAULT_MODEL = "z-image-turbo"  # what generate() and the CLI run without a model
PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel, models/ ships as mlximg/model_data; a source checkout has it beside the package.
MODELS_DIR = Path(os.environ.get("MLXIMG_MODELS_DIR") or (
    PACKAGE / "model_data" if (PACKAGE / "model_data").is_dir() else PACKAGE.parent / "models"))
# diffusers pipeline class -> our family.
# diffusers pipeline classes a model_index.json may name (a folder saved from any of them loads).
FAMILIES = {"ZImagePipeline": "zimage", "ZImageImg2ImgPipeline": "zimage", "ZImageInpaintPipeline": "zimage",
            "Flux2KleinPipeline": "flux2", "Flux2KleinInpaintPipeline": "flux2", "Flux2KleinKVPipeline": "flux2",
            "Flux2Pipeline": "flux2"}
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
    download_gb: float | None = None  # the download's size, for the message when it is missing offline

    def recipe(self) -> dict:
        """What `mlximg.json` in a folder of this model holds."""
        recipe = {"name": self.name, "defaults": self.defaults}
        return {**recipe, "teacache": self.teacache} if self.teacache is not None else recipe


def read_recipe(folder: Path) -> dict:
    """A model folder's own recipe (mlximg.json), or {}."""
    path = Path(folder) / RECIPE_FILE
    return read_json_object(path) if path.is_file() else {}


def known_manifests() -> dict[str, Manifest]:
    manifests = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        data = read_json_object(path)
        folder = MODELS_DIR / data["path"] if "path" in data else None
        data = {**data, **read_recipe(folder)} if folder is not None else data
        manifests[data["name"]] = Manifest(data["name"], data["family"], repo=data.get("repo"), path=folder,
                                           components=data.get("components", []), defaults=data.get("defaults", {}),
                                           teacache=data.get("teacache"), download_gb=data.get("download_gb"))
    return manifests


def family_of(folder: Path) -> str:
    """The family named by a diffusers folder's model_index.json."""
    class_name = read_json_object(Path(folder) / "model_index.json").get("_class_name")
    if class_name not in FAMILIES:
        raise ValueError(f"{folder}: unsupported pipeline {class_name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[class_name]


def named_manifest(model: str) -> Manifest | None:
    """The manifest `model` names: by its name, or by its repo id."""
    manifests = known_manifests()
    if model in manifests:
        return manifests[model]
    return next((manifest for manifest in manifests.values() if manifest.repo == model), None)


def resolve(model: str | Path) -> Manifest:
    """A manifest name, a local diffusers folder, or a repo id (with its manifest's defaults when it has one)."""
    manifests = known_manifests()
    if str(model) in manifests:
        return manifests[str(model)]
    path = Path(model).expanduser()
    if path.is_dir():
        family = family_of(path)
        recipe = read_recipe(path)
        return Manifest(path.name, family, path=path, defaults=recipe.get("defaults") or dict(FAMILY_DEFAULTS[family]),
                        teacache=recipe.get("teacache"))
    if (named := named_manifest(str(model))) is not None:
        return named
    if is_repo_id(str(model)) and not path.exists():
        # An unknown repo: its family is read from model_index.json once downloaded.
        return Manifest(str(model), family="", repo=str(model))
    raise ValueError(f"unknown model {str(model)!r}: not a model name ({', '.join(manifests)}), "
                     f"a local diffusers folder, or a Hugging Face repo id")
