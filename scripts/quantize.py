"""Convert a diffusers-layout model (folder or Hugging Face repo id) to FP8 (mxfp8): scripts/quantize.py SRC DST.

The same as `mlximg quantize SRC DST [--force] [--text-encoder]`.
"""

import sys

import mlximg  # noqa: F401  (first: it sets up the BLAS before mlx loads)
from mlximg.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
