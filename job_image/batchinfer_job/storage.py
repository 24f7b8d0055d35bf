"""Object storage through fsspec (s3fs, gcsfs, adlfs, local): resolve, list, read, write.

S3 endpoint and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, …) through botocore, so MinIO and other S3 APIs work unchanged.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class StorageError(RuntimeError):
    """A storage location cannot be used as the spec asks."""


class TooLargeError(OSError):
    """An input is larger than input.maxImageBytes."""


@dataclass(frozen=True)
class Location:
    """A resolved storage location: filesystem, path inside it, and the URI form users see."""

    fs: fsspec.AbstractFileSystem
    path: str
    uri: str

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        """The same filesystem wrapped for pyarrow and Ray Data."""
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def uri_of(self, path: str) -> str:
        """The user-facing URI of a path inside this filesystem."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """Make a local relative path absolute (against `base` or the working directory); URIs pass through."""
    if "://" in uri:
        return uri
    return str(((base or Path.cwd()) / uri).resolve()) if not Path(uri).is_absolute() else uri


def resolve(uri: str) -> Location:
    """Resolve a URI or local path to a filesystem and a path."""
    options: dict[str, Any] = {}
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as err:
        raise StorageError(f"no filesystem for {uri!r}: {err}; install the matching fsspec package") from err
    return Location(fs, path.rstrip("/") or path, uri.rstrip("/") or uri)


def list_images(location: Location) -> list[str]:
    """Every image file under a prefix, sorted, as paths inside the filesystem."""
    if not location.fs.exists(location.path):
        raise StorageError(f"input.uri {location.uri!r} does not exist; check the path and credentials")
    if location.fs.isfile(location.path):
        return [location.path]
    found = location.fs.find(location.path, withdirs=False)
    return sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES) and "/_" not in p[len(location.path) :])


def list_files(location: Location, suffix: str) -> list[str]:
    """Every file under a prefix ending in `suffix`, sorted."""
    if not location.fs.exists(location.path):
        raise StorageError(f"input.uri {location.uri!r} does not exist; check the path and credentials")
    if location.fs.isfile(location.path):
        return [location.path]
    return sorted(p for p in location.fs.find(location.path, withdirs=False) if p.endswith(suffix))


IN_FLIGHT = ".tmp-"  # marks a local file that `write_json` has not yet renamed into place


def has_data(location: Location) -> bool:
    """True when anything exists under the location, other than files another writer has in flight."""
    if not location.fs.exists(location.path):
        return False
    return any(IN_FLIGHT not in path.rsplit("/", 1)[-1] for path in location.fs.find(location.path, withdirs=False))


def remove_tree(location: Location) -> None:
    """Delete everything under the location (for output.mode=overwrite)."""
    if location.fs.exists(location.path):
        location.fs.rm(location.path, recursive=True)


def ensure_folder(location: Location) -> None:
    """Create a local folder; object stores need none (and must not get buckets created)."""
    if _is_local(location):
        location.fs.makedirs(location.path, exist_ok=True)


def _is_local(location: Location) -> bool:
    protocols = (location.fs.protocol,) if isinstance(location.fs.protocol, str) else location.fs.protocol
    return "file" in protocols or "local" in protocols


def write_json(location: Location, payload: dict[str, Any]) -> None:
    """Write a small JSON document (a manifest, a commit record) atomically: readers see all of it or none.

    Object stores make a single PUT atomic; on local and mounted filesystems the file is renamed into place.
    """
    data = json.dumps(payload, indent=2, sort_keys=True).encode()
    if not _is_local(location):
        with location.fs.open(location.path, "wb") as handle:
            handle.write(data)
        return
    temporary = f"{location.path}{IN_FLIGHT}{uuid.uuid4().hex}"
    with location.fs.open(temporary, "wb") as handle:
        handle.write(data)
    location.fs.mv(temporary, location.path)


def read_json(location: Location) -> dict[str, Any]:
    with location.fs.open(location.path, "rb") as handle:
        return json.loads(handle.read())


def read_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole object by URI (filesystem instances are cached by fsspec), at most `max_bytes`."""
    location = resolve(uri)
    if max_bytes is None:
        return read_bytes(location.fs, location.path)
    with location.fs.open(location.path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"more than input.maxImageBytes {max_bytes} bytes")
    return data


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return handle.read()
