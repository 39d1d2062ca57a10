"""The `mlximg` command line."""

import argparse
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .distributed import PeerLost
from .manifests import DEFAULT_MODEL
from .quant.execution import PATHS
from .quant.format import MODES, NAMES


def _info(args: argparse.Namespace) -> int:
    from .info import info

    for key, value in info().items():
        print(f"{key:<14}{value}")
    return 0


def output_paths(output: Path, seeds: list[int]) -> list[Path]:
    """Where each image goes: `output` for one image; for several, `output` with {seed} filled in, or the seed
    appended to its stem (out.png -> out-7.png)."""
    if "{seed}" in str(output):
        paths = [Path(str(output).replace("{seed}", str(seed))) for seed in seeds]
        if len(set(paths)) < len(paths):
            raise ValueError(f"output {output}: two images would get the same file name (repeated seeds)")
        return paths
    if len(seeds) == 1:
        return [output]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds {seeds} repeat: each image's file is named by its seed")
    return [output.with_name(f"{output.stem}-{seed}{output.suffix}") for seed in seeds]


def preview_writer(pipeline, folder: Path, seeds: list[int]):
    """A step callback that decodes every image at every step into `folder` (phase "preview")."""
    from .output import save_image

    def write(step: int, steps: int, latents) -> None:
        for index, seed in enumerate(seeds):
            image = pipeline.decode(latents[index:index + 1], phase="preview")
            name = f"step-{step:03d}.png" if len(seeds) == 1 else f"step-{step:03d}-{seed}.png"
            save_image(image, folder / name)

    return write


def _generate(args: argparse.Namespace) -> int:
    import secrets
    from dataclasses import replace

    from .api import check_arguments, load
    from .distributed import agree, group_for
    from .lora import parse_cli_lora
    from .lora.source import locate
    from .output import check_output_path, save_image
    from .pipelines.init_image import open_init_image

    start = time.perf_counter()
    group = group_for(args.distributed)
    writer = group is None or group.rank() == 0  # one rank writes the files and prints the summary
    # Seeds are fixed here, so that every file name is known and checked before any work; drawn on rank 0.
    seeds = args.seed or [secrets.randbits(32)]
    if group is not None and not args.seed:
        seeds = agree(seeds, group)
    count = args.num_images if args.num_images is not None else len(seeds)
    if len(seeds) == 1 and count > 1:
        seeds = [seeds[0] + i for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds given for --num-images {count}")
    check_arguments(args.model, width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                    seed=seeds)
    paths = output_paths(args.output, seeds)
    if writer:
        for path in paths:
            check_output_path(path)
    if args.stepwise is not None and writer:
        args.stepwise.mkdir(exist_ok=True)
        check_output_path(args.stepwise / "step-001.png")
    # Model-specific options go through only when given, so each pipeline sees the ones it has.
    options = {name: value for name, value in (
        ("cfg_truncation", args.cfg_truncation), ("cfg_normalization", args.cfg_normalization),
        ("tiled_decode", args.tiled_decode or None), ("image", args.image), ("init_image", args.init_image),
        ("mask", args.mask), ("strength", args.strength),
    ) if value is not None}
    open_init_image(args.init_image, args.mask, args.strength)  # a missing file or a bad mask, before any loading
    loras = [replace(parse_cli_lora(text), skip_text_encoder=args.lora_skip_text_encoder) for text in args.lora]
    for lora in loras:  # a missing file is named before anything loads
        locate(lora.path)
    pipeline = load(args.model, quantize=args.quantize, fp8=args.fp8, loras=loras,
                    text_encoder_quantize=args.text_encoder_quantize, text_encoder=args.text_encoder_model,
                    distributed="tensor" if args.distributed == "tensor" else None)
    for adapter in pipeline.adapters.report():
        print(f"lora {adapter['name']}: scale {adapter['scale']:g}, {adapter['layers']} layers")
    previews = preview_writer(pipeline, args.stepwise, seeds) if args.stepwise is not None and writer else None
    settings = dict(width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                    negative_prompt=args.negative_prompt, progress=writer, **_cache_options(args), **options)
    images = _run(pipeline, args, group, seeds, previews, settings)
    if group is not None:
        print(f"rank {group.rank()} of {group.size()}: kept weights {pipeline.tracker.nbytes() / 2**20:.2f} MiB "
              f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in pipeline.tracker.owners().items())})", flush=True)
    if not writer:
        return 0
    for image, path in zip(images, paths):
        save_image(image, path)
    print(pipeline.phases.table())
    print(forwards_line(images[0].info["parameters"]))
    names = ", ".join(str(path) for path in paths)
    print(f"wrote {names} in {time.perf_counter() - start:.1f} s (seed{'s' * (len(seeds) > 1)} "
          f"{', '.join(map(str, seeds))})")
    return 0


