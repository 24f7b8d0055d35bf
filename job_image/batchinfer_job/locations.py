"""Where local paths really are: made absolute, and checked against the places an output must never be.

Pure pathlib (no fsspec, ray or torch): `batchinfer validate` and the local runner share it.
"""

from __future__ import annotations

from pathlib import Path

from batchinfer_job.spec import BatchInferenceSpec, comparable_path


class LocationError(ValueError):
    """A local output.uri that would overwrite or delete something it must not."""


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """Make a local relative path absolute (against `base` or the working directory); URIs pass through."""
    if "://" in uri:
        return uri
    return str(((base or Path.cwd()) / uri).resolve()) if not Path(uri).is_absolute() else uri


def local_path(uri: str, base: Path) -> Path | None:
    """The real absolute path of a local URI or path (symbolic links followed), None for object stores."""
    scheme, _ = comparable_path(uri)
    if scheme != "file":
        return None
    path = uri.split("://", 1)[1] if "://" in uri else uri
    return (base / path).resolve()


def check_local_paths(spec: BatchInferenceSpec, cwd: Path | None = None, home: Path | None = None) -> None:
    """Refuse a local output that is, or lies above, the working directory, the home directory or the
    filesystem root; that lies inside or above the input (symbolic links followed); or that is a file.

    The schema checks these lexically; here paths are absolute and real. Object-store URIs pass (the schema
    checked them).
    """
    cwd = (cwd or Path.cwd()).resolve()
    home = (home or Path.home()).resolve()
    output = local_path(spec.output.uri, cwd)
    if output is None:
        return
    guarded = {"the filesystem root": Path(output.anchor), "the working directory": cwd, "the home directory": home}
    for what, path in guarded.items():
        if output == path or output in path.parents:
            relation = "is" if output == path else "lies above"
            raise LocationError(
                f"output.uri {spec.output.uri!r} {relation} {what} ({path}); give a folder of its own, "
                "e.g. ./predictions"
            )
    inputs = local_path(spec.input.uri, cwd)
    if inputs is not None and (output == inputs or inputs in output.parents or output in inputs.parents):
        raise LocationError(
            f"output.uri {spec.output.uri!r} overlaps input.uri {spec.input.uri!r} ({output} and {inputs}); "
            "write predictions to a separate folder"
        )
    if output.is_file():
        raise LocationError(f"output.uri {spec.output.uri!r} is an existing file ({output}); give a folder of its own")
