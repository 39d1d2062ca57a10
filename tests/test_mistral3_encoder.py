"""The Mistral3 text encoder of FLUX.2 [dev] against transformers, through diffusers' Flux2Pipeline.encode_prompt.

No Mistral tokenizer can be had offline, so the tokenizer is a small byte-level BPE with Tekken's pre-tokenizer
pattern, Mistral's special tokens at their real ids (<s> 1, [INST] 3, [IMG] 10, <pad> 11, [SYSTEM_PROMPT] 17), a
post-processor that adds <s> (so a second BOS would show) and Mistral Small 3.1's chat template. It is saved padding
on the right and, as Mistral's LlamaTokenizer class does by default, on the left.
Diffusers' tokenizer is an AutoProcessor (PixtralProcessor), which needs torchvision; `TextProcessor` is the same
ProcessorMixin with the tokenizer only, so `apply_chat_template` runs the same code for text prompts.
The reference runs with transformers' default SDPA attention, as diffusers loads it.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from oracle import RecordInputs, assert_close, perturb_, require_oracle, save_tiny

from mlximg.models.mistral3_encoder import (FLUX2_DEV_HIDDEN_LAYERS, MAX_SEQUENCE_LENGTH, SYSTEM_MESSAGE,
                                            Mistral3Encoder, format_input, load_mistral3_encoder, mistral3_args)

TOLERANCE = 1e-4  # float32 against float32 torch
NUM_LAYERS = 7
LAYERS = (2, 4, 6)  # the small version of dev's 10/20/30 of 40: spread out, the last layer unused
HIDDEN = 64
VOCAB_SIZE = 1024
PAD_ID = 11
PROMPTS = ["a red fox in fresh snow, soft winter light", "a cat"]
LONG_PROMPT = "a photo of a lighthouse on a rocky coast at dawn, " * 80  # > 512 tokens: truncated

# Mistral's first 20 control tokens, in id order.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
# Tekken's pre-tokenizer split (tekken.json "pattern").
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral Small 3.1's chat template (system and user content as strings or as text blocks).
CHAT_TEMPLATE = """{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3. The current date is " + today + "." %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""


def text_processor_class():
    from transformers.processing_utils import ProcessorMixin

    class TextProcessor(ProcessorMixin):
        """PixtralProcessor less its image processor: ProcessorMixin's chat template and __call__ for text."""

        def __init__(self, tokenizer, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

    return TextProcessor


def train_tokenizer():
    """A byte-level BPE (a few hundred tokens) on Mistral's control tokens, Tekken's split and a prompt corpus."""
    from diffusers.pipelines.flux2 import system_messages
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [system_messages.SYSTEM_MESSAGE, system_messages.SYSTEM_MESSAGE_UPSAMPLING_T2I, *PROMPTS, LONG_PROMPT]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 4, trainer)
    # Like Mistral's LlamaTokenizer: special tokens means a leading <s>.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    return tokenizer


def write_tokenizer(folder: Path, bpe, padding_side: str) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as a processor folder keeps them."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", padding_side=padding_side)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def build_reference(seed: int = 0):
    """A perturbed tiny Mistral3ForConditionalGeneration: Mistral Small's text config shrunk, a tiny Pixtral tower."""
    torch = require_oracle()
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_theta=1e9, sliding_window=None, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=16, intermediate_size=64, image_size=28, patch_size=14),
        tie_word_embeddings=False)  # Mistral Small's LM head is its own weight: saved, and dropped by us
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    perturb_(model, seed=seed)
    norm = model.model.language_model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    return model


def diffusers_dev(reference, processor, prompts):
    """Flux2Pipeline.encode_prompt with the hidden-state layers given (the pipeline's system message), and the
    tokens it fed the text encoder."""
    from diffusers import Flux2Pipeline

    pipeline = Flux2Pipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=processor, transformer=None)
    with RecordInputs(reference) as recorder:
        embeds, text_ids = pipeline.encode_prompt(prompts, device="cpu", text_encoder_out_layers=LAYERS)
    assert text_ids.shape == (len(recorder.calls[0]["input_ids"]), MAX_SEQUENCE_LENGTH, 4)
    return embeds, recorder.calls[0]


