"""TeaCache and StepCache: exact when off (threshold 0, interval 1), exact decisions on scripted signals, flat
memory, separate CFG entries, real skips on the tiny models, and clear errors for bad settings."""

import json

import mlx.core as mx
import numpy as np
import pytest
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

from mlximg.cache import StepCache, StepCacheConfig, TeaCache, TeaCacheConfig, resolve_stepcache, resolve_teacache
from mlximg.pipelines import zimage as zimage_pipeline
from mlximg.pipelines.flux2 import Flux2Pipeline
from mlximg.pipelines.zimage import ZImagePipeline
from mlximg.runtime import Tracker


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    build_reference(root / "zimage")
    build_klein(root / "klein-base", is_distilled=False)  # CFG above guidance 1, plain below
    return {"zimage": root / "zimage", "flux2": root / "klein-base"}


# family, guidance, latent shape of a 64x64 image, negative prompt
CASES = {
    "zimage": (ZImagePipeline, 0.0, (1, 16, 8, 8), None),
    "zimage-cfg": (ZImagePipeline, 4.0, (1, 16, 8, 8), "blurry"),
    "flux2": (Flux2Pipeline, 1.0, (1, 32, 4, 4), None),
    "flux2-cfg": (Flux2Pipeline, 4.0, (1, 32, 4, 4), "blurry"),
}


_uncached = {}


def uncached(folders, case, steps=3, seed=0):
    """`run` without caches, computed once per setting: the reference several tests compare with."""
    key = (str(folders[case.split("-")[0]]), case, steps, seed)
    if key not in _uncached:
        _uncached[key] = run(folders, case, steps, seed)[:3]
    return _uncached[key]


def run(folders, case, steps=3, seed=0, **caches):
    """(image pixels, final latents, image parameters, pipeline) for `case` from fixed noise."""
    cls, guidance, shape, negative = CASES[case]
    pipeline = cls(folders[case.split("-")[0]], defaults={"steps": steps, "guidance": guidance})
    latents = []
    decode = pipeline.decode
    pipeline.decode = lambda x, **kw: (latents.append(np.array(x)), decode(x, **kw))[1]
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    image = pipeline.generate("a red fox", width=64, height=64, steps=steps, guidance=guidance,
                              negative_prompt=negative, latents=noise, **caches)
    return np.asarray(image, dtype=np.int16), latents[0], image.info["parameters"], pipeline


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("caches", [
    dict(teacache=TeaCacheConfig(threshold=0.0)),
    dict(teacache=TeaCacheConfig(threshold=0.0, mode="modulated")),
    dict(stepcache=StepCacheConfig(interval=1, first_blocks=0, last_blocks=1)),
    dict(teacache=TeaCacheConfig(threshold=0.0, mode="modulated"), stepcache=StepCacheConfig(interval=1)),
    dict(teacache=TeaCacheConfig(threshold=0.0, mode="first_block")),
], ids=["tea-timestep-0", "tea-modulated-0", "step-interval-1", "both", "tea-first-block-0"])
def test_caching_that_never_skips_is_bit_identical(folders, case, caches):
    pixels, latents, parameters = uncached(folders, case)
    cached_pixels, cached_latents, cached_parameters, pipeline = run(folders, case, **caches)
    assert np.array_equal(cached_latents, latents)
    assert np.array_equal(cached_pixels, pixels)
    assert cached_parameters["forwards"]["computed"] == 3 and cached_parameters["forwards"]["skipped"] == 0
    assert parameters["forwards"]["skipped"] == 0 and "teacache" not in parameters
    assert cached_parameters.get("stepcache", {}).get("blocks_skipped", 0) == 0
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}, "the caches are released after the run"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("caches", [dict(teacache={"threshold": 0.2}),
                                    dict(teacache={"threshold": 10.0, "mode": "first_block"}),
                                    dict(stepcache={"interval": 3, "first_blocks": 0})],
                         ids=["tea-0.2", "tea-first-block", "step-3"])
def test_caching_skips_work_and_stays_close(folders, case, caches):
    """8 steps. The tiny models are random, not trained denoisers, so the deviation is only compared with the
    difference other noise makes: caching must stay well closer to the uncached image than that."""
    pixels, _, _ = uncached(folders, case, steps=8)
    other, _, _ = uncached(folders, case, steps=8, seed=1)
    cached, _, parameters, pipeline = run(folders, case, steps=8, **caches)
    if "teacache" in caches:
        assert parameters["forwards"]["skipped"] >= 3
        assert parameters["forwards"]["computed"] + parameters["forwards"]["skipped"] == 8
    else:
        assert parameters["stepcache"]["blocks_skipped"] > 0 and parameters["stepcache"]["refresh_steps"] == 3
    deviation, seed_difference = np.abs(cached - pixels).mean(), np.abs(other - pixels).mean()
    print(f"{case} {caches}: mean |cached - uncached| {deviation:.1f}, other noise {seed_difference:.1f}")
    assert deviation < 0.5 * seed_difference
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}


