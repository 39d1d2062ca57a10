"""AutoencoderKLFlux2 (FLUX.2's VAE) against diffusers: the model, and the FLUX.2 pipelines' latent-space code
(patchify, BatchNorm normalisation, pack / unpack, _encode_vae_image, the end-of-generation decode)."""

import inspect
import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from oracle import (assert_close, assert_tensor_within_reference, host, in_bfloat16, mac_pass, mlximg_dtype, perturb_,
                    require_oracle, save_tiny)

from mlximg.models.flux2_vae import (AutoencoderKLFlux2, AutoencoderKLFlux2Config, load_flux2_vae, pack_latents,
                                     patchify, unpack_latents, unpatchify)

TOLERANCE = 1e-5  # float32 against float32 torch

# The released vae/config.json of black-forest-labs/FLUX.2-dev (klein ships the same VAE); equal to the
# defaults of diffusers' AutoencoderKLFlux2.
REAL_CONFIG = {
    "_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.36.0.dev0",
    "act_fn": "silu", "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 32, "layers_per_block": 2,
    "mid_block_add_attention": True, "norm_num_groups": 32, "patch_size": [2, 2], "sample_size": 1024,
    "use_quant_conv": True, "use_post_quant_conv": True,
}
TINY = {
    # The released structure (32 latent channels, quant convs, mid attention), narrow and two resolutions deep.
    "flux2": dict(REAL_CONFIG, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=32),
    # Every option the other way: a decoder wider than the encoder, no quant convs, no attention, another eps.
    "variant": dict(REAL_CONFIG, block_out_channels=[16, 32, 32], decoder_block_out_channels=[32, 32, 48],
                    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                    layers_per_block=1, norm_num_groups=8, latent_channels=8, sample_size=64,
                    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                    batch_norm_eps=1e-3),
}


def diffusers_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "force_upcast"}


def pipelines():
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    return Flux2Pipeline, Flux2KleinPipeline


@pytest.fixture(scope="module", params=sorted(TINY))
def vaes(request, tmp_path_factory):
    """(mlximg model, diffusers reference) for one tiny variant, through a save_pretrained vae/ folder."""
    torch = require_oracle()
    from diffusers import AutoencoderKLFlux2 as TorchAutoencoderKLFlux2

    torch.manual_seed(0)
    reference = perturb_(TorchAutoencoderKLFlux2(**diffusers_config(TINY[request.param])).eval(), seed=1)
    assert reference.bn.running_var.min() > 0.1 and reference.bn.running_mean.abs().max() > 0.1
    model_dir = tmp_path_factory.mktemp(f"tmp_{request.param}")
    save_tiny(reference, model_dir / "vae")
    return load_flux2_vae(model_dir, mlximg_dtype()), reference


def nchw(x: mx.array) -> np.ndarray:
    return host(x.transpose(0, 3, 1, 2))


def patched_like(reference, height, width, seed=0, batch=1):
    """Transformer-space latents: (B, 4 * latent_channels, h, w), standard normal like the pipelines' noise."""
    return np.random.default_rng(seed).standard_normal(
        (batch, 4 * reference.config.latent_channels, height, width)).astype(np.float32)


