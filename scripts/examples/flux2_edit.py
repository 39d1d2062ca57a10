"""FLUX.2 editing from reference images: the references (PIL images, paths or arrays) are encoded by the VAE and
attend with the image tokens; without a size, the output takes the first reference's. Runs on a tiny random
klein built here (tiny_flux2.py; needs torch and diffusers); with a real model, pass its name instead:

    python scripts/examples/flux2_edit.py                   # the tiny model
    python scripts/examples/flux2_edit.py flux2-klein-4b    # the real one (a 16 GB download)
"""

import sys
import tempfile
from pathlib import Path

import mlximg
from mlximg.output import save_image


def main(model: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        if model is None:
            from tiny_flux2 import build_tiny_klein

            model = str(build_tiny_klein(Path(scratch) / "tiny-klein"))
        # Two references, made by the embedded digits model and scaled up (FLUX.2 references are 64 px or more).
        digits = mlximg.load("z-image-digits")
        references = [digits.generate(f"a handwritten {word}", seed=1).resize((128, 128)) for word in ("one", "two")]
        pipeline = mlximg.load(model)
        prompt = "the digit from image 1 in the style of image 2"
        edited = pipeline.generate(prompt, image=references, seed=0)
        plain = pipeline.generate(prompt, seed=0, width=edited.width, height=edited.height)
    save_image(edited, "edited.png")
    print(f"wrote edited.png: {edited.size[0]}x{edited.size[1]} from {edited.info['parameters']['references']} "
          f"references; the same seed without them gives another image: {edited.tobytes() != plain.tobytes()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