def _run(pipeline, args: argparse.Namespace, group, seeds: list[int], previews, settings: dict) -> list:
    """The images, made by this process alone, by every rank together (tensor) or shared out (data); a lost
    peer becomes one clear error, and a silent one ends the run after --peer-timeout."""
    if group is None:
        return pipeline.generate(args.prompt, seed=seeds, callback=previews, **settings)
    from .distributed import peer_lost
    from .distributed.data import generate_shared
    from .distributed.watchdog import Watchdog

    with Watchdog(args.peer_timeout, group.rank()) as watchdog:
        def callback(step, steps, latents):
            watchdog.tick()
            if previews is not None:
                previews(step, steps, latents)

        try:
            if args.distributed == "data":
                return generate_shared(pipeline, args.prompt, seeds, group, callback=callback, **settings)
            return pipeline.generate(args.prompt, seed=seeds, callback=callback, **settings)
        except RuntimeError as error:
            raise peer_lost(error, group.rank()) or error from None


def _cache_options(args: argparse.Namespace) -> dict:
    """--teacache-threshold implies --teacache, --stepcache-interval implies --stepcache."""
    teacache = {"threshold": args.teacache_threshold} if args.teacache_threshold is not None else args.teacache
    stepcache = {"interval": args.stepcache_interval} if args.stepcache_interval is not None else args.stepcache
    return {"teacache": teacache or None, "stepcache": stepcache or None}


def forwards_line(parameters: dict) -> str:
    """How many transformer forwards ran, and what each cache did, for under the phase table."""
    forwards = parameters["forwards"]
    line = f"forwards: {forwards['computed']} computed, {forwards['skipped']} skipped"
    if "teacache" in parameters:
        tea = parameters["teacache"]
        line += f" (teacache {tea['mode']}, threshold {tea['threshold']})"
    if "stepcache" in parameters:
        step = parameters["stepcache"]
        line += (f"; stepcache interval {step['interval']}: {step['blocks_computed']} blocks computed, "
                 f"{step['blocks_skipped']} reused")
    return line


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="text to image")
    p.add_argument("prompt")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="a model name (models/*.json), a local diffusers folder or a Hugging Face repo id")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, nargs="+",
                   help="one seed (several images get seed, seed + 1, ...), or one per image")
    p.add_argument("--num-images", type=int, help="how many images, as one batch (files named by seed)")
    p.add_argument("--init-image", type=Path, help="start from this picture (image to image; with --mask, inpainting)")
    p.add_argument("--strength", type=float,
                   help="how much of the schedule runs from --init-image, in (0, 1] (default 0.6; 1.0 with --mask)")
    p.add_argument("--mask", type=Path, help="with --init-image: repaint where this mask is white, keep the rest")
    p.add_argument("--image", action="append", type=Path,
                   help="a reference image to edit from (FLUX.2; repeat for several)")
    p.add_argument("--cfg-truncation", type=float, help="Z-Image: switch guidance off once t exceeds this")
    p.add_argument("--cfg-normalization", type=float, help="Z-Image: cap |guided| at this x |positive| (0: off)")
    p.add_argument("--tiled-decode", action="store_true",
                   help="Z-Image: decode in overlapping tiles: lower peak memory, slightly different pixels")
    p.add_argument("--teacache", action="store_true",
                   help="skip transformer forwards whose input barely changed (the model manifest's settings)")
    p.add_argument("--teacache-threshold", type=float,
                   help="TeaCache threshold (higher: more skips); implies --teacache")
    p.add_argument("--stepcache", action="store_true",
                   help="reuse the middle blocks' residual between refresh steps (DeepCache-style)")
    p.add_argument("--stepcache-interval", type=int, help="StepCache refresh interval in steps; implies --stepcache")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA / LoKr adapter: a .safetensors file, a folder or owner/repo[/file]; repeat for several")
    p.add_argument("--lora-skip-text-encoder", action="store_true",
                   help="apply LoRA files that also adapt the text encoder, without those tensors")
    p.add_argument("--quantize", choices=list(NAMES), help="quantize the transformer at load (fp8 = mxfp8)")
    p.add_argument("--text-encoder", choices=list(NAMES), dest="text_encoder_quantize", metavar="MODE",
                   help=f"quantize the text encoder at load ({', '.join(NAMES)})")
    p.add_argument("--text-encoder-model", metavar="MODEL",
                   help="take the text encoder and tokenizer from this folder, repo id or model name")
    p.add_argument("--fp8", choices=list(PATHS),
                   help="how quantized weights run (default: MLXIMG_FP8, else matmul on GPU, dequantize on CPU; "
                        "layerwise: kept quantized, dequantized per layer)")
    p.add_argument("--output", "-o", type=Path, default=Path("out.png"),
                   help="the image file: .png, .jpg or .webp (default out.png); several images: out-SEED.png, or "
                        "a {seed} in the name")
    p.add_argument("--stepwise", type=Path, metavar="DIR",
                   help="write a decoded preview of every step into DIR (step-001.png, ...)")
    p.add_argument("--distributed", choices=["tensor", "data"],
                   help="under mlx.launch: tensor (each rank holds a 1/N shard of the transformer and text "
                        "encoder) or data (each rank a whole model and its share of the images); rank 0 writes")
    p.add_argument("--peer-timeout", type=float, default=600,
                   help="with --distributed: stop when no step finishes in this many seconds (default 600)")
    p.set_defaults(run=_generate)


