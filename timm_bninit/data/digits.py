"""The offline demo data set: scikit-learn's bundled handwritten digits as small RGB images.

``sklearn.datasets.load_digits`` ships 1,797 grey-level 8x8 images of the digits 0-9 (values 0-16) inside the
package, so it needs no download. Each image is scaled to 0-255 (white strokes on black, as in MNIST), upsampled to
32x32 with bilinear interpolation, and replicated to three channels so an ImageNet model takes it unchanged.

The official split of this set is fixed here and documented: a stratified 80/20 train/test split drawn by
``sklearn.model_selection.train_test_split`` with ``random_state=0`` (1,437 train / 360 test), rows kept in the
order of ``load_digits``. The validation split is then drawn from train like for every other source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "DIGITS_SOURCE",
    "DIGITS_IMAGE_SIZE",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "digits_parameters",
    "build_digits_dataset",
]

DIGITS_SOURCE = "sklearn.datasets.load_digits"
DIGITS_IMAGE_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_parameters() -> dict[str, Any]:
    """Everything the built set depends on, scikit-learn's version included (its cache key)."""
    import sklearn

    return {
        "sklearn_version": sklearn.__version__,
        "image_size": DIGITS_IMAGE_SIZE,
        "test_fraction": DIGITS_TEST_FRACTION,
        "split_seed": DIGITS_SPLIT_SEED,
    }


def build_digits_dataset() -> DatasetDict:
    """``DatasetDict`` with ``train`` and ``test``: ``image`` (RGB), ``label`` (ClassLabel '0'-'9'), ``file``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    size = (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    images = [PILImage.fromarray(p).resize(size, PILImage.Resampling.BILINEAR).convert("RGB") for p in pixels]
    labels = digits.target.astype(int)
    train_rows, test_rows = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    features = Features({
        "image": Image(),
        "label": ClassLabel(names=[str(d) for d in range(10)]),
        "file": Value("string"),
    })
    return DatasetDict({
        name: Dataset.from_dict(
            {
                "image": [images[i] for i in rows],
                "label": [int(labels[i]) for i in rows],
                "file": [f"digits/{i:04d}" for i in rows],
            },
            features=features,
        )
        for name, rows in (("train", np.sort(train_rows)), ("test", np.sort(test_rows)))
    })