def scripted(config: TeaCacheConfig, changes: list, steps: int | None = None) -> list[bool]:
    cache = TeaCache(config, steps or len(changes))
    return [cache.decide(step, change) for step, change in enumerate(changes)]


def test_teacache_decisions_on_a_scripted_sequence():
    # Identity rescaling, threshold 0.25: skips accumulate 0.1 + 0.1, the third 0.1 reaches 0.3 >= 0.25.
    config = TeaCacheConfig(threshold=0.25, coefficients=(1.0, 0.0), max_consecutive_skips=10)
    assert scripted(config, [None, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.1]) == [
        True, False, False, True, False, False, True, True]  # step 7: the last step is forced
    cache = TeaCache(config, 8)
    for step, change in enumerate([None, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.1]):
        cache.decide(step, change)
    assert cache.stats() == {"computed": 4, "skipped": 4}
    # The last step may be skipped when asked; two forced first steps.
    config = TeaCacheConfig(threshold=1.0, first_steps=2, compute_last=False, max_consecutive_skips=10)
    assert scripted(config, [None, 0.1, 0.1, 0.1]) == [True, True, False, False]
    # Consecutive-skip cap: never more than 2 skips in a row, however small the change.
    config = TeaCacheConfig(threshold=1.0, max_consecutive_skips=2)
    assert scripted(config, [None] + [0.0] * 7) == [True, False, False, True, False, False, True, True]
    # Threshold 0 never skips.
    assert all(scripted(TeaCacheConfig(threshold=0.0), [None] + [0.0] * 5))


def test_first_block_rule_compares_each_change_with_the_last_computed_step():
    """No accumulation: 0.1 per step stays under 0.25 however many steps pass (up to the skip cap)."""
    config = TeaCacheConfig(threshold=0.25, mode="first_block", max_consecutive_skips=10)
    assert scripted(config, [None, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1]) == [True, False, False, False, True, False, True]


class _Blocks:
    """Toy blocks: block i adds (i + 1) * step to the image tokens; records which ran."""

    def __init__(self):
        self.step, self.ran = 0, []

    def call(self, block, h):
        self.ran.append((self.step, block))
        return h + (block + 1) * self.step


def test_first_block_reuse_adds_the_cached_residual_of_the_other_blocks():
    """A skipped step runs block 0 only and returns its output plus (body output - block 0 output) of the last
    computed step; capture still sees block 0."""
    from mlximg.cache.runner import BlockRunner

    tea = TeaCache(TeaCacheConfig(threshold=10.0, mode="first_block"), num_steps=3)
    toy, x = _Blocks(), mx.ones((1, 4, 2))
    outputs = []
    for step in range(3):
        toy.step = step + 1
        tea.begin(step)
        capture = []
        runner = BlockRunner(tea, capture=capture)
        outputs.append(runner.body(x, None, lambda h: runner.stack("layers", [0, 1, 2], h, toy.call)))
        assert capture[0][0] == "layers.0"
    assert tea.stats() == {"computed": 2, "skipped": 1}  # step 0 forced, step 1 reused, step 2 (last) forced
    assert [s for s, _ in toy.ran] == [1, 1, 1, 2, 3, 3, 3]
    # Step 1 (toy step 2): block 0 gives 1 + 2 = 3, plus the step-0 residual of blocks 1 and 2 (2 + 3 = 5).
    assert mx.array_equal(outputs[1], mx.full((1, 4, 2), 8.0))
    assert mx.array_equal(outputs[2], mx.full((1, 4, 2), 1 + 3 + 6 + 9.0))


def test_first_block_rule_and_stepcache_are_refused_together(folders):
    pipeline = ZImagePipeline(folders["zimage"])
    with pytest.raises(ValueError, match="first_block.*stepcache"):
        pipeline.prepare("a red fox", width=64, height=64, steps=3, guidance=0.0, teacache={"mode": "first_block"},
                         stepcache=True)
    assert not pipeline.tracker.owners()


def test_teacache_polynomial_is_clamped_to_its_range():
    config = TeaCacheConfig(threshold=1.0, coefficients=(10.0, 0.0), signal_range=(0.01, 0.05))
    cache = TeaCache(config, 10)
    assert cache.rescale(0.03) == pytest.approx(0.3)
    assert cache.rescale(1.0) == pytest.approx(0.5), "above the range: the value at its top"
    assert cache.rescale(0.0) == pytest.approx(0.1), "below the range: the value at its bottom"
    # A polynomial that dips below zero counts as no change, never as negative credit.
    assert TeaCache(TeaCacheConfig(coefficients=(1.0, -0.5)), 4).rescale(0.1) == 0.0
    # 0.5 per step (the clamped top) with threshold 1.0: skip, then compute.
    assert scripted(config, [None, 1.0, 1.0, 1.0, 1.0], steps=10) == [True, False, True, False, True]


