"""Quality of every weight mode (mxfp8, mxfp4, nvfp4, affine 4 / 8 bits), as markdown tables:

1. per layer kind, the relative RMS error of a layer's output (x W^T, x Gaussian) with the weight rounded by the
   mode, over the policy layers of the tiny random Z-Image and klein models of the tests and of the embedded
   digits model;
2. end to end on the tiny models: the image against the float image (mean / max levels of 255), transformer and
   text encoder quantized, and the prompt embeddings' relative error with the text encoder alone quantized;
3. the embedded digits model: the independent classifier's accuracy over 10 digits x 2 seeds, and how many of
   the 20 images change their predicted digit against float.

    python scripts/quant_quality.py [--work /tmp/mlximg-quality]
"""

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import mlximg  # first: on Linux it preloads OpenBLAS, which only works before mlx is imported
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from mlximg.loading import load_safetensors, read_config, weight_files  # noqa: E402
from mlximg.quant import layer_policy  # noqa: E402
from mlximg.quant.format import NAMES, Quantization  # noqa: E402
from mlximg.quant.policy import quantizable  # noqa: E402

MODES = [name for name in NAMES if name != "fp8"]
KINDS = (("attention", r"attn|attention"), ("mlp", r"feed_forward|\.ff|ff_context|mlp"),
         ("modulation", r"adaLN|modulation"))
PROMPT = "a red fox in the snow"


def kind_of(layer: str) -> str:
    return next(kind for kind, pattern in KINDS if re.search(pattern, layer))


def layer_errors(folders: dict[str, Path], rng) -> dict[tuple[str, str], float]:
    """(mode, component kind) -> mean relative output error over the layers of that kind."""
    errors = defaultdict(list)
    for name, folder in folders.items():
        for component in ("transformer", "text_encoder"):
            config = read_config(folder / component)
            policy = layer_policy(component, config)
            for key, weight in load_safetensors(weight_files(folder / component)).items():
                layer = key.removesuffix(".weight")
                weight = weight.astype(mx.float32)
                x = mx.array(rng.standard_normal((256, weight.shape[-1] if weight.ndim == 2 else 1), np.float32))
                want = x @ weight.T if weight.ndim == 2 else None
                for mode in MODES:
                    quantization = Quantization.named(mode)
                    if not key.endswith(".weight") or not quantizable(layer, weight.shape, policy,
                                                                       quantization.group_size):
                        continue
                    parts = quantization.quantize(weight)
                    rounded = quantization.dequantize(parts["weight"], parts["scales"], parts.get("biases"))
                    got = x @ rounded.T
                    error = float(mx.sqrt(mx.sum((got - want) ** 2)) / mx.sqrt(mx.sum(want**2)))
                    label = "text encoder" if component == "text_encoder" else f"{name} {kind_of(layer)}"
                    errors[mode, label].append(error)
    return {key: float(np.mean(values)) for key, values in errors.items()}


def image(folder: Path, latents: np.ndarray, **options) -> np.ndarray:
    pipeline = mlximg.load(str(folder), fp8="dequantize", **options)
    return np.asarray(pipeline.generate(PROMPT, width=96, height=64, steps=3, guidance=0.0, latents=latents),
                      dtype=np.float64)


def embedding_error(folder: Path, mode: str, family: str) -> float:
    def embeddings(**options):
        pipeline = mlximg.load(str(folder), fp8="dequantize", **options)
        out = pipeline.encode_prompts(pipeline.component("text_encoder"), [PROMPT])
        return np.array((out[0] if isinstance(out, list) else out).astype(mx.float32))

    reference, rounded = embeddings(), embeddings(text_encoder_quantize=mode)
    return float(np.linalg.norm(rounded - reference) / np.linalg.norm(reference))


def digits_scores(classifier, digits) -> dict[str, tuple[float, int]]:
    """mode -> (accuracy, images whose predicted digit differs from float's)."""
    prompts = [(label, f"a handwritten {word}") for label, word in enumerate(digits.WORDS)]
    scores, float_predicted = {}, None
    for mode in [None, *MODES]:
        pipeline = mlximg.load("z-image-digits", fp8="dequantize", quantize=mode, text_encoder_quantize=mode)
        images = [pipeline.generate(prompt, seed=seed) for _, prompt in prompts for seed in (100, 101)]
        predicted = classifier.predict(digits.images_to_features(images))
        labels = np.repeat([label for label, _ in prompts], 2)
        if mode is None:
            float_predicted = predicted
        scores[mode or "float"] = (float(np.mean(predicted == labels)), int(np.sum(predicted != float_predicted)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlximg-quality"))
    args = parser.parse_args()
    from test_flux2_pipeline import build_klein
    from test_zimage_pipeline import build_reference

    import digits

    folders = {"Z-Image": args.work / "zimage", "klein": args.work / "klein",
               "digits": ROOT / "models" / "z-image-digits"}
    if not (folders["Z-Image"] / "model_index.json").exists():
        build_reference(folders["Z-Image"])
    if not (folders["klein"] / "model_index.json").exists():
        build_klein(folders["klein"], is_distilled=True)
    rng = np.random.default_rng(0)

    errors = layer_errors(folders, rng)
    labels = sorted({label for _, label in errors})
    print("| layer kind | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{errors.get((m, label), float('nan')):.4f}" for m in MODES) + " |")

    print("\n| tiny model | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
    for family, channels in (("Z-Image", 16), ("klein", 32)):
        folder = folders[family]
        latents = rng.standard_normal((1, channels, 64 // (8 if channels == 16 else 16),
                                       96 // (8 if channels == 16 else 16))).astype(np.float32)
        reference = image(folder, latents)
        cells = []
        for mode in MODES:
            difference = np.abs(image(folder, latents, quantize=mode, text_encoder_quantize=mode) - reference)
            cells.append(f"{difference.mean():.2f} / {difference.max():.0f}")
        print(f"| {family} image, mean / max levels | " + " | ".join(cells) + " |")
        print(f"| {family} prompt embeddings, relative | "
              + " | ".join(f"{embedding_error(folder, mode, family):.4f}" for mode in MODES) + " |")

    classifier, _ = digits.train_classifier()
    scores = digits_scores(classifier, digits)
    print("\n| digits model | " + " | ".join(scores) + " |\n|---|" + "---|" * len(scores))
    print("| accuracy (20 images) | " + " | ".join(f"{a:.2f}" for a, _ in scores.values()) + " |")
    print("| predictions changed vs float | " + " | ".join(str(c) for _, c in scores.values()) + " |")


if __name__ == "__main__":
    main()