def _quantize(args: argparse.Namespace) -> int:
    from .quant.convert import convert

    from .quant.format import Quantization

    convert(args.src, args.dst, force=args.force, quantization=Quantization.of(args.mode, args.bits),
            text_encoder=True if args.text_encoder == "same" else args.text_encoder or False)
    return 0


def _add_quantize(commands) -> None:
    p = commands.add_parser("quantize", help="convert a model (name, diffusers folder or repo id) to FP8 (mxfp8), "
                                             "4 or 8 bits")
    p.add_argument("src", help="a model name (models/*.json), a local diffusers folder or a Hugging Face repo id "
                               "(never modified)")
    p.add_argument("dst", type=Path, help="the output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing DST that is an earlier model folder or empty (only after success)")
    p.add_argument("--mode", choices=list(MODES), default="mxfp8", help="the transformer's weight mode")
    p.add_argument("--bits", type=int, help="affine: 4 or 8 (default 4); the other modes have their own")
    p.add_argument("--text-encoder", nargs="?", const="same", choices=["same", *NAMES], metavar="MODE",
                   help="quantize the text encoder's decoder layers too: in the transformer's mode, or in MODE "
                        f"({', '.join(NAMES)})")
    p.set_defaults(run=_quantize)


def _plan(args: argparse.Namespace) -> int:
    from .loading import component_dir
    from .manifests import FAMILY_DEFAULTS, resolve
    from .planner import plan, table, uses_cfg

    manifest = resolve(args.model)
    folder = manifest.path or _cached_snapshot(manifest.repo, args.model)
    for name in ("transformer", "text_encoder", "vae"):
        component_dir(folder, name)
    defaults = manifest.defaults or FAMILY_DEFAULTS[manifest.family]
    width, height = (defaults.get("width", 1024), defaults.get("height", 1024)) if args.size is None else args.size
    guidance = defaults.get("guidance", 0.0) if args.guidance is None else args.guidance
    phases = plan(folder, manifest.family, width=width, height=height, num_images=args.num_images,
                  cfg=uses_cfg(folder, manifest.family, guidance),
                  quantize=args.quantize, text_encoder_quantize=args.text_encoder,
                  compute_bytes=4 if args.dtype == "float32" else 2, tiled_decode=args.tiled_decode,
                  layerwise=args.layerwise)
    print(f"{args.model}: {width}x{height}, {args.num_images} image(s), {args.dtype}"
          f"{', transformer ' + args.quantize if args.quantize else ''}"
          f"{', text encoder ' + args.text_encoder if args.text_encoder else ''}")
    print(table(phases))
    return 0


