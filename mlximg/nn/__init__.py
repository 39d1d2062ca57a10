"""Layers shared by the Z-Image and FLUX.2 networks."""

from .activations import SiLU
from .attention import attention, merge_heads, scaled_dot_product_attention, split_heads
from .cpu_math import silu, silu_mul
from .embeddings import timestep_embedding
from .norms import RMSNorm, layer_norm
from .rope import apply_rope, norm_rope_heads, rope_tables

__all__ = ["RMSNorm", "SiLU", "apply_rope", "attention", "layer_norm", "merge_heads", "norm_rope_heads", "rope_tables",
           "scaled_dot_product_attention", "silu", "silu_mul", "split_heads", "timestep_embedding"]
