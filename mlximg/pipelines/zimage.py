"""Z-Image text-to-image: encode the prompts, release the encoder, denoise with flow-matching Euler, decode."""

import mlx.core as mx
import numpy as np

from ..loading import read_config
from ..models.autoencoder_kl import load_autoencoder
from ..models.qwen3_encoder import ZIMAGE_HIDDEN_LAYERS, load_qwen3_encoder, load_text_encoder
from ..models.zimage import load_zimage_transformer
from ..schedulers import calculate_shift
from .base import Pipeline, Run
from .denoise import Schedule
from .inputs import check_number

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


class ZImageDenoiser:
    """Z-Image's side of the loop: its time runs the other way (t = 1 - sigma), its output is the negated
    velocity, and guidance may switch off once t passes cfg_truncation, as diffusers does."""

    def __init__(self, transformer, positive: list[mx.array], negative: list[mx.array] | None, times: np.ndarray,
                 guidance: float, truncation: float, normalization: float, dtype: mx.Dtype):
        self.transformer, self.positive, self.negative = transformer, positive, negative
        self.times, self.guidance, self.truncation, self.normalization = times, guidance, truncation, normalization
        self.dtype = dtype
        self.conditionings = {}

    def scale(self, step: int) -> float:
        truncated = self.truncation <= 1 and self.times[step] > self.truncation
        return 0.0 if truncated else self.guidance

    def contexts(self, step: int) -> tuple[str, ...]:
        cfg = self.negative is not None and self.scale(step) > 0
        return ("positive", "negative") if cfg else ("positive",)

    def conditioning(self, cfg: bool, grid: tuple[int, int]):
        """Caption tokens, RoPE tables and masks: once per run (and batch: with or without the negatives)."""
        if cfg not in self.conditionings:
            captions = self.positive + self.negative if cfg else self.positive
            self.conditionings[cfg] = self.transformer.condition(captions, grid)
            mx.eval([value for value in vars(self.conditionings[cfg]).values() if value is not None])
        return self.conditionings[cfg]

    def pack(self, latents: mx.array) -> mx.array:
        return latents

    def unpack(self, x: mx.array) -> mx.array:
        return x

    def forward(self, x: mx.array, step: int, contexts: tuple[str, ...], runner) -> mx.array:
        cfg = len(contexts) == 2
        latents = mx.concatenate([x, x]) if cfg else x
        grid = (x.shape[2] // 2, x.shape[3] // 2)
        # diffusers' time stays float32 here: (1000 - t) / 1000 of the float32 timestep.
        t = mx.full((latents.shape[0],), self.times[step], dtype=mx.float32)
        return self.transformer(latents.astype(self.dtype), t,
                                conditioning=self.conditioning(cfg, grid), runner=runner)

    def velocity(self, out: mx.array, contexts: tuple[str, ...], step: int) -> mx.array:
        if len(contexts) == 2:
            batch = out.shape[0] // 2
            out = guided(out[:batch].astype(mx.float32), out[batch:].astype(mx.float32), self.scale(step),
                         self.normalization)
        return -out.astype(mx.float32)


class ZImagePipeline(Pipeline):
    family = "zimage"
    transformer_class = "ZImageTransformer2DModel"

    def _load_text_encoder(self):
        return load_text_encoder(self.text_encoder_dir, dtype=self.dtype, layers=ZIMAGE_HIDDEN_LAYERS, fp8=self.fp8)

    def _load_text_encoder_module(self):
        return load_qwen3_encoder(self.text_encoder_dir, dtype=self.dtype, layers=ZIMAGE_HIDDEN_LAYERS, fp8=self.fp8)

    def text_encoder_expected(self):
        return ("qwen3",), read_config(self.model_dir / "transformer").get("cap_feat_dim", 2560), 1

    def _load_transformer(self):
        return load_zimage_transformer(self.model_dir, self.dtype, fp8=self.transformer_fp8)

    def _load_vae(self):
        return load_autoencoder(self.model_dir, dtype=self.dtype)

    def encode_prompts(self, text_encoder, prompts: list[str]) -> list[mx.array]:
        return text_encoder.encode_zimage(prompts)

    def prepare_options(self, options: dict, width, height, init=None):
        """cfg_truncation (switch guidance off once t passes it; above 1: never), cfg_normalization (cap the
        guided prediction's norm at this x the positive's; True means 1), tiled_decode."""
        known = {"cfg_truncation", "cfg_normalization", "tiled_decode", "image"}
        if unknown := sorted(set(options) - known):
            raise TypeError(f"unexpected Z-Image options {unknown}")
        if options.get("image") is not None:
            raise ValueError("Z-Image text-to-image takes no reference image (FLUX.2 models do)")
        normalization = options.get("cfg_normalization")
        normalization = self.defaults.get("cfg_normalization", 0.0) if normalization is None else normalization
        # diffusers takes a bool: True caps at 1x the positive prediction's norm.
        normalization = check_number(float(normalization) if isinstance(normalization, bool) else normalization,
                                     "cfg_normalization")
        truncation = check_number(options.get("cfg_truncation", 1.0), "cfg_truncation")
        return {"cfg_truncation": truncation, "cfg_normalization": normalization,
                "tiled_decode": bool(options.get("tiled_decode", False))}, width, height

    def uses_cfg(self, guidance: float, options: dict) -> bool:
        return guidance > 0

    def no_cfg_reason(self, guidance: float) -> str:
        return "guidance is 0"

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        downsampling = self.size_multiple // 2
        channels = read_config(self.model_dir / "transformer").get("in_channels", 16)
        return batch, channels, height // downsampling, width // downsampling

    def schedule(self, run: Run) -> Schedule:
        height, width = run.latents.shape[2:]
        cfg = self.scheduler.config
        mu = calculate_shift((height // 2) * (width // 2), cfg.base_image_seq_len, cfg.max_image_seq_len,
                             cfg.base_shift, cfg.max_shift)
        sigmas = self.scheduler.sigmas(run.steps, sigmas=np.linspace(1.0, 1.0 / run.steps, run.steps), mu=mu)
        # The transformer's time runs the other way: t = 1 - sigma, from the scheduler's float32 timesteps.
        timesteps = self.scheduler.timesteps(sigmas)
        return Schedule(sigmas, (np.float32(1000) - timesteps) / np.float32(1000), timesteps)

    def denoiser(self, run: Run, schedule: Schedule) -> ZImageDenoiser:
        embeddings, index = self.encode(run.prompts + (run.negative_prompts or []))
        captions = [embeddings[i] for i in index]
        batch = len(run.prompts)
        negative = captions[batch:] if run.negative_prompts is not None else None
        return ZImageDenoiser(self.component("transformer"), captions[:batch], negative, schedule.times,
                              run.guidance, run.options["cfg_truncation"], run.options["cfg_normalization"],
                              self.dtype)

    def decode_options(self, run: Run) -> dict:
        return {"tiled": run.options["tiled_decode"], "tile_sample_size": DECODE_TILE}

    def family_parameters(self, run: Run) -> dict:
        return {"cfg_truncation": run.options["cfg_truncation"], "cfg_normalization": run.options["cfg_normalization"]}
