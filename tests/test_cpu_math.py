"""The CPU float32 fast paths (mlximg/nn/cpu_math.py) against float64 numpy and torch's kernels."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlximg.nn import attention, cpu_math, dispatch, native, silu, silu_mul
from oracle import assert_close, require_oracle


def test_exp_is_at_least_as_accurate_as_mlx_exp():
    x = np.concatenate([np.linspace(-87, 88, 200_001), np.random.default_rng(0).normal(0, 3, 100_000)])
    x = x.astype(np.float32)
    expected = np.exp(x.astype(np.float64))
    ours = np.array(cpu_math.exp(mx.array(x))).astype(np.float64)
    mlx_exp = np.array(mx.exp(mx.array(x))).astype(np.float64)
    ours_error = np.max(np.abs(ours - expected) / expected)
    assert ours_error < 2e-7 and ours_error <= np.max(np.abs(mlx_exp - expected) / expected)  # 9.6e-8 vs 3.9e-6


def test_exp_saturates_instead_of_wrapping():
    values = np.array(cpu_math.exp(mx.array([-1e4, -100.0, 100.0, 1e4], dtype=mx.float32)))
    assert np.all(np.isfinite(values)) and values[0] < 1e-37 and values[1] < 1e-37 and values[2] > 1e38


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_attention_matches_torch_sdpa(mask_kind):
    torch = require_oracle()
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 40, 16)).astype(np.float32) * 2 for _ in range(3))
    keep = np.ones((2, 1, 1, 40), dtype=bool)
    keep[1, ..., 29:] = False  # sample 1's last keys are padding
    mask = {None: None, "bool": keep, "additive": np.where(keep, 0.0, -1e9).astype(np.float32)}[mask_kind]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=None if mask is None else torch.from_numpy(mask))
    assert dispatch.op_path(mx.array(q)) != "mlx"
    ours = cpu_math.attention(mx.array(q), mx.array(k), mx.array(v), 16**-0.5, None if mask is None else mx.array(mask))
    assert_close(ours, expected, 1e-6, f"attention, mask {mask_kind}")


def test_masked_keys_get_exactly_zero_weight():
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((1, 1, 8, 4)).astype(np.float32)) for _ in range(3))
    mask = mx.array(np.arange(8) < 5)[None, None, None]
    changed = v + mx.array((np.arange(8) >= 5)[:, None] * 1e30, dtype=mx.float32)  # huge values on masked keys
    assert mx.array_equal(cpu_math.attention(q, k, v, 0.5, mask), cpu_math.attention(q, k, changed, 0.5, mask))


def test_silu_and_swiglu_match_torch(monkeypatch):
    """The polynomial exp path, where native.py's kernels are not built (tests/test_native_kernels.py: those)."""
    monkeypatch.setattr(native, "applies", lambda *arrays: False)
    torch = require_oracle()
    x = np.random.default_rng(3).normal(0, 8, (64, 300)).astype(np.float32)
    y = np.random.default_rng(4).normal(0, 1, (64, 300)).astype(np.float32)
    expected = torch.nn.functional.silu(torch.from_numpy(x))
    assert_close(silu(mx.array(x)), expected, 1e-6, "silu")
    assert_close(silu_mul(mx.array(x), mx.array(y)), expected * torch.from_numpy(y), 1e-6, "silu * value")


def test_other_dtypes_keep_mlx_kernels():
    """Half precision takes MLX's ops, computed in float32 and rounded once as torch's silu (MLX's nn.silu rounds
    the sigmoid and the product separately)."""
    torch = require_oracle()
    x = mx.array(np.linspace(-5, 5, 64, dtype=np.float32)).astype(mx.bfloat16)
    assert dispatch.op_path(x) == "mlx"
    expected = torch.nn.functional.silu(torch.from_numpy(np.array(x.astype(mx.float32))).bfloat16()).float().numpy()
    assert np.array_equal(np.array(silu(x).astype(mx.float32)), expected)


def test_gradients_match_mlx_kernels():
    """scripts/train_tiny.py trains through these ops."""
    x = mx.array(np.linspace(-20, 20, 1001, dtype=np.float32))
    expected = np.exp(np.array(x, dtype=np.float64))
    gradient = np.array(mx.grad(lambda x: cpu_math.exp(x).sum())(x))
    assert np.max(np.abs(gradient - expected) / expected) < 1e-6
    q = mx.array(np.random.default_rng(5).standard_normal((1, 2, 16, 8)).astype(np.float32))
    ours = mx.grad(lambda q: attention(q, q, q).sum())(q)
    reference = mx.grad(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=8**-0.5).sum())(q)
    assert_close(ours, reference, 1e-5, "attention gradient")
    gate = mx.array(np.linspace(-10, 10, 64, dtype=np.float32))[None, :, None]
    ours = mx.grad(lambda g: silu_mul(g, g).sum())(gate)
    reference = mx.grad(lambda g: (nn.silu(g) * g).sum())(gate)
    assert_close(ours, reference, 1e-5, "silu_mul gradient")


def test_large_inputs_split_over_streams_give_identical_values(monkeypatch):
    """Attention in query blocks (BLAS may sum a smaller matmul in another order: float32 rounding only) and
    large elementwise work sliced over CPU streams (not a single value changes)."""
    rng = np.random.default_rng(6)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 300, 16)).astype(np.float32)) for _ in range(3))
    causal = mx.array(np.tril(np.ones((300, 300), dtype=bool)))[None, None]  # a per-query mask is sliced too
    gate, value = (mx.array(rng.standard_normal((1, 300, 512)).astype(np.float32)) for _ in range(2))

    def run():
        return [cpu_math.attention(q, k, v, 0.25), cpu_math.attention(q, k, v, 0.25, causal),
                silu_mul(gate, value), silu(gate[..., None])]

    monkeypatch.setattr(native, "applies", lambda *arrays: False)
    monkeypatch.setattr(cpu_math, "_QUERY_BLOCK", 64)
    split = run()
    monkeypatch.setattr(cpu_math, "_QUERY_BLOCK", 1 << 30)
    monkeypatch.setattr(cpu_math, "_PARALLEL_MIN_VALUES", 1 << 40)
    whole = run()
    for a, b in zip(split[:2], whole[:2]):
        assert_close(a, b, 1e-6, "attention in query blocks")
    for a, b in zip(split[2:], whole[2:]):
        assert mx.array_equal(a, b)
