"""Image to image and inpainting against diffusers' ZImageImg2ImgPipeline, ZImageInpaintPipeline and
Flux2KleinInpaintPipeline on the tiny random models, from the same noise: diffusers draws it from a seeded torch
generator (the VAE encodes by its posterior mean, so the noise is the generator's first draw), mlximg gets it as
`latents=`."""

import numpy as np
import pytest
from oracle import assert_image_matches, in_bfloat16, mac_pass, require_oracle
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

from mlximg.pipelines.flux2 import Flux2Pipeline
from mlximg.pipelines.init_image import bilinear, nearest
from mlximg.pipelines.zimage import ZImagePipeline

PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage-init") / "tiny-zimage"
    reference = build_reference(folder)
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    pipes = {name: cls(**reference.components) for name, cls in
             (("img2img", ZImageImg2ImgPipeline), ("inpaint", ZImageInpaintPipeline))}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes, ZImagePipeline(folder, defaults={"steps": 4, "guidance": 0.0})


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    folder = tmp_path_factory.mktemp("klein-init") / "klein"
    reference = build_klein(folder, is_distilled=True)
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline(**reference.components, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Flux2Pipeline(folder, defaults={"steps": 4, "guidance": 1.0})


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    """diffusers' Z-Image pipelines sample the VAE posterior; mlximg (and klein) take its mean."""
    from diffusers.pipelines.z_image import pipeline_z_image_img2img, pipeline_z_image_inpaint

    for module in (pipeline_z_image_img2img, pipeline_z_image_inpaint):
        original = module.retrieve_latents
        monkeypatch.setattr(module, "retrieve_latents",
                            lambda output, generator=None, sample_mode="sample", f=original: f(output, generator,
                                                                                               "argmax"))


def picture(rng, width, height):
    """A smooth random picture (a VAE encodes noise poorly, which would hide nothing but looks unlike use)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def rectangle_mask(width, height):
    from PIL import Image

    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 3: width] = 255
    return Image.fromarray(mask)


def soft_mask(width, height):
    """A horizontal ramp, given at twice the image's size (the mask is resized to it)."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, 2 * width).astype(np.uint8), (2 * height, 1))
    return Image.fromarray(ramp)


def noise(shape, seed):
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()


def generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def diffusers_both(pipe, **kwargs):
    """diffusers-float32's pixels, and in the Mac pass diffusers-bf16's."""
    require_oracle()
    seed = kwargs.pop("seed")
    expected = pixels(pipe(**kwargs, generator=generator(seed)).images[0])
    low = pixels(in_bfloat16(pipe)(**kwargs, generator=generator(seed)).images[0]) if mac_pass() else None
    return expected, low


# -- Z-Image -------------------------------------------------------------------------------------------------

@pytest.mark.mac
@pytest.mark.parametrize("strength, guidance", [(0.3, 0.0), (0.6, 3.0), (1.0, 0.0)],
                         ids=["0.3", "0.6-cfg", "1.0"])
def test_zimage_img2img_matches_diffusers(zimage, rng, strength, guidance):
    pipes, pipeline = zimage
    width, height, seed = 96, 64, 3
    init = picture(rng, width, height)
    negative = "blurry" if guidance else None
    expected, low = diffusers_both(pipes["img2img"], prompt=PROMPT, image=init, strength=strength,
                                   num_inference_steps=4, guidance_scale=guidance, negative_prompt=negative,
                                   seed=seed)
    ours = pipeline.generate(PROMPT, init_image=init, strength=strength, steps=4, guidance=guidance,
                             negative_prompt=negative, latents=noise((1, 16, height // 8, width // 8), seed))
    assert_image_matches(pixels(ours), expected, low, f"Z-Image img2img strength {strength}")
    assert ours.info["parameters"]["strength"] == strength


def test_zimage_img2img_stays_near_the_init_image_at_low_strength(zimage, rng):
    pipes, pipeline = zimage
    init = picture(rng, 64, 64)
    near = pixels(pipeline.generate(PROMPT, init_image=init, strength=0.3, steps=4, seed=1))
    far = pixels(pipeline.generate(PROMPT, init_image=init, strength=1.0, steps=4, seed=1))
    reconstructed = pixels(pipeline.decode(pipeline.encode_init(pipeline.prepare(PROMPT, init_image=init,
                                                                                 strength=0.3))))
    assert np.abs(near - reconstructed).mean() < np.abs(far - reconstructed).mean()


@pytest.mark.mac
@pytest.mark.parametrize("mask, strength", [(rectangle_mask, 1.0), (soft_mask, 0.7)], ids=["rectangle", "soft"])
def test_zimage_inpaint_matches_diffusers(zimage, rng, mask, strength):
    pipes, pipeline = zimage
    width, height, seed = 64, 96, 5
    init, mask_image = picture(rng, width, height), mask(width, height)
    expected, low = diffusers_both(pipes["inpaint"], prompt=PROMPT, image=init, mask_image=mask_image,
                                   strength=strength, num_inference_steps=4, guidance_scale=0.0, seed=seed)
    ours = pipeline.generate(PROMPT, init_image=init, mask=mask_image, strength=strength, steps=4,
                             latents=noise((1, 16, height // 8, width // 8), seed))
    assert_image_matches(pixels(ours), expected, low, f"Z-Image inpaint {mask.__name__}")


def test_inpaint_keeps_the_unmasked_region(zimage, rng):
    """The final latents are the init image's outside the mask (the last blend is at sigma 0), new inside."""
    _, pipeline = zimage
    width, height = 64, 64
    init, mask = picture(rng, width, height), rectangle_mask(width, height)
    run = pipeline.prepare(PROMPT, init_image=init, mask=mask, steps=4, seed=2)
    *_, final = pipeline.run_steps(run)
    keep = np.broadcast_to(np.array(pipeline.mask_latents(run)) == 0, final.latents.shape)
    difference = np.abs(np.array(final.latents) - np.array(run.init_latents))
    assert difference[keep].max() == 0 and difference[~keep].mean() > 0.1


def test_batches_use_their_own_noise(zimage, rng):
    _, pipeline = zimage
    init = picture(rng, 64, 64)
    images = pipeline.generate(PROMPT, init_image=init, strength=0.8, steps=4, seed=[7, 8])
    alone = pipeline.generate(PROMPT, init_image=init, strength=0.8, steps=4, seed=8)
    assert np.abs(pixels(images[1]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 1


# -- FLUX.2 klein ----------------------------------------------------------------------------------------------

@pytest.mark.mac
@pytest.mark.parametrize("references, strength", [(0, 1.0), (2, 0.75)], ids=["no-reference", "two-references"])
def test_klein_inpaint_matches_diffusers(klein, rng, references, strength):
    pipe, pipeline = klein
    width, height, seed = 96, 64, 11
    init, mask = picture(rng, width, height), rectangle_mask(width, height)
    refs = [picture(rng, 64, 80) for _ in range(references)] or None
    expected, low = diffusers_both(pipe, prompt=PROMPT, image=init, mask_image=mask, image_reference=refs,
                                   strength=strength, num_inference_steps=4, seed=seed)
    ours = pipeline.generate(PROMPT, init_image=init, mask=mask, image=refs, strength=strength, steps=4,
                             latents=noise((1, 32, height // 16, width // 16), seed))
    assert_image_matches(pixels(ours), expected, low, f"klein inpaint with {references} references")
    assert ours.info["parameters"]["references"] == references


def test_klein_img2img_is_inpainting_everywhere(klein, rng):
    """FLUX.2 image to image has no diffusers pipeline: it is the inpaint path with nothing kept, so it
    matches diffusers' inpainting with an all-white mask."""
    from PIL import Image

    pipe, pipeline = klein
    width, height, seed = 64, 80, 13
    init = picture(rng, width, height)
    white = Image.new("L", (width, height), 255)
    expected, low = diffusers_both(pipe, prompt=PROMPT, image=init, mask_image=white, strength=0.6,
                                   num_inference_steps=4, seed=seed)
    ours = pipeline.generate(PROMPT, init_image=init, strength=0.6, steps=4,
                             latents=noise((1, 32, height // 16, width // 16), seed))
    assert_image_matches(pixels(ours), expected, low, "klein img2img")


# -- the pieces ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size_in, size_out", [((64, 96), (8, 12)), ((50, 70), (8, 12)), ((7, 5), (16, 9))])
def test_mask_resampling_matches_torch(size_in, size_out):
    torch = require_oracle()
    mask = (np.random.default_rng(0).random(size_in) > 0.5).astype(np.float32)
    for ours, mode in ((nearest, "nearest"), (bilinear, "bilinear")):
        expected = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=size_out, mode=mode)
        np.testing.assert_allclose(ours(mask, *size_out), expected[0, 0].numpy(), atol=1e-6, err_msg=mode)


def test_bad_input_is_refused_before_loading(zimage, rng, tmp_path):
    pipeline = ZImagePipeline(zimage[1].model_dir, defaults={"steps": 4, "guidance": 0.0})
    init = picture(rng, 64, 64)
    cases = [
        (dict(init_image=tmp_path / "missing.png"), "does not exist"),
        (dict(init_image=init, mask=picture(rng, 64, 128)), "aspects differ"),
        (dict(init_image=init, strength=0.0), "strength must be a number in (0, 1]"),
        (dict(init_image=init, strength=1.5), "strength must be a number in (0, 1]"),
        (dict(init_image=init, strength=float("nan")), "strength must be a number in (0, 1]"),
        (dict(init_image=init, strength=1e-17, steps=4), "leaves no denoising step"),
        (dict(mask=init), "mask= needs init_image="),
        (dict(strength=0.5), "strength= needs init_image="),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
            pipeline.generate(PROMPT, **kwargs)
    assert not pipeline.loaded, "refused before any component loaded"


# -- FLUX.2 klein KV ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def klein_kv(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein-kv")
    reference = build_klein(root / "klein", is_distilled=True)
    from diffusers import Flux2KleinKVPipeline

    pipe = Flux2KleinKVPipeline(**reference.components)
    pipe.save_pretrained(root / "klein-kv")
    pipe.set_progress_bar_config(disable=True)
    defaults = {"steps": 4, "guidance": 1.0}
    return pipe, Flux2Pipeline(root / "klein-kv", defaults=defaults), Flux2Pipeline(root / "klein", defaults=defaults)


@pytest.mark.mac
@pytest.mark.parametrize("count", [1, 2])
def test_klein_kv_editing_matches_diffusers(klein_kv, rng, count):
    import torch

    pipe, pipeline, plain = klein_kv
    width, height = 96, 64
    references = [picture(rng, 80, 64) for _ in range(count)]
    latents = rng.standard_normal((1, 32, height // 16, width // 16)).astype(np.float32)

    def diffusers_image(p):
        return pixels(p(prompt=PROMPT, image=references, height=height, width=width, num_inference_steps=3,
                        latents=torch.from_numpy(latents.copy())).images[0])

    expected = diffusers_image(pipe)
    low = diffusers_image(in_bfloat16(pipe)) if mac_pass() else None
    ours = pixels(pipeline.generate(PROMPT, image=references, width=width, height=height, steps=3, latents=latents))
    assert_image_matches(ours, expected, low, f"klein KV with {count} references")
    # The same weights without KV caching give another image (beyond the 1/255 the match allows): the
    # references are modulated and attended differently.
    without = pixels(plain.generate(PROMPT, image=references, width=width, height=height, steps=3, latents=latents))
    assert np.abs(ours - without).max() > 1


def test_klein_kv_refuses_what_it_cannot_run(klein_kv, rng):
    _, pipeline, _ = klein_kv
    reference = picture(rng, 64, 64)
    with pytest.raises(ValueError, match="TeaCache and StepCache do not run"):
        pipeline.generate(PROMPT, image=reference, teacache=True)
    with pytest.raises(ValueError, match="klein KV model has no image-to-image"):
        pipeline.generate(PROMPT, init_image=reference)
