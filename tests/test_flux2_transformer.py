"""FLUX.2 transformer against diffusers' Flux2Transformer2DModel: every block and the output, float32.

Positions are built with the diffusers pipeline's own helpers (Flux2Pipeline._prepare_*_ids), so the
id layout tested here is the one the pipelines pass.
"""

import mlx.core as mx
import numpy as np
import pytest
from oracle import (assert_close, assert_tensor_within_reference, host, in_bfloat16, mac_pass, mlximg_dtype, perturb_,
                    require_oracle, save_tiny)

from mlximg.models.flux2 import Flux2Config, Flux2Transformer, load_flux2_transformer

TOLERANCE = 1e-4
TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=48, timestep_guidance_channels=64, axes_dims_rope=[8, 8, 8, 8])

# The released transformer/config.json values that differ from diffusers' defaults (which are FLUX.2-dev's).
# diffusers does not ship klein configs: these agree across independent copies of the released files (mflux
# model_config.py, DiffSynth-Studio model_configs.py, quoted config.json files), and the parameter counts they
# give (3.88B, 9.08B) confirm the model names.
KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                guidance_embeds=False)
KLEIN_9B = dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                guidance_embeds=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{guidance_embeds: (diffusers reference, our model loaded from its save_pretrained folder, the folder)}."""
    torch = require_oracle()
    from diffusers import Flux2Transformer2DModel

    models = {}
    for seed, guidance_embeds in enumerate((False, True)):
        torch.manual_seed(seed)
        reference = perturb_(Flux2Transformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval(), seed=seed)
        folder = tmp_path_factory.mktemp(f"flux2_guidance_{guidance_embeds}")
        save_tiny(reference, folder / "transformer")
        models[guidance_embeds] = reference, load_flux2_transformer(folder, mlximg_dtype()), folder
    return models


def pipeline_ids(batch: int, grid: tuple[int, int], text_length: int, references: list[tuple[int, int]]):
    """img_ids (latents, then reference images at t = 10, 20, ...) and txt_ids, (B, N, 4) as the pipeline makes them."""
    import torch
    from diffusers import Flux2Pipeline

    img_ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(batch, 1, *grid))
    if references:
        ref_ids = Flux2Pipeline._prepare_image_ids([torch.zeros(1, 1, h, w) for h, w in references])
        img_ids = torch.cat([img_ids, ref_ids.repeat(batch, 1, 1)], dim=1)
    txt_ids = Flux2Pipeline._prepare_text_ids(torch.zeros(batch, text_length, 1))
    return img_ids.numpy(), txt_ids.numpy()


def run_reference(reference, x, text, t, img_ids, txt_ids, guidance):
    """The diffusers forward with every block's output captured by hooks."""
    import torch

    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o, name=f"{group}.{k}": captured.append((name, o)))
             for group in ("transformer_blocks", "single_transformer_blocks")
             for k, block in enumerate(getattr(reference, group))]
    dtype = next(reference.parameters()).dtype
    try:
        out = reference(
            hidden_states=torch.from_numpy(x).to(dtype), encoder_hidden_states=torch.from_numpy(text).to(dtype),
            timestep=torch.from_numpy(t), img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
            guidance=None if guidance is None else torch.from_numpy(guidance), return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured


CASES = {
    # guidance_embeds, batch, latent grid (h, w), text length, reference image grids, embedded guidance
    "klein-like, batch 2, non-square": (False, 2, (3, 5), 7, [], None),
    "klein-like, two reference images": (False, 2, (4, 3), 13, [(2, 3), (3, 2)], None),
    "dev-like, guidance, reference image": (True, 2, (4, 6), 11, [(2, 3)], np.array([4.0, 2.5], np.float32)),
    "dev-like, guidance None": (True, 1, (2, 7), 5, [], None),
}


@pytest.mark.mac
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_and_output_match_diffusers(tiny, rng, case):
    guidance_embeds, batch, grid, text_length, references, guidance = CASES[case]
    reference, model, _ = tiny[guidance_embeds]
    img_ids, txt_ids = pipeline_ids(batch, grid, text_length, references)
    x = rng.standard_normal((batch, img_ids.shape[1], TINY["in_channels"])).astype(np.float32)
    text = rng.standard_normal((batch, text_length, TINY["joint_attention_dim"])).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)  # sigma; the pipelines pass scheduler timesteps / 1000

    expected, expected_blocks = run_reference(reference, x, text, t, img_ids, txt_ids, guidance)
    captured = []
    out = model(mx.array(x), mx.array(text), mx.array(t), img_ids, txt_ids,
                guidance=None if guidance is None else mx.array(guidance), capture=captured)
    if mac_pass():  # bfloat16: within torch-bf16's own error against float32
        low, _ = run_reference(in_bfloat16(reference), x, text, t, img_ids, txt_ids, guidance)
        assert_tensor_within_reference(host(out), expected, low, "bfloat16 output")
        return

    assert [name for name, _ in captured] == [name for name, _ in expected_blocks]
    errors = {}
    for (name, ours), (_, ref) in zip(captured, expected_blocks):
        if name.startswith("transformer_blocks"):  # (text, image) streams, as diffusers returns them
            errors[f"{name} text"] = assert_close(np.array(ours[0]), ref[0], TOLERANCE, f"{name} text")
            errors[f"{name} image"] = assert_close(np.array(ours[1]), ref[1], TOLERANCE, f"{name} image")
        else:
            errors[name] = assert_close(np.array(ours), ref, TOLERANCE, name)
    errors["output"] = assert_close(out, expected, TOLERANCE, "output")
    print(case, {k: f"{v:.2e}" for k, v in errors.items()})


