"""The Z-Image / Z-Image-Turbo single-stream diffusion transformer (diffusers ZImageTransformer2DModel).

Image tokens are refined (noise refiner, timestep-modulated), caption tokens are refined (context refiner, no
modulation), then the unified sequence [image, caption] runs through the main layers. Each sequence is padded to a
multiple of 32 with a learned pad token; those pads are attended to like real tokens, only the padding that evens
out a batch is masked. Module paths equal the checkpoint's keys, so `sanitize` has nothing to rename.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache.runner import PLAIN, BlockRunner
from ..configs import at_least, check_fields, from_dict
from ..loading import load_component
from ..quant.options import QuantOptions
from ..distributed.tensor import TensorPlan
from ..nn import (RMSNorm, SiLU, add_normed, attention, layer_norm, norm_rope_heads, rope_tables, scaled_norm, silu_mul,
                  timestep_embedding)

SEQ_MULTIPLE = 32  # every token sequence is padded to a multiple of this
ADALN_DIM = 256  # width of the timestep conditioning


@dataclass
class ZImageConfig:
    """Field names as in the checkpoint's transformer/config.json; defaults are the released model's."""

    all_patch_size: tuple[int, ...] = at_least(1, default=(2,))
    all_f_patch_size: tuple[int, ...] = at_least(1, default=(1,))
    in_channels: int = at_least(1, default=16)
    dim: int = at_least(1, default=3840)
    n_layers: int = at_least(0, default=30)
    n_refiner_layers: int = at_least(0, default=2)
    n_heads: int = at_least(1, default=30)
    n_kv_heads: int = at_least(1, default=30)
    norm_eps: float = at_least(0, default=1e-5)
    qk_norm: bool = True
    cap_feat_dim: int = at_least(1, default=2560)
    siglip_feat_dim: int | None = None
    rope_theta: float = at_least(1, default=256.0)
    t_scale: float = at_least(0, default=1000.0)
    axes_dims: tuple[int, ...] = at_least(2, default=(32, 48, 48))
    axes_lens: tuple[int, ...] = at_least(1, default=(1024, 512, 512))

    def __post_init__(self):
        check_fields(self)
        if self.siglip_feat_dim is not None:
            raise ValueError("Z-Image Omni (siglip_feat_dim set) is not supported")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3 or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {list(self.axes_dims)} and axes_lens {list(self.axes_lens)} must have 3 "
                             "entries each, the dims even (RoPE rotates channel pairs)")
        if self.dim % self.n_heads or self.dim // self.n_heads != sum(self.axes_dims):
            raise ValueError(f"head dim: dim {self.dim} / n_heads {self.n_heads} must equal sum(axes_dims) "
                             f"{sum(self.axes_dims)}")
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError(f"all_patch_size {list(self.all_patch_size)} and all_f_patch_size "
                             f"{list(self.all_f_patch_size)} must have the same length")

    @classmethod
    def from_dict(cls, config: dict, source: str | None = None) -> "ZImageConfig":
        return from_dict(cls, config, source)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        if qk_norm:
            self.norm_q = RMSNorm(dim // heads, eps=1e-5)
            self.norm_k = RMSNorm(dim // heads, eps=1e-5)
        self.to_out = [nn.Linear(dim, dim, bias=False)]

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array | None) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = (proj(x).reshape(batch, length, self.heads, -1) for proj in (self.to_q, self.to_k, self.to_v))
        norms = (self.norm_q, self.norm_k) if "norm_q" in self else (None, None)
        q, k = (norm_rope_heads(a, norm, *rope) for a, norm in zip((q, k), norms))
        return self.to_out[0](attention(q, k, v.transpose(0, 2, 1, 3), mask))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre- and post-normed attention and SwiGLU; with modulation, scaled by (1 + scale) and tanh-gated."""

    def __init__(self, args: ZImageConfig, modulation: bool):
        super().__init__()
        dim = args.dim
        self.attention = Attention(dim, args.n_heads, args.qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, eps=args.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=args.norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=args.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=args.norm_eps)
        if modulation:
            self.adaLN_modulation = [nn.Linear(args.adaln_dim, 4 * dim)]

    def __call__(self, x, rope, mask, adaln: mx.array | None = None) -> mx.array:
        if adaln is None:
            x = add_normed(x, self.attention(self.attention_norm1(x), rope, mask), self.attention_norm2)
            return add_normed(x, self.feed_forward(self.ffn_norm1(x)), self.ffn_norm2)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaLN_modulation[0](adaln)[:, None], 4, axis=-1)
        attn_out = self.attention(scaled_norm(x, self.attention_norm1, 1 + scale_msa), rope, mask)
        x = add_normed(x, attn_out, self.attention_norm2, mx.tanh(gate_msa))
        ffn_out = self.feed_forward(scaled_norm(x, self.ffn_norm1, 1 + scale_mlp))
        return add_normed(x, ffn_out, self.ffn_norm2, mx.tanh(gate_mlp))

    def modulated_input(self, x: mx.array, adaln: mx.array) -> mx.array:
        """What the attention sees, as in __call__: TeaCache's signal of how much this step's input changed."""
        scale_msa = mx.split(self.adaLN_modulation[0](adaln)[:, None], 4, axis=-1)[0]
        return scaled_norm(x, self.attention_norm1, 1 + scale_msa)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, mid_dim: int = 1024, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = [nn.Linear(frequency_dim, mid_dim), SiLU(), nn.Linear(mid_dim, out_dim)]

    def __call__(self, t: mx.array) -> mx.array:
        x = timestep_embedding(t, self.frequency_dim).astype(self.mlp[0].weight.dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, adaln_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = [SiLU(), nn.Linear(adaln_dim, dim)]

    def __call__(self, x: mx.array, adaln: mx.array) -> mx.array:
        scale = 1 + self.adaLN_modulation[1](self.adaLN_modulation[0](adaln))
        return self.linear(layer_norm(x, eps=1e-6) * scale[:, None])


@dataclass
class Conditioning:
    """A run's per-step constants: caption tokens after the context refiner, (cos, sin) RoPE tables of the image
    tokens and of the unified sequence, and the unified sequence's key mask (None: nothing masked)."""

    captions: mx.array
    image_rope: tuple[mx.array, mx.array]
    rope: tuple[mx.array, mx.array]
    mask: mx.array | None


def padded_length(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def _key_mask(lengths: list[int], total: int) -> mx.array | None:
    """(B, 1, 1, total) True where a key is real, or None when no sample is padded."""
    if all(n == total for n in lengths):
        return None
    return mx.array(np.arange(total)[None] < np.array(lengths)[:, None])[:, None, None, :]


class ZImageTransformer(nn.Module):
    def __init__(self, args: ZImageConfig):
        super().__init__()
        self.args = args
        dim, out = args.dim, args.in_channels
        patches = list(zip(args.all_patch_size, args.all_f_patch_size))
        self.all_x_embedder = {f"{p}-{f}": nn.Linear(f * p * p * out, dim) for p, f in patches}
        self.all_final_layer = {f"{p}-{f}": FinalLayer(dim, p * p * f * out, args.adaln_dim) for p, f in patches}
        self.noise_refiner = [TransformerBlock(args, modulation=True) for _ in range(args.n_refiner_layers)]
        self.context_refiner = [TransformerBlock(args, modulation=False) for _ in range(args.n_refiner_layers)]
        self.t_embedder = TimestepEmbedder(args.adaln_dim)
        self.cap_embedder = [RMSNorm(args.cap_feat_dim, eps=args.norm_eps), nn.Linear(args.cap_feat_dim, dim)]
        self.x_pad_token = mx.zeros((1, dim))
        self.cap_pad_token = mx.zeros((1, dim))
        self.layers = [TransformerBlock(args, modulation=True) for _ in range(args.n_layers)]

    def tensor_parallel_plan(self) -> TensorPlan:
        """Every block's heads and SwiGLU hidden units shared out across ranks (mlximg.distributed)."""
        plan = TensorPlan()
        for group in ("noise_refiner", "context_refiner", "layers"):
            for i in range(len(getattr(self, group))):
                block = f"{group}.{i}"
                plan.columns(*(f"{block}.attention.{name}" for name in ("to_q", "to_k", "to_v")),
                             f"{block}.feed_forward.w1", f"{block}.feed_forward.w3")
                plan.rows(f"{block}.attention.to_out.0", f"{block}.feed_forward.w2")
                plan.divide(f"{block}.attention", "heads")
        return plan

    def rope(self, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        """Per-sample tables (B, 1, N, head_dim / 2) broadcast over heads."""
        cos, sin = rope_tables(positions, tuple(self.args.axes_dims), self.args.rope_theta, float32_angles=True)
        return cos[:, None], sin[:, None]

    def patchify(self, latents: mx.array, patch: int) -> mx.array:
        """(B, C, H, W) -> (B, H/p * W/p, p * p * C), tokens row-major, features (ph, pw, c)."""
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
        return x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)

    def unpatchify(self, x: mx.array, height: int, width: int, patch: int) -> mx.array:
        b, c = x.shape[0], self.args.in_channels
        x = x.reshape(b, height // patch, width // patch, patch, patch, c)
        return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)

    def embed_captions(self, cap_feats: list[mx.array]) -> tuple[mx.array, list[int]]:
        """Embed, pad each caption to a multiple of 32 with the learned pad token, then to the batch's longest."""
        lengths = [padded_length(len(c)) for c in cap_feats]
        total = max(lengths)
        rows = []
        for feats, length in zip(cap_feats, lengths):
            h = self.cap_embedder[1](self.cap_embedder[0](feats))
            pads = [mx.broadcast_to(self.cap_pad_token, (length - len(feats), h.shape[1]))] if length > len(feats) else []
            batch_pad = [mx.zeros((total - length, h.shape[1]), h.dtype)] if total > length else []
            rows.append(mx.concatenate([h, *pads, *batch_pad]))
        return mx.stack(rows), lengths

    def positions(self, cap_lengths: list[int], grid: tuple[int, int], image_length: int):
        """Caption tokens at (1 + i, 0, 0); image tokens at (L_cap + 1, h, w); image pads at (0, 0, 0)."""
        total_cap = max(cap_lengths)
        hs, ws = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        cap_pos, img_pos = [], []
        for length in cap_lengths:
            cap = np.zeros((total_cap, 3), np.int64)
            cap[:, 0] = np.arange(1, total_cap + 1)
            img = np.zeros((image_length, 3), np.int64)
            img[: hs.size] = np.stack([np.full(hs.size, length + 1), hs.ravel(), ws.ravel()], -1)
            cap_pos.append(cap)
            img_pos.append(img)
        return np.stack(cap_pos), np.stack(img_pos)

    def condition(self, cap_feats: list[mx.array], grid: tuple[int, int], runner: BlockRunner = PLAIN) -> Conditioning:
        """What every step of a run shares: captions through the context refiner (it has no timestep input),
        RoPE tables and masks. `grid`: the image's patch grid (H / patch, W / patch)."""
        cap, cap_lengths = self.embed_captions(cap_feats)
        image_length = padded_length(grid[0] * grid[1])
        cap_pos, img_pos = self.positions(cap_lengths, grid, image_length)
        img_rope, cap_rope = self.rope(img_pos), self.rope(cap_pos)
        cap_mask = _key_mask(cap_lengths, cap.shape[1])
        cap = runner.stack("context_refiner", self.context_refiner, cap,
                           lambda block, h: block(h, cap_rope, cap_mask), reusable=False)
        rope = (mx.concatenate([img_rope[0], cap_rope[0]], axis=2), mx.concatenate([img_rope[1], cap_rope[1]], axis=2))
        mask = _key_mask([image_length + n for n in cap_lengths], image_length + cap.shape[1])
        return Conditioning(cap, img_rope, rope, mask)

    def embed(self, latents: mx.array, key: str, patch: int) -> mx.array:
        """Image tokens, padded to a multiple of 32 with the learned pad token."""
        x = self.all_x_embedder[key](self.patchify(latents, patch))
        pads = padded_length(x.shape[1]) - x.shape[1]
        return mx.concatenate([x, mx.broadcast_to(self.x_pad_token, (x.shape[0], pads, x.shape[2]))], axis=1) \
            if pads else x

    def blocks(self, x: mx.array, adaln: mx.array, conditioning: Conditioning, runner: BlockRunner) -> mx.array:
        """The noise refiner over the image tokens, then the main layers over [image, caption]; the image part."""
        x = runner.stack("noise_refiner", self.noise_refiner, x,
                         lambda block, h: block(h, conditioning.image_rope, None, adaln), reusable=False)
        unified = mx.concatenate([x, conditioning.captions], axis=1)
        unified = runner.stack("layers", self.layers, unified,
                               lambda block, h: block(h, conditioning.rope, conditioning.mask, adaln))
        return unified[:, :x.shape[1]]

    def __call__(self, latents: mx.array, t: mx.array, cap_feats: list[mx.array] | None = None,
                 capture: list | None = None, patch: int = 2, f_patch: int = 1, conditioning: Conditioning | None = None,
                 runner: BlockRunner | None = None) -> mx.array:
        """latents (B, C, H, W), t (B,) in [0, 1] (1 = clean image), one (L_i, cap_feat_dim) caption per sample,
        or their `conditioning` (from `condition`, computed once per run).

        Returns the model output (B, C, H, W); the velocity is its negation. `runner` (cache/runner.py) runs the
        blocks: the caches reach the model through it; `capture`, if a list, receives (block name, hidden
        states) after every block, for parity tests.
        """
        runner = runner or BlockRunner(capture=capture)
        key = f"{patch}-{f_patch}"
        height, width = latents.shape[2:]
        adaln = self.t_embedder(t * self.args.t_scale)
        if conditioning is None:
            conditioning = self.condition(cap_feats, (height // patch, width // patch), runner)

        x = self.embed(latents, key, patch)
        x = runner.body(x, lambda: self.noise_refiner[0].modulated_input(x, adaln),
                        lambda x: self.blocks(x, adaln, conditioning, runner))
        tokens = (height // patch) * (width // patch)
        return self.unpatchify(self.all_final_layer[key](x[:, :tokens], adaln), height, width, patch)


def load_zimage_transformer(model_dir, dtype: mx.Dtype | None = None, *,
                            fp8: QuantOptions | None = None) -> ZImageTransformer:
    """The `transformer/` component; its checkpoint keys are our module paths, so there is nothing to sanitize."""
    return load_component(model_dir, "transformer", lambda config: ZImageTransformer(ZImageConfig.from_dict(config)),
                          dtype=dtype, fp8=fp8)
