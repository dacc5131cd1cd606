"""Image transforms applied lazily, when a row is read, via ``datasets.Dataset.with_transform``.

Nothing is precomputed: each ``dataset[i]`` decodes the stored image bytes, converts to RGB, and runs the callable
(typically ``timm.data.create_transform(...)``), so random augmentation is drawn afresh per epoch in the DataLoader's
worker. Rows come out as ``{'image': <transform output>, 'label': int}``, which the default ``collate_fn`` stacks into
``{'image': Tensor[B, C, H, W], 'label': Tensor[B]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = ["ImageTransform", "with_transforms"]


class ImageTransform:
    """Batch function for ``Dataset.with_transform``: RGB-convert each PIL image, apply ``transform``, keep labels.

    A class rather than a closure so it pickles into DataLoader workers started with ``spawn``.

    Args:
        transform: Callable taking an RGB PIL image (a torchvision / timm transform).
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # CUB and Cars hold a few greyscale and CMYK images; timm's transforms and normalisation expect 3 channels
        return {
            "image": [self.transform(image.convert("RGB")) for image in batch["image"]],
            "label": batch["label"],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def with_transforms(
    dataset: DatasetDict | Dataset,
    train_transform: Callable[[Any], Any],
    eval_transform: Callable[[Any], Any] | None = None,
) -> DatasetDict | Dataset:
    """A copy of a ``DatasetDict`` whose rows are transformed on access, ready for ``torch.utils.data.DataLoader``.

    Example::

        data, info = load_image_dataset("cub", data_dir="/data/cub")
        loaders = with_transforms(data, create_transform(224, is_training=True), create_transform(224))
        train_loader = DataLoader(loaders["train"], batch_size=64, shuffle=True, num_workers=8)

    Args:
        dataset: ``DatasetDict`` from :func:`load_image_dataset` (or a single ``Dataset``, which gets
            ``train_transform``).
        train_transform: Applied to the ``train`` split.
        eval_transform: Applied to every other split; defaults to ``train_transform``.

    Returns:
        The same splits with only the ``image`` and ``label`` columns visible; the input is left untouched.
    """
    from datasets import Dataset, DatasetDict

    eval_transform = train_transform if eval_transform is None else eval_transform
    if isinstance(dataset, Dataset):
        return dataset.with_transform(ImageTransform(train_transform), columns=["image", "label"])
    return DatasetDict({
        name: split.with_transform(
            ImageTransform(train_transform if name == "train" else eval_transform), columns=["image", "label"]
        )
        for name, split in dataset.items()
    })
