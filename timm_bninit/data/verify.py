"""Decode every image of a local data set once, before it is cached, so a bad file fails the build, not epoch 7."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

__all__ = ["check_image", "find_unreadable_images"]


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None if it decodes.

    ``Image.verify()`` alone accepts truncated JPEG data, so the pixels are fully decoded with ``load()``.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a folder, not an image file"
    except Image.DecompressionBombError as err:
        return f"refused by PIL as a decompression bomb: {err}"
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        return f"cannot decode: {err}"
    return None


def find_unreadable_images(root: Path, files: Sequence[str], num_workers: int | None = None) -> dict[str, str]:
    """Decode ``root / file`` for every file; map each one that fails to its reason.

    Args:
        root: Folder the paths are relative to.
        files: Relative image paths.
        num_workers: Decoding threads (PIL releases the GIL while decoding); default: one per CPU, at most 32.
    """
    num_workers = num_workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        reasons = pool.map(check_image, (root / file for file in files))
        return {file: reason for file, reason in zip(files, reasons) if reason is not None}
