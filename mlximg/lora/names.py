"""Per family, the module names LoRA files use that are not the diffusers module paths of the model: the original
checkpoints' names (Z-Image's fused `attention.qkv`; Black Forest Labs' `double_blocks` / `single_blocks` for
FLUX.2), each mapped to the diffusers modules it feeds. A fused projection feeds several modules: each takes
some of the up-projection's row chunks (`rows`: count, chunk indices in order), and the down projection is
shared, as diffusers splits it."""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A diffusers module path, and the up-projection rows it takes: `rows` (chunk count, chunk indices in the
    order they stack), or None for all of them."""

    path: str
    rows: tuple[int, tuple[int, ...]] | None = None


def _split3(prefix: str, names: tuple[str, str, str]) -> list[Target]:
    return [Target(f"{prefix}.{name}", (3, (i,))) for i, name in enumerate(names)]


# Z-Image's original transformer names (ai-toolkit, the Tongyi-MAI checkpoint).
_ZIMAGE_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.(qkv|out)$")
_ZIMAGE_NAMES = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
                 "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"}


def zimage_original(name: str) -> list[Target] | None:
    if match := _ZIMAGE_BLOCK.match(name):
        block, part = match.groups()
        if part == "qkv":
            return _split3(f"{block}.attention", ("to_q", "to_k", "to_v"))
        return [Target(f"{block}.attention.to_out.0")]
    return [Target(_ZIMAGE_NAMES[name])] if name in _ZIMAGE_NAMES else None


def zimage_names(depths: dict[str, int]) -> list[str]:
    """Every original name of a Z-Image transformer with these block counts (for kohya's underscored spelling)."""
    blocks = [f"{stack}.{i}" for stack, n in depths.items() for i in range(n)]
    return [f"{b}.attention.{p}" for b in blocks for p in ("qkv", "out")] + list(_ZIMAGE_NAMES)


# FLUX.2 in Black Forest Labs' names.
_DOUBLE = {"img_attn.qkv": ("attn", ("to_q", "to_k", "to_v")), "txt_attn.qkv": ("attn", ("add_q_proj", "add_k_proj",
                                                                                      "add_v_proj")),
           "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
           "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_FLUX2_NAMES = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def flux2_original(name: str) -> list[Target] | None:
    if name == "final_layer.adaLN_modulation.1":
        # BFL orders the final modulation (shift, scale); diffusers' norm_out.linear holds (scale, shift).
        return [Target("norm_out.linear", (2, (1, 0)))]
    if name in _FLUX2_NAMES:
        return [Target(_FLUX2_NAMES[name])]
    match = _BLOCK.match(name)
    if match is None:
        return None
    stack, index, part = match.groups()
    if stack == "single_blocks":
        return [Target(f"single_transformer_blocks.{index}.{_SINGLE[part]}")] if part in _SINGLE else None
    target = _DOUBLE.get(part)
    if isinstance(target, tuple):
        return _split3(f"transformer_blocks.{index}.{target[0]}", target[1])
    return [Target(f"transformer_blocks.{index}.{target}")] if target else None


def flux2_names(depths: dict[str, int]) -> list[str]:
    """Every BFL name of a FLUX.2 transformer with these block counts (for kohya's underscored spelling)."""
    double = [f"double_blocks.{i}.{p}" for i in range(depths.get("transformer_blocks", 0)) for p in _DOUBLE]
    single = [f"single_blocks.{i}.{p}" for i in range(depths.get("single_transformer_blocks", 0)) for p in _SINGLE]
    return double + single + list(_FLUX2_NAMES) + ["final_layer.adaLN_modulation.1"]


FAMILIES = {"zimage": (zimage_original, zimage_names), "flux2": (flux2_original, flux2_names)}
