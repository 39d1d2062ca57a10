"""Intermediate hidden states of an mlx-lm decoder, numbered as transformers numbers them: the text encoders' base.

transformers' `output_hidden_states=True` tuple of a model with N decoder layers: index 0 is the token embedding,
index k (1 <= k < N) the output of decoder layer k, and index N (-1) the final-norm output. The encoders read
intermediate states only, so the decoder is built with just the layers the requested indices need and no final norm.
Attention is causal with padded keys hidden, at positions 0..L-1 whatever the padding, as in transformers when no
position_ids are given.
"""

from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .lm_kernels import PaddedCausalMask, kernels_for


def resolve_hidden_layer(index: int, num_layers: int) -> int:
    """A hidden-state index (negative counts from the end, as in transformers) as the number of layers to run."""
    resolved = index + num_layers + 1 if index < 0 else index
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"hidden state {index} is out of range for a model with {num_layers} layers")
    if resolved == num_layers:
        raise ValueError(f"hidden state {index} is the final-norm output, which this encoder does not compute")
    return resolved


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
        with kernels_for(self.model):
            for layer in self.model.layers[:depth]:
                h = layer(h, mask)
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
        self.h = self.h + layer.mlp(layer.post_attention_layernorm(self.h))
        b, length, dim = out.shape
        flat = out.reshape(b * length, dim)
        flat[self.flat_rows] = self.h[self.inverse]
        return flat.reshape(b, length, dim)
