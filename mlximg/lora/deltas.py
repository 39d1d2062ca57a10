"""What an adapter adds to one Linear layer's output, unfused, in the compute dtype: a LoRA's (B (A x) + b), a
LoKr's kron(W1, W2) x (as W1 X W2^T on x reshaped, never the dense product), or a dense delta. Built from one
module's tensors as diffusers converts them: a kohya / ai-toolkit alpha folded into A and B by powers of two, a
LoKr alpha into W1, and a fused projection's up rows split among the modules it feeds."""

from dataclasses import dataclass

import mlx.core as mx

from .names import Target


@dataclass
class LoRADelta:
    down: mx.array  # A (rank, in)
    up: mx.array  # B (out, rank)
    bias: mx.array | None = None  # (out,)

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.down, self.up, self.bias) if a is not None]

    def __call__(self, x: mx.array) -> mx.array:
        out = (x @ self.down.T) @ self.up.T
        return out if self.bias is None else out + self.bias

    def add_to(self, y: mx.array, x: mx.array, scale: float) -> mx.array:
        """y + scale x delta(x), the up projection's product, scaling and sum in one matmul (addmm)."""
        y = mx.addmm(y, x @ self.down.T, self.up.T, alpha=scale)
        return y if self.bias is None else y + self.bias * scale


@dataclass
class LoKrDelta:
    w1: mx.array  # (a, b)
    w2: mx.array  # (c, d); kron(w1, w2) is (a c, b d)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def arrays(self) -> list[mx.array]:
        return [self.w1, self.w2]

    def __call__(self, x: mx.array) -> mx.array:
        # kron(W1, W2) x = vec(W1 X W2^T) with X = x as (b, d), row-major.
        (a, b), (c, d) = self.w1.shape, self.w2.shape
        out = self.w1 @ x.reshape(*x.shape[:-1], b, d) @ self.w2.T
        return out.reshape(*x.shape[:-1], a * c)


@dataclass
class DenseDelta:
    weight: mx.array  # (out, in)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def arrays(self) -> list[mx.array]:
        return [self.weight]

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def alpha_scales(alpha: float, rank: int) -> tuple[float, float]:
    """alpha / rank as (down, up) factors that are equal up to powers of two, exactly as diffusers splits it (so
    the rounding in the file's dtype is the same)."""
    scale = alpha / rank
    down, up = scale, 1.0
    while down * 2 < up:
        down, up = down * 2, up / 2
    return down, up


def _rows(x: mx.array, rows) -> mx.array:
    if rows is None:
        return x
    count, chunks = rows
    size = x.shape[0] // count
    return mx.concatenate([x[i * size:(i + 1) * size] for i in chunks])


def lora_deltas(tensors: dict[str, mx.array], targets: list[Target], what: str,
                runtime_scale: float = 1.0) -> dict[str, LoRADelta]:
    """LoRA A / B (and alpha, bias) of one module, as the deltas of its targets."""
    down, up = tensors.get("lora_A"), tensors.get("lora_B")
    if down is None or up is None:
        missing = "lora_B / lora_up" if up is None else "lora_A / lora_down"
        raise ValueError(f"{what}: has no {missing} tensor")
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"{what}: the down projection {tuple(down.shape)} and the up projection "
                         f"{tuple(up.shape)} do not share a rank")
    if "alpha" in tensors:
        scale_down, scale_up = alpha_scales(float(tensors["alpha"].astype(mx.float32).item()), down.shape[0])
        down, up = down * scale_down, up * scale_up
    if runtime_scale != 1.0:
        up = up * runtime_scale
    bias = tensors.get("lora_B.bias")
    if bias is not None and runtime_scale != 1.0:
        bias = bias * runtime_scale
    return {t.path: LoRADelta(down, _rows(up, t.rows), None if bias is None else _rows(bias, t.rows))
            for t in targets}


def lokr_deltas(tensors: dict[str, mx.array], targets: list[Target], what: str) -> dict:
    """LoKr factors of one module as the deltas of its targets; alpha / rank goes into W1, as diffusers bakes it
    (no rank when both factors are full: the alpha is dropped)."""
    if "lokr_t2" in tensors:
        raise ValueError(f"{what}: Tucker-decomposed LoKr (lokr_t2) is not supported")
    w1 = _factor(tensors, "lokr_w1", what)
    w2 = _factor(tensors, "lokr_w2", what)
    rank = next((tensors[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in tensors), None)
    if "alpha" in tensors and rank is not None:
        w1 = w1 * (float(tensors["alpha"].astype(mx.float32).item()) / rank)
    deltas = {}
    for target in targets:
        if target.rows is None:
            deltas[target.path] = LoKrDelta(w1, w2)
        elif w1.shape[0] % target.rows[0] == 0:
            # Output rows i*c + k: a chunk of W1's rows is a contiguous chunk of the product's.
            deltas[target.path] = LoKrDelta(_rows(w1, target.rows), w2)
        else:
            deltas[target.path] = DenseDelta(_rows(_kron(w1, w2), target.rows))
    return deltas


def _factor(tensors: dict[str, mx.array], name: str, what: str) -> mx.array:
    if name in tensors:
        return tensors[name]
    if f"{name}_a" in tensors and f"{name}_b" in tensors:
        return tensors[f"{name}_a"] @ tensors[f"{name}_b"]
    raise ValueError(f"{what}: LoKr has neither {name} nor {name}_a / {name}_b")


def _kron(w1: mx.array, w2: mx.array) -> mx.array:
    (a, b), (c, d) = w1.shape, w2.shape
    return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * c, b * d)
