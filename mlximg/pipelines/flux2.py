"""FLUX.2 text-to-image and multi-reference editing: [klein] (Qwen3, distilled or with CFG) and [dev] (Mistral3,
embedded guidance). Which one a folder holds is read from its configs, as diffusers' two pipelines encode it.

Latents are noise of shape (B, 128, H/16, W/16) (the VAE's 32 channels, 2x2-patchified), packed into tokens;
reference images are VAE-encoded the same way and appended to the image tokens at their own RoPE time offset.
"""

import math
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading import read_config, read_json_object
from ..models.flux2 import load_flux2_transformer
from ..models.flux2_kv import ReferenceKV
from ..models.flux2_vae import load_flux2_vae, pack_latents, unpack_latents
from ..models.mistral3_encoder import load_mistral3_encoder, load_mistral3_module, processor_chat_template
from ..models.qwen3_encoder import FLUX2_KLEIN_HIDDEN_LAYERS, load_qwen3_encoder, load_text_encoder
from ..schedulers import compute_empirical_mu
from .base import Pipeline, Run, text_encoder_folder
from .denoise import Schedule
from .init_image import InitImage, bilinear, resized
from .references import MAX_AREA, open_references, prepare_inpaint_references, prepare_reference

KV_PIPELINE = "Flux2KleinKVPipeline"
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


def step_distilled(model_index: dict) -> bool:
    """Whether a model_index.json is a step-distilled model's (no CFG): klein distilled, and the klein KV models
    (Flux2KleinKVPipeline, whose index does not say)."""
    return model_index.get("_class_name") == KV_PIPELINE or bool(model_index.get("is_distilled", False))


def scaled_to_area(image, area: int = MAX_AREA):
    """An image of more than `area` pixels scaled down to about that many (Lanczos), as diffusers' klein
    pipelines do before rounding its size."""
    width, height = image.size
    if width * height <= area:
        return image
    scale = math.sqrt(area / (width * height))
    return resized(image, int(width * scale), int(height * scale))


