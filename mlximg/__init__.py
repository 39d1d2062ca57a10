"""mlximg: diffusion-transformer image generation (Z-Image, FLUX.2) on MLX."""

# The runtime goes first: on Linux it preloads a system OpenBLAS, which only works before mlx is imported.
from . import runtime  # noqa: I001

__version__ = "0.1.0"
__all__ = ["runtime", "__version__"]
