"""Train the embedded default model: a tiny Z-Image (same transformer, Qwen3 text encoder, AutoencoderKL classes as
the real one) on scikit-learn's 8x8 handwritten digits, prompted "a handwritten seven" and the like.

    python scripts/train_tiny.py [--out models/z-image-digits] [--seed 0]

Stage 1 trains the VAE (32x32 RGB <-> 8x8x4 latents), stage 2 the text encoder and transformer together with
rectified-flow matching on the VAE's latents, as Z-Image is trained: the transformer sees t = 1 - sigma and
predicts x0 - noise. A tenth of the prompts are dropped (empty) so classifier-free guidance works. The result is
written in the diffusers folder layout (model_index.json, transformer/, text_encoder/, tokenizer/, vae/,
scheduler/) with the checkpoints' key names, so mlximg's loader and diffusers' ZImagePipeline both load it.
Deterministic given --seed on a given machine (numpy and MLX generators are seeded; data order is drawn from numpy).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlximg  # noqa: E402,F401  (first: it preloads OpenBLAS before mlx loads its own, 10x faster here)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.models import qwen3  # noqa: E402
from mlximg.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from mlximg.models.qwen3_encoder import Qwen3Encoder, TextEncoder, qwen3_args  # noqa: E402
from mlximg.models.zimage import ZImageConfig, ZImageTransformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_DROPOUT = 0.1  # share of empty prompts, so the model also learns the unconditional prediction CFG needs

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ["user", "assistant", "system", "a", "an", "the", "of", "by", "handwritten", "hand", "written", "digit",
         "number", "numeral", "picture", "image", "drawing", "photo", "!", ".", ",", "?",
         *digits.WORDS, *map(str, range(10))]
# Qwen3's chat template reduced to what the pipelines use: one user turn, generation prompt, thinking switch.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 8, "sample_size": digits.IMAGE_SIZE, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "vocab_size": len(SPECIAL_TOKENS) + 1 + len(WORDS), "max_position_embeddings": 512,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "use_sliding_window": False, "torch_dtype": "bfloat16",
    "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
}
TRANSFORMER_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 4,
    "dim": 128, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "norm_eps": 1e-5,
    "qk_norm": True, "cap_feat_dim": 64, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 12, 12],
    "axes_lens": [256, 64, 64],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": False,
}
MODEL_INDEX = {
    "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_tokenizer():
    """A word-level tokenizer over the prompts' vocabulary, with Qwen3's special tokens and chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "[UNK]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="[UNK]", chat_template=CHAT_TEMPLATE, padding_side="right")


def cosine_schedule(peak: float, steps: int, warmup: int):
    return optim.join_schedules([optim.linear_schedule(peak * 0.01, peak, warmup),
                                 optim.cosine_decay(peak, steps - warmup, peak * 0.05)], [warmup])


class EMA:
    """Exponential moving average of a module's parameters; diffusion samples from the EMA weights are cleaner."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = tree_map(lambda p: mx.array(p), module.parameters())

    def update(self, module: nn.Module) -> None:
        self.params = tree_map(lambda e, p: self.decay * e + (1 - self.decay) * p, self.params, module.parameters())

    def arrays(self):
        return [v for _, v in tree_flatten(self.params)]


def log(message: str) -> None:
    print(message, flush=True)


# Stage 1: the VAE


def train_vae(pixels: np.ndarray, steps: int, batch: int, rng: np.random.Generator) -> AutoencoderKL:
    """Reconstruction (MSE) plus a small KL term, which keeps the latents smooth enough to diffuse."""
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(VAE_CONFIG))
    optimizer = optim.AdamW(learning_rate=cosine_schedule(2e-3, steps, max(1, steps // 20)), weight_decay=0.0)
    kl_weight = 1e-4

    def loss_fn(model, images, noise):
        mean, logvar = model.encode(images)
        z = mean + mx.exp(0.5 * logvar) * noise
        recon = model.decode(z)
        kl = 0.5 * mx.mean(mx.square(mean) + mx.exp(logvar) - 1 - logvar)
        return mx.mean(mx.square(recon - images)) + kl_weight * kl

    step_fn = nn.value_and_grad(vae, loss_fn)
    started = time.time()
    for step in range(steps):
        images = mx.array(pixels[rng.integers(len(pixels), size=batch)])
        noise = mx.array(rng.standard_normal(images.shape[:1] + (8, 8, 4), dtype=np.float32))
        loss, grads = step_fn(vae, images, noise)
        optimizer.update(vae, grads)
        mx.eval(vae.parameters(), optimizer.state, loss)
        if step % 100 == 0 or step == steps - 1 or steps < 20:
            log(f"vae step {step:5d}  loss {loss.item():.5f}  {time.time() - started:6.0f} s")
    return vae


def latent_statistics(vae: AutoencoderKL, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Posterior means and stds of every image, and the shift / scaling that make the means zero-mean, unit-std
    (FLUX.1's VAE records them the same way, as shift_factor / scaling_factor)."""
    means, stds = [], []
    for start in range(0, len(pixels), 256):
        mean, logvar = vae.encode(mx.array(pixels[start:start + 256]))
        means.append(np.array(mean))
        stds.append(np.array(mx.exp(0.5 * logvar)))
    means, stds = np.concatenate(means), np.concatenate(stds)
    shift = float(means.mean())
    return means, stds, {"shift_factor": round(shift, 6), "scaling_factor": round(float(1.0 / means.std()), 6)}