@pytest.fixture(scope="module")
def reference():
    return build_reference()


@pytest.fixture(scope="module")
def bpe():
    require_oracle()
    return train_tokenizer()


def write_model_dir(folder: Path, reference, bpe, padding_side: str = "left") -> Path:
    save_tiny(reference, folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", bpe, padding_side)
    return folder


@pytest.fixture(scope="module", params=["right", "left"])
def padded(request, tmp_path_factory, reference, bpe):
    """(encoder, reference processor) for a tokenizer padding on each side, from a folder saved by transformers 5."""
    folder = write_model_dir(tmp_path_factory.mktemp(request.param), reference, bpe, request.param)
    processor = text_processor_class().from_pretrained(folder / "tokenizer")
    assert processor.tokenizer.padding_side == request.param
    return load_mistral3_encoder(folder, layers=LAYERS), processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference, bpe):
    return write_model_dir(tmp_path_factory.mktemp("checkpoint"), reference, bpe)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_mistral3_encoder(checkpoint, layers=LAYERS)


@pytest.fixture(scope="module")
def expected(padded, reference):
    """The pipeline's embeddings of PROMPTS and the tokens it fed the text encoder, for each padding side."""
    return diffusers_dev(reference, padded[1], PROMPTS)


def test_tokens_match_the_pipeline(padded, expected):
    encoder, processor = padded
    _, tokens = expected
    input_ids, mask = encoder.tokenize(PROMPTS)
    np.testing.assert_array_equal(np.array(input_ids), tokens["input_ids"])
    np.testing.assert_array_equal(mask, tokens["attention_mask"])
    assert input_ids.shape == (2, MAX_SEQUENCE_LENGTH)
    lengths = mask.sum(axis=1)
    assert lengths[0] > lengths[1]
    ids = np.array(input_ids)[1]
    real = ids[mask[1]]
    assert (ids[~mask[1]] == PAD_ID).all()
    assert not mask[1, 0 if processor.tokenizer.padding_side == "left" else -1]  # pads on the tokenizer's side
    # One BOS (the template's; none added by the tokenizer), the system turn, then the user turn.
    text = processor.tokenizer.decode(real)
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"


def test_embeddings_match_the_pipeline(padded, expected):
    encoder, processor = padded
    reference_embeds, _ = expected
    ours = encoder.encode_flux2_dev(PROMPTS)
    assert ours.shape == (2, MAX_SEQUENCE_LENGTH, len(LAYERS) * HIDDEN)
    assert_close(ours, reference_embeds, TOLERANCE,
                 f"dev embeddings (all 512 positions, {processor.tokenizer.padding_side} padding)")


def test_long_prompt_is_truncated_as_the_pipeline_does(padded, reference):
    encoder, processor = padded
    prompts = [LONG_PROMPT, "a cat"]
    reference_embeds, tokens = diffusers_dev(reference, processor, prompts)
    assert tokens["attention_mask"][0].all()  # 512 real tokens, the end of the template cut off
    with pytest.warns(UserWarning, match=r"the text encoder reads 512, so the last \d+ are dropped"):
        input_ids, mask = encoder.tokenize(prompts)
    np.testing.assert_array_equal(np.array(input_ids), tokens["input_ids"])
    np.testing.assert_array_equal(mask, tokens["attention_mask"])
    with pytest.warns(UserWarning, match="dropped"):
        assert_close(encoder.encode_flux2_dev(prompts), reference_embeds, TOLERANCE, "dev long-prompt batch")


