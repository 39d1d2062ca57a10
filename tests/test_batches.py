"""Several images per call, step callbacks and step iteration: a batch runs through every transformer forward at
once, and each of its images equals what a call alone with that image's prompt and seed gives (and what
diffusers' num_images_per_prompt gives from the same latents), within 1/255."""

import numpy as np
import pytest
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

import mlximg
from mlximg import cli
from mlximg.output import read_parameters
from mlximg.pipelines.flux2 import Flux2Pipeline
from mlximg.pipelines.zimage import ZImagePipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    return {"zimage": (build_reference(root / "zimage"), root / "zimage"),
            "klein": (build_klein(root / "klein", is_distilled=True), root / "klein")}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_close_images(ours, expected):
    difference = np.abs(pixels(ours) - pixels(expected))
    assert difference.max() <= 1, f"max pixel difference {difference.max()}"
    assert pixels(ours).std() > 5, "a flat image would match trivially"


@pytest.mark.parametrize("family, guidance, negative", [("zimage", 0.0, None), ("zimage", 4.0, "blurry"),
                                                        ("klein", 1.0, None)])
def test_each_image_of_a_batch_equals_its_own_call(models, family, guidance, negative):
    cls = ZImagePipeline if family == "zimage" else Flux2Pipeline
    pipeline = cls(models[family][1], defaults={"steps": 2, "guidance": guidance})
    prompts = ["a fox", "a lighthouse on a cliff at dusk, oil painting"]  # captions of different lengths
    batch = pipeline.generate(prompts, num_images=2, seed=10, width=64, height=48, negative_prompt=negative)
    assert len(batch) == 4
    for image, (prompt, seed) in zip(batch, [(p, 10 + i) for i, p in enumerate(np.repeat(prompts, 2))]):
        assert image.info["parameters"]["prompt"] == prompt and image.info["parameters"]["seed"] == seed
        alone = pipeline.generate(prompt, seed=seed, width=64, height=48, negative_prompt=negative)
        assert_close_images(image, alone)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_batch_matches_diffusers_num_images_per_prompt(models, family, rng):
    import torch

    reference, folder = models[family]
    shape = (2, 16, 6, 8) if family == "zimage" else (2, 32, 3, 4)
    latents = rng.standard_normal(shape).astype(np.float32)
    guidance = 3.0 if family == "zimage" else 1.0
    expected = reference(prompt="a red fox in the snow", height=48, width=64, num_inference_steps=2,
                         guidance_scale=guidance, num_images_per_prompt=2,
                         latents=torch.from_numpy(latents.copy())).images
    ours = mlximg.load(str(folder)).generate("a red fox in the snow", num_images=2, height=48, width=64, steps=2,
                                             guidance=guidance, latents=latents)
    assert len(ours) == len(expected) == 2
    for mine, theirs in zip(ours, expected):
        assert_close_images(mine, theirs)
    assert not np.array_equal(pixels(ours[0]), pixels(ours[1])), "two noises, two images"


def test_seed_lists_and_bad_batches(models):
    pipeline = mlximg.load(str(models["zimage"][1]))
    images = pipeline.generate("a cat", seed=[3, 7], width=32, height=32, steps=1)
    assert [i.info["parameters"]["seed"] for i in images] == [3, 7]
    assert_close_images(images[1], pipeline.generate("a cat", seed=7, width=32, height=32, steps=1))
    single = pipeline.generate("a cat", seed=3, width=32, height=32, steps=1)
    assert not isinstance(single, list), "one image without a batch request"
    for settings, message in [(dict(seed=[1, 2], num_images=3), "2 seeds given for 3 images"),
                              (dict(num_images=0), "num_images must be a positive integer, got 0"),
                              (dict(num_images=65), "65 images asked for; at most 64"),
                              (dict(seed=2**64 - 1, num_images=2), "runs past 2"),
                              (dict(latents=np.zeros((1, 16, 4, 4)), num_images=2), r"latents must have shape \(2,")]:
        with pytest.raises(ValueError, match=message):
            pipeline.generate("a cat", width=32, height=32, steps=1, **settings)
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings"):
        pipeline.generate([], width=32, height=32, steps=1)


def test_callback_sees_every_step_and_steps_can_be_iterated(models):
    pipeline = mlximg.load(str(models["zimage"][1]))
    seen = []
    final = pipeline.generate("a boat", seed=1, num_images=2, width=32, height=32, steps=3,
                              callback=lambda step, total, latents: seen.append((step, total, np.array(latents))))
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(latents.shape == (2, 16, 4, 4) for *_, latents in seen)
    assert not np.array_equal(seen[0][2], seen[1][2])
    # The last step's latents are what is decoded.
    assert_close_images(pipeline.decode(mx_array(seen[-1][2][1:2])), final[1])
    states = []
    for state in pipeline.steps("a boat", seed=1, width=32, height=32, steps=3, stepcache=True):
        states.append(state)
        if state.step == 2:
            break  # stopping early releases the run's caches
    assert [s.step for s in states] == [1, 2] and states[-1].report["forwards"]["computed"] == 2
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}
    pipeline.generate("a boat", seed=1, width=32, height=32, steps=1)  # the lock was released too


def mx_array(values):
    import mlx.core as mx

    return mx.array(values)


def test_memory_grows_with_the_batch_only_by_activations(models):
    """Decoding goes image by image, so its peak stays that of one image; the denoise phase's growth over what it
    starts with (the weights) is activations, about in proportion to the batch (figures: docs/MEASUREMENTS.md)."""
    pipeline = mlximg.load(str(models["zimage"][1]))
    pipeline.generate("a cat", seed=0, width=64, height=64, steps=1, guidance=0.0)  # loads the weights
    activations, decode = {}, {}
    for n in (1, 2, 4):
        pipeline.generate("a cat", seed=0, num_images=n, width=64, height=64, steps=1, guidance=0.0)
        denoise = pipeline.phases.get("denoise")
        activations[n] = denoise.peak - denoise.active_before
        decode[n] = max(r.peak - r.active_before for r in pipeline.phases.records if r.name == "decode")
    assert decode[4] == pytest.approx(decode[1], rel=0.05), decode
    # About n times one image's activations (allocation granularity blurs it at this size), and no weight twice.
    assert activations[1] < activations[2] < activations[4] <= 1.5 * 4 * activations[1], activations
    assert activations[4] - activations[1] < pipeline.tracker.nbytes("transformer"), activations


def test_cli_several_images_and_previews(tmp_path, capsys):
    out = tmp_path / "digit.png"
    assert cli.main(["generate", "a handwritten three", "--model", "z-image-digits", "--num-images", "2",
                     "--seed", "5", "--steps", "3", "-o", str(out), "--stepwise", str(tmp_path / "steps")]) == 0
    assert read_parameters(tmp_path / "digit-5.png")["seed"] == 5
    assert read_parameters(tmp_path / "digit-6.png")["seed"] == 6
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == [
        f"step-{s:03d}-{seed}.png" for s in (1, 2, 3) for seed in (5, 6)]
    assert "preview x6" in capsys.readouterr().out
    pattern = tmp_path / "seed-{seed}.jpg"
    assert cli.main(["generate", "a handwritten three", "--model", "z-image-digits", "--seed", "8", "9",
                     "--steps", "2", "-o", str(pattern)]) == 0
    assert (tmp_path / "seed-8.jpg").is_file() and (tmp_path / "seed-9.jpg").is_file()
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--model", "z-image-digits", "--seed", "1", "2", "--num-images", "3"])
    assert "2 seeds given for --num-images 3" in capsys.readouterr().err
