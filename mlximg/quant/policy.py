"""Which Linear layers quantization (FP8, 4-bit, 8-bit) takes, per component family, as patterns over checkpoint
keys / module paths.

Only the blocks' attention, MLP and modulation projections (almost all of the weights); embedders, final layers,
norms, pad tokens and the VAE stay in high precision: they are small and their errors reach every token.
"""

import re

_ZIMAGE = (r"(?:^|\.)(?:layers|noise_refiner|context_refiner)\.\d+\."
           r"(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)$")
_FLUX2 = (r"(?:^|\.)(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
          r"|to_add_out)|ff\.linear_(?:in|out)|ff_context\.linear_(?:in|out))"
          r"|single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out)"
          r"|(?:double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear)$")
# Qwen3 and Mistral decoder layers, under any prefix (model., language_model.model., ...).
_DECODER = r"(?:^|\.)layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$"

# Transformers by their config's diffusers class name; text encoders by component name.
TRANSFORMER_POLICIES = {
    "ZImageTransformer2DModel": re.compile(_ZIMAGE),
    "Flux2Transformer2DModel": re.compile(_FLUX2),
}
TEXT_ENCODER_POLICY = re.compile(_DECODER)


def layer_policy(component: str, config: dict) -> re.Pattern | None:
    """The pattern of quantizable layer names of a component, or None where nothing may be quantized (the VAE)."""
    if component == "transformer":
        return TRANSFORMER_POLICIES.get(config.get("_class_name"))
    if component == "text_encoder":
        return TEXT_ENCODER_POLICY
    return None


def quantizable(layer: str, weight_shape: tuple[int, ...], policy: re.Pattern | None, group_size: int) -> bool:
    """A 2-D weight of a policy layer whose input width divides into whole groups (the rest stays float)."""
    return (policy is not None and len(weight_shape) == 2 and weight_shape[1] % group_size == 0
            and policy.search(layer) is not None)
