"""TeaCache on and off: how many transformer forwards it skips, what that saves, and how far the image moves.

    python scripts/examples/teacache.py
"""

import numpy as np

import mlximg


def main() -> None:
    pipeline = mlximg.load("z-image-digits")
    prompt, seed = "a handwritten four", 3
    runs = {}
    for name, teacache in (("off", None), ("threshold 0.1", {"threshold": 0.1}), ("threshold 0.3", {"threshold": 0.3})):
        image = pipeline.generate(prompt, seed=seed, teacache=teacache)
        runs[name] = (np.asarray(image, dtype=np.float64), image.info["parameters"]["forwards"],
                      pipeline.phases.get("denoise").seconds)
    baseline = runs["off"][0]
    for name, (pixels, forwards, seconds) in runs.items():
        change = np.abs(pixels - baseline).mean()
        print(f"teacache {name:<14} forwards computed {forwards['computed']:>2}, skipped {forwards['skipped']:>2}; "
              f"denoise {seconds:.2f} s; mean |pixel change| {change:.1f} / 255")


if __name__ == "__main__":
    main()
