"""What caching, FP8 and fewer steps cost in quality, measured on the embedded digits model.

    python scripts/digits_quality.py [--model z-image-digits] [--per-digit 20] [--out table.md]
    python scripts/digits_quality.py --grid docs/digits.png     # the README's picture: seeds 0-3 of every digit
    python scripts/digits_quality.py --caches                   # only the step-skipping rules, more thresholds

An independent classifier (an SVM trained with scikit-learn on half of the same 8x8 digits; its held-out accuracy
is printed) reads every generated image, downsampled to 8x8. For each setting, --per-digit images of each digit
0-9 ("a handwritten seven", seeds 0..N-1, the same seeds in every setting) are generated and scored:
accuracy (the prompted digit is recognised), diversity (mean pairwise distance between the 8x8 images of one
digit, relative to the same figure over real digits: 1.0 is as varied as the data, 0 is one image repeated),
change (mean |pixel difference|, 0-255, from the baseline image of the same prompt and seed), transformer forwards
skipped, and the median seconds per image.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlximg  # noqa: E402  (first: it preloads OpenBLAS before mlx)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402


def settings(steps: int) -> list[tuple[str, dict, dict]]:
    """(label, load options, generate options) for every row of the table."""
    rows = [("baseline", {}, {}), ("no CFG (guidance 0)", {}, {"guidance": 0.0})]
    rows += [(f"{n} steps", {}, {"steps": n}) for n in (steps // 2, steps // 4, steps // 10) if n >= 1]
    rows += [(f"TeaCache {t}", {}, {"teacache": {"threshold": t}}) for t in (0.05, 0.1, 0.2, 0.4)]
    rows += [(f"StepCache interval {n}", {}, {"stepcache": {"interval": n}}) for n in (2, 3, 4)]
    rows += [("FP8 (mxfp8) transformer", {"quantize": "fp8"}, {})]
    return rows


# The first-block rule's change needs no calibrated polynomial: identity rescaling, over the manifest's.
FIRST_BLOCK = {"mode": "first_block", "coefficients": [1.0, 0.0], "signal_range": None}


def cache_settings() -> list[tuple[str, dict, dict]]:
    """The calibration sweep: TeaCache's calibrated modulated rule against the first-block rule."""
    rows = [("baseline", {}, {})]
    rows += [(f"TeaCache modulated {t}", {}, {"teacache": {"threshold": t}}) for t in (0.1, 0.2, 0.4, 0.8)]
    rows += [(f"first-block {t}", {}, {"teacache": {**FIRST_BLOCK, "threshold": t}}) for t in (0.05, 0.1, 0.2, 0.4)]
    # Past 70% the default cap (3 skips in a row) binds for both: lifted, where each rule starts to cost accuracy.
    uncapped = {"max_consecutive_skips": 19}
    rows += [(f"TeaCache modulated {t}, no skip cap", {}, {"teacache": {"threshold": t, **uncapped}})
             for t in (0.8, 1.6)]
    rows += [(f"first-block {t}, no skip cap", {}, {"teacache": {**FIRST_BLOCK, "threshold": t, **uncapped}})
             for t in (0.4, 0.8)]
    return rows


def real_diversity(per_digit: int) -> float:
    """The diversity figure of real digits (the first `per_digit` of each class), the 1.0 of the table."""
    rendered, labels = digits.rendered_digits()
    features = digits.images_to_features(rendered)
    return float(np.mean([digits.diversity(features[labels == k][:per_digit]) for k in range(10)]))


def evaluate(pipeline, classifier, per_digit: int, options: dict) -> dict:
    """Accuracy, per-digit diversity, forwards skipped and seconds per image for one setting, and its images."""
    correct, spread, seconds, computed, skipped, pixels = 0, [], [], 0, 0, []
    for label, word in enumerate(digits.WORDS):
        images = []
        for seed in range(per_digit):
            started = time.perf_counter()
            image = pipeline.generate(f"a handwritten {word}", seed=seed, **options)
            seconds.append(time.perf_counter() - started)
            forwards = image.info["parameters"]["forwards"]
            computed, skipped = computed + forwards["computed"], skipped + forwards["skipped"]
            images.append(image)
            pixels.append(np.asarray(image, dtype=np.float32))
        features = digits.images_to_features(images)
        correct += int((classifier.predict(features) == label).sum())
        spread.append(digits.diversity(features))
    return {"accuracy": correct / (10 * per_digit), "diversity": float(np.mean(spread)),
            "skipped": skipped / (computed + skipped), "seconds": float(np.median(seconds)), "pixels": np.stack(pixels)}


def save_grid(pipeline, path: Path, seeds: int = 4, zoom: int = 4) -> None:
    """One row per seed, one column per digit, each image enlarged `zoom`x with square pixels, on a grey grid."""
    from PIL import Image

    size, gap = pipeline.defaults["width"] * zoom, 4
    grid = Image.new("RGB", (10 * (size + gap) + gap, seeds * (size + gap) + gap), "#999999")
    for label, word in enumerate(digits.WORDS):
        for seed in range(seeds):
            image = pipeline.generate(f"a handwritten {word}", seed=seed)
            grid.paste(image.resize((size, size), Image.NEAREST), (gap + label * (size + gap), gap + seed * (size + gap)))
    grid.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="z-image-digits")
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit and setting")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--grid", type=Path, help="only write a picture of generated digits here")
    parser.add_argument("--caches", action="store_true", help="only the baseline and the step-skipping rules")
    args = parser.parse_args(argv)

    if args.grid:
        save_grid(mlximg.load(args.model), args.grid)
        return

    classifier, held_out = digits.train_classifier()
    reference = real_diversity(args.per_digit)
    base = mlximg.load(args.model)
    lines = [f"Classifier held-out accuracy on real digits: {held_out:.3f}. Model {args.model}: "
             f"{base.defaults['steps']} steps, guidance {base.defaults['guidance']}; "
             f"{args.per_digit} images per digit and setting.", "",
             "| setting | accuracy | diversity | change | forwards skipped | s / image |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    baseline = None
    for label, load_options, options in cache_settings() if args.caches else settings(base.defaults["steps"]):
        pipeline = mlximg.load(args.model, **load_options) if load_options else base
        pipeline.generate("a handwritten zero", seed=0, **options)  # warm-up: loading is not timed
        result = evaluate(pipeline, classifier, args.per_digit, options)
        baseline = result["pixels"] if baseline is None else baseline
        change = float(np.abs(result["pixels"] - baseline).mean())
        line = (f"| {label} | {result['accuracy']:.3f} | {result['diversity'] / reference:.2f} | {change:.1f} | "
                f"{result['skipped']:.0%} | {result['seconds']:.3f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
