"""`mlximg plan`: per-phase weights, activations and peak from configs and safetensors headers alone. The weights
it counts are what a pipeline keeps once loaded (float and quantized); the peaks are checked against measured
ones in docs/MEASUREMENTS.md (scripts/plan_check.py)."""

import pytest
from test_zimage_pipeline import build_reference

import mlximg
from mlximg import cli
from mlximg.planner import fits, plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan") / "zimage"
    build_reference(folder)
    return folder


@pytest.mark.parametrize("quantize", [None, "mxfp4", "affine8"])
def test_weights_are_what_the_pipeline_keeps(tiny, quantize):
    pipeline = mlximg.load(str(tiny), quantize=quantize, fp8="layerwise", dtype="float32")
    phases = {p.name: p for p in plan(tiny, "zimage", width=64, height=64, quantize=quantize, compute_bytes=4)}
    pipeline.component("transformer")
    pipeline.component("vae")
    assert phases["denoise"].weights == pipeline.tracker.nbytes("transformer")
    assert phases["decode"].weights == pipeline.tracker.nbytes("transformer") + pipeline.tracker.nbytes("vae")


def test_activations_grow_with_size_batch_and_guidance(tiny):
    def peak(**options):
        settings = dict(width=64, height=64) | options
        return {p.name: p.activations for p in plan(tiny, "zimage", compute_bytes=4, **settings)}

    small, large = peak(), peak(width=128, height=128)
    assert large["denoise"] > small["denoise"] and large["decode"] == 4 * small["decode"]
    assert peak(num_images=2)["denoise"] > small["denoise"] and peak(cfg=True)["denoise"] > small["denoise"]
    assert peak(width=1024, height=1024, tiled_decode=True)["decode"] < peak(width=1024, height=1024)["decode"]


def test_fits_by_usable_memory():
    assert fits(5 * 10**9) == [8, 16, 24, 32, 48, 64, 96, 128]
    assert fits(20 * 10**9) == [32, 48, 64, 96, 128]
    assert fits(200 * 10**9) == []


def test_cli(tiny, capsys):
    assert cli.main(["plan", str(tiny), "--size", "96x64", "--quantize", "mxfp4", "--num-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "denoise" in out and "decode" in out and "fits Macs with 8 GB" in out
    with pytest.raises(SystemExit):
        cli.main(["plan", "flux2-dev"])  # not downloaded here
    assert "not downloaded" in capsys.readouterr().err


@pytest.mark.parametrize("quantize", ["mxfp4", "affine8"])
def test_layerwise_adds_the_largest_quantized_layer_in_float(tiny, quantize):
    """On the layerwise path a phase also holds its largest quantized layer's float weight and its matmul's
    copy: the largest among the layers the pipeline actually made layerwise."""
    from mlximg.quant.modules import LayerwiseLinear

    pipeline = mlximg.load(str(tiny), quantize=quantize, fp8="layerwise", dtype="float32")
    layers = [m for _, m in pipeline.component("transformer").named_modules() if isinstance(m, LayerwiseLinear)]
    largest = max(m["scales"].size * m.group_size for m in layers)
    settings = dict(width=64, height=64, quantize=quantize, compute_bytes=4)
    plain = {p.name: p.activations for p in plan(tiny, "zimage", **settings)}
    layerwise = {p.name: p.activations for p in plan(tiny, "zimage", layerwise=True, **settings)}
    assert layerwise["denoise"] - plain["denoise"] == 2 * largest * 4
    assert layerwise["decode"] == plain["decode"] and layerwise["encode"] == plain["encode"]
    float_plan = plan(tiny, "zimage", layerwise=True, width=64, height=64, compute_bytes=4)
    assert float_plan == plan(tiny, "zimage", width=64, height=64, compute_bytes=4), "nothing quantized, no copies"


def test_generate_warns_before_loading_when_the_plan_exceeds_memory(monkeypatch):
    """Between the lower bound (which refuses) and the planner's peak (which warns): a warning, and no weight
    loaded before it; with room for the plan, none."""
    import warnings

    from mlximg.pipelines import base, limits

    pipeline = mlximg.load("z-image-digits")
    phases = plan(pipeline.model_dir, "zimage", width=32, height=32, num_images=2, compute_bytes=pipeline.dtype.size)
    peak = max(phase.peak for phase in phases)
    lower = limits.estimate_peak_memory("zimage", pipeline.model_dir, 32, 32, 2, pipeline.dtype.size)
    assert lower < peak
    for memory, warned in (((lower + peak) // 2, True), (2 * peak, False)):
        monkeypatch.setattr(base, "machine_memory", lambda: memory)
        monkeypatch.setattr(limits, "machine_memory", lambda: memory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline.prepare("a handwritten seven", seed=1)
        assert any("memory planner expects" in str(w.message) for w in caught) == warned, memory
        assert not pipeline.loaded, "the check runs before any weight loads"
