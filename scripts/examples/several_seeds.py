"""Several images in one call: a batch of seeds for each of several prompts, run through every transformer
forward at once, then laid out as a contact sheet (rows: prompts, columns: seeds).

    python scripts/examples/several_seeds.py sheet.png
"""

import sys

from PIL import Image

import mlximg

PROMPTS = ["a handwritten zero", "a handwritten three", "a handwritten eight"]
SEEDS_PER_PROMPT = 4


def main(output: str = "sheet.png") -> None:
    pipeline = mlximg.load("z-image-digits")
    # Prompt by prompt, seeds 100, 101, ...: image i gets seed 100 + i, the image that seed gives alone.
    images = pipeline.generate(PROMPTS, num_images=SEEDS_PER_PROMPT, seed=100)
    width, height = images[0].size
    sheet = Image.new("RGB", (width * SEEDS_PER_PROMPT, height * len(PROMPTS)))
    for index, image in enumerate(images):
        row, column = divmod(index, SEEDS_PER_PROMPT)
        sheet.paste(image, (column * width, row * height))
    sheet.resize((sheet.width * 4, sheet.height * 4), Image.Resampling.NEAREST).save(output)
    seeds = [image.info["parameters"]["seed"] for image in images]
    print(f"wrote {output}: {len(images)} images, seeds {seeds[0]}..{seeds[-1]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
