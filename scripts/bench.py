"""Side-by-side pipeline benchmark: mlximg (MLX) against diffusers (PyTorch), same models, same machine, as ratios.

Real weights cannot be downloaded here, so each family gets a random-weight "mid" model of the real architecture,
built once with diffusers / transformers `save_pretrained` under --cache (random_models.py):

    Z-Image  transformer dim 768 (6 heads of 128), 10 layers + 2 noise / 2 context refiners, ~100M parameters
    klein    transformer 768 wide (6 heads of 128), 2 double-stream + 8 single-stream blocks, ~100M parameters
    text     Qwen3 with the real 151k-token tokenizer: hidden 512, MLP 1536, 8 heads (4 KV) of 64;
             8 layers for Z-Image, 28 for klein (which takes hidden states 9, 18 and 27)
    VAE      the real classes at 1/8 of the real width: block_out_channels (16, 32, 64, 64), layers_per_block 2,
             norm_num_groups 8; AutoencoderKL with the FLUX.1 config for Z-Image, AutoencoderKLFlux2 for klein
             (--real-vae: the real widths; the narrow VAE's 16-32-channel convolutions at full resolution are
             where MLX's CPU convolution is weakest, so its decode ratio says little about the real VAE's)

Both engines run the distilled recipes (Z-Image without CFG, klein step-distilled), in float32 on the CPU, from
the same initial latents, each in its own child process so that its peak memory is its own. Each child runs a
one-step warm-up generation, then --reps timed ones; phases are medians over the reps. Both keep every component
loaded (mlximg with keep_text_encoder), so "encode" times encoding, not loading, on both sides. "step GFLOP/s" is
the transformer's matmul FLOPs per step (analytic, attention included) over the step time, also as a share of that
engine's own float32 matmul speed.

    python scripts/bench.py                            # both families, 512 and 1024, the default steps and reps
    python scripts/bench.py --families zimage --sizes 512 --steps 2 --json /tmp/bench.json
    python scripts/bench.py --quick                    # tiny models at 64x64, one rep: a smoke test
    python scripts/bench.py --sizes 512 --steps 1 --reps 1 --real-vae   # decode with the real-width VAEs
    python scripts/bench.py --steps 1 --reps 1 --threads 1   # ~8.5 minutes on a busy 2-core CPU

--threads sets torch's and OpenBLAS's thread count alike: on a shared machine, torch with more OpenMP threads than
free cores stalls at every parallel region (65x slower on the quick models here), which says nothing about diffusers.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from random_models import BUILDERS, GUIDANCE

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
PHASES = ("encode", "denoise", "decode")
MATMUL = 2048  # side of the square float32 matmul that gives each engine's reference speed
ENCODER = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
MID_VAE = dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
MID = {
    "zimage": dict(transformer=dict(dim=768, n_layers=10, n_refiner_layers=2, n_heads=6, n_kv_heads=6),
                   text_encoder=dict(ENCODER, num_hidden_layers=8), vae=MID_VAE),
    "klein": dict(transformer=dict(num_layers=2, num_single_layers=8, num_attention_heads=6),
                  text_encoder=dict(ENCODER, num_hidden_layers=28), vae=MID_VAE),
}
TINY_ENCODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
QUICK = {
    "zimage": dict(transformer=dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                    axes_dims=[8, 12, 12]),
                   text_encoder=dict(TINY_ENCODER, num_hidden_layers=2), vae=TINY_VAE),
    "klein": dict(transformer=dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                                   timestep_guidance_channels=64, axes_dims_rope=[8, 8, 8, 8]),
                  text_encoder=dict(TINY_ENCODER, num_hidden_layers=28), vae=TINY_VAE),
}
TITLES = {"zimage": "Z-Image", "klein": "FLUX.2 klein"}


def model_folder(cache: Path, family: str, config: dict) -> Path:
    """The cached random model for `config`, built if missing; the name hashes the config so an edit rebuilds."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    folder = cache / f"{family}-{digest}"
    if not (folder / "model_index.json").exists():
        BUILDERS[family](folder, **config)
    return folder


def denoise_seconds(pipeline, prompt: str, **settings) -> float:
    """mlximg's denoising seconds of one run of `pipeline.steps` (iterated, not decoded: the VAE is not what the
    scripts built on this compare)."""
    for _ in pipeline.steps(prompt, seed=0, **settings):
        pass
    return pipeline.phases.get("denoise").seconds


