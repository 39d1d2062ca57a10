"""AutoencoderKL (the FLUX.1 VAE of Z-Image) against diffusers: decode, encode, tiling, the real config's keys."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from oracle import (assert_close, assert_tensor_within_reference, host, in_bfloat16, mac_pass, mlximg_dtype, perturb_,
                    require_oracle, save_tiny)

from mlximg.models import autoencoder_kl
from mlximg.models.autoencoder_kl import (AutoencoderKL, AutoencoderKLConfig, Conv3x3, GroupNorm,
                                          load_autoencoder)

TOLERANCE = 1e-5  # float32 against float32 torch

# Z-Image-Turbo's vae/config.json (the FLUX.1 VAE); the tiny variants below shrink widths and depths only.
REAL_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.36.0",
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}
TINY = {
    # FLUX.1 style: 16 latent channels, no quant convs, two resolutions (latents are images / 2).
    "flux": dict(REAL_CONFIG, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=32),
    # SD style: quant convs, three resolutions, one layer per block, no shift factor.
    "quant": dict(REAL_CONFIG, block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=32, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
                  use_post_quant_conv=True),
}


def diffusers_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module", params=sorted(TINY))
def vaes(request, tmp_path_factory):
    """(mlximg model, diffusers reference) for one tiny variant, through a save_pretrained vae/ folder."""
    torch = require_oracle()
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    reference = perturb_(TorchAutoencoderKL(**diffusers_config(TINY[request.param])).eval(), seed=1)
    model_dir = tmp_path_factory.mktemp(f"tmp_{request.param}")
    save_tiny(reference, model_dir / "vae")
    return load_autoencoder(model_dir, mlximg_dtype()), reference


def nchw(x: mx.array) -> np.ndarray:
    return host(x.transpose(0, 3, 1, 2))


def latents_like(reference, height, width, seed=0, batch=1):
    return np.random.default_rng(seed).standard_normal(
        (batch, reference.config.latent_channels, height, width)).astype(np.float32)


def images_like(height, width, seed=0, batch=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)


def reference_decode(reference, latents):
    import torch

    config = reference.config
    z = torch.from_numpy(latents).to(reference.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
    return reference.decode(z).sample


@pytest.mark.mac
def test_decode_latents_matches_diffusers(vaes):
    model, reference = vaes
    latents = latents_like(reference, 12, 20, batch=2)  # non-square, batched
    ours, expected = nchw(model.decode_latents(mx.array(latents))), reference_decode(reference, latents)
    if mac_pass():  # bfloat16: within torch-bf16's own error against float32
        low = reference_decode(in_bfloat16(reference), latents)
        assert_tensor_within_reference(ours, expected, low, "bfloat16 decode_latents")
    else:
        assert_close(ours, expected, TOLERANCE, "decode_latents")


def test_encode_matches_diffusers(vaes):
    import torch

    model, reference = vaes
    images = images_like(24, 40, batch=2)
    posterior = reference.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = model.encode(mx.array(images.transpose(0, 2, 3, 1)))
    assert_close(nchw(mean), posterior.mean, TOLERANCE, "posterior mean")
    assert_close(nchw(logvar), posterior.logvar, TOLERANCE, "posterior logvar")

    # The pipelines' image-to-image latents, from the mean and from a sample with the same noise.
    config = reference.config
    shift, scale = config.shift_factor or 0.0, config.scaling_factor
    latents = model.encode_image(mx.array(images.transpose(0, 2, 3, 1)))
    assert_close(np.array(latents), (posterior.mean - shift) * scale, TOLERANCE, "encode_image (mean)")
    sample = posterior.sample(generator=torch.Generator().manual_seed(3))
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    latents = model.encode_image(mx.array(images.transpose(0, 2, 3, 1)), noise=mx.array(noise.numpy()))
    assert_close(np.array(latents), (sample - shift) * scale, TOLERANCE, "encode_image (sample)")


def test_tiled_decode_matches_diffusers(vaes):
    model, reference = vaes
    tile = reference.tile_latent_min_size
    latents = latents_like(reference, tile + 7, 2 * tile - 5, seed=1)  # 2 x 3 tiles, ragged edges
    reference.enable_tiling()
    try:
        expected = reference_decode(reference, latents)
    finally:
        reference.disable_tiling()
    tiled = nchw(model.decode_latents(mx.array(latents), tiled=True))
    assert_close(tiled, expected, TOLERANCE, "tiled decode")
    # `tiled=None` tiles what is larger than one tile, and tiling really changed the result.
    np.testing.assert_array_equal(nchw(model.decode_latents(mx.array(latents), tiled=None)), tiled)
    full = nchw(model.decode_latents(mx.array(latents)))
    assert np.abs(full - tiled).max() > 1e-3


def test_tiled_encode_matches_diffusers(vaes):
    import torch

    model, reference = vaes
    images = images_like(reference.tile_sample_min_size + 8, reference.tile_sample_min_size + 20, seed=2)
    reference.enable_tiling()
    try:
        expected = reference.encode(torch.from_numpy(images)).latent_dist
    finally:
        reference.disable_tiling()
    mean, logvar = model.tiled_encode(mx.array(images.transpose(0, 2, 3, 1)))
    assert_close(nchw(mean), expected.mean, TOLERANCE, "tiled encode mean")
    assert_close(nchw(logvar), expected.logvar, TOLERANCE, "tiled encode logvar")


def test_small_inputs_are_not_tiled_by_default(vaes):
    model, reference = vaes
    latents = mx.array(latents_like(reference, 6, 4, seed=4))
    np.testing.assert_array_equal(np.array(model.decode_latents(latents, tiled=None)),
                                  np.array(model.decode_latents(latents)))


def test_real_config_has_diffusers_parameter_names_and_shapes():
    torch = require_oracle()
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    with torch.device("meta"):
        reference = TorchAutoencoderKL(**diffusers_config(REAL_CONFIG))
    # Lazy MLX arrays of the checkpoint's shapes: nothing is allocated by building, sanitizing or comparing.
    checkpoint = {k: mx.zeros(tuple(v.shape)) for k, v in reference.state_dict().items()}
    expected = {k: v.shape for k, v in AutoencoderKL.sanitize(checkpoint).items()}
    model = AutoencoderKL(AutoencoderKLConfig.from_dict(REAL_CONFIG))
    actual = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    assert len(actual) == 244 and model.config.scale_factor_spatial == 8


def test_legacy_attention_names_are_renamed():
    weights = {"decoder.mid_block.attentions.0.query.weight": mx.zeros((4, 4)),
               "decoder.mid_block.attentions.0.proj_attn.bias": mx.zeros((4,)),
               "encoder.conv_in.weight": mx.zeros((8, 4, 3, 3))}
    sanitized = AutoencoderKL.sanitize(weights)
    assert sorted(sanitized) == ["decoder.mid_block.attentions.0.to_out.0.bias",
                                 "decoder.mid_block.attentions.0.to_q.weight", "encoder.conv_in.weight"]
    assert sanitized["encoder.conv_in.weight"].shape == (8, 3, 3, 4)
    assert AutoencoderKL.sanitize({"quant_conv.weight": mx.zeros((8, 8, 1, 1))})["quant_conv.weight"].shape == (8, 8)


@pytest.mark.parametrize("shape, offset", [((2, 16, 12, 32), 100.0), ((1, 512, 640, 8), 3.0)])
def test_group_norm_matches_float64(shape, offset):
    """Far from zero (one-pass variance would lose most digits at mean 100, std 1) and over 1.3M values per
    group, as in a 1024x1024 decode (sequential float32 sums drift by ~1e-4 there)."""
    torch = require_oracle()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + offset
    channels = shape[-1]
    groups = min(8, channels // 4)
    norm = GroupNorm(groups, channels)
    norm.weight = mx.array(np.linspace(0.5, 1.5, channels, dtype=np.float32))
    norm.bias = mx.array(np.linspace(-1, 1, channels, dtype=np.float32))
    expected = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2).double(), groups,
                                              torch.from_numpy(np.array(norm.weight)).double(),
                                              torch.from_numpy(np.array(norm.bias)).double(), 1e-6)
    assert_close(nchw(norm(mx.array(x))), expected, TOLERANCE, f"group norm {shape} at mean {offset}")


@pytest.mark.parametrize("path", ["shifted matmuls", "mx.conv2d"])
def test_conv3x3_matches_torch(path, monkeypatch):
    """Both ways Conv3x3 runs: nine shifted matmuls (the CPU, >= 32 channels, large images) and mlx's conv2d."""
    torch = require_oracle()
    monkeypatch.setattr(autoencoder_kl, "_SHIFTED_CONV_MIN_PIXELS", 0)
    if path == "mx.conv2d":
        monkeypatch.setattr(autoencoder_kl, "_SHIFTED_CONV_MIN_CHANNELS", 10**9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 13, 40)).astype(np.float32)
    weight = rng.standard_normal((24, 40, 3, 3)).astype(np.float32) / 20
    bias = rng.standard_normal(24).astype(np.float32)
    conv = Conv3x3(40, 24)
    conv.weight, conv.bias = mx.array(weight.transpose(0, 2, 3, 1)), mx.array(bias)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight),
                                          torch.from_numpy(bias), padding=1)
    assert_close(nchw(conv(mx.array(x))), expected, TOLERANCE, f"3x3 conv ({path})")