def images_like(height, width, seed=0, batch=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def bn_stats(reference):
    """The pipelines' mean and std, in their words (pipeline_flux2*.py)."""
    import torch

    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    return mean, std


def pipeline_unpack(pipeline, tokens, ids, height, width):
    """_unpack_latents_with_ids as each pipeline calls it: klein passes the size, dev reads it from the ids."""
    if "height" in inspect.signature(pipeline._unpack_latents_with_ids).parameters:
        return pipeline._unpack_latents_with_ids(tokens, ids, height, width)
    return pipeline._unpack_latents_with_ids(tokens, ids)


def pipeline_decode(pipeline, reference, latents: np.ndarray):
    """The end of Flux2Pipeline / Flux2KleinPipeline.__call__: packed tokens -> image, with the reference VAE."""
    import torch

    latents = torch.from_numpy(latents)
    ids = pipeline._prepare_latent_ids(latents)
    tokens = pipeline._pack_latents(latents)
    latents = pipeline_unpack(pipeline, tokens, ids, latents.shape[2], latents.shape[3])
    mean, std = bn_stats(reference)
    latents = pipeline._unpatchify_latents(latents * std + mean)
    return reference.decode(latents, return_dict=False)[0]


def pipeline_encode(pipeline, reference, images: np.ndarray):
    """The pipelines' own _encode_vae_image, run on the reference VAE."""
    import torch

    owner = SimpleNamespace(vae=reference, _patchify_latents=pipeline._patchify_latents)
    return pipeline._encode_vae_image(owner, torch.from_numpy(images.transpose(0, 3, 1, 2)), generator=None)


@pytest.mark.mac
def test_decode_matches_diffusers(vaes):
    import torch

    model, reference = vaes
    z = np.random.default_rng(1).standard_normal((2, reference.config.latent_channels, 6, 10)).astype(np.float32)
    expected = reference.decode(torch.from_numpy(z)).sample
    ours = nchw(model.decode(mx.array(z.transpose(0, 2, 3, 1))))
    if mac_pass():  # bfloat16: within torch-bf16's own error against float32
        low = in_bfloat16(reference).decode(torch.from_numpy(z).bfloat16()).sample
        assert_tensor_within_reference(ours, expected, low, "bfloat16 decode")
    else:
        assert_close(ours, expected, TOLERANCE, "decode")


def test_encode_matches_diffusers(vaes):
    import torch

    model, reference = vaes
    images = images_like(24, 40, batch=2)  # any size: the encoder pads as diffusers does
    posterior = reference.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    mean, logvar = model.encode(mx.array(images))
    assert_close(nchw(mean), posterior.mean, TOLERANCE, "posterior mean")
    assert_close(nchw(logvar), posterior.logvar, TOLERANCE, "posterior logvar")


@pytest.mark.parametrize("pipeline", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_layout_helpers_match_the_pipelines(pipeline):
    torch = require_oracle()
    cls = dict(zip(["Flux2Pipeline", "Flux2KleinPipeline"], pipelines()))[pipeline]
    # Distinct values everywhere, so any permutation error shows; non-square, batched.
    latents = np.arange(2 * 32 * 6 * 10, dtype=np.float32).reshape(2, 32, 6, 10)
    patched = cls._patchify_latents(torch.from_numpy(latents))
    np.testing.assert_array_equal(np.array(patchify(mx.array(latents))), patched.numpy())
    np.testing.assert_array_equal(np.array(unpatchify(mx.array(patched.numpy()))),
                                  cls._unpatchify_latents(patched).numpy())
    np.testing.assert_array_equal(np.array(unpatchify(patchify(mx.array(latents)))), latents)
    tokens = cls._pack_latents(patched)
    np.testing.assert_array_equal(np.array(pack_latents(mx.array(patched.numpy()))), tokens.numpy())
    unpacked = pipeline_unpack(cls, tokens, cls._prepare_latent_ids(patched), 3, 5)
    np.testing.assert_array_equal(np.array(unpack_latents(mx.array(tokens.numpy()), 3, 5)), unpacked.numpy())


def test_normalization_matches_the_pipeline_formula(vaes):
    import torch

    model, reference = vaes
    x = patched_like(reference, 3, 5, batch=2) * 2 + 1
    mean, std = bn_stats(reference)
    expected = (torch.from_numpy(x) - mean) / std
    assert_close(np.array(model.normalize(mx.array(x))), expected, TOLERANCE, "normalize")
    assert_close(np.array(model.denormalize(mx.array(x))), torch.from_numpy(x) * std + mean, TOLERANCE, "denormalize")
    assert_close(np.array(model.denormalize(model.normalize(mx.array(x)))), x, TOLERANCE, "round trip")


@pytest.mark.parametrize("pipeline", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_decode_latents_matches_the_pipeline(vaes, pipeline):
    model, reference = vaes
    cls = dict(zip(["Flux2Pipeline", "Flux2KleinPipeline"], pipelines()))[pipeline]
    latents = patched_like(reference, 3, 5, batch=2)  # non-square, batched
    expected = pipeline_decode(cls, reference, latents)
    tokens = pack_latents(mx.array(latents))  # what the denoising loop holds at the end
    images = model.decode_latents(unpack_latents(tokens, 3, 5))
    pixels = 2 * model.config.scale_factor_spatial  # per transformer token
    assert images.shape == (2, 3 * pixels, 5 * pixels, 3)
    assert_close(nchw(images), expected, TOLERANCE, "decode_latents")


@pytest.mark.parametrize("pipeline", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_encode_image_matches_the_pipeline(vaes, pipeline):
    model, reference = vaes
    cls = dict(zip(["Flux2Pipeline", "Flux2KleinPipeline"], pipelines()))[pipeline]
    multiple = 2 * model.config.scale_factor_spatial
    images = images_like(2 * multiple, 3 * multiple, seed=2, batch=2)
    expected = pipeline_encode(cls, reference, images)
    assert_close(np.array(model.encode_image(mx.array(images))), expected, TOLERANCE, "encode_image")


def test_tiled_decode_latents_matches_diffusers(vaes):
    model, reference = vaes
    Flux2Pipeline, _ = pipelines()
    tile = reference.tile_latent_min_size // 2  # in transformer tokens: tiles are taken on the unpatchified latents
    latents = patched_like(reference, tile + 3, 2 * tile - 2, seed=3)  # 2 x 3 tiles, ragged edges
    reference.enable_tiling()
    try:
        expected = pipeline_decode(Flux2Pipeline, reference, latents)
    finally:
        reference.disable_tiling()
    tiled = nchw(model.decode_latents(mx.array(latents), tiled=True))
    assert_close(tiled, expected, TOLERANCE, "tiled decode_latents")
    np.testing.assert_array_equal(nchw(model.decode_latents(mx.array(latents), tiled=None)), tiled)
    assert np.abs(nchw(model.decode_latents(mx.array(latents))) - tiled).max() > 1e-3  # tiling really happened


def test_tiled_encode_image_matches_diffusers(vaes):
    model, reference = vaes
    Flux2Pipeline, _ = pipelines()
    multiple = 2 * model.config.scale_factor_spatial
    images = images_like(reference.tile_sample_min_size + multiple, reference.tile_sample_min_size + 2 * multiple,
                         seed=4)
    reference.enable_tiling()
    try:
        expected = pipeline_encode(Flux2Pipeline, reference, images)
    finally:
        reference.disable_tiling()
    tiled = np.array(model.encode_image(mx.array(images), tiled=True))
    assert_close(tiled, expected, TOLERANCE, "tiled encode_image")
    np.testing.assert_array_equal(np.array(model.encode_image(mx.array(images), tiled=None)), tiled)


def test_bn_statistics_are_loaded_and_the_counter_dropped(vaes, tmp_path):
    model, reference = vaes
    np.testing.assert_array_equal(np.array(model.bn.running_mean), reference.bn.running_mean.numpy())
    np.testing.assert_array_equal(np.array(model.bn.running_var), reference.bn.running_var.numpy())
    assert model.bn.eps == reference.config.batch_norm_eps
    weights = {"bn.num_batches_tracked": mx.array(400000, dtype=mx.int64), "bn.running_mean": mx.zeros((8,))}
    assert list(AutoencoderKLFlux2.sanitize(weights)) == ["bn.running_mean"]


def test_real_config_has_diffusers_parameter_names_and_shapes():
    torch = require_oracle()
    from diffusers import AutoencoderKLFlux2 as TorchAutoencoderKLFlux2

    config = AutoencoderKLFlux2Config.from_dict(REAL_CONFIG)
    # The released config is the class defaults, ours and diffusers'.
    assert config == AutoencoderKLFlux2Config()
    signature = inspect.signature(TorchAutoencoderKLFlux2.__init__).parameters
    for key, value in diffusers_config(REAL_CONFIG).items():
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    with torch.device("meta"):
        reference = TorchAutoencoderKLFlux2(**diffusers_config(REAL_CONFIG))
    # Lazy MLX arrays of the checkpoint's shapes and dtypes: nothing is allocated by building or sanitizing.
    checkpoint = {k: mx.zeros(tuple(v.shape), dtype=mx.int64 if not v.is_floating_point() else mx.float32)
                  for k, v in reference.state_dict().items()}
    expected = {k: v.shape for k, v in AutoencoderKLFlux2.sanitize(checkpoint).items()}
    model = AutoencoderKLFlux2(config)
    actual = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    assert len(checkpoint) == 251 and len(actual) == 250
    assert actual["bn.running_mean"] == (128,) and config.patched_channels == 128 and config.scale_factor_spatial == 8


def test_bfloat16_load_casts_statistics(vaes, tmp_path):
    model, reference = vaes
    reference.save_pretrained(tmp_path / "vae")
    half = load_flux2_vae(tmp_path, dtype=mx.bfloat16)
    assert half.dtype == mx.bfloat16 and half.bn.running_var.dtype == mx.bfloat16
    latents = mx.array(patched_like(reference, 2, 2, seed=5))
    images = half.decode_latents(latents.astype(mx.bfloat16))
    assert images.dtype == mx.bfloat16
    assert_close(np.array(images.astype(mx.float32)), np.array(model.decode_latents(latents)), 5e-2,
                 "bfloat16 decode (bfloat16 rounding, not a parity bound)")


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match=r"unsupported patch_size \(1, 2\)"):
        AutoencoderKLFlux2Config.from_dict(dict(REAL_CONFIG, patch_size=[1, 2]))
    with pytest.raises(ValueError, match=r"decoder_block_out_channels \(128, 256, 512\) must have one width"):
        AutoencoderKLFlux2Config.from_dict(dict(REAL_CONFIG, decoder_block_out_channels=[128, 256, 512]))
    with pytest.raises(ValueError, match=r"AutoencoderKLFlux2: unsupported act_fn 'gelu'"):
        AutoencoderKLFlux2Config.from_dict(dict(REAL_CONFIG, act_fn="gelu"))
    config = AutoencoderKLFlux2Config.from_dict(dict(REAL_CONFIG, sample_size=[512, 512], unknown_key=1))
    assert config.sample_size == 512 and config.patch_size == (2, 2)


def test_bad_inputs_and_checkpoints_are_named(vaes, tmp_path):
    model, reference = vaes
    channels = 4 * reference.config.latent_channels
    latent = reference.config.latent_channels
    with pytest.raises(ValueError, match=rf"latents must be NCHW with {channels} channels, got shape "
                                         rf"\(1, {latent}, 8, 8\)"):
        model.decode_latents(mx.zeros((1, latent, 8, 8)))  # VAE latents where patchified ones belong
    with pytest.raises(ValueError, match=rf"got shape \(1, 4, 6, {channels}\)"):
        model.normalize(mx.zeros((1, 4, 6, channels)))  # NHWC where NCHW belongs
    multiple = 2 * model.config.scale_factor_spatial
    odd = multiple + multiple // 2
    with pytest.raises(ValueError, match=rf"multiples of {multiple}, got shape \(1, {odd}, {multiple}, 3\)"):
        model.encode_image(mx.zeros((1, odd, multiple, 3)))
    with pytest.raises(ValueError, match=r"images must be NHWC with 3 channels, got shape \(1, 3, 32, 32\)"):
        model.encode_image(mx.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"even height and width, got shape \(1, 32, 5, 4\)"):
        patchify(mx.zeros((1, 32, 5, 4)))
    with pytest.raises(ValueError, match=r"multiple of 4 channels, got shape \(1, 6, 2, 2\)"):
        unpatchify(mx.zeros((1, 6, 2, 2)))
    with pytest.raises(ValueError, match=r"tokens must be \(B, 3 \* 5, C\), got shape \(1, 16, 128\)"):
        unpack_latents(mx.zeros((1, 16, 128)), 3, 5)

    # A checkpoint that does not fit its config names the key: quant convs, and the BatchNorm statistics.
    reference.save_pretrained(tmp_path / "vae")
    config_path = tmp_path / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_quant_conv=not config["use_quant_conv"])))
    with pytest.raises(ValueError, match=r"quant_conv\.weight"):
        load_flux2_vae(tmp_path)
    config_path.write_text(json.dumps(config))
    weights_path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_path)
    del weights["bn.running_var"]
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match=r"bn\.running_var"):
        load_flux2_vae(tmp_path)