def test_teacache_signals():
    cache = TeaCache(TeaCacheConfig(mode="timestep"), 4)
    assert cache.change(0.5) is None
    cache.previous_signal = 0.5
    assert cache.change(0.25) == pytest.approx(0.25)
    cache = TeaCache(TeaCacheConfig(mode="modulated"), 4)
    cache.previous_signal = mx.array([[1.0, -2.0]])
    assert cache.change(mx.array([[1.5, -2.0]])) == pytest.approx(0.25 / 1.5)  # mean |diff| / mean |prev|
    assert cache.change(mx.array([[1.0, -2.0], [1.0, -2.0]])) is None, "another batch shape: no comparison"


def test_memory_stays_flat_across_100_steps():
    tracker = Tracker()
    teacache = TeaCache(TeaCacheConfig(threshold=0.05, mode="modulated", max_consecutive_skips=2), 100, tracker)
    stepcache = StepCache(StepCacheConfig(interval=3), tracker)
    x = mx.random.normal((2, 64, 32), key=mx.random.key(0))
    memory, kept = {}, set()
    for step in range(100):
        teacache.begin(step, ("positive", "negative"))
        stepcache.begin(step)
        signal = x * (1 + 0.01 * step)
        if teacache.reuse(signal) is None:
            teacache.store(signal * 2)
        if stepcache.refresh:
            stepcache.set("blocks", x + step)
            stepcache.set2("blocks", x - step)
        mx.eval(*teacache.arrays(), *stepcache.arrays())
        if step >= 10:
            kept.add((tracker.nbytes("teacache"), tracker.nbytes("stepcache")))
        if step in (10, 100 - 1):
            memory[step] = mx.get_active_memory()
    assert memory[10] == memory[99]
    # Two per-context entries (half the batch each) and the previous signal; two streams of the step cache.
    assert kept == {(2 * x.nbytes, 2 * x.nbytes)}
    assert teacache.hits > 0 and teacache.misses > 0
    teacache.release()
    stepcache.release()
    assert tracker.owners() == {}


def test_cfg_entries_stay_separate_and_guidance_is_fresh(folders, monkeypatch):
    stores, calls = [], []
    store = TeaCache.store
    monkeypatch.setattr(TeaCache, "store", lambda self, value: (
        store(self, value), stores.append({c: np.array(e) for c, e in self.entries.items()}))[0])
    guided = zimage_pipeline.guided
    monkeypatch.setattr(zimage_pipeline, "guided", lambda pos, neg, scale, norm: (
        calls.append((np.array(pos), np.array(neg), scale, len(stores))), guided(pos, neg, scale, norm))[1])
    pipeline = ZImagePipeline(folders["zimage"], defaults={"steps": 8, "guidance": 4.0})
    noise = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    image = pipeline.generate("a red fox", width=64, height=64, steps=8, guidance=4.0, negative_prompt="blurry",
                              latents=noise, teacache={"threshold": 0.2, "max_consecutive_skips": 8})
    forwards = image.info["parameters"]["forwards"]
    assert forwards["skipped"] > 0 and len(stores) == forwards["computed"]
    assert len(calls) == 8, "guidance is recombined on every step, skipped or not"
    assert all(scale == 4.0 for *_, scale, _ in calls)
    assert all(not np.array_equal(s["positive"], s["negative"]) for s in stores), "separate entries"
    # Every step, computed or skipped, guides exactly the latest stored positive and negative predictions.
    for pos, neg, _, stored in calls:
        assert np.array_equal(pos, stores[stored - 1]["positive"])
        assert np.array_equal(neg, stores[stored - 1]["negative"])


def test_stepcache_slots_and_refresh():
    tracker = Tracker()
    cache = StepCache(StepCacheConfig(interval=3), tracker)
    assert [StepCache.should_refresh(step, 3) for step in range(7)] == [True, False, False, True, False, False, True]
    a, b = mx.ones((2, 3)), mx.zeros((2, 3))
    cache.set(0, a)
    cache.set2(0, b)
    assert cache.get(0) is a and cache.get2(0) is b and cache.get(1) is None
    cache.set(0, b)  # replacing frees the old array from the tracker
    assert tracker.nbytes("stepcache") == 2 * b.nbytes
    assert cache.middle(5) == (1, 4) and cache.middle(2) == (1, 1) and cache.middle(1) == (1, 1)
    assert cache.release() == 2 * b.nbytes and cache.get(0) is None


