"""On-disk cache of built data sets: ``DatasetDict.save_to_disk`` under a key that changes when the source does.

An entry is ``<cache_root>/<kind>-<key[:16]>/`` holding ``dataset/`` (Arrow files with the image bytes embedded, so
a load memory-maps them and never touches the archive again) and ``build.json`` (the full key, the source, the class
names and the files skipped while building). ``build.json`` is written last and the entry is moved into place with
one ``rename``, so a half-written entry is never loaded.

The key is a SHA-256 over the source's resolved path, the bytes of its index files, and the relative path, size and
modification time of every (non-hidden) file under its image folders. Re-extracting or editing the archive
therefore rebuilds; hashing every image's bytes would cost as much as the build itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT_VERSION",
    "default_cache_dir",
    "source_fingerprint",
    "entry_path",
    "load_entry",
    "build_entry",
]

CACHE_ENV = "TIMM_BNINIT_DATA_CACHE"
# bump when the stored columns or their meaning change, so old entries are rebuilt instead of misread
CACHE_FORMAT_VERSION = 1
BUILD_FILE = "build.json"
DATASET_DIR = "dataset"


def default_cache_dir() -> Path:
    """``$TIMM_BNINIT_DATA_CACHE``, else ``$XDG_CACHE_HOME/timm_bninit/datasets`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "timm_bninit" / "datasets"


def source_fingerprint(
    kind: str, root: Path, index_files: Sequence[Path] = (), image_dirs: Sequence[Path] = (), **extra: Any
) -> str:
    """The cache key of a source: a hex SHA-256 that changes when any index file or image-folder listing does.

    Args:
        kind: Source kind (``'cub'``, ``'cars'``, ...); part of the key.
        root: The source's resolved root folder; part of the key, so two copies of an archive are two entries.
        index_files: Files whose bytes are hashed. A missing file is hashed as missing (the build reports it).
        image_dirs: Folders whose file listing (relative path, size, mtime) is hashed, recursively.
        **extra: Further JSON-serialisable values the built data set depends on.
    """
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT_VERSION, "kind": kind, "root": str(root), **extra}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in index_files:
        digest.update(f"\0index:{_relative(path, root)}\0".encode())
        try:
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            digest.update(f"unreadable:{type(err).__name__}".encode())
    for folder in image_dirs:
        digest.update(f"\0dir:{_relative(folder, root)}\0".encode())
        for relative, size, mtime in _listing(str(folder)):
            digest.update(f"{relative}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def entry_path(cache_root: Path, kind: str, key: str) -> Path:
    return cache_root / f"{kind}-{key[:16]}"


def load_entry(cache_root: Path, kind: str, key: str) -> tuple[DatasetDict, dict[str, Any]] | None:
    """The cached ``(DatasetDict, build metadata)`` for this key, or None if there is no complete entry."""
    from datasets import load_from_disk

    path = entry_path(cache_root, kind, key)
    try:
        meta = json.loads((path / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:  # a 16-hex-digit prefix collision, or an entry from another format version
        return None
    try:
        dataset = load_from_disk(str(path / DATASET_DIR))
    except Exception as err:  # damaged entry (disk full during a copy, files deleted by hand): rebuild it
        warnings.warn(f"data set cache entry {path} is unreadable ({err}); rebuilding it", stacklevel=3)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return dataset, meta


@contextmanager
def build_entry(cache_root: Path, kind: str, key: str, source: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Build an entry in a scratch folder and move it into place only if the ``with`` body succeeds.

    Yields ``(scratch, meta)``: the body saves the data set to ``scratch / 'dataset'`` and fills ``meta``;
    ``scratch / 'work'`` is free for temporary files and is deleted. Older entries for the same ``kind`` and
    ``source`` are then removed, so re-extracting an archive does not leave its old copy behind.
    """
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = cache_root / f".tmp-{kind}-{key[:16]}-{uuid.uuid4().hex[:8]}"
    (scratch / "work").mkdir(parents=True)
    try:
        meta: dict[str, Any] = {"format": CACHE_FORMAT_VERSION, "key": key, "kind": kind, "source": source}
        yield scratch, meta
        shutil.rmtree(scratch / "work", ignore_errors=True)
        (scratch / BUILD_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        final = entry_path(cache_root, kind, key)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / BUILD_FILE).is_file():
                raise
            # another process finished the same entry first; its copy is identical
        _prune_stale_entries(cache_root, kind, key, source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prune_stale_entries(cache_root: Path, kind: str, key: str, source: str) -> None:
    for path in cache_root.glob(f"{kind}-*"):
        try:
            meta = json.loads((path / BUILD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("source") == source and meta.get("key") != key:
            shutil.rmtree(path, ignore_errors=True)


def _listing(folder: str, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every non-hidden file under ``folder``, sorted, recursively.

    ``os.scandir`` on strings rather than ``Path.rglob``: CUB's 11,788 images are listed on every load.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # a missing folder: the build reports it
        yield f"{prefix}<missing folder>", -1, -1
        return
    for entry in entries:
        # hidden entries are skipped, as datasets' builders skip them; this also keeps a cache dir placed
        # inside an image folder (e.g. <data>/.cache) from changing the key of that folder on every build
        if _hidden(entry.name):
            continue
        if entry.is_dir():
            yield from _listing(entry.path, f"{prefix}{entry.name}/")
            continue
        try:
            stat = entry.stat()
        except OSError:  # a dangling symlink: listed, so the build reports it as a missing image
            yield f"{prefix}{entry.name}", -1, -1
            continue
        yield f"{prefix}{entry.name}", stat.st_size, stat.st_mtime_ns


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()
