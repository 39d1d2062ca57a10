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
