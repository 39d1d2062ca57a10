"""The public API: `load(model)` once, `.generate(...)` many times; `generate(prompt, model=...)` for one image."""

from .loading import resolve_model
from .manifests import DEFAULT_MODEL, FAMILY_DEFAULTS, Manifest, family_of, resolve
from .pipelines.inputs import check_seed, prompt_batch, resolve_arguments
from .pipelines.limits import size_limits


def _pipeline_class(family: str):
    if family == "zimage":
        from .pipelines.zimage import ZImagePipeline

        return ZImagePipeline
    if family == "flux2":
        from .pipelines.flux2 import Flux2Pipeline

        return Flux2Pipeline
    raise ValueError(f"unsupported model family {family!r}")


def check_arguments(model: str, *, width=None, height=None, steps=None, guidance=None, seed=None,
                    num_images=None) -> Manifest:
    """Resolve `model` and validate the arguments against its defaults and limits: cheap (no heavy import), before
    any download or load."""
    manifest = resolve(model)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    prompt_batch("", num_images if num_images is not None else len(seeds))  # the count is within bounds
    for one in seeds:
        check_seed(one)
    if manifest.family:  # an unknown repo id's family is known only once downloaded
        defaults = manifest.defaults or FAMILY_DEFAULTS[manifest.family]
        resolve_arguments(defaults, width, height, steps, guidance, size_limits(manifest.family, manifest.path))
    return manifest


def load(model: str = DEFAULT_MODEL, *, dtype=None, **pipeline_options):
    """A pipeline for `model`: a manifest name (models/*.json), a local diffusers folder or a Hugging Face repo id.

    Only configs are read here; weights load on first use. Pipeline options: keep_text_encoder, quantize="fp8" |
    "mxfp4" | "nvfp4" | "affine4" | "affine8" (quantize the transformer at load), text_encoder_quantize (the same
    for the text encoder), text_encoder=FOLDER | REPO | NAME (the text encoder and tokenizer from elsewhere, e.g. a
    quantized copy), fp8="matmul" | "dequantize" | "layerwise" (how quantized weights run), loras=[...] (LoRA
    adapters: paths, (path, scale) pairs or mlximg.LoRA; see Pipeline.set_loras).
    """
    manifest = resolve(model)
    folder = manifest.path or resolve_model(manifest.repo, manifest.components or None, manifest.download_gb)
    family = manifest.family or family_of(folder)
    defaults = manifest.defaults or FAMILY_DEFAULTS[family]
    return _pipeline_class(family)(folder, defaults=defaults, dtype=dtype, teacache_defaults=manifest.teacache,
                                   **pipeline_options)


def generate(prompt, *, model: str = DEFAULT_MODEL, quantize: str | None = None, fp8: str | None = None,
             text_encoder_quantize: str | None = None, **settings):
    """A PIL image for `prompt` (or a list of them, see Pipeline.generate). Unset steps / guidance / size come
    from the model's manifest. Settings: width, height, steps, guidance, negative_prompt, seed (one, or one per
    image: s gives s, s + 1, ...), num_images, latents, callback(step, steps, latents), teacache, stepcache, loras, and
    the family's own (Z-Image: cfg_truncation, cfg_normalization, tiled_decode; FLUX.2: image).

    `quantize="fp8"` (or mxfp4, nvfp4, affine4, affine8) quantizes the transformer at load, `text_encoder_quantize`
    the text encoder; `fp8` picks how quantized weights run (matmul / dequantize / layerwise).
    `teacache=True` skips transformer forwards by the manifest's "teacache" settings (a dict overrides some, a
    TeaCacheConfig replaces them); `stepcache=True` (or a dict / StepCacheConfig) reuses middle blocks' residuals.
    image.info["parameters"]["forwards"] says how many forwards ran and were skipped.
    """
    check_arguments(model, **{k: settings.get(k) for k in ("width", "height", "steps", "guidance", "seed",
                                                           "num_images")})
    return load(model, quantize=quantize, fp8=fp8, text_encoder_quantize=text_encoder_quantize).generate(
        prompt, **settings)
