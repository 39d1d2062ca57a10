"""What every pipeline shares: components checked up front, loaded on first use and kept through a Tracker,
the text encoder released once the prompt is encoded, and per-phase time and memory."""

from pathlib import Path

import mlx.core as mx

from ..cache import StepCache, TeaCache, resolve_stepcache, resolve_teacache
from ..loading import component_dir, read_config
from ..quant import Quantization, fp8_execution, layer_policy
from ..quant.modules import quantize_module
from ..runtime import PhaseLog, Tracker, compute_dtype
from ..schedulers import FlowMatchEulerScheduler
from .inputs import to_image


class Pipeline:
    components = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    size_multiple = 16  # VAE downsampling x the transformer's 2x2 patches
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
        self.size_multiple = self.size_multiple_of(self.model_dir)
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

    @classmethod
    def size_multiple_of(cls, model_dir: Path | None) -> int:
        """What image sides must be a multiple of, for the model in `model_dir` (None: not downloaded yet)."""
        return cls.size_multiple

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
            decoded = self.component("vae").decode_latents(latents.astype(self.dtype), **vae_options)
            self.tracker.eval(decoded)
        return to_image(decoded)

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
        """The cache report for image.info["parameters"], with the denoising time it goes with."""
        seconds = round(self.phases.get("denoise").seconds, 3)
        return {**self.cache_report, "forwards": {**self.cache_report["forwards"], "denoise_seconds": seconds}}