def test_rope_tables_once_per_generation(tiny, rng):
    """rope= from model.rope gives the same result as ids; (N, 4) ids equal (B, N, 4) identical ones."""
    model = tiny[False][1]
    img_ids, txt_ids = pipeline_ids(2, (3, 4), 6, [(2, 2)])
    x = mx.array(rng.standard_normal((2, img_ids.shape[1], 16)).astype(np.float32))
    text = mx.array(rng.standard_normal((2, 6, 48)).astype(np.float32))
    from_ids = model(x, text, 0.5, img_ids, txt_ids)
    rope = model.rope(img_ids[0], txt_ids[0])
    assert rope[0].shape == (1, 1, 6 + img_ids.shape[1], 16)
    assert mx.array_equal(model(x, text, mx.array([0.5, 0.5]), rope=rope), from_ids)


def test_per_sample_ids(tiny, rng):
    """Samples with different positions each get their own (diffusers would use the first sample's)."""
    model = tiny[False][1]
    img_ids, txt_ids = pipeline_ids(2, (3, 4), 6, [])
    shifted = img_ids.copy()
    shifted[1, :, 0] = 10  # sample 1 at t = 10, as a reference image would be
    x = mx.array(rng.standard_normal((2, 12, 16)).astype(np.float32))
    text = mx.array(rng.standard_normal((2, 6, 48)).astype(np.float32))
    out = model(x, text, 0.5, shifted, txt_ids)
    assert model.rope(shifted, txt_ids[0])[0].shape == (2, 1, 18, 16)
    # Batch 2 against batch 1: equal up to the matmuls' summation order, far below the parity tolerance.
    assert_close(out[0], model(x[:1], text[:1], 0.5, img_ids[0], txt_ids[0])[0], 1e-5, "sample 0")
    assert_close(out[1], model(x[1:], text[1:], 0.5, shifted[1], txt_ids[0])[0], 1e-5, "sample 1")


