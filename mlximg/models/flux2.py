"""The FLUX.2 diffusion transformer (diffusers Flux2Transformer2DModel): dev, klein 4B / 9B and klein base.

Double-stream blocks (separate image and text weights, joint attention over [text, image]) are followed by
single-stream blocks (one fused QKV + MLP projection over the concatenated sequence). Every block is
modulated by shift / scale / gate vectors that are computed once per forward from the timestep (and guidance)
embedding and shared by all blocks of a kind. No biases anywhere; QK RMSNorm; 4-axis RoPE (t, h, w, l).
Module paths equal the checkpoint's keys, so there is nothing to sanitize.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache.runner import BlockRunner
from ..configs import at_least, check_fields, from_dict
from ..loading import load_component
from ..distributed.tensor import TensorPlan
from ..nn import (RMSNorm, add_gated, attention, modulate, norm_rope_heads, rope_tables, silu, silu_mul,
                  timestep_embedding)
from ..quant.options import QuantOptions
from .flux2_kv import LayerKV, ReferenceKV

TIME_SCALE = 1000.0  # the model gets sigma (and the guidance scale) and embeds them x1000
FLOAT16_MAX = 65504.0


@dataclass
class Flux2Config:
    """Field names as in the checkpoint's transformer/config.json; defaults are FLUX.2-dev's (diffusers' own)."""

    patch_size: int = at_least(1, default=1)
    in_channels: int = at_least(1, default=128)
    out_channels: int | None = at_least(1, default=None)
    num_layers: int = at_least(0, default=8)
    num_single_layers: int = at_least(0, default=48)
    attention_head_dim: int = at_least(2, default=128)
    num_attention_heads: int = at_least(1, default=48)
    joint_attention_dim: int = at_least(1, default=15360)
    timestep_guidance_channels: int = at_least(2, default=256)
    mlp_ratio: float = at_least(0, default=3.0)
    axes_dims_rope: tuple[int, ...] = at_least(0, default=(32, 32, 32, 32))
    rope_theta: float = at_least(1, default=2000.0)
    eps: float = at_least(0, default=1e-6)
    guidance_embeds: bool = True

    def __post_init__(self):
        check_fields(self)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope) {sum(self.axes_dims_rope)} != attention_head_dim {self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must all be even (channel pairs), got {list(self.axes_dims_rope)}")
        if self.num_layers + self.num_single_layers < 1:
            raise ValueError(f"no blocks: num_layers {self.num_layers}, num_single_layers {self.num_single_layers}")

    @classmethod
    def from_dict(cls, config: dict, source: str | None = None) -> "Flux2Config":
        return from_dict(cls, config, source)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)


def _heads(x: mx.array, head_dim: int) -> mx.array:
    """(B, N, heads * head_dim) -> (B, N, heads, head_dim): the layout the QK norms apply in."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def _attend(q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array], norms=(None, None),
            kv: LayerKV | None = None) -> mx.array:
    """(B, N, heads, head_dim) each -> (B, N, heads * head_dim); `norms` (QK RMSNorms, or None) and RoPE on q and k;
    `kv`: the block's reference keys and values (KV models), which then does the attending."""
    q, k = (norm_rope_heads(a, norm, *rope) for a, norm in zip((q, k), norms))
    return (kv.attend if kv is not None else attention)(q, k, v.transpose(0, 2, 1, 3))


def _clip_float16(x: mx.array) -> mx.array:
    # diffusers clips the residual stream in float16 so that it stays finite.
    return mx.clip(x, -FLOAT16_MAX, FLOAT16_MAX) if x.dtype == mx.float16 else x