class Flux2Pipeline(Pipeline):
    family = "flux2"
    transformer_class = "Flux2Transformer2DModel"
    mask_resampling = staticmethod(bilinear)

    def __init__(self, model_dir, defaults: dict | None = None, dtype=None, keep_text_encoder: bool = False,
                 text_encoder=None, **options):
        if text_encoder is not None:  # resolved once here (a repo id may download); the base takes the folder
            text_encoder = text_encoder_folder(model_dir, text_encoder)
        own = read_config(Path(model_dir) / "text_encoder") if (Path(model_dir) / "text_encoder").is_dir() else {}
        # klein takes Qwen3, dev Mistral3: a text encoder from elsewhere keeps the model's own kind.
        self.encoder_type = own.get("model_type") or read_config(
            text_encoder_folder(model_dir, text_encoder) / "text_encoder").get("model_type")
        if self.encoder_type not in MAX_REFERENCES:
            raise ValueError(f"{model_dir}: FLUX.2 text encoder {self.encoder_type!r} is not supported "
                             f"(expected one of {sorted(MAX_REFERENCES)})")
        super().__init__(model_dir, defaults, dtype, keep_text_encoder, text_encoder=text_encoder, **options)
        transformer_config = read_config(self.model_dir / "transformer")
        self.guidance_embeds = bool(transformer_config.get("guidance_embeds", True))
        # Noise channels: the VAE's latent channels x a 2x2 patch (128 for the released models).
        self.latent_channels = int(transformer_config.get("in_channels", 128))
        index = read_json_object(self.model_dir / "model_index.json")
        # klein KV models (Flux2KleinKVPipeline) keep the references' keys and values.
        self.kv = index.get("_class_name") == KV_PIPELINE
        self.is_distilled = step_distilled(index)
        self.max_references = self.defaults.get("max_references", MAX_REFERENCES[self.encoder_type])

    def _load_text_encoder(self):
        if self.encoder_type == "mistral3":
            return load_mistral3_encoder(self.text_encoder_dir, dtype=self.dtype, fp8=self.fp8)
        return load_text_encoder(self.text_encoder_dir, dtype=self.dtype, layers=FLUX2_KLEIN_HIDDEN_LAYERS,
                                 fp8=self.fp8)

    def _load_text_encoder_module(self):
        if self.encoder_type == "mistral3":
            processor_chat_template(self.text_encoder_dir / "tokenizer")
            return load_mistral3_module(self.text_encoder_dir, dtype=self.dtype, fp8=self.fp8)
        return load_qwen3_encoder(self.text_encoder_dir, dtype=self.dtype, layers=FLUX2_KLEIN_HIDDEN_LAYERS,
                                  fp8=self.fp8)

    def text_encoder_expected(self):
        features = read_config(self.model_dir / "transformer").get("joint_attention_dim", 15360)
        return (self.encoder_type,), features, 3  # three hidden states stacked

    def _load_transformer(self):
        return load_flux2_transformer(self.model_dir, self.dtype, fp8=self.transformer_fp8)

    def _load_vae(self):
        return load_flux2_vae(self.model_dir, dtype=self.dtype)

    def encode_prompts(self, text_encoder, prompts: list[str]) -> mx.array:
        if self.encoder_type == "mistral3":
            return text_encoder.encode_flux2_dev(prompts)
        return text_encoder.encode_flux2_klein(prompts)

    def reference_tokens(self, run: Run) -> tuple[mx.array, np.ndarray] | None:
        """The conditioning images' packed tokens (1, N, 128) and ids, each image at its own time: the init image
        first where there is one (as klein inpainting conditions on it), then the references, VAE-encoded."""
        latents = [run.init_latents] if run.init is not None else []
        if run.options["references"]:
            with self.phases.phase("references"):
                vae = self.component("vae")
                latents += [vae.encode_image(image.astype(self.dtype)) for image in run.options["references"]]
                self.tracker.eval(latents)
        if not latents:
            return None
        ids = [grid_ids(*latent.shape[2:], REFERENCE_TIME_STEP * (i + 1)) for i, latent in enumerate(latents)]
        tokens = mx.concatenate([pack_latents(latent.astype(self.dtype)) for latent in latents], axis=1)
        return self.tracker.eval(tokens), np.concatenate(ids)

    def prepare_init(self, init: InitImage, width, height):
        """klein image to image and inpainting, as Flux2KleinInpaintPipeline: the init image scaled down to 1 Mpx,
        its size rounded down to a multiple of 16 where none is given."""
        if self.encoder_type != "qwen3" or self.kv:
            model = "FLUX.2 [dev]" if self.encoder_type != "qwen3" else "a klein KV model"
            raise ValueError(f"init_image / mask: {model} has no image-to-image or inpainting pipeline; edit with "
                             "image= references instead")
        init.image = scaled_to_area(init.image)
        return super().prepare_init(init, width, height)

    def prepare_options(self, options: dict, width, height, init: InitImage | None = None):
        """`image`: reference images to edit from (one or a list: PIL images, paths or arrays). Without an explicit
        size, the first reference's (cropped) size is used, as diffusers does. With an init image, the
        references are prepared as klein inpainting prepares them."""
        if unknown := sorted(set(options) - {"image"}):
            raise TypeError(f"unexpected FLUX.2 options {unknown}")
        image = options.get("image")
        opened = open_references(image, self.max_references) if image is not None else []
        if init is not None and opened:
            references = prepare_inpaint_references(opened, self.size_multiple)
        else:
            references = [prepare_reference(reference, self.size_multiple) for reference in opened]
        if references and width is None and height is None:
            height, width = references[0].shape[1:3]
        return {"references": references}, width, height

    def check_run(self, run: Run) -> None:
        if self.kv and run.options["references"] and (run.teacache or run.stepcache):
            raise ValueError("TeaCache and StepCache do not run with a klein KV model's references: the first step "
                             "runs the references, the others reuse their keys and values")

    def uses_cfg(self, guidance: float, options: dict | None = None) -> bool:
        """klein base: CFG above 1; klein distilled and dev (embedded guidance) never."""
        if guidance > 1 and self.is_distilled:
            warnings.warn(f"guidance {guidance} is ignored: this model is step-distilled", stacklevel=4)
        return guidance > 1 and not self.is_distilled and not self.guidance_embeds

    def no_cfg_reason(self, guidance: float) -> str:
        if self.guidance_embeds:
            return "FLUX.2 [dev] embeds guidance instead"
        if self.is_distilled:
            return "this model is step-distilled"
        return f"guidance {guidance} <= 1"

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        return batch, self.latent_channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN

    def schedule(self, run: Run) -> Schedule:
        height, width = run.latents.shape[2:]
        mu = compute_empirical_mu(height * width, run.steps)
        sigmas = self.scheduler.sigmas(run.steps, sigmas=np.linspace(1.0, 1.0 / run.steps, run.steps), mu=mu)
        timesteps = self.scheduler.timesteps(sigmas)
        return Schedule(sigmas, (timesteps / np.float32(1000)).astype(np.float32), timesteps)

    def denoiser(self, run: Run, schedule: Schedule) -> "Flux2Denoiser":
        embeddings, index = self.encode(run.prompts + (run.negative_prompts or []))
        text = embeddings[mx.array(index)] if index != list(range(len(embeddings))) else embeddings
        return Flux2Denoiser(self.component("transformer"), text, run.latents.shape, self.reference_tokens(run),
                             schedule.timesteps, run.guidance, run.negative_prompts is not None, self.guidance_embeds,
                             self.dtype, kv=self.kv)

    def family_parameters(self, run: Run) -> dict:
        return {"references": len(run.options["references"])}