@pytest.mark.parametrize("make, message", [
    (lambda: TeaCacheConfig(threshold=-0.1), "threshold must be a finite number >= 0, got -0.1"),
    (lambda: TeaCacheConfig(mode="embedding"), "mode must be one of timestep, modulated, first_block, got 'embedding'"),
    (lambda: TeaCacheConfig(max_consecutive_skips=-1), "max_consecutive_skips must be an integer >= 0, got -1"),
    (lambda: TeaCacheConfig(first_steps=0), "first_steps must be an integer >= 1, got 0"),
    (lambda: TeaCacheConfig(coefficients=()), r"coefficients must be finite numbers, got \[\]"),
    (lambda: TeaCacheConfig(signal_range=(0.5, 0.1)), r"low <= high, got \[0.5, 0.1\]"),
    (lambda: StepCacheConfig(interval=0), "interval must be an integer >= 1, got 0"),
    (lambda: StepCacheConfig(first_blocks=-2), "first_blocks must be an integer >= 0, got -2"),
    (lambda: resolve_teacache({"treshold": 0.1}), r"unknown teacache settings \['treshold'\]"),
    (lambda: resolve_teacache("fast"), "teacache must be True, False, a dict or a TeaCacheConfig, got 'fast'"),
    (lambda: resolve_stepcache(2.5), "stepcache must be True, False, a dict or a StepCacheConfig, got 2.5"),
])
def test_bad_settings_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_defaults_come_from_the_manifest():
    manifest = {"mode": "modulated", "threshold": 0.3, "coefficients": [2.0, 0.0], "signal_range": [0.0, 0.5],
                "calibrated": True, "source": "scripts/calibrate_teacache.py"}
    assert resolve_teacache(True, manifest) == TeaCacheConfig(threshold=0.3, mode="modulated",
                                                              coefficients=(2.0, 0.0), signal_range=(0.0, 0.5))
    assert resolve_teacache({"threshold": 0.05}, manifest).threshold == 0.05
    assert resolve_teacache(True).mode == "timestep"
    assert resolve_teacache(False) is None and resolve_stepcache(None) is None
    assert resolve_stepcache(True) == StepCacheConfig()


def test_cli_flags_and_report(folders, tmp_path, capsys):
    from mlximg.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "a boat", "--model", str(folders["zimage"]), "--width", "32", "--height", "32",
                 "--steps", "6", "--seed", "1", "--teacache-threshold", "0.3", "--stepcache-interval", "2",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peak MiB" in printed
    assert "forwards: " in printed and "teacache timestep, threshold 0.3" in printed
    assert "stepcache interval 2" in printed
    from PIL import Image

    parameters = json.loads(Image.open(out).text["parameters"])
    forwards = parameters["forwards"]
    assert forwards["computed"] + forwards["skipped"] == 6 and forwards["skipped"] > 0
    assert "denoise_seconds" not in forwards and parameters["stepcache"]["interval"] == 2  # no timings in files
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", str(folders["zimage"]), "--stepcache-interval", "0", "-o", str(out)])
    assert "interval must be an integer >= 1, got 0" in capsys.readouterr().err


def test_calibration_fits_and_writes_the_manifest(folders, tmp_path):
    """scripts/calibrate_teacache.py on the tiny model: pairs per step, a fit, a manifest entry generate() uses."""
    import importlib.util
    from pathlib import Path

    import mlximg

    path = Path(__file__).resolve().parent.parent / "scripts" / "calibrate_teacache.py"
    spec = importlib.util.spec_from_file_location("calibrate_teacache", path)
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    pipeline = mlximg.load(str(folders["zimage"]))
    pairs = calibrate.record(pipeline, ["a fox", "a boat"], [0], steps=4, guidance=0.0, size=32)
    assert pairs.shape == (2 * 3, 2) and (pairs >= 0).all(), "one pair per step after the first"
    result = calibrate.fit(pairs, degree=1)
    assert result["signal_range"] == [pairs[:, 0].min(), pairs[:, 0].max()]
    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({"name": "tiny"}))
    entry = {"mode": "modulated", "threshold": 0.1, **{k: result[k] for k in ("coefficients", "signal_range")},
             "calibrated": True, "source": "test"}
    calibrate.write_manifest(manifest, entry)
    written = json.loads(manifest.read_text())
    assert written["name"] == "tiny" and written["teacache"] == entry
    pipeline.teacache_defaults = written["teacache"]
    image = pipeline.generate("a fox", width=32, height=32, steps=4, seed=0, teacache=True)
    assert image.info["parameters"]["teacache"]["mode"] == "modulated"
    assert image.info["parameters"]["teacache"]["calibrated"] is True
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}
    with pytest.raises(ValueError, match="2 pairs are too few for a degree-4 fit"):
        calibrate.fit(pairs[:2], degree=4)
