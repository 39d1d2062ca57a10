"""Half precision beyond the Mac pass: float16 pipelines (MLXIMG_DTYPE=float16) stay finite and within
diffusers-float16's own error against float32, and attention keeps float32 scores where MLX has no fused kernel."""

import mlx.core as mx
import numpy as np
import pytest
from oracle import IMAGE_FLOOR, LOW_PRECISION_FACTOR, image_errors, require_oracle
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

from mlximg.nn import scaled_dot_product_attention
from mlximg.pipelines.flux2 import Flux2Pipeline
from mlximg.pipelines.zimage import ZImagePipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    return {"zimage": (build_reference(root / "zimage"), root / "zimage"),
            "klein": (build_klein(root / "klein", is_distilled=True), root / "klein")}


@pytest.mark.parametrize("family, guidance", [("zimage", 4.0), ("klein", 1.0)])
def test_float16_pipelines_stay_finite_and_close(models, family, guidance):
    import copy

    torch = require_oracle()
    reference, folder = models[family]
    latents = np.random.default_rng(0).standard_normal(
        (1, 16, 8, 12) if family == "zimage" else (1, 32, 4, 6)).astype(np.float32)
    settings = dict(prompt="a red fox in the snow", height=64, width=96, num_inference_steps=3,
                    guidance_scale=guidance)

    def diffusers_pixels(pipe):
        return np.asarray(pipe(latents=torch.from_numpy(latents.copy()), **settings).images[0], np.int16)

    expected, half = diffusers_pixels(reference), diffusers_pixels(copy.deepcopy(reference).to(torch.float16))
    cls = ZImagePipeline if family == "zimage" else Flux2Pipeline
    pipeline = cls(folder, dtype="float16", defaults={"steps": 3, "guidance": guidance})
    assert pipeline.component("transformer").parameters()  # loaded, in float16
    # A NaN or inf anywhere would raise NonFiniteError instead of returning an image.
    ours = np.asarray(pipeline.generate(settings["prompt"], width=96, height=64, steps=3, guidance=guidance,
                                        latents=latents), np.int16)
    ours_error, reference_error = image_errors(ours, expected), image_errors(half, expected)
    print(f"{family} float16: mlximg {ours_error}, diffusers {reference_error}")
    for key, floor in IMAGE_FLOOR.items():
        assert ours_error[key] <= LOW_PRECISION_FACTOR * reference_error[key] + floor, (key, ours_error, reference_error)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_unfused_attention_keeps_float32_scores(dtype):
    """On the CPU (and for head dims such as the VAE's 512 on Metal) MLX composes attention in the input dtype;
    ours runs it in float32 and rounds once, as torch's SDPA does: within one half-precision rounding of float64."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, 256, 512)).astype(np.float32) for _ in range(3))
    arrays = [mx.array(a).astype(dtype) for a in (q, k, v)]
    rounded = [np.array(a.astype(mx.float32), np.float64) for a in arrays]
    scores = rounded[0] @ rounded[1].transpose(0, 1, 3, 2) / np.sqrt(512)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ rounded[2]
    ours = np.array(scaled_dot_product_attention(*arrays, 512**-0.5).astype(mx.float32))
    unit = 2.0**-8 if dtype == mx.bfloat16 else 2.0**-11
    assert np.abs(ours - expected).max() <= unit * np.abs(expected).max()
