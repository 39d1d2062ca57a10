"""The 4- and 8-bit weight modes beside mxfp8 (mxfp4, nvfp4, affine 4 / 8 bits as mlx-lm writes them) on the tiny
Z-Image and klein models: the on-disk format, the round trip, the three execution paths (quantized matmul,
dequantized at load, dequantized layer by layer), quantization at load, mlx-lm reading the quantized text
encoder, and bad modes refused."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

import mlximg
from mlximg.loading import load_safetensors, weight_files
from mlximg.models.flux2 import load_flux2_transformer
from mlximg.quant import layer_policy
from mlximg.quant.convert import convert
from mlximg.quant.format import METADATA_KEY, Quantization
from mlximg.quant.modules import LayerwiseLinear
from mlximg.quant.options import QuantOptions
from mlximg.quant.policy import quantizable

MODES = ["mxfp4", "nvfp4", "affine4", "affine8"]
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    build_reference(root / "zimage")
    build_klein(root / "klein", is_distilled=True)
    for name in MODES:
        for family in ("zimage", "klein"):
            convert(root / family, root / f"{family}-{name}", text_encoder=True, quantization=Quantization.named(name),
                    log=lambda line: None)
    return root


def image_of(folder, **options) -> np.ndarray:
    latents = np.random.default_rng(0).standard_normal(
        (1, 16, 8, 12) if "zimage" in folder.name else (1, 32, 4, 6)).astype(np.float32)
    pipeline = mlximg.load(str(folder), **options)
    return np.asarray(pipeline.generate(PROMPT, width=96, height=64, steps=3, guidance=0.0, latents=latents),
                      dtype=np.int16)


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_format_on_disk(models, name, component):
    """config.json and every file record the mode; exactly the policy layers whose width divides the group size
    are quantized, with the mode's dtypes (affine: float scales and biases); the rest is the source's."""
    quantization = Quantization.named(name)
    folder = models / f"klein-{name}" / component
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == quantization.to_config()
    source = load_safetensors(weight_files(models / "klein" / component))
    ours = load_safetensors(weight_files(folder))
    policy = layer_policy(component, config)
    expected = {key.removesuffix(".weight") for key, value in source.items()
                if key.endswith(".weight") and quantizable(key.removesuffix(".weight"), value.shape, policy,
                                                           quantization.group_size)}
    assert expected and {k.removesuffix(".scales") for k in ours if k.endswith(".scales")} == expected
    for layer in expected:
        assert ours[f"{layer}.weight"].dtype == mx.uint32
        assert (f"{layer}.biases" in ours) == quantization.has_biases
        assert mx.issubdtype(ours[f"{layer}.scales"].dtype, mx.floating) == quantization.has_biases
    for key, value in source.items():
        if key.removesuffix(".weight") not in expected:
            assert mx.array_equal(ours[key], value), key
    for path in weight_files(folder):
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        assert json.loads(header["__metadata__"][METADATA_KEY]) == quantization.to_config()


def affine_reference(w: np.ndarray, bits: int, group_size: int = 64) -> np.ndarray:
    """An independent affine round trip: per group, levels from the minimum to the maximum in 2^bits - 1 steps."""
    groups = w.reshape(w.shape[0], -1, group_size).astype(np.float64)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    step = np.maximum(high - low, 1e-12) / (2**bits - 1)
    return (np.round((groups - low) / step) * step + low).reshape(w.shape)


@pytest.mark.parametrize("name", MODES)
def test_round_trip(models, name):
    """Reloaded (dequantized at load), each quantized weight is its source rounded by the mode, within the
    mode's bound; affine agrees with an independent round trip to within a level."""
    quantization = Quantization.named(name)
    module = load_flux2_transformer(models / f"klein-{name}", fp8=QuantOptions(execution="dequantize"))
    ours = dict(tree_flatten(module.parameters()))
    source = load_safetensors(weight_files(models / "klein" / "transformer"))
    converted = load_safetensors(weight_files(models / f"klein-{name}" / "transformer"))
    layers = [k.removesuffix(".scales") for k in converted if k.endswith(".scales")]
    for layer in layers:
        got, want = np.array(ours[f"{layer}.weight"]), np.array(source[f"{layer}.weight"].astype(mx.float32))
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 0 < error <= quantization.rounding_bound, (layer, error)
        if quantization.mode == "affine":
            step = (want.max() - want.min()) / (2**quantization.bits - 1)
            assert np.abs(got - affine_reference(want, quantization.bits)).max() <= step, layer


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_execution_paths_agree(models, name, family):
    """Dequantized layer by layer on each call (the CPU's low-memory path) gives the image of dequantizing at
    load; MLX's quantized matmul is within a few levels of it; and the quantized image is not the float one."""
    folder = models / f"{family}-{name}"
    dequantized = image_of(folder, fp8="dequantize")
    assert np.abs(image_of(folder, fp8="layerwise") - dequantized).max() <= 1
    matmul = np.abs(image_of(folder, fp8="matmul") - dequantized)
    print(f"{family} {name}: matmul vs dequantize mean {matmul.mean():.2f} max {matmul.max()}")
    assert matmul.max() <= 1
    assert np.abs(image_of(models / family) - dequantized).max() > 1, "nothing was quantized"


