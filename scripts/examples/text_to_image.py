"""Text to image with the embedded digits model: load once, generate, save with the settings as metadata.

    python scripts/examples/text_to_image.py "a handwritten seven" seven.png
"""

import sys

import mlximg
from mlximg.output import save_image


def main(prompt: str = "a handwritten seven", output: str = "seven.png") -> None:
    pipeline = mlximg.load("z-image-digits")  # configs only: weights load on first use
    image = pipeline.generate(prompt, seed=7, progress=True)
    save_image(image, output)  # PNG, JPEG or WebP by the extension, with image.info["parameters"] inside
    print(pipeline.phases.table())
    print(f"wrote {output}: {image.size[0]}x{image.size[1]}, {image.info['parameters']['steps']} steps")


if __name__ == "__main__":
    main(*sys.argv[1:])
