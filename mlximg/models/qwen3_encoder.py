"""The Qwen3 text encoder of Z-Image and FLUX.2 klein: mlx-lm's Qwen3, read out as intermediate hidden states.

Hidden-state indices follow transformers' `output_hidden_states=True` tuple (see decoder_states.py). Z-Image takes
-2 (the output of layer N-1), klein 9/18/27; neither needs the last layer or the final norm, so the module is built
with at most N-1 layers and no final norm, and `sanitize` drops their checkpoint keys.
Tokenization is transformers' tokenizer and chat template, called as the diffusers pipelines call them.
"""

import dataclasses
import re
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3

from ..loading import component_dir, load_checkpoint, read_config
from ..quant.options import QuantOptions
from .decoder_states import (DecoderHiddenStates, check_decoder_config, prompt_list, resolve_hidden_layer,
                             warn_truncated)

MAX_SEQUENCE_LENGTH = 512  # both pipelines pad (and truncate) every prompt to this many tokens
ZIMAGE_HIDDEN_LAYERS = (-2,)  # ZImagePipeline: hidden_states[-2], the second-to-last decoder layer's output
FLUX2_KLEIN_HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline: hidden_states[9], [18], [27], concatenated

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_UNUSED_KEYS = ("lm_head.weight", "model.norm.weight")  # the LM head and the final norm never run


