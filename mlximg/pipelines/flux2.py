"""FLUX.2 text-to-image and multi-reference editing: [klein] (Qwen3, distilled or with CFG) and [dev] (Mistral3,
embedded guidance). Which one a folder holds is read from its configs, as diffusers' two pipelines encode it.

Latents are noise of shape (B, 128, H/16, W/16) (the VAE's 32 channels, 2x2-patchified), packed into tokens;
reference images are VAE-encoded the same way and appended to the image tokens at their own RoPE time offset.
"""

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..cache import step_forward
from ..loading import read_config, read_json_object
from ..models.flux2 import load_flux2_transformer
from ..models.flux2_vae import load_flux2_vae, pack_latents, unpack_latents
from ..models.mistral3_encoder import load_mistral3_encoder, load_mistral3_module, processor_chat_template
from ..models.qwen3_encoder import FLUX2_KLEIN_HIDDEN_LAYERS, load_qwen3_encoder, load_text_encoder
from ..schedulers import compute_empirical_mu
from .base import Pipeline, serialized
from .inputs import check_prompts, initial_noise, resolve_arguments
from .references import load_references

PIXELS_PER_TOKEN = 16
REFERENCE_TIME_STEP = 10  # reference i sits at RoPE time 10 * (i + 1)
# Black Forest Labs' documented limits: klein up to 4 references, dev a recommended maximum of 6.
MAX_REFERENCES = {"qwen3": 4, "mistral3": 6}


