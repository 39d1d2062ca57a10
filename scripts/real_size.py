"""Z-Image-Turbo and FLUX.2-klein-4B at their real size on this machine: the released configurations (Z-Image: a
6.15B-parameter transformer and the FLUX.1 VAE; klein-4B: a 3.88B transformer and the FLUX.2 VAE; both with the
Qwen3-4B text encoder) with random bfloat16 weights in the real folder layout, built once (about 20 / 15 GB,
tensor by tensor, never the whole model in memory), quantized to 4 bits with `mlximg quantize`, then generated at
512x512 with the weights kept quantized in memory (fp8="layerwise"): per-phase seconds and MLX peak memory, the
process's peak RSS, and the memory planner's prediction beside them.

    python scripts/real_size.py [--family zimage|klein] [--folder DIR] [--mode affine4] [--steps 2] [--size 512]
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

# diffusers' ZImageTransformer2DModel defaults are Z-Image-Turbo's released configuration; klein-4B's differs from
# Flux2Transformer2DModel's defaults (FLUX.2-dev's) as tests/test_flux2_transformer.py records.
KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                guidance_embeds=False)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True)
SHARD_BYTES = 2 * 2**30
NAMES = {"zimage": "Z-Image-Turbo", "klein": "FLUX.2-klein-4B"}
FAMILIES = {"zimage": "zimage", "klein": "flux2"}  # the planner's names


def write_random(folder: Path, shapes: dict[str, tuple[int, ...]], prefix: str, index_name: str) -> None:
    """Random N(0, 0.02) bfloat16 tensors of `shapes` in ~2 GiB shards with an index, one shard in memory."""
    import torch
    from safetensors.torch import save_file

    groups, size = [[]], 0
    for key, shape in shapes.items():  # plan the shards first: their names carry the count
        if size >= SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += math.prod(shape) * 2
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {key: (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16) for key in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
        del shard
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_transformer(folder: Path, model) -> None:
    model.save_config(folder)
    write_random(folder, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "diffusion_pytorch_model",
                 "diffusion_pytorch_model.safetensors.index.json")


def build(folder: Path, family: str) -> None:
    import torch
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,
                           Flux2Transformer2DModel, ZImageTransformer2DModel)
    from random_models import FLUX1_VAE, qwen3_tokenizer
    from transformers import Qwen3Config, Qwen3Model

    folder.mkdir(parents=True)
    tokenizer = qwen3_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=family == "klein").save_pretrained(
        folder / "scheduler")
    with torch.device("meta"):
        transformer = (ZImageTransformer2DModel() if family == "zimage" else Flux2Transformer2DModel(**KLEIN_4B))
        encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **QWEN3_4B))
    write_transformer(folder / "transformer", transformer)
    (folder / "text_encoder").mkdir()
    encoder.config.save_pretrained(folder / "text_encoder")
    write_random(folder / "text_encoder", {k: tuple(v.shape) for k, v in encoder.state_dict().items()}, "model",
                 "model.safetensors.index.json")
    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX1_VAE) if family == "zimage" else AutoencoderKLFlux2()
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    components = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                  "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2TokenizerFast"]}
    if family == "zimage":
        index = {"_class_name": "ZImagePipeline", **components,
                 "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    else:
        index = {"_class_name": "Flux2KleinPipeline", "is_distilled": True, **components,
                 "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (folder / "model_index.json").write_text(json.dumps(index))


def run(folder: Path, family: str, size: int, steps: int) -> None:
    """In a child process: one generation, its phases and the process's peak RSS as JSON."""
    import mlximg
    from random_models import GUIDANCE

    start = time.perf_counter()
    pipeline = mlximg.load(str(folder), fp8="layerwise")
    load = time.perf_counter() - start
    pipeline.generate("a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                      guidance=GUIDANCE[family], seed=0)
    phases = {r.name: {"seconds": r.seconds, "peak": r.peak} for r in pipeline.phases.records}
    print(json.dumps({"load": load, "phases": phases, "weights": pipeline.tracker.nbytes(),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("zimage", "klein"), default="zimage")
    parser.add_argument("--folder", type=Path, help="default: /tmp/mlximg-FAMILY-real")
    parser.add_argument("--mode", default="affine4", help="the weight mode of both transformer and text encoder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return run(args.run, args.family, args.size, args.steps)
    args.folder = args.folder or Path(f"/tmp/mlximg-{args.family}-real")
    import mlximg  # noqa: F401
    from mlximg.planner import plan
    from mlximg.quant.convert import convert
    from mlximg.quant.format import Quantization

    if not (args.folder / "model_index.json").exists():
        start = time.perf_counter()
        build(args.folder, args.family)
        print(f"built {args.folder} in {time.perf_counter() - start:.0f} s", flush=True)
    quantized = args.folder.with_name(f"{args.folder.name}-{args.mode}")
    if not (quantized / "model_index.json").exists():
        start = time.perf_counter()
        convert(args.folder, quantized, text_encoder=True, quantization=Quantization.named(args.mode))
        print(f"quantized in {time.perf_counter() - start:.0f} s", flush=True)
    out = subprocess.run([sys.executable, __file__, f"--run={quantized}", f"--size={args.size}",
                          f"--steps={args.steps}", f"--family={args.family}"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    result = json.loads(out.stdout.splitlines()[-1])
    planned = {p.name: p.peak for p in plan(quantized, FAMILIES[args.family], width=args.size, height=args.size, compute_bytes=4,
                                            layerwise=True)}
    print(f"{NAMES[args.family]} real size, random weights, {args.mode} (layerwise), {args.size}x{args.size}, "
          f"{args.steps} steps, float32 compute; load {result['load']:.1f} s; kept weights "
          f"{result['weights'] / 2**30:.2f} GiB; process peak RSS {result['rss'] / 2**30:.2f} GiB")
    print(f"{'phase':<10}{'seconds':>9}{'peak GiB':>10}{'planned GiB':>13}")
    for name, phase in result["phases"].items():
        seconds = phase["seconds"] / (args.steps if name == "denoise" else 1)
        label = f"{name} (/step)" if name == "denoise" else name
        print(f"{label:<16}{seconds:>9.1f}{phase['peak'] / 2**30:>10.2f}"
              f"{planned.get(name, 0) / 2**30:>13.2f}")


if __name__ == "__main__":
    main()