def _cached_snapshot(repo_id: str, model: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        raise FileNotFoundError(f"{model}: not downloaded; the plan reads the model's configs and safetensors "
                                "headers, so it needs a local copy (or a folder path)") from None


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None


def _add_plan(commands) -> None:
    p = commands.add_parser("plan", help="will it fit: per-phase weights, activations and peak memory of a run")
    p.add_argument("model", help="a model name (downloaded), a local diffusers folder or a repo id in the cache")
    p.add_argument("--quantize", choices=list(NAMES), help="the transformer's weight mode")
    p.add_argument("--text-encoder", choices=list(NAMES), metavar="MODE", help="the text encoder's weight mode")
    p.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--guidance", type=float, help="default: the model's (CFG doubles the transformer's batch)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="the compute dtype (bfloat16 on a Mac, float32 on the CPU)")
    p.add_argument("--tiled-decode", action="store_true")
    p.add_argument("--layerwise", action="store_true",
                   help="quantized weights dequantized layer by layer (--fp8 layerwise, the CPU's low-memory path)")
    p.set_defaults(run=_plan)


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .server import serve
        from .server.app import ServerSettings
    except ImportError as error:
        raise ValueError(f"mlximg serve needs FastAPI and uvicorn ({error.name} is missing): "
                         "pip install 'mlximg[serve]'") from None
    from .api import check_arguments
    from .pipelines.limits import machine_memory

    for model in args.model:  # a typo is named now, not on the first request
        check_arguments(model)
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise FileNotFoundError(f"--lora-dir {args.lora_dir} is not a folder")
    budget = args.memory_budget * 2**30 if args.memory_budget else int((machine_memory() or 16 * 2**30) * 0.6)
    load_options = {key: value for key, value in (("quantize", args.quantize), ("fp8", args.fp8),
                                                  ("text_encoder_quantize", args.text_encoder_quantize)) if value}
    settings = ServerSettings(
        models=args.model, api_key=args.api_key or os.environ.get("MLXIMG_API_KEY") or None,
        max_queue=args.max_queue, memory_budget=budget, timeout=args.timeout or None,
        max_body=int(args.max_body_mb * 2**20), url_ttl=args.url_ttl, lora_dir=args.lora_dir,
        load_options=load_options)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"listening on {args.host} without an API key: anyone who reaches it can generate "
                      "(set --api-key or MLXIMG_API_KEY)")
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="an OpenAI-compatible image server that keeps models loaded")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", "-m", action="append", default=[],
                   help="load this model at start (repeat for several; the first is the default); every model "
                        "name (models/*.json) is served, loading on its first request")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: MLXIMG_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this are answered 429")
    p.add_argument("--memory-budget", type=float, metavar="GB",
                   help="model weights kept loaded; least recently used models close beyond it (default: 60%% "
                        "of the machine's memory)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a request may take, queue included (0: none)")
    p.add_argument("--max-body-mb", type=float, default=64, help="larger request bodies are answered 413")
    p.add_argument("--url-ttl", type=float, default=3600, help="seconds images answered as url stay available")
    p.add_argument("--lora-dir", type=Path, help="a folder of LoRA files that requests may name in 'loras'")
    p.add_argument("--quantize", choices=list(NAMES), help="quantize every transformer at load")
    p.add_argument("--text-encoder", choices=list(NAMES), dest="text_encoder_quantize", metavar="MODE",
                   help="quantize every text encoder at load")
    p.add_argument("--fp8", choices=list(PATHS), help="how quantized weights run")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlximg", description="Diffusion-transformer image generation on MLX.")
    parser.add_argument("--version", action="version", version=f"mlximg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backend, device, dtype policy, BLAS and versions").set_defaults(run=_info)
    _add_generate(commands)
    _add_quantize(commands)
    _add_plan(commands)
    _add_serve(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mlximg: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a narrow terminal encoding must not fail a finished run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, PeerLost) as error:  # FileNotFoundError, FileExistsError, a full disk, ...
        parser.exit(2, f"mlximg: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "mlximg: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
