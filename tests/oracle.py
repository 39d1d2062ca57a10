"""The reference oracle: PyTorch diffusers / transformers on the CPU in float32, and helpers to compare with it.

Tiny models are built from the same classes as the real checkpoints, randomly initialised, with every
constant-initialised parameter perturbed (norm weights, zero biases, pad tokens, BatchNorm running stats), so
a port that forgets one of them fails. They are saved with `save_pretrained`: the real layout and key names.
"""

import os
from pathlib import Path

import numpy as np
import pytest


def require_oracle():
    """Import torch, diffusers and transformers. Missing in CI (CI=true) is a failure, elsewhere a skip."""
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the reference oracle is missing in CI: {error}", pytrace=False)
        pytest.skip(f"reference oracle not installed: {error}")
    torch.set_grad_enabled(False)
    return torch


def saved_buffers(module):
    """Buffers that go into the checkpoint: not the derived, non-persistent ones (e.g. RoPE inv_freq tables)."""
    for prefix, child in module.named_modules():
        for name, buffer in child.named_buffers(recurse=False):
            if name not in child._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buffer


def perturb_(module, seed: int = 0, scale: float = 0.1):
    """Add noise to every floating parameter and saved buffer, in place; keeps BatchNorm variances positive."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *saved_buffers(module)]:
            if not tensor.is_floating_point():
                continue
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
            if name.endswith("running_var"):
                tensor.abs_().add_(0.1)
    return module


def save_tiny(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):
        return tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), to_numpy(expected).astype(np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != reference {expected.shape}")
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def assert_close(actual, expected, rtol: float, what: str = "output"):
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} exceeds {rtol:g}"
    return error


class RecordInputs:
    """Records the input_ids and attention_mask a pipeline passes to its text encoder."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({k: kwargs[k].numpy() for k in ("input_ids", "attention_mask")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- the Mac pass (pytest --mac): MLX's own ops, bfloat16 compute, FP8 as a quantized matmul --------------------------

# mlximg's error against the float32 reference may exceed the reference's own bfloat16-vs-float32 error by this
# factor plus this floor: both engines round at different points, so neither is the other's exact witness.
LOW_PRECISION_FACTOR = 1.25
IMAGE_FLOOR = {"max": 4.0, "mean": 0.5}  # pixel levels (0-255)
TENSOR_FLOOR = 2.0**-8  # one bfloat16 ulp, relative


def mac_pass() -> bool:
    """Whether this run is the Mac pass (conftest.py sets MLXIMG_DTYPE=bfloat16 for it)."""
    return os.environ.get("MLXIMG_DTYPE") == "bfloat16"


def in_bfloat16(module):
    """A bfloat16 copy of a torch module or diffusers pipeline; the float32 original stays as it is."""
    import copy

    import torch

    return copy.deepcopy(module).to(torch.bfloat16)


def image_errors(actual, expected) -> dict[str, float]:
    difference = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    return {"max": float(difference.max()), "mean": float(difference.mean())}


def assert_image_within_reference(ours, expected, low_expected, what: str = "image") -> dict:
    """Mac pass: mlximg-bf16's pixel error against diffusers-float32 within diffusers-bf16's own, by the margin."""
    ours_error, reference_error = image_errors(ours, expected), image_errors(low_expected, expected)
    for key, floor in IMAGE_FLOOR.items():
        bound = LOW_PRECISION_FACTOR * reference_error[key] + floor
        assert ours_error[key] <= bound, (f"{what}: {key} error {ours_error[key]:.2f} against float32 exceeds "
                                          f"diffusers-bf16's {reference_error[key]:.2f} x {LOW_PRECISION_FACTOR} "
                                          f"+ {floor}")
    print(f"{what}: mlximg-bf16 vs float32 {ours_error}, diffusers-bf16 vs float32 {reference_error}, "
          f"mlximg vs diffusers-bf16 {image_errors(ours, low_expected)}")
    return ours_error


def assert_image_matches(ours, expected, low_expected=None, what: str = "image") -> None:
    """A pipeline image against diffusers': float32 within 1/255 per pixel; Mac pass (`low_expected`, diffusers-bf16's
    image) within diffusers-bf16's own error against float32. A flat image would match trivially, so it fails."""
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    if low_expected is not None:
        assert_image_within_reference(ours, expected, low_expected, what)
    else:
        difference = np.abs(ours - expected)
        assert difference.max() <= 1, f"{what}: max pixel difference {difference.max()}"
    assert ours.std() > 5, "a flat image would match trivially"


def assert_tensor_within_reference(ours, expected, low_expected, what: str = "output") -> float:
    """Mac pass: the relative error against torch-float32 within torch-bf16's own, by the margin."""
    ours_error = relative_error(to_numpy(ours), expected)
    reference_error = relative_error(to_numpy(low_expected), expected)
    bound = LOW_PRECISION_FACTOR * reference_error + TENSOR_FLOOR
    assert ours_error <= bound, (f"{what}: relative error {ours_error:.3g} against float32 exceeds torch-bf16's "
                                 f"{reference_error:.3g} x {LOW_PRECISION_FACTOR} + {TENSOR_FLOOR:.3g}")
    print(f"{what}: mlximg-bf16 vs float32 {ours_error:.3g}, torch-bf16 vs float32 {reference_error:.3g}")
    return ours_error


def mlximg_dtype():
    """The dtype components load in for a parity test: bfloat16 in the Mac pass, the checkpoint's otherwise."""
    import mlx.core as mx

    return mx.bfloat16 if mac_pass() else None


def host(x) -> np.ndarray:
    """An MLX array of any float dtype as float32 NumPy (NumPy has no bfloat16)."""
    import mlx.core as mx

    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else np.asarray(x, np.float32)
