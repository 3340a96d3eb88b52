"""Reads tensors out of one safetensors file straight into their destination.

The file is read with plain positioned reads, not memory-mapped, so nothing of it counts towards
the process's memory: a tensor whose dtype already matches is read directly into the parameter's
own storage, and one that needs converting goes through a bounded staging buffer. A slice of
leading rows (one expert-parallel rank's experts) reads only those bytes. The header is checked
against the file size up front, so a truncated file fails naming the file and the first tensor
it cuts.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
               "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
               "U8": torch.uint8, "BOOL": torch.bool}
STAGING_BYTES = 16 << 20     # converted tensors are read this many bytes at a time


class WeightFileError(ValueError):
    """A safetensors file that cannot be read as it claims; the message names the file."""


class WeightFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries, self.data_start = self.read_header()
        except Exception:
            os.close(self.fd)
            raise

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def read_header(self) -> tuple[dict, int]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise WeightFileError(f"{self.path.name}: truncated or not a safetensors file "
                                  f"({size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{self.path.name}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if entry.get("dtype") not in FILE_DTYPES:
                raise WeightFileError(f"{self.path.name}: tensor {name} has unsupported dtype "
                                      f"{entry.get('dtype')!r}")
            if 8 + n + entry["data_offsets"][1] > size:
                raise WeightFileError(f"{self.path.name} is truncated: tensor {name} ends at byte "
                                      f"{8 + n + entry['data_offsets'][1]}, file has {size}")
        return header, 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, rows: range | None = None) -> torch.Tensor:
        """The tensor (or its leading rows `rows`) as stored in the file."""
        entry = self.entries[name]
        dtype, shape = FILE_DTYPES[entry["dtype"]], list(entry["shape"])
        begin = entry["data_offsets"][0]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * _itemsize(dtype)
            begin += rows.start * row_bytes
            shape[0] = len(rows)
        out = torch.empty(shape, dtype=dtype)
        self.pread_into(out, begin)
        return out

    def read_into(self, name: str, target: torch.Tensor, rows: range | None = None) -> None:
        """Fill `target` (same shape as the selected rows) from the file, converting its dtype."""
        file_dtype = FILE_DTYPES[self.entries[name]["dtype"]]
        rows = rows if rows is not None else range(self.shape(name)[0] if self.shape(name) else 0)
        if file_dtype == target.dtype and target.is_contiguous() and target.device.type == "cpu":
            if target.dim() == 0:
                return target.copy_(self.read(name))
            self.pread_into(target, self.entries[name]["data_offsets"][0]
                            + rows.start * self.row_bytes(name))
            return
        if target.dim() == 0:
            return target.copy_(self.read(name))
        step = max(1, STAGING_BYTES // max(1, self.row_bytes(name)))
        for r in range(0, len(rows), step):
            chunk = range(rows.start + r, min(rows.stop, rows.start + r + step))
            target[r:r + len(chunk)].copy_(self.read(name, chunk))

    def row_bytes(self, name: str) -> int:
        entry = self.entries[name]
        return math.prod(entry["shape"][1:]) * _itemsize(FILE_DTYPES[entry["dtype"]])

    def pread_into(self, out: torch.Tensor, begin: int) -> None:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else b""
        offset, total = 0, len(view)
        while offset < total:   # pread may return short counts on large reads
            got = os.preadv(self.fd, [view[offset:]], self.data_start + begin + offset)
            if got <= 0:
                raise WeightFileError(f"{self.path.name}: unexpected end of file")
            offset += got


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