# Stage 2: text encoder and transformer


class Denoiser(nn.Module):
    """The two trained networks as one module, so one optimizer and one EMA cover both."""

    def __init__(self, text_encoder: Qwen3Encoder, transformer: ZImageTransformer):
        super().__init__()
        self.text_encoder = text_encoder
        self.transformer = transformer


def new_transformer() -> ZImageTransformer:
    """Z-Image's transformer with DiT's initialisation: modulations and the output layer start at zero, so every
    block starts as the identity and the first prediction is 0."""
    transformer = ZImageTransformer(ZImageConfig.from_dict(TRANSFORMER_CONFIG))
    zeros = {}
    for name, value in tree_flatten(transformer.parameters()):
        if "adaLN_modulation" in name or name.startswith("all_final_layer") and ".linear." in name:
            zeros[name] = mx.zeros_like(value)
    transformer.load_weights(list(zeros.items()), strict=False)
    return transformer


def train_denoiser(tokenizer, latents: tuple[np.ndarray, np.ndarray], labels: np.ndarray, scaling: dict,
                   steps: int, batch: int, rng: np.random.Generator) -> Denoiser:
    means, stds = latents
    args = qwen3_args(TEXT_ENCODER_CONFIG)
    model = Denoiser(Qwen3Encoder(args), new_transformer())
    encoder = TextEncoder(tokenizer, model.text_encoder)
    optimizer = optim.AdamW(learning_rate=cosine_schedule(1e-3, steps, max(1, steps // 20)), weight_decay=0.01)
    ema = EMA(model, decay=0.999)

    def loss_fn(model, prompts, x0, noise, sigma):
        cap_feats = encoder.zimage_states(prompts, max_length=64)  # prompts are < 20 tokens
        s = sigma[:, None, None, None]
        pred = model.transformer((1 - s) * x0 + s * noise, 1 - sigma, cap_feats)
        return mx.mean(mx.square(pred - (x0 - noise)))

    step_fn = nn.value_and_grad(model, loss_fn)
    started, recent = time.time(), []
    for step in range(steps):
        index = rng.integers(len(labels), size=batch)
        prompts = ["" if rng.random() < PROMPT_DROPOUT else digits.prompt_for(int(k), rng) for k in labels[index]]
        z = means[index] + stds[index] * rng.standard_normal(means[index].shape, dtype=np.float32)
        x0 = mx.array(((z - scaling["shift_factor"]) * scaling["scaling_factor"]).transpose(0, 3, 1, 2))
        noise = mx.array(rng.standard_normal(x0.shape, dtype=np.float32))
        # Logit-normal sigmas (SD3 / Z-Image training): most weight on the middle of the trajectory.
        sigma = mx.array(1 / (1 + np.exp(-rng.standard_normal(batch))), dtype=mx.float32)
        loss, grads = step_fn(model, prompts, x0, noise, sigma)
        optimizer.update(model, grads)
        ema.update(model)
        mx.eval(model.parameters(), optimizer.state, ema.arrays(), loss)
        recent.append(loss.item())
        if step % 100 == 0 or step == steps - 1 or steps < 20:
            log(f"denoiser step {step:5d}  loss {np.mean(recent):.4f}  {time.time() - started:6.0f} s")
            recent = []
    model.update(ema.params)
    return model


# Saving in the diffusers layout


def vae_checkpoint(vae: AutoencoderKL) -> dict[str, mx.array]:
    """Our module paths are diffusers' keys; convolutions go back to OIHW, the 1x1 convs we run as Linear too."""
    weights = {}
    for key, value in tree_flatten(vae.parameters()):
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        elif value.ndim == 2 and key.endswith(("quant_conv.weight", "conv_shortcut.weight")):
            value = value[:, :, None, None]
        weights[key] = value
    return weights


def text_encoder_checkpoint(encoder: Qwen3Encoder, args: qwen3.ModelArgs, seed: int) -> dict[str, mx.array]:
    """Qwen3ForCausalLM keys (tied embeddings, so no lm_head). Z-Image reads hidden_states[-2], so the last layer
    and final norm never run; they are saved at their initial values so the checkpoint is a complete Qwen3."""
    mx.random.seed(seed + 1)
    last = qwen3.TransformerBlock(args)
    weights = {f"model.{k}": v for k, v in tree_flatten(encoder.model.parameters())}
    weights.update({f"model.layers.{args.num_hidden_layers - 1}.{k}": v for k, v in tree_flatten(last.parameters())})
    weights["model.norm.weight"] = mx.ones((args.hidden_size,))
    return weights


def stored(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Weights as the released models store them: bfloat16 (halves the shipped size; computed in float32 on the CPU)."""
    return {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save(out: Path, vae: AutoencoderKL, vae_config: dict, denoiser: Denoiser, tokenizer, seed: int,
         manifest: dict) -> None:
    """Write the folder next to `out` and rename it into place, so an interrupted run leaves no half model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        (tmp / name).mkdir(parents=True)
    write_json(tmp / "model_index.json", MODEL_INDEX)
    write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(tmp / "vae" / "config.json", vae_config)
    mx.save_safetensors(str(tmp / "vae" / "diffusion_pytorch_model.safetensors"), stored(vae_checkpoint(vae)),
                        metadata={"format": "pt"})
    write_json(tmp / "transformer" / "config.json", TRANSFORMER_CONFIG)
    mx.save_safetensors(str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"),
                        stored(dict(tree_flatten(denoiser.transformer.parameters()))), metadata={"format": "pt"})
    write_json(tmp / "text_encoder" / "config.json", TEXT_ENCODER_CONFIG)
    mx.save_safetensors(str(tmp / "text_encoder" / "model.safetensors"),
                        stored(text_encoder_checkpoint(denoiser.text_encoder, qwen3_args(TEXT_ENCODER_CONFIG), seed)),
                        metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp / "tokenizer")
    write_json(tmp / "training.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "z-image-digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2500, help="text encoder + transformer training steps")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    ink, labels = digits.load_digits_8x8()
    pixels = digits.ink_to_pixels(digits.upscale(ink))
    log(f"{len(labels)} digits, {pixels.shape[1]}x{pixels.shape[2]} RGB")

    vae = train_vae(pixels, args.vae_steps, args.vae_batch, rng)
    means, stds, scaling = latent_statistics(vae, pixels)
    decoded = vae.decode(mx.array(means[:256]))
    vae_error = float(mx.mean(mx.abs(decoded - mx.array(pixels[:256]))).item())
    log(f"vae: mean |reconstruction error| {vae_error:.4f} (pixels in [-1, 1]); latents {scaling}")

    tokenizer = build_tokenizer()
    denoiser = train_denoiser(tokenizer, (means, stds), labels, scaling, args.steps, args.batch, rng)
    minutes = (time.time() - started) / 60
    record = {"script": "scripts/train_tiny.py", "seed": args.seed, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
              "steps": args.steps, "batch": args.batch, "vae_reconstruction_mae": round(vae_error, 5),
              "minutes": round(minutes, 1), "dataset": "sklearn.datasets.load_digits (1,797 8x8 digits)"}
    save(args.out, vae, {**VAE_CONFIG, **scaling}, denoiser, tokenizer, args.seed, record)
    log(f"saved {args.out} after {minutes:.1f} min")


if __name__ == "__main__":
    main()