@pytest.mark.mac
def test_bfloat16_matches_diffusers_in_bfloat16(tiny, rng):
    """dtype= casts the weights and the inputs follow them. Like diffusers, sigma and the guidance are rounded
    to bfloat16 before x1000 (0.7 -> 699.2 -> 700), which moves the output ~25% from float32 in both engines:
    the fair reference is diffusers in bfloat16."""
    torch = require_oracle()
    from diffusers import Flux2Transformer2DModel

    folder = tiny[True][2]
    reference = Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    model = load_flux2_transformer(folder, dtype=mx.bfloat16)
    img_ids, txt_ids = pipeline_ids(1, (4, 4), 8, [])
    x = rng.standard_normal((1, 16, 16)).astype(np.float32)
    text = rng.standard_normal((1, 8, 48)).astype(np.float32)
    out = model(mx.array(x), mx.array(text), 0.7, img_ids, txt_ids, guidance=3.5)
    expected = reference(
        hidden_states=torch.from_numpy(x).bfloat16(), encoder_hidden_states=torch.from_numpy(text).bfloat16(),
        timestep=torch.tensor([0.7]), img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
        guidance=torch.tensor([3.5]), return_dict=False)[0]
    assert out.dtype == mx.bfloat16
    # Two bfloat16 engines differ by rounding order: a few bfloat16 ulps (2^-8) through four blocks.
    error = assert_close(np.array(out.astype(mx.float32)), expected, 2e-2, "bfloat16 output")
    print("bfloat16 output against diffusers bfloat16", f"{error:.2e}")


@pytest.mark.parametrize("name,config,billions", [
    ("FLUX.2-dev", {}, 32.2),
    ("FLUX.2-klein-4B", KLEIN_4B, 3.9),
    ("FLUX.2-klein-9B", KLEIN_9B, 9.1),
])
def test_real_config_names_and_shapes_equal_diffusers(name, config, billions):
    """Built lazily in MLX (nothing is evaluated), on the meta device in torch."""
    torch = require_oracle()
    from diffusers import Flux2Transformer2DModel
    from mlx.utils import tree_flatten

    with torch.device("meta"):
        reference = Flux2Transformer2DModel(**config)
    expected = {key: tuple(p.shape) for key, p in reference.state_dict().items()}
    model = Flux2Transformer(Flux2Config.from_dict(config))
    ours = {key: tuple(p.shape) for key, p in tree_flatten(model.parameters())}
    assert ours == expected
    assert sum(np.prod(s) for s in ours.values()) / 1e9 == pytest.approx(billions, abs=0.1)


def test_config_from_checkpoint_dict_ignores_unknown_keys():
    args = Flux2Config.from_dict({"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.37.0.dev0",
                                  **TINY, "out_channels": None})
    assert args.inner_dim == 64 and args.output_channels == 16 and args.axes_dims_rope == (8, 8, 8, 8)


def test_config_errors():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Flux2Config.from_dict({**TINY, "axes_dims_rope": [8, 8, 8, 4]})
    with pytest.raises(ValueError, match="even"):
        Flux2Config.from_dict({**TINY, "axes_dims_rope": [7, 9, 8, 8]})
    with pytest.raises(ValueError, match="no blocks"):
        Flux2Config.from_dict({**TINY, "num_layers": 0, "num_single_layers": 0})


def test_input_errors(tiny):
    model = tiny[False][1]
    img_ids, txt_ids = pipeline_ids(1, (2, 2), 3, [])
    x, text = mx.zeros((1, 4, 16)), mx.zeros((1, 3, 48))
    with pytest.raises(ValueError, match="no guidance embedding"):
        model(x, text, 0.5, img_ids, txt_ids, guidance=4.0)
    with pytest.raises(ValueError, match="img_ids must have shape"):
        model(x, text, 0.5, img_ids[..., :3], txt_ids)
    with pytest.raises(ValueError, match="do not fit"):
        model(x, text[:, :2], 0.5, img_ids, txt_ids)
    with pytest.raises(ValueError, match="rope="):
        model(x, text, 0.5)
