"""Intermediate hidden states of an mlx-lm decoder, numbered as transformers numbers them: the text encoders' base.

transformers' `output_hidden_states=True` tuple of a model with N decoder layers: index 0 is the token embedding,
index k (1 <= k < N) the output of decoder layer k, and index N (-1) the final-norm output. The encoders read
intermediate states only, so the decoder is built with just the layers the requested indices need and no final norm.
Attention is causal with padded keys hidden, at positions 0..L-1 whatever the padding, as in transformers when no
position_ids are given.
"""

import warnings
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import checked
from ..distributed.tensor import TensorPlan
from .lm_kernels import PaddedCausalMask, decoder_layer, mlp


# The sizes every decoder config needs, as transformers names them; head_dim may be absent (hidden / heads).
_DECODER_SIZES = {"hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
                  "num_key_value_heads": 1, "vocab_size": 1, "head_dim": 1}


def check_decoder_config(config: dict, prefix: str = "") -> None:
    """The decoder sizes typed and positive, and the heads fitting together; errors name the field."""
    for name, minimum in _DECODER_SIZES.items():
        if name in config and not (name == "head_dim" and config[name] is None):
            checked(int, config[name], f"{prefix}{name}", minimum)
    checked(float, config.get("rms_norm_eps", 1e-6), f"{prefix}rms_norm_eps", 0)
    heads, kv_heads = config.get("num_attention_heads", 1), config.get("num_key_value_heads", 1)
    if heads % kv_heads:
        raise ValueError(f"{prefix}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.get("head_dim") is None and config.get("hidden_size", 0) % heads:
        raise ValueError(f"{prefix}hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                         f"{heads} (and no head_dim is given)")


def resolve_hidden_layer(index: int, num_layers: int) -> int:
    """A hidden-state index (negative counts from the end, as in transformers) as the number of layers to run."""
    resolved = index + num_layers + 1 if index < 0 else index
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"hidden state {index} is out of range for a model with {num_layers} layers")
    if resolved == num_layers:
        raise ValueError(f"hidden state {index} is the final-norm output, which this encoder does not compute")
    return resolved


def warn_truncated(tokenizer, texts: list[str], max_length: int, **options) -> None:
    """Warn, for each text longer than `max_length` tokens, how many tokens truncation drops and where it cuts."""
    for ids in tokenizer(texts, **options)["input_ids"]:
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length:max_length + 8]).strip()
            warnings.warn(f"a prompt is {len(ids)} tokens with its chat template; the text encoder reads "
                          f"{max_length}, so the last {len(ids) - max_length} are dropped (from {cut!r} on)",
                          stacklevel=4)


