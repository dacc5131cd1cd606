"""The validation split: a stratified fraction of the official train split, drawn with its own fixed seed.

The split seed is a data-set parameter, never the run seed: the paired-seed protocol compares methods on the same
training images, and every seed of a comparison must validate on the same images. The draw is scikit-learn's
``train_test_split(stratify=labels, random_state=split_seed)``, which uses its own ``RandomState(split_seed)`` and so
ignores numpy's, torch's and Python's global random state. Per class it takes ``val_fraction`` of the images, rounded
so that the total is ``ceil(val_fraction * len(train))`` (StratifiedShuffleSplit's allocation). Both parts keep the
rows in their original order.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BNInitValueError
from .errors import DatasetError

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["add_validation_split"]


def add_validation_split(dataset: DatasetDict, val_fraction: float = 0.1, split_seed: int = 0) -> DatasetDict:
    """``DatasetDict`` with ``train``, ``validation`` and ``test``, the validation rows taken out of ``train``.

    A source that ships its own ``validation`` split keeps it and ``val_fraction`` is not used.

    Args:
        dataset: ``DatasetDict`` with the official ``train`` and ``test`` splits and a ClassLabel ``label`` column.
        val_fraction: Fraction of each class's training images moved to validation; 0 gives an empty validation split.
        split_seed: Seed of the draw; keep it fixed across the runs of a comparison.
    """
    from datasets import DatasetDict

    if "validation" in dataset:
        return DatasetDict(train=dataset["train"], validation=dataset["validation"], test=dataset["test"])
    if not 0.0 <= val_fraction < 1.0:
        raise BNInitValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train = dataset["train"]
    if val_fraction == 0.0:
        return DatasetDict(train=train, validation=train.select([], keep_in_memory=True), test=dataset["test"])

    # one Arrow read of the label column; indexing a column row by row costs seconds on CUB
    labels = np.asarray(train.with_format("numpy", columns=["label"])[:]["label"])
    _check_stratifiable(labels, train.features["label"].names, val_fraction)
    # Not Dataset.train_test_split: on a dataset backed by cache files it insists on writing index files beside
    # them (keep_in_memory=True raises), and the cache entry is shared by every run. Same algorithm, indices only.
    from sklearn.model_selection import train_test_split

    train_rows, val_rows = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=split_seed
    )
    return DatasetDict(
        train=train.select(np.sort(train_rows), keep_in_memory=True),
        validation=train.select(np.sort(val_rows), keep_in_memory=True),
        test=dataset["test"],
    )


def _check_stratifiable(labels: np.ndarray, names: list[str], val_fraction: float) -> None:
    # the conditions scikit-learn checks, but naming the class and the way out instead of "Minimum class count error"
    counts = Counter(labels.tolist())
    singles = [names[c] for c in sorted(counts) if counts[c] < 2]
    if singles:
        raise DatasetError(
            f"a stratified validation split needs at least 2 training images per class; {len(singles)} class(es) have "
            f"only 1: {', '.join(singles[:10])}; pass val_fraction=0 to train without a validation split"
        )
    num_val = math.ceil(val_fraction * len(labels))  # as scikit-learn computes it
    num_train = len(labels) - num_val
    if min(num_val, num_train) < len(counts):
        raise DatasetError(
            f"val_fraction={val_fraction} of {len(labels)} training images leaves {num_train} for training and "
            f"{num_val} for validation; a stratified split needs at least one image per class ({len(counts)}) on "
            "each side: change val_fraction, or pass val_fraction=0 for no validation split"
        )