class FeedForward(nn.Module):
    """SwiGLU with the gate and value projections fused in `linear_in` (gate first)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, value = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(silu_mul(gate, value))


class JointAttention(nn.Module):
    """Image (to_*) and text (add_*) projections, each QK-normed, attending jointly over [text, image]."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        self.add_q_proj = nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def __call__(self, img: mx.array, txt: mx.array, rope, kv=None) -> tuple[mx.array, mx.array]:
        d = self.head_dim
        txt_q, txt_k, txt_v = (_heads(proj(txt), d) for proj in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        img_q, img_k, img_v = (_heads(proj(img), d) for proj in (self.to_q, self.to_k, self.to_v))
        q = mx.concatenate([self.norm_added_q(txt_q), self.norm_q(img_q)], axis=1)
        k = mx.concatenate([self.norm_added_k(txt_k), self.norm_k(img_k)], axis=1)
        out = _attend(q, k, mx.concatenate([txt_v, img_v], axis=1), rope, kv=kv)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class TransformerBlock(nn.Module):
    """Double stream: image and text keep their own weights and residual streams, joined only in attention."""

    def __init__(self, args: Flux2Config):
        super().__init__()
        dim = args.inner_dim
        self.eps = args.eps
        self.attn = JointAttention(dim, args.attention_head_dim, args.eps)
        self.ff = FeedForward(dim, args.mlp_hidden_dim)
        self.ff_context = FeedForward(dim, args.mlp_hidden_dim)

    def __call__(self, img: mx.array, txt: mx.array, mod_img, mod_txt, rope, kv=None) -> tuple[mx.array, mx.array]:
        (shift, scale, gate), (shift_ff, scale_ff, gate_ff) = mod_img
        (c_shift, c_scale, c_gate), (c_shift_ff, c_scale_ff, c_gate_ff) = mod_txt
        img_attn, txt_attn = self.attn(
            modulate(img, shift, scale, self.eps), modulate(txt, c_shift, c_scale, self.eps), rope, kv)
        img = add_gated(img, img_attn, gate)
        img = add_gated(img, self.ff(modulate(img, shift_ff, scale_ff, self.eps)), gate_ff)
        txt = add_gated(txt, txt_attn, c_gate)
        txt = add_gated(txt, self.ff_context(modulate(txt, c_shift_ff, c_scale_ff, self.eps)), c_gate_ff)
        return _clip_float16(img), _clip_float16(txt)


class ParallelAttention(nn.Module):
    """Attention and SwiGLU side by side: one input projection [q, k, v, gate, value], one output projection."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.splits = [dim, 2 * dim, 3 * dim, 3 * dim + mlp_hidden]
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(dim + mlp_hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope, kv=None) -> mx.array:
        q, k, v, gate, value = mx.split(self.to_qkv_mlp_proj(x), self.splits, axis=-1)
        d = self.head_dim
        out = _attend(_heads(q, d), _heads(k, d), _heads(v, d), rope, (self.norm_q, self.norm_k), kv)
        return self.to_out(mx.concatenate([out, silu_mul(gate, value)], axis=-1))


class SingleTransformerBlock(nn.Module):
    """Single stream over [text, image]: one modulation set, attention and MLP in parallel."""

    def __init__(self, args: Flux2Config):
        super().__init__()
        self.eps = args.eps
        self.attn = ParallelAttention(args.inner_dim, args.attention_head_dim, args.mlp_hidden_dim, args.eps)

    def __call__(self, x: mx.array, mod, rope, kv=None) -> mx.array:
        shift, scale, gate = mod
        return _clip_float16(add_gated(x, self.attn(modulate(x, shift, scale, self.eps), rope, kv), gate))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class TimestepGuidanceEmbeddings(nn.Module):
    """Sinusoidal embeddings of t (and of the guidance scale, for guidance-distilled dev), each through an MLP,
    summed."""

    def __init__(self, channels: int, dim: int, guidance_embeds: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim)
        if guidance_embeds:
            self.guidance_embedder = TimestepEmbedding(channels, dim)

    def __call__(self, t: mx.array, guidance: mx.array | None) -> mx.array:
        # The sinusoids are float32 and then rounded to the input's dtype, as diffusers does.
        emb = self.timestep_embedder(timestep_embedding(t, self.channels).astype(t.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, self.channels).astype(guidance.dtype))
        return emb


class Modulation(nn.Module):
    """SiLU and one projection giving `sets` (shift, 1 + scale, gate) triples, each (B, 1, dim)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def __call__(self, temb: mx.array) -> list[tuple[mx.array, mx.array, mx.array]]:
        chunks = mx.split(self.linear(silu(temb))[:, None], 3 * self.sets, axis=-1)
        return [(chunks[i], 1 + chunks[i + 1], chunks[i + 2]) for i in range(0, 3 * self.sets, 3)]


class AdaLayerNormContinuous(nn.Module):
    """Final LayerNorm scaled and shifted by the conditioning (note: scale comes first in the projection)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(silu(temb))[:, None], 2, axis=-1)
        return modulate(x, shift, 1 + scale, self.eps)


def _host_ids(ids, axes: int, what: str) -> np.ndarray:
    """Positions as float32 (diffusers rounds ids to float32 before its float64 angles). A batch of identical
    rows, which is what the pipelines pass, collapses to one table shared by the batch."""
    ids = np.asarray(ids).astype(np.float32)
    if ids.ndim not in (2, 3) or ids.shape[-1] != axes:
        raise ValueError(f"{what} must have shape (N, {axes}) or (B, N, {axes}), got {ids.shape}")
    if ids.ndim == 3 and (ids == ids[:1]).all():
        ids = ids[0]
    return ids


class Flux2Transformer(nn.Module):
    def __init__(self, args: Flux2Config):
        super().__init__()
        self.args = args
        dim = args.inner_dim
        self.time_guidance_embed = TimestepGuidanceEmbeddings(
            args.timestep_guidance_channels, dim, args.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, sets=2)
        self.double_stream_modulation_txt = Modulation(dim, sets=2)
        self.single_stream_modulation = Modulation(dim, sets=1)
        self.x_embedder = nn.Linear(args.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(args.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [TransformerBlock(args) for _ in range(args.num_layers)]
        self.single_transformer_blocks = [SingleTransformerBlock(args) for _ in range(args.num_single_layers)]
        self.norm_out = AdaLayerNormContinuous(dim, args.eps)
        self.proj_out = nn.Linear(dim, args.output_channels, bias=False)

    def tensor_parallel_plan(self) -> TensorPlan:
        """Heads and SwiGLU hidden units shared out across ranks (mlximg.distributed): the double blocks' image
        and text projections, and the single blocks' fused [q, k, v, gate, value] input and [attention, MLP]
        output, segment by segment."""
        plan = TensorPlan()
        for i in range(len(self.transformer_blocks)):
            block = f"transformer_blocks.{i}"
            plan.columns(*(f"{block}.attn.{name}" for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                                 "add_v_proj")))
            plan.rows(f"{block}.attn.to_out.0", f"{block}.attn.to_add_out", f"{block}.ff.linear_out",
                      f"{block}.ff_context.linear_out")
            plan.columns(f"{block}.ff.linear_in", f"{block}.ff_context.linear_in", segments=2)
        dim, hidden = self.args.inner_dim, self.args.mlp_hidden_dim
        for i in range(len(self.single_transformer_blocks)):
            attn = f"single_transformer_blocks.{i}.attn"
            plan.columns(f"{attn}.to_qkv_mlp_proj", segments=[dim, 2 * dim, 3 * dim, 3 * dim + hidden])
            plan.rows(f"{attn}.to_out", segments=[dim])
            plan.divide(attn, "splits")
        return plan

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the norm weights, which quantization leaves alone."""
        return [*self.transformer_blocks, *self.single_transformer_blocks][0].attn.norm_q.weight.dtype

    def rope(self, img_ids, txt_ids) -> tuple[mx.array, mx.array]:
        """cos / sin tables for the sequence [text, image], (1 or B, 1, N_txt + N_img, head_dim / 2).

        ids are host arrays (N, 4) or (B, N, 4) of (t, h, w, l) positions. Positions do not change between
        steps: build the tables once per generation and pass them to every call as `rope=`. Per-sample ids
        that differ give each sample its own positions (diffusers would use the first sample's for all).
        """
        axes = len(self.args.axes_dims_rope)
        img, txt = _host_ids(img_ids, axes, "img_ids"), _host_ids(txt_ids, axes, "txt_ids")
        batches = {len(a) for a in (img, txt) if a.ndim == 3}
        if len(batches) > 1:
            raise ValueError(f"img_ids and txt_ids have different batch sizes: {img.shape}, {txt.shape}")
        if batches:  # per-sample positions for at least one of the two: give both the batch axis
            img, txt = (np.broadcast_to(a, (*batches, *a.shape[-2:])) for a in (img, txt))
        positions = np.concatenate([txt, img], axis=-2)
        cos, sin = rope_tables(positions, self.args.axes_dims_rope, self.args.rope_theta)
        cos, sin = (a.reshape(-1, 1, *a.shape[-2:]) for a in (cos, sin))
        return cos, sin

    def conditioning(self, t, guidance, batch: int, dtype: mx.Dtype) -> mx.array:
        """The timestep(+guidance) embedding (B, dim): t = sigma and guidance = scale, both x1000 inside."""
        t = mx.broadcast_to(mx.array(t), (batch,)).astype(dtype) * TIME_SCALE
        if guidance is not None:
            if "guidance_embedder" not in self.time_guidance_embed:
                raise ValueError(f"guidance={guidance} given, but this model has no guidance embedding "
                                 "(guidance_embeds is false)")
            guidance = mx.broadcast_to(mx.array(guidance), (batch,)).astype(dtype) * TIME_SCALE
        return self.time_guidance_embed(t, guidance)

    def blocks(self, img: mx.array, txt: mx.array, modulation, rope, runner: BlockRunner,
               references: ReferenceKV | None = None) -> mx.array:
        """Double-stream blocks over (image, text), then single-stream blocks over [text, image]; the image part."""
        mod_img, mod_txt, mod_single = modulation
        kv = references.layer if references is not None else lambda block: None
        img, txt = runner.stack("transformer_blocks", self.transformer_blocks, (img, txt),
                                lambda block, h: block(*h, mod_img, mod_txt, rope, kv(block)),
                                record=lambda h: h[::-1])
        h = mx.concatenate([txt, img], axis=1)
        h = runner.stack("single_transformer_blocks", self.single_transformer_blocks, h,
                         lambda block, h: block(h, mod_single, rope, kv(block)))
        return h[:, txt.shape[1]:]

    def __call__(
        self, x: mx.array, text: mx.array, t, img_ids=None, txt_ids=None, guidance=None, *,
        rope: tuple[mx.array, mx.array] | None = None, capture: list | None = None, runner: BlockRunner | None = None,
        references: ReferenceKV | None = None,
    ) -> mx.array:
        """x (B, N_img, in_channels) packed latent tokens (reference-image tokens appended after them), text
        (B, N_txt, joint_attention_dim), t: sigma in [0, 1], scalar or (B,); guidance: the embedded guidance
        scale (dev only), scalar or (B,), or None. Positions come as `img_ids` / `txt_ids` or as `rope`
        (from `self.rope`). Returns (B, N_img, patch^2 * out_channels) in the model's dtype: the velocity
        for every image token (slice off the reference tokens). `runner` (cache/runner.py) runs the blocks: the
        caches reach the model through it; `capture`, if a list, receives (block name, output) after every block,
        for parity tests. `references` (KV models): the reference tokens' kept keys and values; while it is
        extracting, x holds its reference tokens *before* the image tokens, and only the image tokens' output
        is returned.
        """
        runner = runner or BlockRunner(capture=capture)
        dtype = self.dtype
        x, text = x.astype(dtype), text.astype(dtype)
        (batch, n_img, _), n_txt = x.shape, text.shape[1]
        if rope is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("give img_ids and txt_ids, or rope= from Flux2Transformer.rope")
            rope = self.rope(img_ids, txt_ids)
        if rope[0].shape[-2] != n_txt + n_img or rope[0].shape[0] not in (1, batch):
            raise ValueError(f"rope tables {rope[0].shape} do not fit batch {batch} and {n_txt} text + {n_img} "
                             "image tokens")

        temb = self.conditioning(t, guidance, batch, dtype)
        modulation = (self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb),
                      self.single_stream_modulation(temb)[0])
        extracting = references is not None and references.extracting
        if extracting:
            modulation = self.reference_modulation(modulation, references, guidance, batch, n_txt, n_img)
        if references is not None:
            references.text_tokens = n_txt
        img, txt = self.x_embedder(x), self.context_embedder(text)
        img = runner.body(img, lambda: self.modulated_input(img, modulation[0], modulation[2]),
                          lambda img: self.blocks(img, txt, modulation, rope, runner, references))
        if extracting:
            img, references.extracting = img[:, references.count:], False
        return self.proj_out(self.norm_out(img, temb))

    def reference_modulation(self, modulation, references: ReferenceKV, guidance, batch: int, n_txt: int,
                             n_img: int):
        """The first KV step's modulations: the reference tokens' rows modulated at t = 0."""
        mod_img, mod_txt, mod_single = modulation
        temb = self.conditioning(0.0, guidance, batch, self.dtype)
        mod_img, mod_single = references.modulation(
            mod_img, mod_single, self.double_stream_modulation_img(temb), self.single_stream_modulation(temb)[0],
            n_txt, n_img)
        return mod_img, mod_txt, mod_single

    def modulated_input(self, img: mx.array, mod_img, mod_single) -> mx.array:
        """The first block's modulated image input: TeaCache's signal of how much this step's input changed."""
        shift, scale, _ = mod_img[0] if self.transformer_blocks else mod_single
        return modulate(img, shift, scale, self.args.eps)


def load_flux2_transformer(model_dir, dtype: mx.Dtype | None = None, *,
                           fp8: QuantOptions | None = None) -> Flux2Transformer:
    """The `transformer/` component; its checkpoint keys are our module paths, so there is nothing to sanitize."""
    return load_component(model_dir, "transformer", lambda config: Flux2Transformer(Flux2Config.from_dict(config)),
                          dtype=dtype, fp8=fp8)
