"""The one exception the data layer raises for bad data, and the record of files it was told to skip."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BNInitError

__all__ = ["DatasetError", "SkippedFile"]


class DatasetError(BNInitError, ValueError):
    """A data set that cannot be loaded as asked: missing or malformed files, bad labels, undecodable images.

    The message names the file, what was wrong, and what to do about it.
    """


@dataclass(frozen=True)
class SkippedFile:
    """An image left out of the data set because ``skip_corrupt=True`` was passed.

    Attributes:
        path: Path of the file relative to the data set's root folder.
        split: Official split the file belonged to (``'train'`` or ``'test'``).
        reason: What was wrong with it, e.g. ``'file not found'`` or ``'cannot decode: ...'``.
    """

    path: str
    split: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "split": self.split, "reason": self.reason}