def prompt_list(prompts: str | list[str]) -> list[str]:
    """A prompt or a list of prompts, as the pipelines accept them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode (empty list)")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {bad}")
    return prompts


def causal_padding_mask(attention_mask: np.ndarray | None, length: int, allow_left_padding: bool = False
                        ) -> tuple[mx.array | PaddedCausalMask | str, np.ndarray | None]:
    """transformers' mask: causal, and keys at padded positions hidden. All valid: plain causal (the fast path);
    every query with a key (right padding): a PaddedCausalMask, which the CPU kernel takes.

    Returns the mask and, where left padding leaves queries with no key at all, those (B, L) rows (else None).
    """
    if attention_mask is None or attention_mask.all():
        return "causal", None
    allowed = np.tril(np.ones((length, length), dtype=bool))[None] & attention_mask[:, None, :]
    # A query before the first real token has nothing to attend to; torch's SDPA returns zeros there, MLX's not.
    unattended = ~allowed.any(axis=-1)
    if not unattended.any():
        return PaddedCausalMask(mx.array(attention_mask[:, None, None, :])), None
    if not allow_left_padding:
        rows = np.flatnonzero(unattended.any(axis=1))
        raise ValueError(f"attention_mask masks the first token of sequences {rows.tolist()} (left padding?); "
                         "only right padding is supported by this encoder")
    # Those rows get their own key so MLX's softmax stays finite; their attention output is replaced (UnattendedRows).
    allowed |= np.eye(length, dtype=bool)[None] & unattended[:, :, None]
    return mx.array(allowed[:, None]), unattended


class DecoderHiddenStates(nn.Module):
    """An mlx-lm decoder model (`.model`: embed_tokens and a plain list of pre-norm blocks, no final norm) read out
    as transformers' hidden states; `config_layers` is the checkpoint's layer count, which fixes the numbering."""

    # Left padding leaves the leading pad queries with every key masked: True gives them torch's SDPA result.
    allow_left_padding = False

    def __init__(self, model: nn.Module, config_layers: int):
        super().__init__()
        self.config_layers = config_layers
        self.model = model

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def tensor_parallel_plan(self) -> TensorPlan:
        """mlx-lm's decoder layers as mlx-lm shards them: q, k, v and the MLP's gate and up split by heads and hidden
        units, o_proj and down_proj reduced."""
        plan = TensorPlan()
        for i in range(self.num_layers):
            layer = f"model.layers.{i}"
            plan.columns(*(f"{layer}.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")),
                         f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj")
            plan.rows(f"{layer}.self_attn.o_proj", f"{layer}.mlp.down_proj")
            plan.divide(f"{layer}.self_attn", "n_heads", "n_kv_heads")
        return plan

    def hidden_states(self, input_ids: mx.array, attention_mask: np.ndarray | mx.array | None,
                      layers: Iterable[int]) -> list[mx.array]:
        """transformers' `hidden_states[k]` for each k in `layers`, each (B, L, hidden); runs only the layers needed.

        `attention_mask` is (B, L), 1/True for real tokens.
        """
        indices = [resolve_hidden_layer(k, self.config_layers) for k in layers]
        if not indices:
            raise ValueError("no hidden-state layers requested")
        depth = max(indices)
        if depth > self.num_layers:
            raise ValueError(f"hidden state {depth} needs {depth} layers; this encoder was loaded with "
                             f"{self.num_layers} (pass the layers when loading it)")
        input_ids = mx.array(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask).astype(bool)
            if attention_mask.shape != tuple(input_ids.shape):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids {tuple(input_ids.shape)}")
        mask, unattended = causal_padding_mask(attention_mask, input_ids.shape[1], self.allow_left_padding)

        h = self.model.embed_tokens(input_ids)
        states = [h]
        rows = None if unattended is None else UnattendedRows(self.model, np.array(input_ids), unattended)
        for layer in self.model.layers[:depth]:
            h = decoder_layer(layer, h, mask)
            if rows is not None:
                h = rows.step(layer, h)
            states.append(h)
        return [states[k] for k in indices]


class UnattendedRows:
    """Queries with every key masked, as torch's SDPA computes them: a zero attention output, and o_proj has no
    bias, so each block reduces to `h + mlp(post_attention_layernorm(h))`. That depends on the token alone (no
    position, no other token), so it is computed once per distinct token id and scattered into those rows."""

    def __init__(self, model: nn.Module, input_ids: np.ndarray, unattended: np.ndarray):
        tokens, self.inverse = np.unique(input_ids[unattended], return_inverse=True)
        self.flat_rows = mx.array(np.flatnonzero(unattended))
        self.inverse = mx.array(self.inverse.reshape(-1))
        self.h = model.embed_tokens(mx.array(tokens))

    def step(self, layer: nn.Module, out: mx.array) -> mx.array:
        """Advance the rows through `layer` and write them over the block's output `out` (B, L, D)."""
        self.h = self.h + mlp(layer.mlp, layer.post_attention_layernorm(self.h))
        b, length, dim = out.shape
        flat = out.reshape(b * length, dim)
        flat[self.flat_rows] = self.h[self.inverse]
        return flat.reshape(b, length, dim)