def step_seconds(pipeline, size: int, steps: int) -> float:
    """Per step, for a square text-to-image run without guidance."""
    return denoise_seconds(pipeline, "a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                           guidance=0.0) / steps


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (Linux clear_refs) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def initial_latents(family: str, folder: Path, size: int) -> np.ndarray:
    """The same noise for both engines: Z-Image latents are (1, 16, H/8, W/8), klein's 2x2-patchified
    (1, 128, H/16, W/16); the channels are the transformer's input channels."""
    channels = read_config(folder / "transformer")["in_channels"]
    side = size // (8 if family == "zimage" else 16)
    return np.random.default_rng(0).standard_normal((1, channels, side, side)).astype(np.float32)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(generate, steps: int, reps: int, matmul) -> dict:
    """`generate(steps)` -> {phase: seconds}; `matmul()` runs one evaluated MATMUL x MATMUL product."""
    generate(1)  # warm-up: loads every component and pays first-call costs
    peak_rss_reset()
    runs = [generate(steps) for _ in range(reps)]
    peak = _status_bytes("VmHWM")
    matmul()
    return {"runs": runs, "peak_rss": peak, "matmul_seconds": [seconds(matmul) for _ in range(5)]}


def run_mlximg(family: str, folder: Path, size: int, steps: int, reps: int) -> dict:
    import mlximg  # noqa: F401  (preloads OpenBLAS before mlx)
    import mlx.core as mx

    from mlximg.pipelines.flux2 import Flux2Pipeline
    from mlximg.pipelines.zimage import ZImagePipeline

    pipeline = {"zimage": ZImagePipeline, "klein": Flux2Pipeline}[family](folder, keep_text_encoder=True)
    latents = initial_latents(family, folder, size)

    def generate(n):
        pipeline.generate(PROMPT, width=size, height=size, steps=n, guidance=GUIDANCE[family], latents=latents)
        return {phase: pipeline.phases.get(phase).seconds for phase in PHASES}

    a = mx.random.normal((MATMUL, MATMUL))
    return measure(generate, steps, reps, lambda: mx.eval(a @ a))


def add_timer(owner, name: str, phase: str, totals: dict, current: dict | None = None) -> None:
    """Wrap the method `owner.name` so that its wall time adds to totals[phase] (torch on the CPU is synchronous);
    while it runs, current["phase"] (if given) names the phase, for timers of the ops inside it."""
    call = getattr(owner, name)
    current = {} if current is None else current

    def timed(*args, **kwargs):
        outer, current["phase"] = current.get("phase"), phase
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - start
            current["phase"] = outer

    setattr(owner, name, timed)


def run_diffusers(family: str, folder: Path, size: int, steps: int, reps: int) -> dict:
    import torch
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    pipe = {"zimage": ZImagePipeline, "klein": Flux2KleinPipeline}[family].from_pretrained(
        folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(family, folder, size)
    totals = dict.fromkeys(PHASES, 0.0)
    # The same work as mlximg's phases: a denoising step is the transformer forward plus the scheduler update.
    for owner, name, phase in ((pipe, "encode_prompt", "encode"), (pipe.transformer, "forward", "denoise"),
                               (pipe.scheduler, "step", "denoise"), (pipe.vae, "decode", "decode")):
        add_timer(owner, name, phase, totals)

    def generate(n):
        totals.update(dict.fromkeys(PHASES, 0.0))
        pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=n, guidance_scale=GUIDANCE[family],
             latents=torch.from_numpy(latents.copy()))
        return dict(totals)

    a = torch.randn(MATMUL, MATMUL)
    return measure(generate, steps, reps, lambda: a @ a)


ENGINES = {"mlximg": run_mlximg, "diffusers": run_diffusers}


def zimage_step_flops(config: dict, image_tokens: int, caption_tokens: int) -> int:
    """Matmul FLOPs (2 M N K) of one ZImageTransformer2DModel forward; both token sequences are padded to
    multiples of 32, refiners see each alone, the main layers and the final projection their concatenation."""
    image, caption = (-(-n // 32) * 32 for n in (image_tokens, caption_tokens))
    dim, kv = config["dim"], config["n_kv_heads"] * config["dim"] // config["n_heads"]
    patch = 4 * config["in_channels"]  # 2x2 patches

    def block(n):  # QKV, QK^T and PV, output projection, SwiGLU MLP
        return 2 * n * dim * (dim + 2 * kv) + 4 * n * n * dim + 2 * n * dim * dim + 6 * n * dim * int(dim / 3 * 8)

    return (2 * image * patch * dim + 2 * caption * config["cap_feat_dim"] * dim
            + config["n_refiner_layers"] * (block(image) + block(caption))
            + config["n_layers"] * block(image + caption) + 2 * (image + caption) * dim * patch)


def klein_step_flops(config: dict, image_tokens: int, text_tokens: int = 512) -> int:
    """Matmul FLOPs (2 M N K) of one Flux2Transformer2DModel forward over [text, image] (klein pads text to 512);
    per-sample work (timestep embedding, modulation) is negligible and left out."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp, n = int(dim * config["mlp_ratio"]), image_tokens + text_tokens
    attention = 4 * n * n * dim  # QK^T and PV
    double = 2 * n * dim * 3 * dim + attention + 2 * n * dim * dim + 2 * n * dim * 2 * mlp + 2 * n * mlp * dim
    single = 2 * n * dim * (3 * dim + 2 * mlp) + attention + 2 * n * (dim + mlp) * dim
    return (2 * image_tokens * config["in_channels"] * dim + 2 * text_tokens * config["joint_attention_dim"] * dim
            + config["num_layers"] * double + config["num_single_layers"] * single
            + 2 * image_tokens * dim * config["in_channels"])


def step_flops(family: str, folder: Path, size: int) -> int:
    config = read_config(folder / "transformer")
    if family == "klein":
        return klein_step_flops(config, (size // 16) ** 2)
    from transformers import AutoTokenizer

    # Z-Image's caption is the chat-templated prompt's tokens, as diffusers' ZImagePipeline builds it.
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return zimage_step_flops(config, (size // 16) ** 2, len(tokenizer(text).input_ids))


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "np") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def run_child(engine: str, family: str, folder: Path, size: int, steps: int, reps: int, threads: int) -> dict:
    # The same thread count for torch (OpenMP) and for the BLAS under MLX, set before either starts.
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"),
                                         str(threads))}
    proc = subprocess.run([sys.executable, __file__, f"--child={engine}", f"--families={family}",
                           f"--folder={folder}", f"--sizes={size}", f"--steps={steps}", f"--reps={reps}"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{engine} {family} {size}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def summarize(raw: dict, steps: int, flops: int) -> dict:
    """Medians over the reps; GFLOP/s from the median times."""
    median = {phase: statistics.median(run[phase] for run in raw["runs"]) for phase in PHASES}
    step = median["denoise"] / steps
    matmul = 2 * MATMUL**3 / statistics.median(raw["matmul_seconds"]) / 1e9
    return {"encode": median["encode"], "step": step, "decode": median["decode"],
            "peak_mib": raw["peak_rss"] / 2**20, "step_gflops": flops / step / 1e9, "matmul_gflops": matmul,
            "peak_share": flops / step / 1e9 / matmul}


ROWS = [("encode s", "encode", "{:.3f}"), ("denoise s/step", "step", "{:.3f}"), ("decode s", "decode", "{:.3f}"),
        ("peak RSS MiB", "peak_mib", "{:,.0f}"), ("step GFLOP/s", "step_gflops", "{:.1f}"),
        (f"matmul {MATMUL} GFLOP/s", "matmul_gflops", "{:.1f}"), ("step % of matmul", "peak_share", "{:.0%}")]


def table(title: str, results: dict) -> str:
    engines = list(results)
    lines = [title, f"{'':<20}" + "".join(f"{e:>12}" for e in engines) + f"{'mlximg/diffusers':>18}"]
    for label, key, fmt in ROWS:
        values = [results[e][key] for e in engines]
        lines.append(f"{label:<20}" + "".join(f"{fmt.format(v):>12}" for v in values)
                     + f"{values[0] / values[1]:>18.2f}")
    return "\n".join(lines)


def child(args) -> None:
    family, size = args.families, int(args.sizes)
    print(json.dumps(ENGINES[args.child](family, Path(args.folder), size, args.steps, args.reps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="zimage,klein")
    parser.add_argument("--sizes", default="512,1024", help="square image sides, comma separated")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for each engine (default: all cores; fewer when the machine is shared)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mlximg-bench"), help="where the models are built")
    parser.add_argument("--json", type=Path, help="write the raw and summarized numbers here")
    parser.add_argument("--quick", action="store_true", help="tiny models, 64x64, 2 steps, 1 rep: a smoke test")
    parser.add_argument("--real-vae", action="store_true",
                        help="the VAE at its real width instead of 1/8 (decode takes ~30 s per 512x512 image here)")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.sizes, args.steps, args.reps = "64", 2, 1

    report = {}
    for family in args.families.split(","):
        config = (QUICK if args.quick else MID)[family]
        folder = model_folder(args.cache, family, dict(config, vae=None) if args.real_vae else config)
        params = {c: parameter_count(folder / c) for c in ("transformer", "text_encoder", "vae")}
        print(f"{TITLES[family]} ({folder}): " + ", ".join(f"{c} {n / 1e6:.1f}M" for c, n in params.items())
              + " parameters")
        for size in map(int, args.sizes.split(",")):
            flops = step_flops(family, folder, size)
            raw = {engine: run_child(engine, family, folder, size, args.steps, args.reps, args.threads)
                   for engine in ENGINES}
            results = {engine: summarize(r, args.steps, flops) for engine, r in raw.items()}
            report[f"{family} {size}"] = {"params": params, "step_flops": flops, "raw": raw, "summary": results}
            print(table(f"\n{TITLES[family]} {size}x{size}, {args.steps} steps, median of {args.reps}, float32, "
                        f"{args.threads} threads, {flops / 1e9:.1f} GFLOP/step", results) + "\n")
    print("ratio < 1: mlximg takes less time or memory; for the GFLOP/s rows, > 1: mlximg does more per second.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
