"""Shared layers against the diffusers / PyTorch code the Z-Image and FLUX.2 models use."""

import mlx.core as mx
import numpy as np
import pytest
from oracle import assert_close, require_oracle

from mlximg.nn import RMSNorm, apply_rope, attention, layer_norm, rope_tables, split_heads, timestep_embedding

TOLERANCE = 1e-5  # float32 layers against float32 torch; exact up to rounding


@pytest.fixture
def torch():
    return require_oracle()


def test_timestep_embedding_matches_diffusers(torch, rng):
    from diffusers.models.embeddings import get_timestep_embedding
    from diffusers.models.transformers.transformer_z_image import TimestepEmbedder

    # Small arguments: the formula (frequencies, order of halves, shift) must agree to rounding.
    t = rng.uniform(0, 1, size=5).astype(np.float32)
    expected = TimestepEmbedder.timestep_embedding(torch.from_numpy(t), 256)
    assert_close(timestep_embedding(mx.array(t), 256), expected, TOLERANCE, "Z-Image timestep embedding")
    for dim, flip, shift in [(256, True, 0.0), (255, False, 1.0)]:
        expected = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ours = timestep_embedding(mx.array(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert_close(ours, expected, TOLERANCE, f"timestep embedding dim={dim}")


def test_timestep_embedding_at_model_scale(torch, rng):
    """Both models embed t x 1000: a 1-ulp difference in float32 exp (torch and MLX differ there) moves an
    argument of 1000 by ~6e-5. Against the float64 truth, ours must be as accurate as diffusers' own."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = rng.uniform(0, 1000, size=64).astype(np.float32)
    freqs = np.exp(-np.log(10000.0) * np.arange(128, dtype=np.float64) / 128)
    args = t.astype(np.float64)[:, None] * freqs[None]
    truth = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    bound = 2 * np.abs(args).max() * 2.0**-23  # two float32 ulps of the largest argument
    reference_error = np.abs(get_timestep_embedding(torch.from_numpy(t), 256, True, 0).numpy() - truth)
    our_error = np.abs(np.array(timestep_embedding(mx.array(t), 256)) - truth)
    assert reference_error.max() <= bound and our_error.max() <= bound, (our_error.max(), reference_error.max())


def test_zimage_rope_matches_diffusers(torch, rng):
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    axes_dims, axes_lens = (8, 12, 12), (512, 64, 64)
    # Caption positions (1..L, 0, 0) then image positions (L+1, h, w) on a non-square grid.
    caption = [(i, 0, 0) for i in range(1, 40)]
    image = [(40, h, w) for h in range(6) for w in range(10)]
    positions = np.array(caption + image)
    freqs_cis = RopeEmbedder(theta=256.0, axes_dims=axes_dims, axes_lens=axes_lens)(torch.from_numpy(positions))
    x = rng.standard_normal((2, len(positions), 3, sum(axes_dims))).astype(np.float32)  # (B, S, heads, D)
    x_complex = torch.view_as_complex(torch.from_numpy(x).reshape(*x.shape[:-1], -1, 2))
    expected = torch.view_as_real(x_complex * freqs_cis[None, :, None]).flatten(3)

    cos, sin = rope_tables(positions, axes_dims, 256.0, float32_angles=True)
    ours = apply_rope(mx.array(x).transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)
    assert_close(ours, expected, TOLERANCE, "Z-Image RoPE")


def test_flux2_rope_matches_diffusers(torch, rng):
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    axes_dims = (8, 8, 8, 8)
    positions = np.stack(np.meshgrid(np.arange(1), np.arange(6), np.arange(10), np.arange(1), indexing="ij"), -1)
    positions = positions.reshape(-1, 4)
    positions[:7, 3] = np.arange(7)  # text tokens count along the last axis
    cos_ref, sin_ref = Flux2PosEmbed(theta=2000, axes_dim=list(axes_dims))(torch.from_numpy(positions))
    x = rng.standard_normal((2, 4, len(positions), sum(axes_dims))).astype(np.float32)  # (B, heads, S, D)
    expected = apply_rotary_emb(torch.from_numpy(x), (cos_ref, sin_ref), sequence_dim=2)

    cos, sin = rope_tables(positions, axes_dims, 2000.0)
    assert_close(apply_rope(mx.array(x), cos, sin), expected, TOLERANCE, "FLUX.2 RoPE")


def test_attention_matches_torch_sdpa(torch, rng):
    import torch.nn.functional as F

    q, k, v = (rng.standard_normal((2, 4, 24, 16)).astype(np.float32) for _ in range(3))
    key_valid = np.ones((2, 24), dtype=bool)
    key_valid[1, 17:] = False  # the second sample's last keys are padding
    mask = key_valid[:, None, None, :]
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                              attn_mask=torch.from_numpy(mask))
    expected = expected.transpose(1, 2).reshape(2, 24, 64)
    ours = attention(mx.array(q), mx.array(k), mx.array(v), mask=mx.array(mask))
    assert_close(ours, expected, TOLERANCE, "masked attention")

    x = rng.standard_normal((2, 24, 64)).astype(np.float32)
    np.testing.assert_array_equal(np.array(split_heads(mx.array(x), 4)),
                                  torch.from_numpy(x).unflatten(-1, (4, 16)).transpose(1, 2).numpy())


def test_norms_match_torch(torch, rng):
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    x = rng.standard_normal((2, 7, 32)).astype(np.float32) * 3
    weight = rng.standard_normal(32).astype(np.float32)
    reference = DiffusersRMSNorm(32, eps=1e-5)
    reference.weight.data = torch.from_numpy(weight)
    ours = RMSNorm(32, eps=1e-5)
    ours.weight = mx.array(weight)
    assert_close(ours(mx.array(x)), reference(torch.from_numpy(x)), TOLERANCE, "RMSNorm")

    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (32,), eps=1e-6)
    assert_close(layer_norm(mx.array(x)), expected, TOLERANCE, "LayerNorm")


def test_rope_rejects_wrong_axes():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        rope_tables(np.zeros((4, 2)), (8, 8, 8), 256.0)
