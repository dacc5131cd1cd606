"""Data layer: CUB-200-2011, Stanford Cars, CIFAR-10/100, any imagefolder tree, an offline digits demo set, and any
data set registered with :func:`register_dataset`.

Local sources are parsed once and cached; CUB, Cars and CIFAR can also come from their Hugging Face hub copies. Each
data set is one entry of :mod:`.registry` (names, hub copy, split sizes, class count, local layout).

One entry point, :func:`load_image_dataset`, returns ``train`` / ``validation`` / ``test`` splits (official
train/test kept, validation the source's own or a stratified fraction of train with a fixed split seed) and an
:class:`ImageDatasetInfo`; :func:`with_transforms` attaches the train / eval transforms lazily for a
``torch.utils.data.DataLoader``.

Example::

    from timm.data import create_transform
    from timm_bninit.data import load_image_dataset, with_transforms

    data, info = load_image_dataset("cub", data_dir="/data")       # /data/CUB_200_2011/..., or omit for the hub copy
    data, info = load_image_dataset("cifar10", data_dir="/data")   # /data/cifar-10-batches-py/...
    data = with_transforms(data, create_transform(224, is_training=True), create_transform(224))

:mod:`.pipeline` is the run's faster path: decoded and augmented to uint8 in the workers, normalised on the device.

``datasets``, scikit-learn and scipy are imported where they are used, so importing this package stays cheap.
"""

from .errors import DatasetError, SkippedFile
from .loading import ImageDatasetInfo, load_image_dataset, resolve_source
from .pipeline import DeviceNormalize, ImagePipeline, decode_pil, decode_rgb, uint8_pipeline
from .registry import DatasetSpec, HubCopy, get_dataset, list_datasets, register_dataset
from .splits import add_validation_split
from .transforms import ImageTransform, with_transforms

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "DeviceNormalize",
    "HubCopy",
    "ImageDatasetInfo",
    "ImagePipeline",
    "ImageTransform",
    "SkippedFile",
    "add_validation_split",
    "decode_pil",
    "decode_rgb",
    "get_dataset",
    "list_datasets",
    "load_image_dataset",
    "register_dataset",
    "resolve_source",
    "uint8_pipeline",
    "with_transforms",
]
