"""LoRA and LoKr adapters for the Z-Image and FLUX.2 transformers, read from the formats diffusers, kohya,
ai-toolkit, fal and LyCORIS write, applied unfused on float and FP8 weights alike (see README "LoRA")."""

from .adapter import Adapter, Adapters, load_adapter
from .source import LoRA, as_lora, parse_cli_lora

__all__ = ["Adapter", "Adapters", "LoRA", "as_lora", "load_adapter", "parse_cli_lora"]
