"""The blocks' fused norm / adaLN modulation / gated residual chains (mlximg/nn/modulation.py): the CPU kernel and
the compiled chain against torch's ops, the compiled chain against the uncompiled one, and their gradients."""

import mlx.core as mx
import numpy as np
import pytest

from mlximg.nn import RMSNorm, modulation, native
from oracle import assert_close, require_oracle
from test_native_kernels import CAN_BUILD

EPS = 1e-5


def inputs(batch=2, length=37, dim=24, seed=0):
    """x, y (B, N, D); per-sample scale, shift, gate (B, 1, D); an RMSNorm with a perturbed weight."""
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((batch, length, dim)).astype(np.float32) * 3 + 1 for _ in range(2))
    scale, shift, gate = (rng.standard_normal((batch, 1, dim)).astype(np.float32) for _ in range(3))
    norm = RMSNorm(dim, eps=EPS)
    norm.weight = mx.array(rng.standard_normal(dim).astype(np.float32))
    return x, y, scale, shift, gate, norm


def torch_chains(x, y, scale, shift, gate, weight):
    """The four chains as diffusers writes them (RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight)."""
    torch = require_oracle()
    x, y, scale, shift, gate, weight = (torch.from_numpy(np.asarray(a)) for a in (x, y, scale, shift, gate, weight))

    def rms(a):
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS) * weight

    layer = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
    return {"scaled_norm": rms(x) * scale, "add_normed": x + torch.tanh(gate) * rms(y),
            "modulate": layer * scale + shift, "add_gated": x + gate * y}


def ours(x, y, scale, shift, gate, norm):
    x, y, scale, shift, gate = (mx.array(a) for a in (x, y, scale, shift, gate))
    return {"scaled_norm": modulation.scaled_norm(x, norm, scale),
            "add_normed": modulation.add_normed(x, y, norm, mx.tanh(gate)),
            "modulate": modulation.modulate(x, shift, scale, 1e-6), "add_gated": modulation.add_gated(x, y, gate)}


@pytest.mark.parametrize("ops", ["auto", "fast", "mlx"])
@pytest.mark.parametrize("shape", [(2, 37, 24), (2, 1100, 36), (1, 300, 256)])
def test_chains_match_torch(monkeypatch, ops, shape):
    """Every op path (the kernel on the CPU in float32 from 2^16 values; MLX's ops), batches of per-sample
    modulation, widths on and off the kernel's vector width."""
    monkeypatch.setenv("MLXIMG_OPS", ops)
    kernel_calls = []
    kernel = native.norm_modulate
    monkeypatch.setattr(native, "norm_modulate", lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
    *arrays, norm = inputs(*shape)
    expected = torch_chains(*arrays, np.array(norm.weight))
    for name, out in ours(*arrays, norm).items():
        assert_close(out, expected[name].numpy(), 2e-6, f"{name} ({ops})")
    large = np.prod(shape) >= 1 << 16
    assert len(kernel_calls) == (3 if ops == "auto" and large and CAN_BUILD else 0)  # add_gated: MLX's two passes


def test_the_kernel_takes_the_norm_chains_on_the_cpu_in_float32():
    x, y, scale, shift, gate, norm = (mx.array(a) if isinstance(a, np.ndarray) else a for a in inputs())
    assert native.supports_norm_modulate(x, weight=norm.weight, scale=scale) == CAN_BUILD
    assert native.supports_norm_modulate(x, scale=scale[:, :, :5]) is False  # not per-sample (B, 1, D)
    assert native.supports_norm_modulate(x.astype(mx.bfloat16), scale=scale) is False


@pytest.mark.parametrize("names", [("scale", "weight"), ("gate", "residual", "weight"), ("scale", "shift"),
                                   ("gate", "residual")])
def test_compiled_chains_equal_the_uncompiled_ones(monkeypatch, names):
    """The function the GPU path compiles (shapeless) gives the uncompiled chain's values across shapes and batch
    sizes, traced once per dtype: a new size or batch does not compile again."""
    norm_kind = "rms" if "weight" in names else "layer" if "shift" in names else "none"
    chain, traces = modulation._chain, []
    monkeypatch.setattr(modulation, "_chain", lambda *a, **k: traces.append(a[0].shape) or chain(*a, **k))
    compiled = modulation.compiled_chain.__wrapped__(norm_kind, EPS, names)  # a fresh one, not the cached
    cases = [((2, 37, 24), mx.float32), ((1, 300, 24), mx.float32), ((3, 16, 64), mx.float32),
             ((3, 16, 64), mx.bfloat16), ((1, 40, 64), mx.bfloat16)]
    for shape, dtype in cases:
        x, y, scale, shift, gate, norm = inputs(*shape)
        values = {"weight": norm.weight, "scale": mx.array(scale), "shift": mx.array(shift),
                  "residual": mx.array(y), "gate": mx.array(gate)}
        arrays = [values[n].astype(dtype) for n in names]
        expected = chain(mx.array(x).astype(dtype), norm_kind, EPS, **dict(zip(names, arrays)))
        got = compiled(mx.array(x).astype(dtype), *arrays)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        # Fused elementwise code may contract a multiply-add: within one rounding of the output, not more.
        ulp = np.finfo(np.float32).eps if dtype == mx.float32 else 2.0**-8
        error = float(mx.max(mx.abs(got.astype(mx.float32) - expected.astype(mx.float32))
                             / (mx.abs(expected.astype(mx.float32)) + 1e-3)))
        assert error <= 2 * ulp, f"{names} {shape} {dtype}: {error:.3g}"
    assert len(traces) == 2, f"traced for {traces}: once per dtype expected"


def test_kernel_gradients_are_those_of_the_mlx_chain():
    x, y, scale, shift, gate, norm = inputs(1, 1100, 64)
    x, y, scale, gate = (mx.array(a) for a in (x, y, scale, gate))

    def loss(x, y, scale, gate, weight):
        norm.weight = weight
        return mx.sum(modulation.add_normed(x, modulation.scaled_norm(y, norm, scale), norm, gate) ** 2)

    args = (x, y, scale, gate, norm.weight)
    kernel = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXIMG_OPS", "fast")
        reference = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    for name, a, b in zip(("x", "y", "scale", "gate", "weight"), kernel, reference):
        assert_close(a, np.array(b), 1e-5, f"gradient of {name}")