def qwen3_args(config: dict) -> qwen3.ModelArgs:
    """mlx-lm's ModelArgs from a transformers Qwen3Config dict (text_encoder/config.json)."""
    if config.get("model_type") != "qwen3":
        raise ValueError(f"text encoder model_type is {config.get('model_type')!r}; expected 'qwen3'")
    if config.get("use_sliding_window"):
        raise ValueError("Qwen3 text encoder with use_sliding_window=true is not supported (mlx-lm has full attention)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Qwen3 text encoder hidden_act {config['hidden_act']!r} is not supported; expected 'silu'")
    required = [f.name for f in dataclasses.fields(qwen3.ModelArgs)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(f"text encoder config.json lacks {missing}")
    check_decoder_config(config)
    return qwen3.ModelArgs.from_dict(config)


class Qwen3Encoder(DecoderHiddenStates):
    """mlx-lm's Qwen3Model holding only the first `num_layers` decoder layers and no final norm (`.model`)."""

    def __init__(self, args: qwen3.ModelArgs, num_layers: int | None = None):
        config_layers = args.num_hidden_layers
        num_layers = config_layers - 1 if num_layers is None else num_layers
        if not 0 <= num_layers < config_layers:
            raise ValueError(f"cannot keep {num_layers} of {config_layers} layers (at most all but the last)")
        model = qwen3.Qwen3Model(dataclasses.replace(args, num_hidden_layers=num_layers))
        # Never run (hidden states are read before it), so not kept: Qwen3Model.__call__ is not used.
        del model.norm
        super().__init__(model, config_layers)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Qwen3ForCausalLM keys (model.*, lm_head) or Qwen3Model keys (no prefix) -> our paths, unused ones dropped.

        Only keys of the LM head, the final norm and the configured layers we do not keep are dropped; anything
        else stays, so the strict load names it.
        """
        sanitized = {}
        for key, value in weights.items():
            if not key.startswith(("model.", "lm_head.")):
                key = f"model.{key}"
            layer = _LAYER_KEY.match(key)
            if key in _UNUSED_KEYS or (layer and self.num_layers <= int(layer.group(1)) < self.config_layers):
                continue
            sanitized[key] = value
        return sanitized


class TextEncoder:
    """The tokenizer (transformers) and the MLX Qwen3 encoder (`.model`, the module a pipeline keeps and releases)."""

    def __init__(self, tokenizer, model: Qwen3Encoder):
        self.tokenizer = tokenizer
        self.model = model

    def tokenize(self, prompts: str | list[str], enable_thinking: bool,
                 max_length: int = MAX_SEQUENCE_LENGTH) -> tuple[mx.array, np.ndarray]:
        """Chat template, then padded to and truncated at `max_length`, as both pipelines do.

        Returns the token ids (B, max_length) and the attention mask as a numpy bool array (read on the host).
        """
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
        texts = [
            self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=enable_thinking)
            for prompt in prompt_list(prompts)
        ]
        warn_truncated(self.tokenizer, texts, max_length)
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="np")
        return mx.array(tokens["input_ids"].astype(np.int32)), tokens["attention_mask"].astype(bool)

    def zimage_states(self, prompts: str | list[str], max_length: int = MAX_SEQUENCE_LENGTH) -> list[mx.array]:
        """`encode_zimage` unevaluated (scripts/train_tiny.py differentiates through it)."""
        input_ids, mask = self.tokenize(prompts, enable_thinking=True, max_length=max_length)
        # Causal attention: positions after the last real token never change earlier ones, so don't compute them.
        length = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
        (states,) = self.model.hidden_states(input_ids[:, :length], mask[:, :length], ZIMAGE_HIDDEN_LAYERS)
        return [states[i][mx.array(np.flatnonzero(row))] for i, row in enumerate(mask[:, :length])]

    def encode_zimage(self, prompts: str | list[str], max_length: int = MAX_SEQUENCE_LENGTH) -> list[mx.array]:
        """ZImagePipeline's prompt embeddings: hidden_states[-2] of the valid tokens, one (L_i, hidden) per prompt."""
        embeds = self.zimage_states(prompts, max_length)
        mx.eval(embeds)
        return embeds

    def encode_flux2_klein(self, prompts: str | list[str], max_length: int = MAX_SEQUENCE_LENGTH,
                           layers: Iterable[int] = FLUX2_KLEIN_HIDDEN_LAYERS) -> mx.array:
        """Flux2KleinPipeline's prompt embeddings: all `max_length` positions (pads included), the hidden states
        of `layers` concatenated on the feature axis -> (B, max_length, len(layers) * hidden)."""
        input_ids, mask = self.tokenize(prompts, enable_thinking=False, max_length=max_length)
        embeds = mx.concatenate(self.model.hidden_states(input_ids, mask, layers), axis=-1)
        mx.eval(embeds)
        return embeds


def load_qwen3_encoder(model_dir: str | Path, dtype: mx.Dtype | None = None, layers: Iterable[int] | None = None,
                       *, fp8: QuantOptions | None = None) -> Qwen3Encoder:
    """The `text_encoder/` module alone, weights loaded lazily (nothing is read until evaluated).

    `layers`: the hidden-state indices the encoder will be asked for (e.g. ZIMAGE_HIDDEN_LAYERS); only the decoder
    layers they need are built and loaded. None keeps all but the last, enough for any index but the final-norm one.
    `dtype`: cast floating weights to it; None keeps the checkpoint's. `fp8`: how FP8 weights load.
    """
    encoder_dir = component_dir(Path(model_dir), "text_encoder")
    config = read_config(encoder_dir)
    try:
        args = qwen3_args(config)
        num_layers = None
        if layers is not None:
            layers = list(layers)
            if not layers:
                raise ValueError("`layers` is empty; pass None to keep all layers but the last")
            num_layers = max(resolve_hidden_layer(k, args.num_hidden_layers) for k in layers)
        model = Qwen3Encoder(args, num_layers)
    except ValueError as error:
        raise ValueError(f"{encoder_dir / 'config.json'}: {error}") from error
    return load_checkpoint(model, encoder_dir, config, "text_encoder", model.sanitize, dtype, fp8=fp8)


def load_text_encoder(model_dir: str | Path, dtype: mx.Dtype | None = None,
                      layers: Iterable[int] | None = None, *, fp8: QuantOptions | None = None) -> TextEncoder:
    """The `tokenizer/` and `text_encoder/` components of a diffusers folder (see `load_qwen3_encoder`)."""
    from transformers import AutoTokenizer

    model = load_qwen3_encoder(model_dir, dtype, layers, fp8=fp8)
    return TextEncoder(AutoTokenizer.from_pretrained(component_dir(Path(model_dir), "tokenizer")), model)
