"""FP8: convert a model's transformer to mxfp8 on disk (the source is never touched), then generate from the
converted folder, which carries the model's recipe, and compare with the original.

    python scripts/examples/fp8_quantize.py /tmp/digits-fp8
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

import mlximg
from mlximg.quant.convert import convert


def main(destination: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = convert("z-image-digits", Path(destination or Path(scratch) / "digits-fp8"))
        original = mlximg.generate("a handwritten two", model="z-image-digits", seed=5)
        quantized = mlximg.generate("a handwritten two", model=str(folder), seed=5)
    change = np.abs(np.asarray(original, np.float64) - np.asarray(quantized, np.float64))
    print(f"FP8 vs original: mean |pixel change| {change.mean():.2f}, max {change.max():.0f} (of 255)")


if __name__ == "__main__":
    main(*sys.argv[1:])
