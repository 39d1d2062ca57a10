"""scikit-learn's 8x8 handwritten digits as the tiny model's training images, its prompts, and the independent
classifier that scores generated digits (scripts/train_tiny.py, scripts/digits_quality.py, tests)."""

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings seen in training; "{}" is the digit's word or numeral.
TEMPLATES = ("a handwritten {}", "the digit {}", "a handwritten digit {}", "the number {}", "{}",
             "a picture of a handwritten {}", "{} written by hand")
IMAGE_SIZE = 32  # pixels per side of the training images (8x8 digits upscaled 4x)
CLASSIFIER_SEED = 0


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 8, 8) ink in [0, 1] and their labels; sklearn ships them, no download."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def upscale(ink: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, 8, 8) ink -> (N, size, size) ink, bicubic, clipped to [0, 1]."""
    return np.stack([np.clip(np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BICUBIC)), 0, 1)
                     for a in ink]).astype(np.float32)


def ink_to_pixels(ink: np.ndarray) -> np.ndarray:
    """Ink in [0, 1] -> dark ink on white paper, RGB in [-1, 1], NHWC: the VAE's input."""
    gray = 1.0 - 2.0 * ink
    return np.repeat(gray[..., None], 3, axis=-1)


def rendered_digits() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the model is trained to draw them: (N, 32, 32) uint8 grey images, and their labels."""
    ink, labels = load_digits_8x8()
    return ((ink_to_pixels(upscale(ink))[..., 0] + 1) * 127.5).round().astype(np.uint8), labels


def images_to_features(images) -> np.ndarray:
    """PIL images (or (N, H, W[, 3]) uint8 arrays) -> the classifier's input: 8x8 ink in sklearn's 0..16 scale."""
    arrays = [np.asarray(image.convert("L") if isinstance(image, Image.Image) else image, dtype=np.float32)
              for image in images]
    features = []
    for pixels in arrays:
        gray = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
        ink = 1.0 - gray / 255.0
        small = Image.fromarray(ink.astype(np.float32), mode="F").resize((8, 8), Image.BOX)
        features.append(np.clip(np.asarray(small), 0, 1).ravel() * 16.0)
    return np.stack(features)


def prompt_for(label: int, rng: np.random.Generator) -> str:
    """A random training phrasing of `label`: its word (mostly) or its numeral."""
    name = WORDS[label] if rng.random() < 0.75 else str(label)
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(name)


def train_classifier(seed: int = CLASSIFIER_SEED):
    """An SVM on half the digits (stratified); returns it with its accuracy on the held-out half.

    It sees the digits as 8x8 features computed the way generated images are scored (`images_to_features` of
    the upscaled, rendered digit), so its accuracy on real digits is the ceiling for generated ones.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    rendered, labels = rendered_digits()
    features = images_to_features(rendered)
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.5, stratify=labels,
                                                        random_state=seed)
    classifier = SVC(gamma="scale", C=10.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def diversity(features: np.ndarray) -> float:
    """Mean pairwise Euclidean distance between feature rows (0 when all are the same image)."""
    if len(features) < 2:
        return 0.0
    diffs = features[:, None, :] - features[None, :, :]
    distances = np.sqrt((diffs ** 2).sum(-1))
    return float(distances.sum() / (len(features) * (len(features) - 1)))