def test_single_string_empty_prompt_and_image_placeholder(encoder, checkpoint, reference):
    # A string is one prompt; "" still has the system turn; "[IMG]" is removed as the pipeline removes it.
    processor = text_processor_class().from_pretrained(checkpoint / "tokenizer")
    for prompt in ("a cat", "", "a [IMG]cat"):
        reference_embeds, tokens = diffusers_dev(reference, processor, prompt)
        np.testing.assert_array_equal(np.array(encoder.tokenize(prompt)[0]), tokens["input_ids"])
        assert_close(encoder.encode_flux2_dev(prompt), reference_embeds, TOLERANCE, f"dev embeddings of {prompt!r}")


def test_hidden_states_match_transformers(encoder, reference, rng):
    torch = require_oracle()
    # Row 0 right-padded, row 1 left-padded: its leading queries have no key, which SDPA answers with zeros.
    input_ids = rng.integers(0, VOCAB_SIZE, size=(2, 40))
    mask = np.ones((2, 40), dtype=bool)
    mask[0, 37:] = False
    mask[1, :12] = False
    expected = reference(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                         output_hidden_states=True, use_cache=False).hidden_states
    layers = [0, 1, 3, 6, -2]
    for k, actual in zip(layers, encoder.model.hidden_states(mx.array(input_ids), mask, layers)):
        assert_close(actual, expected[k], TOLERANCE, f"hidden_states[{k}]")
    unpadded = encoder.model.hidden_states(mx.array(input_ids[:1, :7]), None, [LAYERS[-1]])[0]
    assert_close(unpadded, expected[LAYERS[-1]][:1, :7], TOLERANCE, "hidden state without a mask")


def to_transformers_457_layout(folder: Path) -> None:
    """Rewrite a transformers 5 save (language_model.model.*, vision_tower.*, ...) as transformers 4.52-4.57 saved
    Mistral3 (model.language_model.*, model.vision_tower.*, lm_head), with rope_theta in the text config."""
    path = folder / "text_encoder" / "model.safetensors"
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    renamed = {}
    for key, value in mx.load(str(path)).items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    mx.save_safetensors(str(path), renamed, metadata={"format": "pt"})
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["rope_theta"] = config["text_config"].pop("rope_parameters")["rope_theta"]
    config["transformers_version"] = "4.57.1"
    config_path.write_text(json.dumps(config))


def test_both_key_layouts_load(checkpoint, encoder, reference, tmp_path):
    torch = require_oracle()
    from transformers import Mistral3ForConditionalGeneration

    saved = mx.load(str(checkpoint / "text_encoder" / "model.safetensors")).keys()
    assert {"language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight",
            "vision_tower.ln_pre.weight", "multi_modal_projector.linear_1.weight"} <= saved
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    to_transformers_457_layout(folder)
    assert "model.language_model.layers.0.mlp.up_proj.weight" in mx.load(
        str(folder / "text_encoder" / "model.safetensors"))
    # transformers reads the rewritten folder back to the same weights: the layout is one it knows.
    reloaded = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder").state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(reloaded[key], value), key
    ours = load_mistral3_encoder(folder, layers=LAYERS).encode_flux2_dev(PROMPTS)
    assert mx.array_equal(ours, encoder.encode_flux2_dev(PROMPTS))


def test_only_the_needed_layers_are_kept(encoder):
    from mlx.utils import tree_flatten

    keys = {k for k, _ in tree_flatten(encoder.model.parameters())}
    assert encoder.model.num_layers == max(LAYERS) and encoder.layers == LAYERS
    assert not any(k.startswith(f"model.layers.{max(LAYERS)}.") for k in keys)
    assert not any("vision" in k or "projector" in k or "lm_head" in k for k in keys)
    assert "model.norm.weight" not in keys and "model.embed_tokens.weight" in keys
    assert "model.layers.0.input_layernorm.weight" in keys


