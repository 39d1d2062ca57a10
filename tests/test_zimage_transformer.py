"""Z-Image transformer against diffusers' ZImageTransformer2DModel: every block and the output, float32."""

import mlx.core as mx
import numpy as np
import pytest
from oracle import (assert_close, assert_tensor_within_reference, host, in_bfloat16, mac_pass, mlximg_dtype, perturb_,
                    require_oracle, save_tiny)

from mlximg.models.zimage import ZImageConfig, ZImageTransformer, load_zimage_transformer

TOLERANCE = 1e-4
TINY = dict(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64], in_channels=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = require_oracle()
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    reference = perturb_(ZImageTransformer2DModel(**TINY).eval())
    folder = tmp_path_factory.mktemp("zimage")
    save_tiny(reference, folder / "transformer")
    return reference, load_zimage_transformer(folder, mlximg_dtype())


def run_reference(reference, latents, t, caps):
    """The diffusers forward with every block's output captured by hooks."""
    import torch

    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o, name=f"{group}.{k}": captured.append((name, o)))
             for group in ("noise_refiner", "context_refiner", "layers")
             for k, block in enumerate(getattr(reference, group))]
    dtype = next(reference.parameters()).dtype  # the pipelines feed the model's dtype; t stays float32
    try:
        out = reference([torch.from_numpy(x[:, None]).to(dtype) for x in latents], torch.from_numpy(t),
                        [torch.from_numpy(c).to(dtype) for c in caps], return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out)[:, :, 0], captured


def valid_rows(name: str, n_image: int, cap_lengths: list[int]) -> list[int]:
    """Tokens per sample that are not batch padding (their values are undefined in both engines)."""
    padded = [n + (-n) % 32 for n in cap_lengths]
    if name.startswith("noise_refiner"):
        return [n_image + (-n_image) % 32] * len(cap_lengths)
    if name.startswith("context_refiner"):
        return padded
    return [n_image + (-n_image) % 32 + p for p in padded]


@pytest.mark.mac
@pytest.mark.parametrize("height,width,cap_lengths", [
    (12, 20, [7, 40]),   # non-square; 60 image tokens (padded to 64); captions of different lengths, not x32
    (16, 16, [32]),      # square, batch 1, lengths already multiples of 32: no padding at all
    (8, 24, [33, 33]),   # equal caption lengths: no batch mask
])
def test_blocks_and_output_match_diffusers(tiny, rng, height, width, cap_lengths):
    reference, model = tiny
    batch = len(cap_lengths)
    latents = rng.standard_normal((batch, 16, height, width)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    caps = [rng.standard_normal((n, 32)).astype(np.float32) for n in cap_lengths]

    expected, expected_blocks = run_reference(reference, latents, t, caps)
    captured = []
    dtype = model.all_x_embedder["2-1"].weight.dtype
    out = model(mx.array(latents).astype(dtype), mx.array(t), [mx.array(c).astype(dtype) for c in caps],
                capture=captured)
    if mac_pass():  # bfloat16: within torch-bf16's own error against float32
        low, _ = run_reference(in_bfloat16(reference), latents, t, caps)
        assert_tensor_within_reference(host(out), expected, low, "bfloat16 output")
        return

    # Captions are refined before the image tokens (their refiner is step-independent), so compare by name.
    assert sorted(name for name, _ in captured) == sorted(name for name, _ in expected_blocks)
    n_image = (height // 2) * (width // 2)
    ours_by_name = dict(captured)
    for name, ref in expected_blocks:
        ours = ours_by_name[name]
        for i, rows in enumerate(valid_rows(name, n_image, cap_lengths)):
            assert_close(np.array(ours[i, :rows]), ref[i, :rows], TOLERANCE, f"{name}, sample {i}")
    assert_close(out, expected, TOLERANCE, "output")


def test_real_config_names_and_shapes_equal_diffusers():
    """The released config (diffusers' defaults): built lazily in MLX, on the meta device in torch."""
    torch = require_oracle()
    from diffusers import ZImageTransformer2DModel
    from mlx.utils import tree_flatten

    with torch.device("meta"):
        reference = ZImageTransformer2DModel()
    expected = {name: tuple(p.shape) for name, p in reference.state_dict().items()}
    ours = {name: tuple(p.shape) for name, p in tree_flatten(ZImageTransformer(ZImageConfig()).parameters())}
    assert ours == expected
    assert sum(np.prod(s) for s in ours.values()) > 6e9  # the 6B-parameter model


def test_config_errors():
    with pytest.raises(ValueError, match="head dim"):
        ZImageConfig.from_dict({**TINY, "axes_dims": [8, 8, 8]})
    with pytest.raises(ValueError, match="Omni"):
        ZImageConfig.from_dict({**TINY, "siglip_feat_dim": 64})
