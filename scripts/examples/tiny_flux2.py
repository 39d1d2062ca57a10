"""A tiny random FLUX.2 [klein] in the real diffusers folder layout, for the FLUX.2 example to run without a
download (the real models are tens of GB): diffusers' and transformers' own classes at a few thousand
parameters, saved with save_pretrained, and the embedded digits model's tokenizer. Needs torch and diffusers
(`pip install -e '.[test]'`). Random weights make noise-like pictures: it shows the calls, not the quality."""

import json
import shutil
from pathlib import Path

from mlximg.manifests import RECIPE_FILE, resolve

# Its recipe, which a folder given by path runs by: klein is step-distilled (no CFG, guidance 1).
RECIPE = {"name": "tiny-klein", "defaults": {"steps": 2, "guidance": 1.0, "width": 128, "height": 128}}


def build_tiny_klein(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer_dir = resolve("z-image-digits").path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # klein reads the text encoder's hidden states 9, 18 and 27: 28 layers, each tiny.
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8))
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=AutoencoderKLFlux2(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                               latent_channels=8),
        text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=True,
        transformer=Flux2Transformer2DModel(in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                            num_attention_heads=1, joint_attention_dim=48, axes_dims_rope=[8, 8, 8, 8],
                                            timestep_guidance_channels=32, guidance_embeds=False))
    pipeline.save_pretrained(folder)
    shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)  # with its chat template file
    (folder / RECIPE_FILE).write_text(json.dumps(RECIPE))
    return folder
