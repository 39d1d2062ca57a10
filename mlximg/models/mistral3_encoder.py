"""The Mistral3 text encoder of FLUX.2 [dev]: mlx-lm's Llama decoder (what mlx-lm's mistral3 builds for a
`mistral` text config) read out as intermediate hidden states, the vision tower never built.

Flux2Pipeline stacks hidden_states[10], [20] and [30] of Mistral Small 3.x (40 layers; numbering as in
decoder_states.py) on the feature axis, keeping all 512 positions, pads included; so 30 layers are built and loaded.
Tokenization reproduces its AutoProcessor (PixtralProcessor) call: system + user messages through the processor's
chat template, no special tokens added when the template already starts with BOS, padded to and truncated at 512.
The processor itself needs torchvision, so its tokenizer is loaded directly, as the processor loads it.
"""

import dataclasses
import re
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import numpy as np
from mlx_lm.models import llama

from ..loading import component_dir, load_checkpoint, read_config, read_json_object
from ..quant.options import QuantOptions
from .decoder_states import (DecoderHiddenStates, check_decoder_config, prompt_list, resolve_hidden_layer,
                             warn_truncated)

MAX_SEQUENCE_LENGTH = 512  # Flux2Pipeline pads (and truncates) every prompt to this many tokens
FLUX2_DEV_HIDDEN_LAYERS = (10, 20, 30)  # Flux2Pipeline: hidden_states[10], [20], [30], concatenated
# diffusers' pipelines/flux2/system_messages.py SYSTEM_MESSAGE, verbatim (line break included).
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")

# Checkpoint key prefixes of the text decoder: transformers >= 4.52 and 5.x, then older Mistral3 checkpoints.
_DECODER_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
# The vision tower, its projector and the LM head (both layouts) never run for text prompts.
_UNUSED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                    "lm_head.", "language_model.lm_head.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "rms_norm_eps", "vocab_size")


def rope_theta(text_config: dict) -> float:
    """The RoPE base of a plain (unscaled) RoPE, from transformers 5's rope_parameters or 4.x's rope_theta."""
    parameters = text_config.get("rope_parameters")
    if parameters is None:
        scaling = text_config.get("rope_scaling")
        parameters = {**(scaling or {}), "rope_theta": text_config.get("rope_theta")}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"Mistral3 text encoder RoPE type {rope_type!r} is not supported; expected plain RoPE "
                         "('default', as FLUX.2 [dev]'s Mistral Small 3.2)")
    if parameters.get("rope_theta") is None:
        raise ValueError("Mistral3 text encoder config lacks rope_theta")
    return float(parameters["rope_theta"])


def mistral3_args(config: dict) -> llama.ModelArgs:
    """mlx-lm's Llama ModelArgs from a transformers Mistral3Config dict (text_encoder/config.json)."""
    if config.get("model_type") != "mistral3":
        raise ValueError(f"text encoder model_type is {config.get('model_type')!r}; expected 'mistral3'")
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("Mistral3 text encoder config.json lacks a text_config")
    text_type = text.get("model_type", "mistral")  # Mistral3Config's default text model
    if text_type != "mistral":
        raise ValueError(f"Mistral3 text_config model_type {text_type!r} is not supported; expected 'mistral' "
                         "(Ministral3's scaled RoPE is not implemented here)")
    missing = [name for name in _REQUIRED if name not in text]
    if missing:
        raise ValueError(f"Mistral3 text_config lacks {missing}")
    check_decoder_config(text, "text_config ")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Mistral3 text encoder hidden_act {text['hidden_act']!r} is not supported; expected 'silu'")
    sliding_window = text.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"Mistral3 text_config sliding_window {sliding_window!r} is not a positive integer or null")
    return llama.ModelArgs(
        model_type="llama", hidden_size=text["hidden_size"], num_hidden_layers=text["num_hidden_layers"],
        intermediate_size=text["intermediate_size"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], head_dim=text.get("head_dim"),
        rms_norm_eps=text["rms_norm_eps"], vocab_size=text["vocab_size"], rope_theta=rope_theta(text),
        max_position_embeddings=text.get("max_position_embeddings"), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, sliding_window=sliding_window)