def test_bfloat16_weights_decode_close_to_float32(vaes, tmp_path):
    model, reference = vaes
    latents = mx.array(latents_like(reference, 8, 8, seed=5))
    half = AutoencoderKL(model.config)
    half.update(model.parameters())
    half.set_dtype(mx.bfloat16)
    images = half.decode_latents(latents)
    assert images.dtype == mx.bfloat16 and half.dtype == mx.bfloat16
    assert_close(np.array(images.astype(mx.float32)), np.array(model.decode_latents(latents)), 3e-2,
                 "bfloat16 decode (bfloat16 rounding, not a parity bound)")


def test_unsupported_configs_are_named():
    down = ["AttnDownEncoderBlock2D", *REAL_CONFIG["down_block_types"][1:]]
    with pytest.raises(ValueError, match=r"unsupported block types \['AttnDownEncoderBlock2D'\]"):
        AutoencoderKLConfig.from_dict(dict(REAL_CONFIG, down_block_types=down))
    with pytest.raises(ValueError, match=r"unsupported act_fn 'gelu'"):
        AutoencoderKLConfig.from_dict(dict(REAL_CONFIG, act_fn="gelu"))
    with pytest.raises(ValueError, match=r"block_out_channels \[48\] not divisible by norm_num_groups 32"):
        AutoencoderKLConfig.from_dict(dict(REAL_CONFIG, block_out_channels=[128, 256, 48, 512]))
    with pytest.raises(ValueError, match=r"must have the same, non-zero length"):
        AutoencoderKLConfig.from_dict(dict(REAL_CONFIG, block_out_channels=[128, 256, 512]))
    config = AutoencoderKLConfig.from_dict(dict(REAL_CONFIG, sample_size=[512, 512], unknown_key=1))
    assert config.sample_size == 512 and config.block_out_channels == (128, 256, 512, 512)


def test_bad_inputs_and_checkpoints_are_named(vaes, tmp_path):
    model, reference = vaes
    channels = reference.config.latent_channels
    message = rf"latents must be NCHW with {channels} channels, got shape \(1, 8, 8, {channels}\)"
    with pytest.raises(ValueError, match=message):
        model.decode_latents(mx.zeros((1, 8, 8, channels)))
    with pytest.raises(ValueError, match=r"images must be NHWC with 3 channels, got shape \(1, 3, 16, 16\)"):
        model.encode_image(mx.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"latents must be NHWC.*got shape \(8, 8\)"):
        model.decode(mx.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"noise must have the latents' shape"):
        model.encode_image(mx.zeros((1, 16, 16, 3)), noise=mx.zeros((1, channels, 3, 3)))
    # A checkpoint that does not fit its config names the key.
    (tmp_path / "vae").mkdir()
    reference.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(config, mid_block_add_attention=False)))
    with pytest.raises(ValueError, match=r"attentions\.0"):
        load_autoencoder(tmp_path)
