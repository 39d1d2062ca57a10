"""Calibrate TeaCache's rescaling polynomial for a model and recipe, and write it to the model's manifest.

Runs the model with every step computed, recording per step the relative L1 change of the first block's
modulated input (the signal TeaCache sees) and of the cached block-stack residual (what a skip would reuse), over
prompts and seeds; fits output change = poly(signal change) with numpy.polyfit; and writes the coefficients with
the signal range seen (for clamping) to the manifest's "teacache" entry, mode "modulated".

    python scripts/calibrate_teacache.py z-image --steps 50 --guidance 4
    python scripts/calibrate_teacache.py /path/to/folder --manifest /tmp/tiny.json --size 64

Published coefficients for other models do not transfer: fit on the recipe (steps, guidance) you will run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlximg.cache import TeaCache, TeaCacheConfig  # noqa: E402

PROMPTS = ["a lighthouse on a cliff at dusk", "a bowl of ramen, studio photo", "a fox in the snow, watercolor",
           "a city street at night in the rain"]


class Recorder(TeaCache):
    """A TeaCache that computes every step and records (signal change, residual change) pairs."""

    def __init__(self, tracker):
        super().__init__(TeaCacheConfig(threshold=0.0, mode="modulated"), num_steps=1, tracker=tracker)
        self.pairs: list[tuple[float, float]] = []
        self._signal_change = None

    def reuse(self, signal):
        self._signal_change = self.change(signal)
        self._keep_signal(signal)
        return None

    def store(self, value: mx.array) -> None:
        if self._signal_change is not None and all(c in self.entries for c in self.contexts):
            previous = self.cached().astype(mx.float32)
            change = mx.mean(mx.abs(value.astype(mx.float32) - previous)) / mx.maximum(
                mx.mean(mx.abs(previous)), 1e-12)
            self.pairs.append((self._signal_change, change.item()))
        super().store(value)


class Recording(TeaCacheConfig):
    """TeaCache settings whose run is a Recorder: the pipeline starts it like any TeaCache."""

    def start(self, num_steps: int, tracker) -> Recorder:
        self.recorder = Recorder(tracker)
        return self.recorder


def record(pipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int | None,
           negative_prompt: str | None = None) -> np.ndarray:
    """(N, 2) pairs of (signal change, output change) over every prompt, seed and step after the first."""
    pairs = []
    for prompt in prompts:
        for seed in seeds:
            recording = Recording(threshold=0.0, mode="modulated")
            pipeline.generate(prompt, steps=steps, guidance=guidance, seed=seed, width=size, height=size,
                              negative_prompt=negative_prompt, teacache=recording)
            pairs.extend(recording.recorder.pairs)
    return np.array(pairs, dtype=np.float64)


def fit(pairs: np.ndarray, degree: int) -> dict:
    """The polynomial (highest degree first) and the signal range it was fitted on."""
    if len(pairs) <= degree:
        raise ValueError(f"{len(pairs)} pairs are too few for a degree-{degree} fit; use more prompts, seeds or steps")
    coefficients = np.polyfit(pairs[:, 0], pairs[:, 1], degree)
    residual = pairs[:, 1] - np.polyval(coefficients, pairs[:, 0])
    return {"coefficients": [float(c) for c in coefficients],
            "signal_range": [float(pairs[:, 0].min()), float(pairs[:, 0].max())],
            "rms_error": float(np.sqrt(np.mean(residual ** 2)))}


def write_manifest(path: Path, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data["teacache"] = entry
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a manifest name, a local diffusers folder or a repo id")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--size", type=int, help="image side (default: the manifest's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.1, help="the threshold written with the fit")
    parser.add_argument("--manifest", type=Path, help="the manifest to write (default: the model folder's "
                                                        "mlximg.json, or models/MODEL.json for a download)")
    args = parser.parse_args()

    import mlximg
    from mlximg.manifests import MODELS_DIR, RECIPE_FILE, resolve

    folder = resolve(args.model).path
    manifest = args.manifest or (folder / RECIPE_FILE if folder else MODELS_DIR / f"{args.model}.json")
    pipeline = mlximg.load(args.model)
    pairs = record(pipeline, args.prompts, args.seeds, args.steps, args.guidance, args.size, args.negative_prompt)
    result = fit(pairs, args.degree)
    entry = {"mode": "modulated", "threshold": args.threshold, "coefficients": result["coefficients"],
             "signal_range": result["signal_range"], "calibrated": True,
             "source": (f"scripts/calibrate_teacache.py {time.strftime('%Y-%m-%d')}: {len(pairs)} step pairs from "
                        f"{len(args.prompts)} prompts x {len(args.seeds)} seeds, {args.steps} steps, guidance "
                        f"{args.guidance}, degree {args.degree}, rms error {result['rms_error']:.4f}")}
    TeaCacheConfig.from_dict({k: v for k, v in entry.items() if k != "source"})  # refuse to write a bad entry
    write_manifest(manifest, entry)
    print(f"{len(pairs)} pairs, signal change {result['signal_range'][0]:.4f}..{result['signal_range'][1]:.4f}, "
          f"rms error {result['rms_error']:.4f}")
    print(f"wrote {manifest}: {json.dumps(entry)}")


if __name__ == "__main__":
    main()