class Mistral3Encoder(DecoderHiddenStates):
    """mlx-lm's LlamaModel holding only the first `num_layers` decoder layers and no final norm (`.model`)."""

    # Mistral's tokenizer class (LlamaTokenizer) pads on the left unless its config says otherwise.
    allow_left_padding = True

    def __init__(self, args: llama.ModelArgs, num_layers: int | None = None):
        config_layers = args.num_hidden_layers
        num_layers = config_layers - 1 if num_layers is None else num_layers
        if not 1 <= num_layers < config_layers:
            raise ValueError(f"cannot keep {num_layers} of {config_layers} layers (at least one, all but the last)")
        # layer_types None: full attention in every layer (a sliding window is checked against the length instead).
        model = llama.LlamaModel(dataclasses.replace(args, num_hidden_layers=num_layers, layer_types=None))
        # Never run (hidden states are read before it), so not kept: LlamaModel.__call__ is not used.
        del model.norm
        super().__init__(model, config_layers)
        self.sliding_window = args.sliding_window

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Mistral3ForConditionalGeneration keys of either layout -> our paths; the vision tower, projector, LM head,
        final norm and the layers we do not keep are dropped. Anything else stays, so the strict load names it."""
        sanitized = {}
        for key, value in weights.items():
            if key.startswith(_UNUSED_PREFIXES):
                continue
            for prefix, replacement in _DECODER_PREFIXES:
                if key.startswith(prefix):
                    key = replacement + key[len(prefix):]
                    break
            layer = _LAYER_KEY.match(key)
            if key == "model.norm.weight" or (layer and self.num_layers <= int(layer.group(1)) < self.config_layers):
                continue
            sanitized[key] = value
        return sanitized

    def hidden_states(self, input_ids: mx.array, attention_mask: np.ndarray | mx.array | None,
                      layers: Iterable[int]) -> list[mx.array]:
        length = mx.array(input_ids).shape[-1]
        # transformers hides keys more than `sliding_window` back; within it, attention is full (what we compute).
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"sequence of {length} tokens exceeds the text encoder's sliding_window "
                             f"{self.sliding_window}, which this encoder does not implement")
        return super().hidden_states(input_ids, attention_mask, layers)


def format_input(prompts: list[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """Flux2Pipeline's conversations: a system turn and a user turn, content as text blocks, "[IMG]" removed."""
    return [
        [{"role": "system", "content": [{"type": "text", "text": system_message}]},
         {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
        for prompt in prompts
    ]


def processor_chat_template(tokenizer_dir: Path) -> str:
    """The template the AutoProcessor of `tokenizer_dir` renders, found where ProcessorMixin.from_pretrained looks:
    processor_config.json's key, the legacy chat_template.json, then chat_template.jinja."""
    processor_config = tokenizer_dir / "processor_config.json"
    template = read_json_object(processor_config).get("chat_template") if processor_config.is_file() else None
    if template is None and (tokenizer_dir / "chat_template.json").is_file():
        template = read_json_object(tokenizer_dir / "chat_template.json").get("chat_template")
    elif template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None:
        raise FileNotFoundError(f"{tokenizer_dir}: no chat template (processor_config.json, chat_template.json or "
                                "chat_template.jinja)")
    if isinstance(template, dict):  # named templates: the processor renders "default"
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{tokenizer_dir}: the chat template is not a non-empty string")
    return template


class Mistral3TextEncoder:
    """The tokenizer (transformers), the processor's chat template and the MLX Mistral3 encoder (`.model`, the
    module a pipeline keeps and releases); `layers` are the hidden states it was loaded for."""

    def __init__(self, tokenizer, chat_template: str, model: Mistral3Encoder,
                 layers: Iterable[int] = FLUX2_DEV_HIDDEN_LAYERS):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model = model
        self.layers = tuple(layers)

    def tokenize(self, prompts: str | list[str], max_length: int = MAX_SEQUENCE_LENGTH,
                 system_message: str = SYSTEM_MESSAGE) -> tuple[mx.array, np.ndarray]:
        """Token ids (B, max_length) and the attention mask (numpy bool, read on the host), as the processor
        tokenizes Flux2Pipeline's conversations (padding="max_length", truncation=True, max_length)."""
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
        texts = self.tokenizer.apply_chat_template(format_input(prompt_list(prompts), system_message),
                                                   chat_template=self.chat_template, tokenize=False,
                                                   add_generation_prompt=False)
        # As ProcessorMixin.apply_chat_template: a template that already wrote BOS gets no special tokens added.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos is not None and texts[0].startswith(bos))
        warn_truncated(self.tokenizer, texts, max_length, add_special_tokens=add_special_tokens)
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=add_special_tokens, return_tensors="np")
        return mx.array(tokens["input_ids"].astype(np.int32)), tokens["attention_mask"].astype(bool)

    def encode_flux2_dev(self, prompts: str | list[str], max_length: int = MAX_SEQUENCE_LENGTH,
                         system_message: str = SYSTEM_MESSAGE) -> mx.array:
        """Flux2Pipeline's prompt embeddings: all `max_length` positions (pads included), the hidden states of
        `self.layers` concatenated on the feature axis -> (B, max_length, len(layers) * hidden).

        The pipeline stacks them as (B, layers, L, D) and permutes to (B, L, layers, D) before flattening, which is
        this concatenation: [h10 | h20 | h30] for each token.
        """
        input_ids, mask = self.tokenize(prompts, max_length, system_message)
        embeds = mx.concatenate(self.model.hidden_states(input_ids, mask, self.layers), axis=-1)
        mx.eval(embeds)
        return embeds


def load_mistral3_module(model_dir: str | Path, dtype: mx.Dtype | None = None,
                         layers: Iterable[int] = FLUX2_DEV_HIDDEN_LAYERS, *,
                         fp8: QuantOptions | None = None) -> Mistral3Encoder:
    """The `text_encoder/` module alone, weights loaded lazily (nothing is read until evaluated); only the decoder
    layers `layers` need are built and loaded (30 of Mistral Small's 40 for FLUX.2 [dev])."""
    encoder_dir = component_dir(Path(model_dir), "text_encoder")
    config = read_config(encoder_dir)
    try:
        args = mistral3_args(config)
        layers = tuple(layers)
        if not layers:
            raise ValueError("`layers` is empty")
        model = Mistral3Encoder(args, max(resolve_hidden_layer(k, args.num_hidden_layers) for k in layers))
    except ValueError as error:
        raise ValueError(f"{encoder_dir / 'config.json'}: {error}") from error
    return load_checkpoint(model, encoder_dir, config, "text_encoder", model.sanitize, dtype, fp8=fp8)


def load_mistral3_encoder(model_dir: str | Path, dtype: mx.Dtype | None = None,
                          layers: Iterable[int] = FLUX2_DEV_HIDDEN_LAYERS, *, fp8: QuantOptions | None = None,
                          ) -> Mistral3TextEncoder:
    """The `tokenizer/` and `text_encoder/` components of a FLUX.2 [dev] diffusers folder (see
    `load_mistral3_module`). `dtype`: cast floating weights to it; None keeps the checkpoint's."""
    from transformers import AutoTokenizer

    component_dir(Path(model_dir), "text_encoder")  # named first when both are missing
    tokenizer_dir = component_dir(Path(model_dir), "tokenizer")
    chat_template = processor_chat_template(tokenizer_dir)
    model = load_mistral3_module(model_dir, dtype, layers, fp8=fp8)
    return Mistral3TextEncoder(AutoTokenizer.from_pretrained(tokenizer_dir), chat_template, model, tuple(layers))
