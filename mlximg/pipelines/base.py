"""What every pipeline shares: components checked up front, loaded on first use and kept through a Tracker,
the text encoder released once the prompt is encoded, and per-phase time and memory."""

import functools
import threading
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..cache import StepCache, TeaCache, resolve_stepcache, resolve_teacache
from ..loading import check_json_files, component_dir, read_config, read_json_object
from ..quant import Quantization, fp8_execution, layer_policy
from ..quant.modules import quantize_module
from ..runtime import PhaseLog, Tracker, compute_dtype
from ..schedulers import FlowMatchEulerScheduler
from .inputs import to_image
from .limits import check_memory, estimate_peak_memory, size_limits


class NonFiniteError(ValueError):
    """A run produced NaN or inf: reported with its likely cause instead of saving a black image."""


def serialized(method):
    """One call at a time per pipeline: a run loads, releases and caches components, which another run in a
    second thread must not see half done. Two pipelines run in parallel freely."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


def first_nonfinite_weight(module) -> str | None:
    """The name of the first floating-point weight of `module` holding NaN or inf, or None."""
    for name, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and not mx.isfinite(value).all().item():
            return name
    return None


class Pipeline:
    components = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    family = ""  # as manifests name it
    transformer_class = ""  # the diffusers class transformer/config.json must name
    quantize_modes = ("fp8",)
    quantized_components = ("transformer",)  # what quantize="fp8" quantizes right after loading

    def __init__(self, model_dir: Path, defaults: dict | None = None, dtype=None, keep_text_encoder: bool = False,
                 quantize: str | None = None, fp8: str | None = None, teacache_defaults: dict | None = None):
        """`quantize="fp8"`: quantize the transformer at load (per the FP8 policy); `fp8`: the FP8 execution path,
        "matmul" or "dequantize" (default: MLXIMG_FP8, else by backend); `teacache_defaults`: the manifest's
        "teacache" entry, what `generate(teacache=True)` uses."""
        self.model_dir = Path(model_dir)
        for name in self.components:  # fail now, not after minutes of work
            component_dir(self.model_dir, name)
        self.check_family()
        self.limits = size_limits(self.family, self.model_dir)
        self.size_multiple = self.limits.multiple
        self.defaults = defaults or {}
        self.dtype = compute_dtype(dtype)
        self.scheduler = FlowMatchEulerScheduler.from_pretrained(self.model_dir)
        self.keep_text_encoder = keep_text_encoder
        if quantize not in (None, *self.quantize_modes):
            raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(self.quantize_modes)}")
        self.quantize = quantize
        self.fp8 = fp8_execution(fp8)
        self.tracker = Tracker()
        self.phases = PhaseLog()
        self.loaded: dict[str, object] = {}
        self.teacache_defaults = teacache_defaults
        self.cache_report: dict = {}
        self.lock = threading.RLock()
        self.check_components()

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
        check_json_files(self.model_dir / "tokenizer")

    def _load_text_encoder_module(self):
        raise NotImplementedError

    def check_memory(self, width: int, height: int, batch: int, tiled_decode: bool = False) -> None:
        """Refuse a run whose lower-bound memory estimate exceeds this machine's memory, before any work."""
        estimate = estimate_peak_memory(self.family, self.model_dir, width, height, batch, self.dtype.size,
                                        tiled_decode)
        check_memory(estimate)

    def component(self, name: str):
        """The component `name`, loaded by `self._load_<name>()` on first use and kept under its name."""
        if name not in self.loaded:
            loaded = getattr(self, f"_load_{name}")()
            if self.quantize and name in self.quantized_components:
                self._quantize_loaded(name, loaded)
            # A text encoder wraps its MLX module (`.model`) with the tokenizer.
            self.tracker.keep(loaded.model if name == "text_encoder" else loaded, owner=name)
            self.loaded[name] = loaded
        return self.loaded[name]

    def _quantize_loaded(self, name: str, module) -> None:
        config = read_config(self.model_dir / name)
        if Quantization.from_config(config) is None:  # an FP8 checkpoint is already quantized
            quantize_module(module, layer_policy(name, config), self.fp8)

    def release(self, name: str) -> int:
        """Free a loaded component now (it reloads if used again); returns the bytes released."""
        del self.loaded[name]
        return self.tracker.release(name)

    def encode(self, prompts: list[str]):
        """Prompt embeddings, evaluated; the text encoder is released afterwards unless `keep_text_encoder`."""
        with self.phases.phase("encode"):
            embeddings = self.encode_prompts(self.component("text_encoder"), prompts)
            self.tracker.eval(embeddings)
            if not self.keep_text_encoder:
                self.release("text_encoder")
        return embeddings

    def encode_prompts(self, text_encoder, prompts: list[str]):
        raise NotImplementedError

    def decode(self, latents: mx.array, **vae_options):
        """Latents in the diffusion model's layout -> PIL image, in the "decode" phase; options go to the VAE."""
        with self.phases.phase("decode"):
            vae = self.component("vae")
            decoded = vae.decode_latents(latents.astype(self.dtype), **vae_options)
            self.tracker.eval(decoded)
        if not mx.isfinite(decoded).all().item():
            raise NonFiniteError("the VAE decoded NaN or inf from finite latents: " + self._weights_verdict("vae", vae))
        return to_image(decoded)

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

    def evaluate_step(self, latents: mx.array, *caches) -> mx.array:
        """End of a denoising step: evaluate, so each step's graph is freed before the next is built; cached
        arrays are evaluated with it, so that none of them holds on to the step's graph."""
        cached = [a for cache in caches if cache is not None for a in cache.arrays()]
        return self.tracker.eval(latents, *cached)[0] if cached else self.tracker.eval(latents)

    def resolve_caches(self, teacache, stepcache):
        """The generate() arguments as configs (None when off); bad values raise ValueError before any work."""
        return resolve_teacache(teacache, self.teacache_defaults), resolve_stepcache(stepcache)

    def start_caches(self, teacache, stepcache, steps: int):
        """Per-run cache state for the configs from `resolve_caches`, kept through this pipeline's tracker."""
        return (TeaCache(teacache, steps, self.tracker) if teacache is not None else None,
                StepCache(stepcache, self.tracker) if stepcache is not None else None)

    def finish_caches(self, steps: int, teacache: TeaCache | None, stepcache: StepCache | None) -> None:
        """Release the caches and record how many transformer forwards ran (`self.cache_report`)."""
        forwards = teacache.stats() if teacache is not None else {"computed": steps, "skipped": 0}
        report = {"forwards": forwards}
        for name, cache in (("teacache", teacache), ("stepcache", stepcache)):
            if cache is not None:
                report[name] = {**cache.config.describe(), **cache.stats()}
                cache.release()
        self.cache_report = report

    def report_parameters(self) -> dict:
        """The cache report for image.info["parameters"]: settings and counts only, no timings, so that the same
        settings give the same file."""
        return dict(self.cache_report)
