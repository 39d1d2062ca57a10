"""The memory planner against measured peaks: for pipeline_memory.py's random reduced-width Z-Image and klein
(built on first use), each phase's planned peak (mlximg.planner, float32) beside MLX's measured peak active
memory of a real run (batch_memory.py's child, a fresh process per setting), and the error.

    python scripts/plan_check.py [--families zimage klein] [--sizes 512 768] [--images 1 2]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline_memory import build
from random_models import GUIDANCE

import mlximg  # noqa: F401  (first: it sets up the BLAS before mlx loads)
from mlximg.planner import plan, uses_cfg

FAMILIES = {"zimage": "zimage", "klein": "flux2"}
BATCH_MEMORY = Path(__file__).with_name("batch_memory.py")


def measured(family: str, folder: Path, size: int, images: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, str(BATCH_MEMORY), f"--family={family}", f"--folder={folder}",
                          f"--size={size}", "--steps=1", f"--run={images}"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return {name: r["peak"] for name, r in json.loads(out.stdout.splitlines()[-1])["phases"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["zimage", "klein"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print("| model | size | images | phase | planned MiB | measured MiB | error |\n|---|---|---|---|---|---|---|")
    for family in args.families:
        folder = Path(f"/tmp/mlximg-{family}-mid")
        if not (folder / "model_index.json").exists():
            build(family, folder)
        cfg = uses_cfg(folder, FAMILIES[family], GUIDANCE[family])
        for size in args.sizes:
            for images in args.images:
                phases = plan(folder, FAMILIES[family], width=size, height=size, num_images=images, cfg=cfg,
                              compute_bytes=4)
                peaks = measured(family, folder, size, images)
                for phase in phases:
                    real = peaks[phase.name]
                    print(f"| {family} mid | {size} | {images} | {phase.name} | {phase.peak / 2**20:.0f} | "
                          f"{real / 2**20:.0f} | {(phase.peak - real) / real:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
