"""The embedded default model (models/z-image-digits, trained by scripts/train_tiny.py): it loads through the
normal path, generates the digit it is asked for, matches diffusers' ZImagePipeline on the same checkpoint, and
its training script is deterministic."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import mlximg
from mlximg import cli
from mlximg.manifests import resolve
from oracle import assert_image_within_reference, in_bfloat16, mac_pass, require_oracle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import digits  # noqa: E402

MODEL = "z-image-digits"


@pytest.fixture(scope="module")
def pipeline():
    return mlximg.load(MODEL)


@pytest.fixture(scope="module")
def classifier():
    classifier, held_out = digits.train_classifier()
    assert held_out > 0.97, held_out  # scores generated digits only if it reads real ones
    return classifier


def test_manifest_points_at_the_shipped_folder():
    manifest = resolve(MODEL)
    assert manifest.path == ROOT / "models" / MODEL and (manifest.path / "model_index.json").is_file()
    sizes = sum(f.stat().st_size for f in manifest.path.rglob("*") if f.is_file())
    assert sizes < 8 * 2**20, f"{sizes / 2**20:.1f} MiB: the embedded model should stay a few MB"


def test_generates_the_prompted_digit(pipeline, classifier):
    """Two seeds of every digit, with the manifest's defaults, read back by the independent classifier."""
    images, labels = [], []
    for label, word in enumerate(digits.WORDS):
        for seed in (100, 101):
            image = pipeline.generate(f"a handwritten {word}", seed=seed)
            assert image.size == (32, 32)
            images.append(image)
            labels.append(label)
    predicted = classifier.predict(digits.images_to_features(images))
    accuracy = float(np.mean(predicted == np.array(labels)))
    assert accuracy >= 0.8, f"accuracy {accuracy:.2f}: predicted {predicted.tolist()}"


def test_numerals_and_phrasings_mean_the_same_digit(pipeline, classifier):
    prompts = ["7", "the digit seven", "a handwritten 7", "Seven, written by hand."]
    predicted = classifier.predict(digits.images_to_features([pipeline.generate(p, seed=3) for p in prompts]))
    assert (predicted == 7).sum() >= 3, predicted.tolist()


def rendered(label: int):
    from PIL import Image

    images, labels = digits.rendered_digits()
    return Image.fromarray(images[np.flatnonzero(labels == label)[0]]).convert("RGB")


def test_img2img_turns_a_three_into_an_eight(pipeline, classifier):
    """From a rendered 3 toward "a handwritten eight": at strength 0.8 it reads as an 8, at 0.3 it stays a 3.
    (Measured over seeds 0-9: strength 0.5 keeps the 3 for all ten, 0.6 gives an 8 for five, 0.8 for ten.)"""
    three = rendered(3)
    seeds = range(10)
    for strength, label in ((0.8, 8), (0.3, 3)):
        images = [pipeline.generate("a handwritten eight", init_image=three, strength=strength, seed=s) for s in seeds]
        predicted = classifier.predict(digits.images_to_features(images))
        assert (predicted == label).sum() >= 8, (strength, predicted.tolist())


def test_inpainting_the_right_half_of_a_one(pipeline, classifier):
    """The right half of a rendered 1 repainted toward "a handwritten four": it reads as a 4, and the left half
    stays the 1's (within the VAE's round trip)."""
    one = rendered(1)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    images = [pipeline.generate("a handwritten four", init_image=one, mask=mask, seed=s) for s in range(10)]
    predicted = classifier.predict(digits.images_to_features(images))
    assert (predicted == 4).sum() >= 8, predicted.tolist()
    left = [np.abs(np.asarray(image, np.float32)[:, :16] - np.asarray(one, np.float32)[:, :16]).mean()
            for image in images]
    assert max(left) < 8, left


@pytest.mark.mac
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_matches_diffusers_pipeline(guidance):
    """diffusers' ZImagePipeline loads the same folder (the real layout and key names) and gives the same image;
    in the Mac pass, mlximg-bf16 stays within diffusers-bf16's own error against float32."""
    torch = require_oracle()
    import diffusers

    folder = resolve(MODEL).path
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    reference = diffusers.ZImagePipeline.from_pretrained(folder, dtype=torch.float32)  # the weights are bf16

    def diffusers_pixels(pipe):
        image = pipe("a handwritten three", height=32, width=32, num_inference_steps=10, guidance_scale=guidance,
                     latents=torch.from_numpy(latents), output_type="np").images[0]
        return (image * 255).round()

    expected = diffusers_pixels(reference)
    ours = np.asarray(mlximg.load(MODEL).generate("a handwritten three", steps=10, guidance=guidance, latents=latents,
                                                  negative_prompt="" if guidance else None), dtype=np.float64)
    if mac_pass():
        assert_image_within_reference(ours, expected, diffusers_pixels(in_bfloat16(reference)), "digits")
        return
    difference = np.abs(ours - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())


def test_readme_command_writes_a_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "a handwritten seven", "--model", MODEL, "-o", "seven.png"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "seven.png") as image:
        assert image.size == (32, 32) and image.text["prompt"] == "a handwritten seven"


def _digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


def test_training_is_deterministic_and_loads(tmp_path):
    """A few steps twice with one seed: byte-identical weights, in a folder the normal loader generates from."""
    import train_tiny

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        train_tiny.main(["--out", str(out), "--vae-steps", "2", "--vae-batch", "4", "--steps", "2", "--batch", "4"])
        runs.append(_digests(out))
    assert runs[0] == runs[1] and len(runs[0]) == 3
    image = mlximg.load(str(tmp_path / "a")).generate("a handwritten one", steps=2, width=32, height=32, seed=0)
    assert image.size == (32, 32)


def test_cli_img2img_and_inpaint(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from mlximg.output import read_parameters

    monkeypatch.chdir(tmp_path)
    rendered(1).save("one.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save("mask.png")
    assert cli.main(["generate", "a handwritten four", "--model", MODEL, "--init-image", "one.png", "--mask",
                     "mask.png", "--seed", "1", "-o", "four.png"]) == 0
    assert cli.main(["generate", "a handwritten eight", "--model", MODEL, "--init-image", "one.png", "--strength",
                     "0.8", "--seed", "1", "-o", "eight.png"]) == 0
    assert read_parameters(tmp_path / "four.png")["mask"] is True
    assert read_parameters(tmp_path / "eight.png")["strength"] == 0.8
    Image.fromarray(np.zeros((64, 32), np.uint8)).save("tall.png")
    for extra, message in ((["--init-image", "missing.png"], "does not exist"),
                           (["--init-image", "one.png", "--mask", "tall.png"], "aspects differ"),
                           (["--init-image", "one.png", "--strength", "1.5"], "strength must be"),
                           (["--mask", "mask.png"], "needs init_image")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "x", "--model", MODEL, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