def test_dtype_cast_and_layers_loaded(checkpoint):
    cast = load_mistral3_encoder(checkpoint, dtype=mx.bfloat16, layers=[2]).model
    assert cast.model.layers[0].input_layernorm.weight.dtype == mx.bfloat16 and cast.num_layers == 2
    with pytest.raises(ValueError, match="hidden state 3 needs 3 layers; this encoder was loaded with 2"):
        cast.hidden_states(mx.zeros((1, 4), dtype=mx.int32), None, [3])
    with pytest.raises(ValueError, match="hidden state -1 is the final-norm output"):
        load_mistral3_encoder(checkpoint, layers=[-1])
    with pytest.raises(ValueError, match="cannot keep 0 of 7 layers"):
        load_mistral3_encoder(checkpoint, layers=[0])
    # The default asks for FLUX.2 [dev]'s hidden state 10, which this 7-layer model does not have.
    with pytest.raises(ValueError, match="hidden state 10 is out of range for a model with 7 layers"):
        load_mistral3_encoder(checkpoint)


def edit_weights(folder: Path, edit) -> None:
    path = folder / "text_encoder" / "model.safetensors"
    weights = mx.load(str(path))
    edit(weights)
    mx.save_safetensors(str(path), weights)


@pytest.fixture
def small_checkpoint(tmp_path, checkpoint):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    return folder


def test_checkpoint_keys_are_checked_strictly(small_checkpoint):
    edit_weights(small_checkpoint, lambda w: w.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)


def test_unexpected_keys_are_named(small_checkpoint):
    # A bias Mistral never has, and a layer beyond the configured count: neither is silently dropped.
    edit_weights(small_checkpoint,
                 lambda w: w.update({"language_model.model.layers.0.self_attn.q_proj.bias": mx.zeros((64,))}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)
    edit_weights(small_checkpoint, lambda w: (w.pop("language_model.model.layers.0.self_attn.q_proj.bias"),
                                              w.update({"language_model.model.layers.9.mlp.up_proj.weight":
                                                        mx.zeros((1,))})))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)