@pytest.mark.parametrize("name", ["mxfp4", "affine8"])
def test_quantize_at_load_equals_the_checkpoint(models, name):
    """quantize= / text_encoder_quantize= at load round the same source weights the converter does."""
    checkpoint = image_of(models / f"zimage-{name}", fp8="dequantize")
    at_load = image_of(models / "zimage", quantize=name, text_encoder_quantize=name, fp8="dequantize")
    assert np.abs(at_load - checkpoint).max() <= 1


def test_layerwise_keeps_weights_quantized(models):
    pipeline = mlximg.load(str(models / "klein-mxfp4"), fp8="layerwise")
    transformer = pipeline.component("transformer")
    layers = [m for _, m in transformer.named_modules() if isinstance(m, LayerwiseLinear)]
    assert layers and all(m["weight"].dtype == mx.uint32 for m in layers)
    float_bytes = mlximg.load(str(models / "klein-mxfp4"), fp8="dequantize").component("transformer")
    assert pipeline.tracker.nbytes("transformer") < 0.5 * sum(v.nbytes for _, v in
                                                              tree_flatten(float_bytes.parameters()))


@pytest.mark.parametrize("name", MODES)
def test_mlx_lm_loads_the_quantized_text_encoder(models, name):
    """The quantized Qwen3 text encoder is in mlx-lm's own format: mlx-lm loads it as a quantized model, and its
    hidden states equal ours."""
    from mlx_lm.utils import load_model

    folder = models / f"klein-{name}" / "text_encoder"
    model, _ = load_model(folder)
    theirs = dict(tree_flatten(model.parameters()))
    ours = load_safetensors(weight_files(folder))
    for key in (k for k in ours if k.endswith((".scales", ".biases"))):
        assert mx.array_equal(theirs[key], ours[key]), key


def test_bad_modes_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        mlximg.load(str(models / "klein"), quantize="int4")
    with pytest.raises(ValueError, match="unknown quantization 'q3'"):
        mlximg.load(str(models / "klein"), text_encoder_quantize="q3")
    with pytest.raises(ValueError, match="affine quantization takes bits 4 or 8, not 3"):
        Quantization.of("affine", 3)
    with pytest.raises(ValueError, match="nvfp4 quantization has group size 16, not 32"):
        Quantization("nvfp4", 4, 32)
    from mlximg import cli

    with pytest.raises(SystemExit):
        cli.main(["quantize", str(models / "klein"), str(tmp_path / "out"), "--mode", "affine", "--bits", "3"])
    assert not (tmp_path / "out").exists()


def test_a_text_encoder_from_another_folder(models, tmp_path):
    """The text encoder (and tokenizer) of another folder, here a quantized copy, as text_encoder=: the image is
    the one of quantizing it at load; one of another architecture or width is refused before loading."""
    import shutil

    borrowed = image_of(models / "zimage", text_encoder=models / "zimage-affine8", fp8="dequantize")
    at_load = image_of(models / "zimage", text_encoder_quantize="affine8", fp8="dequantize")
    assert np.abs(borrowed - at_load).max() <= 1
    for field, value, message in (("hidden_size", 48, "qwen3 text encoder of width 48, but this zimage transformer "
                                                      "takes qwen3 hidden states of 32 features"),
                                  ("model_type", "llama", "a llama text encoder")):
        other = tmp_path / f"other-{field}"
        shutil.copytree(models / "zimage" / "tokenizer", other / "tokenizer")
        shutil.copytree(models / "zimage" / "text_encoder", other / "text_encoder")
        config = json.loads((other / "text_encoder" / "config.json").read_text())
        (other / "text_encoder" / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=message):
            mlximg.load(str(models / "zimage"), text_encoder=other)
    with pytest.raises(FileNotFoundError):
        mlximg.load(str(models / "zimage"), text_encoder=tmp_path / "missing")


def test_layerwise_dequantizes_one_layer_at_a_time():
    """A stack of layerwise layers holds about one float weight at a time while it runs: MLX would otherwise
    dequantize every weight ahead of its matmul (nothing orders them), as many float copies as layers."""
    layers = []
    for _ in range(8):
        layer = nn.QuantizedLinear.from_linear(nn.Linear(2048, 2048, bias=False), group_size=64, bits=4)
        layer.__class__ = LayerwiseLinear
        layers.append(layer)
    x = mx.random.normal((256, 2048))
    mx.eval(x, [layer.parameters() for layer in layers])
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    y = x
    for layer in layers:
        y = layer(y)
    mx.eval(y)
    weight = 2048 * 2048 * 4
    # Measured (mlx 0.32.4 CPU): 4.5 weights' worth (a float weight, its matmul's working set, the activations);
    # without the ordering, 12.
    assert mx.get_peak_memory() - base < 6 * weight, (mx.get_peak_memory() - base) / weight
