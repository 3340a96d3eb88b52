"""`model: s3://bucket/prefix`: copy the checkpoint to this node once, then load it locally.

The copy goes to $DELTARAY_CACHE/models/<hash of the URI> (default ~/.cache/deltaray) through a
temporary folder renamed into place, so replicas on one node that start together download at
most a few times, never load a half-written copy, and later replicas reuse it.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.spec import StorageSpec
from pipelines.storage import locate, read_bytes


def local_model(model: str, storage: StorageSpec) -> str:
    """A path or preset the engine can load; object-storage URIs are fetched first."""
    if "://" not in model:
        return model
    from cluster.engine.llm import cache_root
    target = cache_root() / "models" / hashlib.sha1(model.encode()).hexdigest()[:16]
    if (target / "config.json").exists():
        return str(target)
    loc = locate(model, storage)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    if not any(f.endswith("/config.json") for f in files):
        raise FileNotFoundError(f"model {model!r}: no config.json under that prefix")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    for path in files:
        dest = tmp / path[len(loc.path):].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(loc.fs, path))
    try:
        tmp.rename(target)
    except OSError:                          # another replica finished first; theirs is whole
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