def test_missing_folders_and_template_are_named(small_checkpoint):
    (small_checkpoint / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(FileNotFoundError, match="no chat template"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)
    shutil.rmtree(small_checkpoint / "tokenizer")
    with pytest.raises(FileNotFoundError, match="missing component folder 'tokenizer'"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)
    shutil.rmtree(small_checkpoint / "text_encoder")
    with pytest.raises(FileNotFoundError, match="missing component folder 'text_encoder'"):
        load_mistral3_encoder(small_checkpoint, layers=LAYERS)


def test_chat_template_is_found_as_the_processor_finds_it(small_checkpoint):
    # Another template in each place ProcessorMixin looks, most preferred last; ours must pick what it picks.
    tokenizer_dir = small_checkpoint / "tokenizer"
    legacy = CHAT_TEMPLATE.replace("[INST]' + message", "[INST]legacy ' + message")
    configured = CHAT_TEMPLATE.replace("[INST]' + message", "[INST]configured ' + message")
    (tokenizer_dir / "chat_template.json").write_text(json.dumps({"chat_template": legacy}))
    (tokenizer_dir / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    for expected_word in ("legacy", "configured"):
        processor = text_processor_class().from_pretrained(tokenizer_dir)
        encoder = load_mistral3_encoder(small_checkpoint, layers=LAYERS)
        assert encoder.chat_template == processor.chat_template
        conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        assert f"{expected_word} u" in processor.apply_chat_template(conversation)
        (tokenizer_dir / "processor_config.json").write_text(json.dumps({"chat_template": configured}))


def test_config_is_validated(checkpoint):
    config = json.loads((checkpoint / "text_encoder" / "config.json").read_text())
    text = config["text_config"]
    args = mistral3_args(config)
    assert (args.num_hidden_layers, args.head_dim, args.rope_theta) == (NUM_LAYERS, 16, 1e9)
    legacy = {k: v for k, v in text.items() if k != "rope_parameters"}
    assert mistral3_args({**config, "text_config": {**legacy, "rope_theta": 1e9}}).rope_theta == 1e9

    def with_text(**changes):
        return {**config, "text_config": {**text, **changes}}

    with pytest.raises(ValueError, match="model_type is 'mistral'; expected 'mistral3'"):
        mistral3_args({**config, "model_type": "mistral"})
    with pytest.raises(ValueError, match="text_config model_type 'ministral3' is not supported"):
        mistral3_args(with_text(model_type="ministral3"))
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        mistral3_args(with_text(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0}))
    with pytest.raises(ValueError, match="RoPE type 'linear' is not supported"):
        mistral3_args({**config, "text_config": {**legacy, "rope_theta": 1e9, "rope_scaling": {"type": "linear"}}})
    with pytest.raises(ValueError, match="lacks rope_theta"):
        mistral3_args({**config, "text_config": legacy})
    with pytest.raises(ValueError, match=r"lacks \['num_key_value_heads'\]"):
        mistral3_args({**config, "text_config": {k: v for k, v in text.items() if k != "num_key_value_heads"}})
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        mistral3_args(with_text(hidden_act="gelu"))
    with pytest.raises(ValueError, match="cannot keep 7 of 7 layers"):
        Mistral3Encoder(args, NUM_LAYERS)
    # A sliding window shorter than the sequence would hide keys: refused at encode time, not ignored.
    windowed = Mistral3Encoder(mistral3_args(with_text(sliding_window=8)), 2)
    with pytest.raises(ValueError, match="sequence of 9 tokens exceeds the text encoder's sliding_window 8"):
        windowed.hidden_states(mx.zeros((1, 9), dtype=mx.int32), None, [1])
    assert windowed.hidden_states(mx.zeros((1, 8), dtype=mx.int32), None, [1])[0].shape == (1, 8, HIDDEN)


def test_bad_inputs_raise(encoder):
    with pytest.raises(ValueError, match="no prompts"):
        encoder.encode_flux2_dev([])
    with pytest.raises(ValueError, match=r"prompts must be strings; got \['NoneType'\]"):
        encoder.encode_flux2_dev(["a cat", None])
    with pytest.raises(ValueError, match="max_length must be a positive integer; got 0"):
        encoder.encode_flux2_dev("a cat", max_length=0)
    ids = mx.zeros((1, 4), dtype=mx.int32)
    with pytest.raises(ValueError, match="hidden state -1 is the final-norm output"):
        encoder.model.hidden_states(ids, None, [-1])
    with pytest.raises(ValueError, match="hidden state 8 is out of range for a model with 7 layers"):
        encoder.model.hidden_states(ids, None, [8])


def test_constants_follow_the_pipeline():
    import inspect

    require_oracle()
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2 import pipeline_flux2, system_messages

    assert SYSTEM_MESSAGE == system_messages.SYSTEM_MESSAGE
    embeds = inspect.signature(Flux2Pipeline._get_mistral_3_small_prompt_embeds).parameters
    assert tuple(embeds["hidden_states_layers"].default) == FLUX2_DEV_HIDDEN_LAYERS
    assert embeds["max_sequence_length"].default == MAX_SEQUENCE_LENGTH
    encode = inspect.signature(Flux2Pipeline.encode_prompt).parameters
    assert tuple(encode["text_encoder_out_layers"].default) == FLUX2_DEV_HIDDEN_LAYERS
    prompts = ["a [IMG]cat", ""]
    assert format_input(prompts) == pipeline_flux2.format_input(prompts)
    assert format_input(prompts, "sys") == pipeline_flux2.format_input(prompts, system_message="sys")
    # The pipeline keeps its own copy of the message: the one encode_prompt passes.
    assert Flux2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                         transformer=None).system_message == SYSTEM_MESSAGE
