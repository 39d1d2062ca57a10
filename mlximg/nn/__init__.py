"""Layers shared by the Z-Image and FLUX.2 networks."""

from .activations import SiLU
from .attention import attention, merge_heads, scaled_dot_product_attention, split_heads
from .cpu_math import silu, silu_mul
from .embeddings import timestep_embedding
from .modulation import add_gated, add_normed, modulate, scaled_norm
from .norms import RMSNorm, layer_norm
from .rope import apply_rope, norm_rope_heads, rope_tables

__all__ = ["RMSNorm", "SiLU", "add_gated", "add_normed", "apply_rope", "attention", "layer_norm", "merge_heads",
           "modulate", "norm_rope_heads", "rope_tables", "scaled_dot_product_attention", "scaled_norm", "silu",
           "silu_mul", "split_heads", "timestep_embedding"]
