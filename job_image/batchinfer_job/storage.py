"""Object storage through fsspec (s3fs, gcsfs, adlfs, local): resolve, list, read, write.

S3 endpoint and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, …) through botocore, so MinIO and other S3 APIs work unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

log = logging.getLogger(__name__)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class StorageError(RuntimeError):
    """A storage location cannot be used as the spec asks."""


class TooLargeError(OSError):
    """An input is larger than input.maxImageBytes."""


class NotRegularFileError(OSError):
    """A local input is a FIFO, socket or device: never opened."""


def _object_store_errors() -> tuple[type[BaseException], ...]:
    """The object store's refusals (credentials, access, missing bucket) as botocore raises them, when the S3
    back end is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no S3 back end installed: nothing of it can be raised
        return ()
    return (BotoCoreError, ClientError)


# What reading one input can raise that concerns that input alone: I/O and permissions, a bad name, no back end
# for its scheme, the object store's refusals.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, StorageError, *_object_store_errors())
# What writing the output can raise from where it is written: a missing bucket or folder, permissions, a full disk.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, *_object_store_errors())


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


def resolve(uri: str) -> Location:
    """Resolve a URI or local path to a filesystem and a path.

    The spec's one URI grammar: `scheme://rest` (scheme in any case) or a local path. No fsspec URL chains:
    a local name holding `::` is the literal file it names.
    """
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else "file"
    rest = uri[match.end() :] if match else uri
    if scheme in ("file", "local"):
        path = os.path.abspath(rest) if rest else "/"
        return Location(fsspec.filesystem("file"), path, path)
    options: dict[str, Any] = {}
    if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs = fsspec.filesystem(scheme, **options)
    except (ImportError, ValueError) as err:
        raise StorageError(f"no filesystem for {uri!r}: {err}; install the matching fsspec package") from err
    path = rest.rstrip("/")
    return Location(fs, path, f"{scheme}://{path}")


@dataclass
class Listing:
    """The files under a prefix that are inputs, and how many others were passed over, by reason."""

    paths: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


SKIP_HIDDEN = "hidden (a name starts with '.')"
SKIP_BROKEN_LINK = "broken symlink"
SKIP_LINKED_FOLDER = "symlink to a folder (not followed)"
SKIP_NOT_REGULAR = "not a regular file (FIFO, socket or device)"
SKIP_SUFFIX = "not an image suffix (" + " ".join(IMAGE_SUFFIXES) + ")"
SKIP_OUTPUT_RECORDS = "batchinfer's own records (_shards/, _errors/)"


def _entries(location: Location) -> dict[str, dict[str, Any]]:
    if not location.fs.exists(location.path):
        raise StorageError(f"input.uri {location.uri!r} does not exist; check the path and credentials")
    if location.fs.isfile(location.path):
        return {location.path: location.fs.info(location.path)}
    found = location.fs.find(location.path, withdirs=False, detail=True)
    return found if isinstance(found, dict) else {p: location.fs.info(p) for p in found}


def list_inputs(location: Location, suffixes: tuple[str, ...], *, top_level: bool = True) -> Listing:
    """Regular files under a prefix ending in one of `suffixes`, sorted; everything else counted by reason.

    Files whose names start with `_` are inputs like any other; hidden files and folders (`.name`), FIFOs,
    sockets and devices are never opened. `top_level`: the location is input.uri itself, where batchinfer's own
    record folders (`_shards/`, `_errors/`) are passed over; below it they are ordinary folders.
    """
    listing = Listing(paths=[])
    base = location.path.rstrip("/")
    for path, info in sorted(_entries(location).items()):
        relative = path[len(base) :].lstrip("/") if path != base else path.rsplit("/", 1)[-1]
        reason = _skip_reason(relative, info, suffixes, top_level)
        if reason:
            listing.skip(reason)
        else:
            listing.paths.append(path)
    return listing


def _skip_reason(relative: str, info: dict[str, Any], suffixes: tuple[str, ...], top_level: bool) -> str | None:
    if any(part.startswith(".") for part in relative.split("/")):
        return SKIP_HIDDEN
    if info.get("islink") and info.get("type") != "file":
        reason = _link_skip_reason(info["name"])
        if reason:
            return reason
    elif info.get("type") != "file":
        return SKIP_NOT_REGULAR
    if top_level and "/" in relative and relative.split("/", 1)[0] in OUTPUT_RECORD_FOLDERS:
        return SKIP_OUTPUT_RECORDS
    if not relative.lower().endswith(suffixes):
        return SKIP_SUFFIX if suffixes == IMAGE_SUFFIXES else f"not {' '.join(suffixes)}"
    return None


