"""Caching benchmark (not a test): forwards skipped, denoising time and deviation from the uncached image, for
TeaCache thresholds and StepCache intervals, on the tiny parity models (tests/), 8 and 28 steps.

    python scripts/cache_bench.py [--steps 8 28] [--repeats 3]
    python scripts/cache_bench.py --mid --size 256 --repeats 1   # scripts/pipeline_memory.py's mid-size models

The tiny models are random, not trained denoisers: the deviations say how the caches behave, not how a real
model's images degrade. Times are the median denoise phase over `repeats` runs.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))



def configs(first_blocks: int) -> list:
    """The tiny models are too shallow for a first and a last block around a middle: first_blocks 0 there."""
    return [("off", {}),
            *((f"tea {t}", {"teacache": {"threshold": t}}) for t in (0.05, 0.1, 0.2, 0.4)),
            *((f"tea-mod {t}", {"teacache": {"threshold": t, "mode": "modulated"}}) for t in (0.4, 1.0)),
            *((f"step {n}", {"stepcache": {"interval": n, "first_blocks": first_blocks}}) for n in (2, 3))]


def build(root: Path) -> dict:
    from test_flux2_pipeline import build_klein
    from test_zimage_pipeline import build_reference

    build_reference(root / "zimage")
    build_klein(root / "klein", is_distilled=True)
    return {"zimage": root / "zimage", "klein": root / "klein"}


def build_mid() -> dict:
    """Reduced-width random models of the real architectures (built once, kept in /tmp)."""
    from pipeline_memory import build_klein, build_zimage

    folders = {"zimage": Path("/tmp/mlximg-zimage-mid"), "klein": Path("/tmp/mlximg-klein-mid")}
    for family, builder in (("zimage", build_zimage), ("klein", build_klein)):
        if not (folders[family] / "model_index.json").exists():
            builder(folders[family])
    return folders


def run(pipeline, shape, steps, repeats, size, **caches):
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times = []
    for _ in range(repeats):
        image = pipeline.generate("a red fox in the snow", width=size, height=size, steps=steps, latents=noise,
                                  **caches)
        times.append(pipeline.phases.get("denoise").seconds)
    return np.asarray(image, dtype=np.float64), image.info["parameters"], statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 28])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mid", action="store_true", help="the mid-size random models instead of the tiny ones")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    from mlximg.pipelines.flux2 import Flux2Pipeline
    from mlximg.pipelines.zimage import ZImagePipeline

    with tempfile.TemporaryDirectory() as tmp:
        folders = build_mid() if args.mid else build(Path(tmp))
        klein = Flux2Pipeline(folders["klein"], defaults={"steps": 4, "guidance": 1.0})
        families = [("zimage", ZImagePipeline(folders["zimage"], defaults={"steps": 8, "guidance": 0.0}),
                     (1, 16, args.size // 8, args.size // 8)),
                    ("klein", klein, (1, klein.latent_channels, args.size // 16, args.size // 16))]
        print("| model | steps | cache | forwards computed / skipped | blocks reused | denoise s | vs off | "
              "mean abs dev (px) | max abs dev (px) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for family, pipeline, shape in families:
            run(pipeline, shape, 2, 1, args.size)  # warm-up: the first run pays for loading the weights
            for steps in args.steps:
                reference, _, base_time = run(pipeline, shape, steps, args.repeats, args.size)
                for name, caches in configs(1 if args.mid else 0):
                    image, parameters, seconds = run(pipeline, shape, steps, args.repeats, args.size, **caches)
                    forwards = parameters["forwards"]
                    reused = parameters.get("stepcache", {}).get("blocks_skipped", "-")
                    deviation = np.abs(image - reference)
                    print(f"| {family} | {steps} | {name} | {forwards['computed']} / {forwards['skipped']} | "
                          f"{reused} | {seconds:.3f} | {seconds / base_time:.2f}x | {deviation.mean():.1f} | "
                          f"{deviation.max():.0f} |")


if __name__ == "__main__":
    main()
