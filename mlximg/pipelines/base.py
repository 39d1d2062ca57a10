"""What every pipeline shares: components checked up front, loaded on first use and kept through a Tracker, the
text encoder released once the prompts are encoded, one run's settings validated before any work, the shared
denoising loop (denoise.py), per-image decoding and per-phase time and memory.

A family (zimage.py, flux2.py) supplies its loaders, what a run of it takes (`prepare_options`), how it encodes
a run's prompts (`condition`) and the Denoiser that drives its transformer.
"""

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from ..cache import check_caches, resolve_stepcache, resolve_teacache
from ..distributed.group import group_for
from ..distributed.tensor import shard_module
from ..cache.stepcache import StepCacheConfig
from ..cache.teacache import TeaCacheConfig
from ..loading import check_json_files, component_dir, read_config, read_json_object
from ..lora import Adapters, as_lora
from ..quant.format import named_quantization
from ..quant.options import QuantOptions
from ..runtime import PhaseLog, Tracker, compute_dtype
from ..schedulers import FlowMatchEulerScheduler
from .denoise import Denoiser, Schedule, StepState, denoise
from .init_image import InitImage, Inpaint, init_pixels, mask_pixels, nearest, noised, open_init_image, start_step, truncated
from .inputs import check_prompts, initial_noise, negative_batch, prompt_batch, resolve_arguments, seed_batch, to_image
from .limits import check_memory, estimate_peak_memory, machine_memory, size_limits


class NonFiniteError(ValueError):
    """A run produced NaN or inf: reported with its likely cause instead of saving a black image."""


TEXT_COMPONENTS = ("text_encoder", "tokenizer")
SHARDED = ("transformer", "text_encoder")  # what tensor parallelism splits; the VAE runs whole on every rank


def text_encoder_folder(model_dir: Path, text_encoder: str | Path | None) -> Path:
    """Where the text encoder and tokenizer come from: the model's own folder, or `text_encoder` (a manifest name,
    a diffusers-layout folder or a repo id holding text_encoder/ and tokenizer/; only those are downloaded)."""
    if text_encoder is None:
        return Path(model_dir)
    from ..loading import resolve_model
    from ..manifests import known_manifests

    manifest = known_manifests().get(str(text_encoder))
    if manifest is not None:
        return manifest.path or resolve_model(manifest.repo, TEXT_COMPONENTS, manifest.download_gb)
    return resolve_model(text_encoder, TEXT_COMPONENTS)


def text_width(config: dict) -> int | None:
    """A text encoder config's hidden size (Mistral3 keeps it in its text_config)."""
    return config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")


def first_nonfinite_weight(module) -> str | None:
    """The name of the first floating-point weight of `module` holding NaN or inf, or None."""
    for name, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and not mx.isfinite(value).all().item():
            return name
    return None


@dataclass
class Run:
    """One call's settings, validated: one prompt, negative prompt and seed per image."""

    prompts: list[str]
    negative_prompts: list[str] | None  # None: no classifier-free guidance
    seeds: list[int | None]  # None where the caller gave the latents
    width: int
    height: int
    steps: int
    guidance: float
    latents: mx.array  # the initial noise (B, C, h, w), float32
    teacache: TeaCacheConfig | None = None
    stepcache: StepCacheConfig | None = None
    options: dict = field(default_factory=dict)  # the family's own, validated
    several: bool = False  # the caller asked for a list of images
    progress: bool = False
    init: InitImage | None = None  # image to image / inpainting
    init_latents: mx.array | None = None  # the init image, VAE-encoded (1, C, h, w), once the run encodes it


