"""mlximg: diffusion-transformer image generation (Z-Image, FLUX.2) on MLX."""

# The runtime goes first: on Linux it preloads a system OpenBLAS, which only works before mlx is imported.
__version__ = "0.1.0"

from . import runtime  # noqa: E402, I001
from .api import generate, load  # noqa: E402
from .lora import LoRA  # noqa: E402
__all__ = ["LoRA", "generate", "load", "runtime", "__version__"]
