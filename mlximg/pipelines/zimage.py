"""Z-Image text-to-image: encode the prompt, release the encoder, denoise with flow-matching Euler, decode."""

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..cache import step_forward
from ..loading import read_config
from ..models.autoencoder_kl import load_autoencoder
from ..models.qwen3_encoder import ZIMAGE_HIDDEN_LAYERS, load_qwen3_encoder, load_text_encoder
from ..models.zimage import load_zimage_transformer
from ..schedulers import calculate_shift
from .base import Pipeline, serialized
from .inputs import check_number, check_prompts, initial_noise, resolve_arguments

# Tiled decode: 512-px tiles cut a 1024x1024 decode's peak from 6.1 to 1.7 GiB (docs/MEASUREMENTS.md).
DECODE_TILE = 512


def guided(pos: mx.array, neg: mx.array, scale: float, normalization: float) -> mx.array:
    """CFG, pos + s (pos - neg); with normalization > 0, each sample's norm is capped at normalization x |pos|."""
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        axes = tuple(range(1, pred.ndim))
        pos_norm = mx.sqrt(mx.sum(pos * pos, axis=axes, keepdims=True))
        pred_norm = mx.sqrt(mx.sum(pred * pred, axis=axes, keepdims=True))
        limit = pos_norm * normalization
        pred = mx.where(pred_norm > limit, pred * (limit / pred_norm), pred)
    return pred


class ZImagePipeline(Pipeline):
    family = "zimage"
    transformer_class = "ZImageTransformer2DModel"

    def _load_text_encoder(self):
        return load_text_encoder(self.model_dir, dtype=self.dtype, layers=ZIMAGE_HIDDEN_LAYERS, fp8=self.fp8)

    def _load_text_encoder_module(self):
        return load_qwen3_encoder(self.model_dir, dtype=self.dtype, layers=ZIMAGE_HIDDEN_LAYERS, fp8=self.fp8)

    def _load_transformer(self):
        return load_zimage_transformer(self.model_dir, self.dtype, fp8=self.fp8)

    def _load_vae(self):
        return load_autoencoder(self.model_dir, dtype=self.dtype)

    def encode_prompts(self, text_encoder, prompts: list[str]) -> list[mx.array]:
        return text_encoder.encode_zimage(prompts)

    def denoise(self, latents: mx.array, positive: list[mx.array], negative: list[mx.array], steps: int,
                guidance: float, cfg_truncation: float = 1.0, cfg_normalization: float = 0.0,
                progress: bool = False, teacache=None, stepcache=None) -> mx.array:
        """`teacache` / `stepcache`: configs (see `resolve_caches`) or None; how many forwards ran goes to
        `self.cache_report`."""
        transformer = self.component("transformer")
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
        sigmas = self.scheduler.sigmas(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        # The transformer's time runs the other way: t = 1 - sigma, from the scheduler's float32 timesteps.
        times = (np.float32(1000) - self.scheduler.timesteps(sigmas)) / np.float32(1000)
        batch = latents.shape[0]
        conditionings = {}

        def conditioning(cfg: bool):
            """Caption tokens, RoPE tables and masks: once per run (and batch: with or without the negative)."""
            if cfg not in conditionings:
                grid = (latents.shape[2] // 2, latents.shape[3] // 2)
                conditionings[cfg] = transformer.condition(positive + negative if cfg else positive, grid)
                mx.eval([value for value in vars(conditionings[cfg]).values() if value is not None])
            return conditionings[cfg]

        teacache, stepcache = self.start_caches(teacache, stepcache, steps)
        try:
            with self.phases.phase("denoise"):
                for i in tqdm(range(steps), disable=not progress, desc="denoise"):
                    # cfg_truncation switches guidance off once t passes it, as diffusers does.
                    scale = guidance if (cfg_truncation > 1 or times[i] <= cfg_truncation) else 0.0
                    t = mx.full((batch,), times[i], dtype=mx.float32)
                    if stepcache is not None:
                        stepcache.begin(i)
                    if guidance > 0 and scale > 0:
                        # The cache holds positive and negative predictions; guidance is applied after it.
                        out = step_forward(teacache, i, times[i], ("positive", "negative"), lambda cache: transformer(
                            mx.concatenate([latents, latents]).astype(self.dtype), mx.concatenate([t, t]),
                            conditioning=conditioning(True), teacache=cache, stepcache=stepcache))
                        pred = guided(out[:batch].astype(mx.float32), out[batch:].astype(mx.float32), scale,
                                      cfg_normalization)
                    else:
                        pred = step_forward(teacache, i, times[i], ("positive",), lambda cache: transformer(
                            latents.astype(self.dtype), t, conditioning=conditioning(False), teacache=cache,
                            stepcache=stepcache))
                        pred = pred.astype(mx.float32)
                    latents = self.scheduler.step(-pred, latents, sigmas[i], sigmas[i + 1])
                    self.evaluate_step(latents, teacache, stepcache)
                    self.check_finite(latents, i, steps)
        finally:
            self.finish_caches(steps, teacache, stepcache)
        return latents

    @serialized
    def generate(self, prompt: str, *, width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, negative_prompt: str | None = None, seed: int | None = None,
                 latents=None, cfg_truncation: float = 1.0, cfg_normalization: float | bool | None = None,
                 tiled_decode: bool = False, image=None, progress: bool = False, teacache=None, stepcache=None):
        """One image for `prompt`; returns a PIL image whose `info["parameters"]` records the settings used and
        how many transformer forwards ran. `teacache` / `stepcache`: True (defaults), a dict of settings or a
        TeaCacheConfig / StepCacheConfig."""
        if image is not None:
            raise ValueError("Z-Image text-to-image takes no reference image (FLUX.2 models do)")
        width, height, steps, guidance = resolve_arguments(self.defaults, width, height, steps, guidance,
                                                           self.limits)
        normalization = cfg_normalization if cfg_normalization is not None else self.defaults.get(
            "cfg_normalization", 0.0)
        # diffusers takes a bool: True caps at 1x the positive prediction's norm.
        normalization = check_number(float(normalization) if isinstance(normalization, bool) else normalization,
                                     "cfg_normalization")
        cfg_truncation = check_number(cfg_truncation, "cfg_truncation")
        use_cfg = guidance > 0
        check_prompts(prompt, negative_prompt, use_cfg, "guidance is 0")
        teacache, stepcache = self.resolve_caches(teacache, stepcache)
        self.check_memory(width, height, 2 if use_cfg else 1, tiled_decode)
        downsampling = self.size_multiple // 2
        channels = read_config(self.model_dir / "transformer").get("in_channels", 16)
        shape = (1, channels, height // downsampling, width // downsampling)
        latents, seed = initial_noise(shape, seed, latents)

        self.phases.clear()
        embeddings = self.encode([prompt, negative_prompt or ""] if use_cfg else [prompt])
        positive, negative = embeddings[:1], embeddings[1:]
        latents = self.denoise(latents, positive, negative, steps, guidance, cfg_truncation, normalization, progress,
                               teacache, stepcache)
        image = self.decode(latents, tiled=tiled_decode, tile_sample_size=DECODE_TILE)
        image.info["parameters"] = {
            "prompt": prompt, "negative_prompt": negative_prompt or "", "model": self.model_dir.name,
            "width": width, "height": height, "steps": steps, "guidance": guidance, "seed": seed,
            "cfg_truncation": cfg_truncation, "cfg_normalization": normalization, **self.report_parameters(),
        }
        return image