class Flux2Denoiser:
    """FLUX.2's side of the loop: latents packed into tokens (reference tokens appended, sliced off again), the
    model gets sigma, its output is the velocity, and CFG (klein base) is neg + g (pos - neg). On a KV model the
    references run once, placed before the image tokens, and their keys and values serve the later steps."""

    def __init__(self, transformer, text: mx.array, shape: tuple[int, ...], references, timesteps: np.ndarray,
                 guidance: float, cfg: bool, guidance_embeds: bool, dtype: mx.Dtype, kv: bool = False):
        self.transformer, self.text, self.timesteps, self.dtype = transformer, text, timesteps, dtype
        self.height, self.width = shape[2:]
        self.references = None if references is None else references[0]
        self.guidance, self.cfg, self.guidance_embeds = guidance, cfg, guidance_embeds
        image_ids, txt_ids = grid_ids(self.height, self.width), text_ids(text.shape[1])
        # Positions are fixed: the RoPE tables are made once per run.
        self.kv = ReferenceKV(self.references.shape[1]) if kv and references is not None else None
        if self.kv is not None:
            self.rope_with_references = transformer.rope(np.concatenate([references[1], image_ids]), txt_ids)
        elif references is not None:
            image_ids = np.concatenate([image_ids, references[1]])
        self.rope = transformer.rope(image_ids, txt_ids)

    def tokens(self, x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """The transformer's image-stream tokens for latents `x`, and their RoPE tables."""
        if self.references is None or (self.kv is not None and not self.kv.extracting):
            return x, self.rope
        references = mx.broadcast_to(self.references, (x.shape[0], *self.references.shape[1:]))
        if self.kv is not None:
            return mx.concatenate([references, x], axis=1), self.rope_with_references
        return mx.concatenate([x, references], axis=1), self.rope

    def contexts(self, step: int) -> tuple[str, ...]:
        return ("positive", "negative") if self.cfg else ("positive",)

    def pack(self, latents: mx.array) -> mx.array:
        return pack_latents(latents)

    def unpack(self, x: mx.array) -> mx.array:
        return unpack_latents(x, self.height, self.width)

    def forward(self, x: mx.array, step: int, contexts: tuple[str, ...], runner) -> mx.array:
        extracting = self.kv is not None and self.kv.extracting
        tokens, rope = self.tokens(mx.concatenate([x, x]) if self.cfg else x)
        batch = tokens.shape[0]
        guidance = mx.full((batch,), self.guidance, dtype=mx.float32) if self.guidance_embeds else None
        # As diffusers rounds it: the timestep in the latents' dtype, divided by 1000 there (the model multiplies
        # by 1000 again in its dtype); sigma itself, rounded once, lands elsewhere in bfloat16 (764 for 768).
        t = mx.full((batch,), self.timesteps[step], dtype=mx.float32).astype(self.dtype) / 1000
        out = self.transformer(tokens.astype(self.dtype), self.text, t, guidance=guidance, rope=rope, runner=runner,
                               references=self.kv)
        if extracting:  # the kept keys and values must not hold on to the first step's graph
            mx.eval(out, self.kv.arrays())
        return out

    def velocity(self, out: mx.array, contexts: tuple[str, ...], step: int) -> mx.array:
        out = out[:, :self.height * self.width].astype(mx.float32)
        if self.cfg:
            batch = out.shape[0] // 2
            out = out[batch:] + self.guidance * (out[:batch] - out[batch:])
        return out
