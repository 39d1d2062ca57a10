"""A LoRA file's tensor names, whatever program wrote them, reduced to (module name, what the tensor is): the
prefixes of diffusers / PEFT (`transformer.`, `base_model.model.`), ai-toolkit and original checkpoints
(`diffusion_model.`), kohya (`lora_unet_`, underscores for dots) and LyCORIS (`lycoris_`), and the suffixes of
LoRA (`lora_A` / `lora_down`, `lora_B` / `lora_up`, `alpha`), LoKr (`lokr_w1`, ...) and what is refused."""

import re
from collections import defaultdict
from dataclasses import dataclass, field

import mlx.core as mx

# Prefixes of text-encoder tensors (diffusers, kohya, LyCORIS), which mlximg does not adapt.
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoders.", "lora_te_", "lora_te1_", "lora_te2_",
                         "lora_te3_", "lycoris_te_")
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
# Suffix -> kind. lora_A is the down projection (rank x in), lora_B the up projection (out x rank).
KINDS = {
    ".lora_A.weight": "lora_A", ".lora_A.default.weight": "lora_A", ".lora_down.weight": "lora_A",
    ".lora.down.weight": "lora_A",
    ".lora_B.weight": "lora_B", ".lora_B.default.weight": "lora_B", ".lora_up.weight": "lora_B",
    ".lora.up.weight": "lora_B",
    ".lora_B.bias": "lora_B.bias", ".lora_B.default.bias": "lora_B.bias", ".alpha": "alpha",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".dora_scale": "dora", ".lora_magnitude_vector": "dora", ".lora_magnitude_vector.default.weight": "dora",
    ".diff": "diff", ".diff_b": "diff",
}
_SUFFIX = re.compile("(" + "|".join(re.escape(s) for s in sorted(KINDS, key=len, reverse=True)) + ")$")


@dataclass(frozen=True)
class Module:
    """A module as the file names it: `name` with its prefixes stripped; `underscored` for kohya / LyCORIS
    spelling, where the dots of the path are underscores."""

    name: str
    underscored: bool = False


@dataclass
class Parsed:
    modules: dict[Module, dict[str, tuple[str, mx.array]]] = field(default_factory=dict)  # kind -> (key, tensor)
    text_encoder: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def parse(tensors: dict[str, mx.array]) -> Parsed:
    """Group a file's tensors by the module they adapt."""
    parsed = Parsed()
    modules = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            parsed.text_encoder.append(key)
            continue
        match = _SUFFIX.search(key)
        if match is None:
            parsed.unknown.append(key)
            continue
        module = _module(key[:match.start()])
        modules[module][KINDS[match.group(1)]] = (key, value)
    parsed.modules = dict(modules)
    return parsed


def _module(name: str) -> Module:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    for prefix in UNDERSCORED_PREFIXES:
        if name.startswith(prefix):
            return Module(name[len(prefix):], underscored=True)
    return Module(name)


# Names that give a file's family away, for the message when it matches nothing of this model. FLUX.1 shares
# FLUX.2's block names; its per-block modulations (img_mod, single_blocks' modulation) are its own.
_FLUX1 = ("img_mod", "txt_mod", ".modulation.lin", "_modulation_lin")
_FAMILIES = {
    "FLUX.2": ("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks", "img_attn"),
    "Z-Image": ("noise_refiner", "context_refiner", "feed_forward", "attention.to_q", "attention_to_q"),
    "Stable Diffusion": ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks"),
}


def likely_family(keys: list[str]) -> str | None:
    """The model family most of `keys` name modules of, or None."""
    if any(marker in key for key in keys for marker in _FLUX1):
        return "FLUX.1"
    counts = {family: sum(any(marker in key for marker in markers) for key in keys)
              for family, markers in _FAMILIES.items()}
    family, count = max(counts.items(), key=lambda item: item[1])
    return family if count * 2 >= len(keys) > 0 else None