class Pipeline:
    components = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    family = ""  # as manifests name it
    transformer_class = ""  # the diffusers class transformer/config.json must name
    mask_resampling = staticmethod(nearest)  # how the family's diffusers pipeline shrinks a mask to the latents

    def __init__(self, model_dir: Path, defaults: dict | None = None, dtype=None, keep_text_encoder: bool = False,
                 quantize: str | None = None, fp8: str | None = None, teacache_defaults: dict | None = None,
                 loras=None, text_encoder_quantize: str | None = None, text_encoder=None,
                 distributed: str | None = None):
        """`quantize`: quantize the transformer at load (per the policy) to "fp8" (= "mxfp8"), "mxfp4", "nvfp4",
        "affine4" or "affine8"; `text_encoder_quantize`: the same for the text encoder; `fp8`: how quantized
        weights run, "matmul", "dequantize" or "layerwise" (default: MLXIMG_FP8, else by backend);
        `teacache_defaults`: the manifest's
        "teacache" entry, what `generate(teacache=True)` uses; `loras`: adapters to apply (see `set_loras`);
        `text_encoder`: take the text encoder and tokenizer from another folder, repo id or model name (its
        architecture and width must be what the transformer takes); `distributed="tensor"`: under mlx.launch,
        hold only this rank's shard of the transformer and text encoder ("data": a whole model per rank, the
        images shared out by mlximg.distributed.data)."""
        self.model_dir = Path(model_dir)
        self.text_encoder_dir = text_encoder_folder(self.model_dir, text_encoder)
        for name in self.components:  # fail now, not after minutes of work
            component_dir(self.text_encoder_dir if name in TEXT_COMPONENTS else self.model_dir, name)
        if text_encoder is not None:
            self.check_text_encoder()
        self.check_family()
        self.limits = size_limits(self.family, self.model_dir)
        self.size_multiple = self.limits.multiple
        self.defaults = defaults or {}
        self.dtype = compute_dtype(dtype)
        self.scheduler = FlowMatchEulerScheduler.from_pretrained(self.model_dir)
        self.keep_text_encoder = keep_text_encoder
        self.fp8 = QuantOptions(quantize=named_quantization(text_encoder_quantize), execution=fp8)
        self.transformer_fp8 = QuantOptions(quantize=named_quantization(quantize), execution=fp8)
        self.tracker = Tracker()
        self.phases = PhaseLog()
        self.loaded: dict[str, object] = {}
        self.teacache_defaults = teacache_defaults
        # One run at a time: a run loads, releases and caches components, which a second thread must not see half
        # done. Two pipelines run side by side freely.
        self.lock = threading.RLock()
        self.check_components()
        self.adapters = Adapters(self.tracker)
        self.group = group_for(distributed)
        self.tensor_parallel = distributed == "tensor"
        if loras:
            self.set_loras(loras)

    # -- components ------------------------------------------------------------------------------------------

    def check_family(self) -> None:
        """model_index.json names this pipeline; the transformer must be the class it goes with."""
        found = read_config(self.model_dir / "transformer").get("_class_name", self.transformer_class)
        if found != self.transformer_class:
            pipeline = read_json_object(self.model_dir / "model_index.json").get("_class_name")
            raise ValueError(f"{self.model_dir}: model_index.json names {pipeline}, but transformer/config.json is "
                             f"a {found!r}, not the {self.transformer_class!r} that goes with it")

    def check_components(self) -> None:
        """Every component's config, and its weights' keys, shapes and dtypes from the safetensors headers, now:
        a broken VAE is reported at load, not after the whole denoise. The modules are built lazily, so no
        weight is read, and dropped."""
        self._load_transformer()
        self._load_vae()
        self._load_text_encoder_module()
        check_json_files(self.text_encoder_dir / "tokenizer")

    def check_text_encoder(self) -> None:
        """A text encoder from elsewhere must be one this transformer takes: its architecture, and a width whose
        stacked hidden states fill the transformer's text input."""
        folder = self.text_encoder_dir / "text_encoder"
        config = read_config(folder)
        architectures, features, stacked = self.text_encoder_expected()
        model_type, width = config.get("model_type"), text_width(config)
        if model_type not in architectures or width is None or width * stacked != features:
            raise ValueError(
                f"{folder}: a {model_type} text encoder of width {width}, but this {self.family} transformer takes "
                f"{' or '.join(architectures)} hidden states of {features // stacked} features"
                f"{f' ({stacked} layers stacked)' if stacked > 1 else ''}")

    def text_encoder_expected(self) -> tuple[tuple[str, ...], int, int]:
        """(architectures, the transformer's text features, how many hidden states are stacked into them)."""
        raise NotImplementedError

    def component(self, name: str):
        """The component `name`, loaded by `self._load_<name>()` on first use and kept under its name."""
        if name not in self.loaded:
            loaded = getattr(self, f"_load_{name}")()
            # A text encoder wraps its MLX module (`.model`) with the tokenizer.
            module = loaded.model if name == "text_encoder" else loaded
            if self.tensor_parallel and name in SHARDED:
                shard_module(module, self.group, str(self.model_dir / name))
            self.tracker.keep(module, owner=name)
            self.loaded[name] = loaded
        return self.loaded[name]

    def release(self, name: str) -> int:
        """Free a loaded component now (it reloads if used again); returns the bytes released."""
        del self.loaded[name]
        return self.tracker.release(name)

    def close(self) -> int:
        """Release everything this pipeline keeps (components, adapters, caches) now; returns the bytes. A closed
        pipeline is not used again (a server drops it and loads the model anew)."""
        with self.lock:
            self.loaded.clear()
            return sum(self.tracker.release(owner) for owner in list(self.tracker.owners()))

    def set_loras(self, loras) -> list[dict]:
        """Apply exactly these adapters to the transformer from now on: each a path (a .safetensors file, a folder
        or "owner/repo[/file.safetensors]"), a (path, scale) pair or a mlximg.LoRA; [] takes them all off. A
        file is read and checked against the model here, before any generation; changing only scales reloads
        nothing. Returns each adapter's name, scale and how many layers it touches."""
        with self.lock:
            specs = [as_lora(lora) for lora in loras]
            if specs and self.tensor_parallel:
                raise ValueError("LoRA adapters do not combine with tensor parallelism yet (distributed='tensor')")
            self.adapters.set(specs, self.component("transformer"), self.family, self.dtype)
            return self.adapters.report()

    # -- a run -----------------------------------------------------------------------------------------------

    def generate(self, prompt, *, callback: Callable[[int, int, mx.array], None] | None = None, **settings):
        """An image for `prompt`, or a list of images when asked for several (a list of prompts, `num_images`, or
        a list of seeds); each image's `info["parameters"]` records its settings and how many transformer
        forwards ran. `callback(step, steps, latents)` is called after each step with the latents (B, C, h, w)
        in diffusers' layout. The settings are those of `steps`."""
        with self.lock:
            self._take_loras(settings)
            run = self.prepare(prompt, **settings)
            final = None
            for final in self.run_steps(run):
                if callback is not None:
                    callback(final.step, final.steps, final.latents)
            images = [self.decode(final.latents[i:i + 1], **self.decode_options(run)) for i in range(len(run.prompts))]
            for i, image in enumerate(images):
                image.info["parameters"] = self.parameters(run, i, final.report)
            return images if run.several else images[0]

    def steps(self, prompt, **settings) -> Iterator[StepState]:
        """The denoising steps of a run, one StepState each (the latents after it, what the caches did), for a
        caller that shows, previews or stops them; `decode(state.latents)` makes images of them. Settings:
        width, height, steps, guidance, negative_prompt, seed (one, or one per image), latents, num_images,
        progress, teacache, stepcache, and the family's own. Iterate it in the thread that made it."""
        with self.lock:
            self._take_loras(settings)
            yield from self.run_steps(self.prepare(prompt, **settings))

    def _take_loras(self, settings: dict) -> None:
        """`loras=` in a call sets the adapters for it and the calls after it (as `set_loras`)."""
        if settings.get("loras") is not None:
            self.set_loras(settings.pop("loras"))
        settings.pop("loras", None)

    def prepare(self, prompt, *, width=None, height=None, steps=None, guidance=None, negative_prompt=None,
                seed=None, latents=None, num_images=None, progress: bool = False, teacache=None, stepcache=None,
                init_image=None, mask=None, strength=None, **options) -> Run:
        """Validate a call's settings (cheap: before any model work) into a Run. `init_image` (a PIL image, path
        or array) starts from that picture, `strength` in (0, 1] saying how much of the schedule runs (default
        0.6; 1.0 with a mask); `mask` (white = repaint) keeps the rest of it. Unset, the size is the init
        image's."""
        init = open_init_image(init_image, mask, strength)
        if init is not None:
            init, width, height = self.prepare_init(init, width, height)
        options, width, height = self.prepare_options(options, width, height, init)
        width, height, steps, guidance = resolve_arguments(self.defaults, width, height, steps, guidance,
                                                           self.limits)
        if init is not None:
            start_step(steps, init.strength)
        if isinstance(seed, (list, tuple)) and num_images is None and isinstance(prompt, str):
            num_images = len(seed)
        prompts = prompt_batch(prompt, num_images)
        cfg = self.uses_cfg(guidance, options)
        check_prompts(prompts[0], negative_prompt, cfg, self.no_cfg_reason(guidance))
        negatives = negative_batch(negative_prompt, prompt, num_images) if cfg else None
        seeds = seed_batch(seed, len(prompts))
        self.check_memory(width, height, len(prompts) * (2 if cfg else 1), options)
        teacache, stepcache = resolve_teacache(teacache, self.teacache_defaults), resolve_stepcache(stepcache)
        check_caches(teacache, stepcache)
        noise, seeds = initial_noise(self.latent_shape(len(prompts), width, height), seeds, latents)
        run = Run(prompts, negatives, seeds, width, height, steps, guidance, noise, teacache, stepcache, options,
                  several=not isinstance(prompt, str) or num_images is not None or isinstance(seed, (list, tuple)),
                  progress=progress, init=init)
        self.check_run(run)
        return run

    def run_steps(self, run: Run) -> Iterator[StepState]:
        """Encode, then the shared denoising loop with this family's Denoiser; from an init image, the schedule
        shortened by the strength, starting from the image noised to its first sigma."""
        self.phases.clear()
        schedule = self.schedule(run)
        if run.init is not None:
            schedule = truncated(schedule, run.init.strength)
            run.init_latents = self.encode_init(run)
        denoiser = self.denoiser(run, schedule)
        latents, inpaint = run.latents, None
        if run.init is not None:
            latents = noised(run.init_latents, run.latents, schedule.sigmas[0])
            if run.init.mask is not None:
                inpaint = Inpaint(denoiser.pack(run.init_latents), denoiser.pack(run.latents),
                                  denoiser.pack(self.mask_latents(run)))
        with self.phases.phase("denoise"):
            yield from denoise(denoiser, latents, schedule, self.scheduler, self.tracker,
                               teacache=run.teacache, stepcache=run.stepcache, check=self.check_finite,
                               progress=run.progress, inpaint=inpaint)

    def encode_init(self, run: Run) -> mx.array:
        """The init image in the transformer's latent space, (1, C, h, w) float32."""
        with self.phases.phase("init image"):
            pixels = init_pixels(run.init.image, run.width, run.height)
            latents = self.component("vae").encode_image(pixels.astype(self.dtype))
            return self.tracker.eval(latents.astype(mx.float32))

    def mask_latents(self, run: Run) -> mx.array:
        """The mask at the latents' size, (1, 1, h, w), 1 = repaint."""
        height, width = run.latents.shape[2:]
        mask = self.mask_resampling(mask_pixels(run.init.mask, run.width, run.height), height, width)
        return mx.array(mask)[None, None]

    def encode(self, prompts: list[str]):
        """Embeddings of each distinct prompt, evaluated, and for each of `prompts` the index of its embedding;
        the text encoder is released afterwards unless `keep_text_encoder`."""
        distinct = list(dict.fromkeys(prompts))
        with self.phases.phase("encode"):
            embeddings = self.encode_prompts(self.component("text_encoder"), distinct)
            self.tracker.eval(embeddings)
            if not self.keep_text_encoder:
                self.release("text_encoder")
        return embeddings, [distinct.index(p) for p in prompts]

    def decode(self, latents: mx.array, *, phase: str = "decode", **vae_options):
        """Latents (1, C, h, w) in diffusers' layout -> PIL image, in the phase `phase`; options go to the VAE."""
        with self.phases.phase(phase):
            vae = self.component("vae")
            decoded = vae.decode_latents(latents.astype(self.dtype), **vae_options)
            self.tracker.eval(decoded)
        if not mx.isfinite(decoded).all().item():
            raise NonFiniteError("the VAE decoded NaN or inf from finite latents: " + self._weights_verdict("vae", vae))
        return to_image(decoded)

    def check_memory(self, width: int, height: int, batch: int, options: dict) -> None:
        """Before any work: refuse a run whose lower-bound memory estimate exceeds this machine's memory, and warn
        when the memory planner's expected peak does (it may swap, or fail)."""
        tiled = bool(options.get("tiled_decode"))
        check_memory(estimate_peak_memory(self.family, self.model_dir, width, height, batch, self.dtype.size, tiled))
        available = machine_memory()
        if available is None or self.tensor_parallel:  # the planner counts one whole model
            return
        from ..planner import plan

        phases = plan(self.model_dir, self.family, width=width, height=height, num_images=batch,
                      quantize=self.transformer_fp8.quantize, text_encoder_quantize=self.fp8.quantize,
                      compute_bytes=self.dtype.size, tiled_decode=tiled, text_encoder_dir=self.text_encoder_dir,
                      layerwise=self.transformer_fp8.execution == "layerwise")
        peak = max(phases, key=lambda phase: phase.peak)
        if peak.peak > available:
            warnings.warn(f"the memory planner expects this run to peak at {peak.peak / 2**30:.1f} GiB ({peak.name}), "
                          f"more than this machine's {available / 2**30:.1f} GiB: it may swap or fail (mlximg plan "
                          "shows the phases; a smaller size, 4-bit weights or tiled decoding need less)")

    def check_finite(self, latents: mx.array, step: int, steps: int) -> None:
        """After each step: a non-finite latent ends the run at once, with its likely cause."""
        if not mx.isfinite(latents).all().item():
            verdict = self._weights_verdict("transformer", self.component("transformer"))
            raise NonFiniteError(f"denoising produced NaN or inf at step {step + 1} of {steps}: {verdict}")

    def _weights_verdict(self, name: str, module) -> str:
        bad = first_nonfinite_weight(module)
        if bad is not None:
            return f"{name} weight {bad} holds NaN or inf (a broken checkpoint: {self.model_dir / name})"
        return (f"the {name}'s weights are all finite, so look at the inputs and the schedule "
                f"({self.model_dir / 'scheduler' / 'scheduler_config.json'})")

    def parameters(self, run: Run, index: int, report: dict) -> dict:
        """Image `index`'s settings for its metadata: no timings, so that the same settings give the same file."""
        start = {} if run.init is None else {"strength": run.init.strength, "mask": run.init.mask is not None}
        return {"prompt": run.prompts[index],
                "negative_prompt": run.negative_prompts[index] if run.negative_prompts else "",
                "model": self.model_dir.name, "width": run.width, "height": run.height, "steps": run.steps,
                "guidance": run.guidance, "seed": run.seeds[index], **start, **self.family_parameters(run),
                **({"loras": self.adapters.report()} if self.adapters.active else {}), **report}

    # -- what a family supplies ------------------------------------------------------------------------------

    def prepare_init(self, init: InitImage, width, height) -> tuple[InitImage, int, int]:
        """The size from an init image where it is unset: its own, rounded down to the size multiple."""
        multiple = self.size_multiple
        width = width if width is not None else max(init.image.width // multiple * multiple, multiple)
        height = height if height is not None else max(init.image.height // multiple * multiple, multiple)
        return init, width, height

    def prepare_options(self, options: dict, width, height,
                        init: InitImage | None = None) -> tuple[dict, int | None, int | None]:
        """The family's own generate() options, validated; may pick the size (FLUX.2: from the references)."""
        raise NotImplementedError

    def check_run(self, run: Run) -> None:
        """Refuse combinations of settings the family cannot run (cheap: before any model work)."""

    def uses_cfg(self, guidance: float, options: dict) -> bool:
        raise NotImplementedError

    def no_cfg_reason(self, guidance: float) -> str:
        raise NotImplementedError

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        raise NotImplementedError

    def schedule(self, run: Run) -> Schedule:
        raise NotImplementedError

    def denoiser(self, run: Run, schedule: Schedule) -> Denoiser:
        """Encode the run's prompts (and whatever else conditions it) and return its Denoiser."""
        raise NotImplementedError

    def encode_prompts(self, text_encoder, prompts: list[str]):
        raise NotImplementedError

    def decode_options(self, run: Run) -> dict:
        return {}

    def family_parameters(self, run: Run) -> dict:
        return {}

    def _load_text_encoder_module(self):
        raise NotImplementedError