def grid_ids(height: int, width: int, time: int = 0) -> np.ndarray:
    """Position ids (time, row, column, 0) of an h x w token grid."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.full(rows.size, time), rows.ravel(), cols.ravel(), np.zeros(rows.size, int)], -1)


def text_ids(length: int) -> np.ndarray:
    """Text tokens count along the last axis: (0, 0, 0, l)."""
    ids = np.zeros((length, 4), dtype=np.int64)
    ids[:, 3] = np.arange(length)
    return ids


class Flux2Pipeline(Pipeline):
    family = "flux2"
    transformer_class = "Flux2Transformer2DModel"

    def __init__(self, model_dir, defaults: dict | None = None, dtype=None, keep_text_encoder: bool = False,
                 **options):
        self.encoder_type = read_config(Path(model_dir) / "text_encoder").get("model_type")
        if self.encoder_type not in MAX_REFERENCES:
            raise ValueError(f"{model_dir}: FLUX.2 text encoder {self.encoder_type!r} is not supported "
                             f"(expected one of {sorted(MAX_REFERENCES)})")
        super().__init__(model_dir, defaults, dtype, keep_text_encoder, **options)
        transformer_config = read_config(self.model_dir / "transformer")
        self.guidance_embeds = bool(transformer_config.get("guidance_embeds", True))
        # Noise channels: the VAE's latent channels x a 2x2 patch (128 for the released models).
        self.latent_channels = int(transformer_config.get("in_channels", 128))
        self.is_distilled = bool(read_json_object(self.model_dir / "model_index.json").get("is_distilled", False))
        self.max_references = self.defaults.get("max_references", MAX_REFERENCES[self.encoder_type])

    def _load_text_encoder(self):
        if self.encoder_type == "mistral3":
            return load_mistral3_encoder(self.model_dir, dtype=self.dtype, fp8=self.fp8)
        return load_text_encoder(self.model_dir, dtype=self.dtype, layers=FLUX2_KLEIN_HIDDEN_LAYERS, fp8=self.fp8)

    def _load_text_encoder_module(self):
        if self.encoder_type == "mistral3":
            processor_chat_template(self.model_dir / "tokenizer")
            return load_mistral3_module(self.model_dir, dtype=self.dtype, fp8=self.fp8)
        return load_qwen3_encoder(self.model_dir, dtype=self.dtype, layers=FLUX2_KLEIN_HIDDEN_LAYERS, fp8=self.fp8)

    def _load_transformer(self):
        return load_flux2_transformer(self.model_dir, self.dtype, fp8=self.fp8)

    def _load_vae(self):
        return load_flux2_vae(self.model_dir, dtype=self.dtype)

    def encode_prompts(self, text_encoder, prompts: list[str]) -> mx.array:
        if self.encoder_type == "mistral3":
            return text_encoder.encode_flux2_dev(prompts)
        return text_encoder.encode_flux2_klein(prompts)

    def uses_cfg(self, guidance: float) -> bool:
        """klein base: CFG above 1; klein distilled and dev (embedded guidance) never."""
        return guidance > 1 and not self.is_distilled and not self.guidance_embeds

    def encode_references(self, images: list[mx.array]) -> tuple[mx.array, np.ndarray]:
        """VAE-encoded, normalised, packed reference tokens (1, N, 128) and their ids, each at its own time."""
        with self.phases.phase("references"):
            vae = self.component("vae")
            tokens, ids = [], []
            for index, image in enumerate(images):
                latents = vae.encode_image(image.astype(self.dtype))
                tokens.append(pack_latents(latents))
                ids.append(grid_ids(latents.shape[2], latents.shape[3], REFERENCE_TIME_STEP * (index + 1)))
            tokens = self.tracker.eval(mx.concatenate(tokens, axis=1))
        return tokens, np.concatenate(ids)

    def denoise(self, latents: mx.array, text: mx.array, steps: int, guidance: float,
                references: tuple[mx.array, np.ndarray] | None = None, progress: bool = False, teacache=None,
                stepcache=None) -> mx.array:
        """latents (1, 128, h, w); text (1 or 2 with CFG [positive, negative], 512, D). `teacache` / `stepcache`:
        configs (see `resolve_caches`) or None; how many forwards ran goes to `self.cache_report`."""
        transformer = self.component("transformer")
        height, width = latents.shape[2], latents.shape[3]
        x = pack_latents(latents)
        n_image = x.shape[1]
        image_ids = grid_ids(height, width)
        if references is not None:
            image_ids = np.concatenate([image_ids, references[1]])
        rope = transformer.rope(image_ids, text_ids(text.shape[1]))  # positions are fixed: once per run
        cfg = self.uses_cfg(guidance)
        batch = text.shape[0]
        guidance_input = mx.full((batch,), guidance, dtype=mx.float32) if self.guidance_embeds else None

        mu = compute_empirical_mu(n_image, steps)
        sigmas = self.scheduler.sigmas(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        times = (self.scheduler.timesteps(sigmas) / np.float32(1000)).astype(np.float32)
        contexts = ("positive", "negative") if cfg else ("positive",)
        teacache, stepcache = self.start_caches(teacache, stepcache, steps)
        try:
            with self.phases.phase("denoise"):
                for i in tqdm(range(steps), disable=not progress, desc="denoise"):
                    tokens = x if references is None else mx.concatenate([x, references[0]], axis=1)
                    tokens = mx.broadcast_to(tokens, (batch, *tokens.shape[1:])).astype(self.dtype)
                    t = mx.full((batch,), times[i], dtype=mx.float32)
                    if stepcache is not None:
                        stepcache.begin(i)
                    # The cache holds the per-context predictions; guidance is combined after it, every step.
                    out = step_forward(teacache, i, times[i], contexts, lambda cache: transformer(
                        tokens, text, t, guidance=guidance_input, rope=rope, teacache=cache, stepcache=stepcache))
                    out = out[:, :n_image].astype(mx.float32)
                    if cfg:
                        out = out[1:] + guidance * (out[:1] - out[1:])
                    x = self.scheduler.step(out, x, sigmas[i], sigmas[i + 1])
                    self.evaluate_step(x, teacache, stepcache)
                    self.check_finite(x, i, steps)
        finally:
            self.finish_caches(steps, teacache, stepcache)
        return unpack_latents(x, height, width)

    @serialized
    def generate(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, negative_prompt: str | None = None, seed: int | None = None,
                 latents=None, image=None, progress: bool = False, teacache=None, stepcache=None):
        """One image for `prompt`, optionally edited from reference `image`s (one or a list: PIL images, paths or
        uint8 arrays). Without an explicit size, the first reference's (cropped) size is used, as diffusers does.
        `teacache` / `stepcache`: True (defaults), a dict of settings or a TeaCacheConfig / StepCacheConfig."""
        references = load_references(image, self.max_references, self.size_multiple) if image is not None else []
        if references and width is None and height is None:
            height, width = references[0].shape[1:3]
        width, height, steps, guidance = resolve_arguments(self.defaults, width, height, steps, guidance,
                                                           self.limits)
        cfg = self.uses_cfg(guidance)
        check_prompts(prompt, negative_prompt, cfg, self._no_cfg_reason(guidance))
        teacache, stepcache = self.resolve_caches(teacache, stepcache)
        self.check_memory(width, height, 2 if cfg else 1)
        if guidance > 1 and self.is_distilled:
            warnings.warn(f"guidance {guidance} is ignored: this model is step-distilled", stacklevel=2)
        shape = (1, self.latent_channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
        latents, seed = initial_noise(shape, seed, latents)

        self.phases.clear()
        text = self.encode([prompt, negative_prompt or ""] if cfg else [prompt])
        reference_tokens = self.encode_references(references) if references else None
        latents = self.denoise(latents, text, steps, guidance, reference_tokens, progress, teacache, stepcache)
        result = self.decode(latents)
        result.info["parameters"] = {
            "prompt": prompt, "negative_prompt": negative_prompt or "", "model": self.model_dir.name,
            "width": width, "height": height, "steps": steps, "guidance": guidance, "seed": seed,
            "references": len(references), **self.report_parameters(),
        }
        return result

    def _no_cfg_reason(self, guidance: float) -> str:
        if self.guidance_embeds:
            return "FLUX.2 [dev] embeds guidance instead"
        if self.is_distilled:
            return "this model is step-distilled"
        return f"guidance {guidance} <= 1"
