"""Array lifetimes in the spirit of the seed's tracker: intermediates go at eval, kept arrays stay, loops stay flat."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlximg.runtime import PhaseLog, Tracker, compute_dtype, nbytes

MIB = 2**20


@pytest.fixture(autouse=True)
def clean_memory():
    mx.eval()
    mx.clear_cache()
    yield
    mx.clear_cache()


def chain_of_intermediates(x: mx.array) -> mx.array:
    """Several temporaries as large as x; only the result should survive evaluation."""
    y = x
    for _ in range(8):
        y = mx.tanh(y * 1.01 + 0.5)
    return y.sum(axis=0)


def test_intermediates_released_after_eval():
    tracker = Tracker()
    x = tracker.keep(mx.random.normal((1024, 1024)), owner="weights")  # 4 MiB
    mx.eval(x)
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    out = tracker.eval(chain_of_intermediates(x))
    assert out.shape == (1024,)
    # Only the 4 KiB output was added; the eight 4 MiB temporaries are gone.
    assert mx.get_active_memory() - baseline <= out.nbytes + 4096
    assert mx.get_peak_memory() >= baseline + x.nbytes, "the temporaries did exist during evaluation"


def test_kept_arrays_survive_and_are_counted():
    tracker = Tracker()
    tracker.keep({"a": mx.ones((256, 256)), "b": [mx.ones((128,))]}, owner="weights")
    tracker.eval(*[v for v in tracker.kept("weights")[0].values() if isinstance(v, mx.array)])
    assert tracker.nbytes("weights") == 256 * 256 * 4 + 128 * 4
    assert tracker.owners() == {"weights": 256 * 256 * 4 + 128 * 4}
    assert float(tracker.kept("weights")[0]["a"].sum()) == 256 * 256


def test_free_releases_a_kept_array():
    tracker = Tracker()
    cache = tracker.keep(mx.zeros((512, 512)), owner="cache")
    mx.eval(cache)
    before = mx.get_active_memory()
    tracker.free(cache)
    del cache
    assert before - mx.get_active_memory() == 512 * 512 * 4
    assert tracker.owners() == {}
    with pytest.raises(ValueError, match="not kept"):
        tracker.free(mx.zeros((1,)))
    tracker.free(None)  # an empty cache slot


def test_generation_loop_memory_is_flat():
    """100 steps, each replacing a kept cache entry and the latents, as a denoising loop with a step cache does."""
    tracker = Tracker()
    weights = tracker.keep(mx.random.normal((512, 512)) * 0.02, owner="transformer")
    latents = mx.random.normal((256, 512))
    cache = None
    active = []
    for step in range(100):
        hidden = mx.tanh(latents @ weights)
        new_cache = tracker.keep(hidden * 0.5, owner="stepcache")
        tracker.free(cache)
        cache = new_cache
        latents = latents - 0.01 * (hidden + cache)
        tracker.eval(latents, cache)
        active.append(mx.get_active_memory())
    assert active[99] == active[10], f"memory grew from {active[10]} to {active[99]} bytes"
    assert tracker.nbytes("stepcache") == cache.nbytes


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(1024, 1024) for _ in range(8)]  # ~32 MiB in float32

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_release_component_frees_its_size():
    tracker = Tracker()
    encoder = tracker.keep(Encoder(), owner="text_encoder")
    mx.eval(encoder.parameters())
    size = nbytes(encoder)
    assert size >= 32 * MIB
    before = mx.get_active_memory()
    released = tracker.release("text_encoder")
    # The caller still holds `encoder`, yet its memory is gone: release empties the module in place.
    assert released == size
    assert before - mx.get_active_memory() >= 0.99 * size
    assert nbytes(encoder) == 0
    assert mx.get_cache_memory() == 0
    with pytest.raises(ValueError, match="text_encoder"):
        tracker.release("text_encoder")


def test_phases_record_time_and_peak():
    log = PhaseLog()
    with log.phase("outer"):
        with log.phase("inner"):
            big = mx.ones((1024, 1024 * 4))  # 16 MiB
            mx.eval(big)
            del big
        small = mx.ones((1024,))
        mx.eval(small)
    inner, outer = log.get("inner"), log.get("outer")
    assert inner.peak >= 16 * MIB
    assert outer.peak >= inner.peak, "an outer phase's peak includes its inner phases"
    assert outer.seconds >= inner.seconds > 0
    assert outer.active_after - outer.active_before == small.nbytes
    assert "inner" in log.table() and "outer" in log.table()
    with pytest.raises(KeyError, match="decode"):
        log.get("decode")


def test_dtype_policy(monkeypatch):
    monkeypatch.delenv("MLXIMG_DTYPE", raising=False)
    expected = mx.float32 if not (mx.metal.is_available() or mx.cuda.is_available()) else mx.bfloat16
    assert compute_dtype() == expected
    assert compute_dtype("bfloat16") == mx.bfloat16
    monkeypatch.setenv("MLXIMG_DTYPE", "float16")
    assert compute_dtype() == mx.float16
    with pytest.raises(ValueError, match="'float8'"):
        compute_dtype("float8")