def _link_skip_reason(path: str) -> str | None:
    """A local symlink (fsspec lists it as type 'other'): None when its target is a regular file (read like
    one), else why it is passed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return SKIP_BROKEN_LINK
    if stat.S_ISREG(mode):
        return None
    return SKIP_LINKED_FOLDER if stat.S_ISDIR(mode) else SKIP_NOT_REGULAR


@dataclass
class TopLevel:
    """One level of a folder: its sub-folders (listed later, elsewhere), its input files, the rest by reason."""

    folders: list[str]
    paths: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


def list_top_level(location: Location, suffixes: tuple[str, ...]) -> TopLevel:
    """Sub-folders and input files directly in a folder, sorted (one delimiter listing, no recursion).

    Hidden entries count once each (a hidden folder is never listed); `_shards/` and `_errors/` once each.
    """
    top = TopLevel(folders=[], paths=[])
    base = location.path.rstrip("/")
    entries = location.fs.ls(location.path, detail=True)
    for info in sorted(entries, key=lambda e: e["name"]):
        path = info["name"].rstrip("/")
        if path == base:
            continue
        name = path.rsplit("/", 1)[-1]
        if info.get("type") == "directory":
            reason = SKIP_HIDDEN if name.startswith(".") else None
            if reason is None and name in OUTPUT_RECORD_FOLDERS:
                reason = SKIP_OUTPUT_RECORDS
            if reason is None:
                top.folders.append(path)
                continue
        else:
            reason = _skip_reason(name, info, suffixes, top_level=False)
            if reason is None:
                top.paths.append(path)
                continue
        top.skipped[reason] = top.skipped.get(reason, 0) + 1
    location.fs.invalidate_cache(location.path)  # object stores cache listings; the driver keeps only names
    return top


OUTPUT_RECORD_FOLDERS = ("_shards", "_errors")  # what batchinfer writes beside its shards (see `commit`)


IN_FLIGHT = ".tmp-"  # marks a local file that `write_json` has not yet renamed into place


def _files(location: Location) -> list[str]:
    """Every file under the location (full paths), leaving out folder markers: the zero-byte `name/` objects
    the S3 console and some tools create for a "folder" hold no data."""
    if not location.fs.exists(location.path):
        return []
    return [p for p in location.fs.find(location.path, withdirs=False) if not p.endswith("/")]


def has_data(location: Location) -> bool:
    """True when anything exists under the location, other than files another writer has in flight."""
    return any(IN_FLIGHT not in path.rsplit("/", 1)[-1] for path in _files(location))


def files_under(location: Location) -> list[str]:
    """Every file under the location, as paths relative to it, sorted."""
    base = location.path.rstrip("/") + "/"
    return sorted(p[len(base) :] for p in _files(location) if p.startswith(base))


def remove_files(location: Location, relative: list[str]) -> None:
    """Delete exactly these files under the location, then local folders they leave empty."""
    for name in relative:
        location.fs.rm_file(location.child(name).path)
    if is_local(location):
        for folder in sorted({n.rsplit("/", 1)[0] for n in relative if "/" in n}, key=len, reverse=True):
            path = location.child(folder).path
            if location.fs.isdir(path) and not location.fs.ls(path):
                location.fs.rmdir(path)


def ensure_folder(location: Location) -> None:
    """Create a local folder; object stores need none (and must not get buckets created)."""
    if is_local(location):
        location.fs.makedirs(location.path, exist_ok=True)


def upload_files(location: Location, files: list[Path]) -> None:
    """Copy local files under `location` (their names kept); the bucket must exist."""
    for file in files:
        location.fs.put_file(str(file), location.child(file.name).path)


def is_local(location: Location) -> bool:
    protocols = (location.fs.protocol,) if isinstance(location.fs.protocol, str) else location.fs.protocol
    return "file" in protocols or "local" in protocols


def write_json(location: Location, payload: dict[str, Any]) -> None:
    """Write a small JSON document (a manifest, a commit record) atomically: readers see all of it or none.

    Object stores make a single PUT atomic; on local and mounted filesystems the file is renamed into place.
    """
    data = json.dumps(payload, indent=2, sort_keys=True).encode()
    if not is_local(location):
        with location.fs.open(location.path, "wb") as handle:
            handle.write(data)
        return
    temporary = f"{location.path}{IN_FLIGHT}{uuid.uuid4().hex}"
    try:
        with location.fs.open(temporary, "wb") as handle:
            handle.write(data)
        location.fs.mv(temporary, location.path)
    except BaseException:
        remove_leftovers(location.fs, [temporary])  # a full disk must not leave a half-written record behind
        raise


def remove_leftovers(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete what a failed write left, if it is there; a failure to delete is logged (the write's own error
    is the one raised)."""
    for path in paths:
        try:
            if fs.exists(path):
                fs.rm_file(path)
        except OSError as err:
            log.warning("could not remove %s after a failed write: %s", path, err)


def read_json(location: Location) -> dict[str, Any]:
    with location.fs.open(location.path, "rb") as handle:
        return json.loads(handle.read())


def read_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a whole object by URI (filesystem instances are cached by fsspec), at most `max_bytes`.

    A local path that is not a regular file (a FIFO would block forever) raises instead of being opened.
    """
    location = resolve(uri)
    if is_local(location) and not stat.S_ISREG(os.stat(location.path).st_mode):
        raise NotRegularFileError(f"{location.path} is not a regular file")
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
