"""Object storage and local files behind one pyarrow filesystem, plus atomic commits.

`s3://bucket/key` goes to `pyarrow.fs.S3FileSystem` (endpoint overridable, credentials only from
the environment); anything else is a local path. A commit is atomic either way: local files are
written under a hidden temporary name and renamed; an S3 object becomes visible only when its
upload completes, so a killed writer leaves nothing behind that a reader would see.
"""
from __future__ import annotations

import fnmatch
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipelines.spec import StorageSpec


@dataclass(frozen=True)
class Location:
    """Where a URI points: a filesystem and the path inside it (no scheme)."""
    fs: pafs.FileSystem
    path: str
    scheme: str                      # "s3" or "" (local)

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}" if self.scheme else path

    @property
    def is_local(self) -> bool:
        return not self.scheme


def filesystem(scheme: str, storage: StorageSpec) -> pafs.FileSystem:
    if scheme == "":
        return pafs.LocalFileSystem()
    if scheme != "s3":
        raise ValueError(f"storage: unsupported URI scheme {scheme!r}:// (use s3:// or a local path)")
    kwargs = {"anonymous": storage.anonymous, "region": storage.region or "us-east-1"}
    if storage.endpoint_url:
        scheme_part, _, host = storage.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme_part, scheme=scheme_part if host else "https")
    return pafs.S3FileSystem(**kwargs)


def locate(uri: str, storage: StorageSpec) -> Location:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Location(pafs.LocalFileSystem(), os.path.abspath(uri), "")
    return Location(filesystem(scheme, storage), rest.rstrip("/"), scheme)


def list_files(loc: Location) -> tuple[str, list[str]]:
    """(root, sorted file paths) for a file, a directory/prefix, or a glob; hidden names skipped."""
    has_glob = any(c in loc.path for c in "*?[")
    base = loc.path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if has_glob else loc.path
    info = loc.fs.get_file_info(base)
    if info.type == pafs.FileType.File and not has_glob:
        return base.rsplit("/", 1)[0], [base]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input.uri: nothing at {loc.uri(loc.path)!r}")
    infos = loc.fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path, base)]
    if has_glob:
        files = [f for f in files if fnmatch.fnmatch(f, loc.path)]
    if not files:
        raise FileNotFoundError(f"input.uri: no files under {loc.uri(loc.path)!r}")
    return base, sorted(files)


def _hidden(path: str, base: str) -> bool:
    return any(part.startswith((".", "_")) for part in path[len(base):].split("/") if part)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def commit(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see all of it or nothing."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:          # S3: visible only once the upload completes
        f.write(data)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def list_names(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Base names of the files directly in `folder` (empty when it does not exist)."""
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return [i.base_name for i in infos if i.type == pafs.FileType.File]
