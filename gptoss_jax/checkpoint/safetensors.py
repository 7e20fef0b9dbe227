"""A small, strict safetensors reader and writer.

We read the format ourselves (8-byte little-endian header length, a JSON header, then raw little-endian
data) because we need: memory-mapped views with no copy (bounded-memory streaming), bf16/fp8 through
ml_dtypes, and one-line errors that name the file and tensor for a truncated, corrupt or hostile shard.

The header is checked in full before anything else is read (`parse_header`): known dtypes, shapes of at
most 32 non-negative integer dimensions whose byte size is computed exactly (no int64 overflow),
offsets that match it, and tensors that tile the data section exactly (in order, no overlap, no gap, no
trailing bytes), as the format requires; `__metadata__` maps strings to strings. A file is opened only if
it is a regular file (`untrusted.open_regular`).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from .untrusted import CheckpointError, open_regular, parse_json, read_exact, show

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
MAX_DIMS = 32

__all__ = ["CheckpointError", "SafetensorsFile", "parse_header", "save_file"]


def _nonneg_ints(v, n: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n) and len(v) <= MAX_DIMS
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))  # fmt: skip


def parse_header(raw: bytes, data_size: int, where) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], dict]:
    """The checked header: name -> (dtype, shape, begin, end) within the data section of `data_size`
    bytes, and the `__metadata__` strings. CheckpointError naming `where` and the tensor otherwise."""
    header = parse_json(raw, where, "safetensors header")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        bad = next((k for k, v in meta.items() if not isinstance(v, str)), None) if isinstance(meta, dict) else None
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings"
                              + (f" (value of {show(bad)} is not a string)" if bad is not None else ""))  # fmt: skip
    entries = {}
    for name, info in header.items():
        at = f"{where}: tensor {show(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{at}: header entry is not an object")
        dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(f"{at}: unknown dtype {show(dt)}")
        if not _nonneg_ints(shape):
            raise CheckpointError(f"{at}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
                                  f"got {show(shape)}")  # fmt: skip
        if not _nonneg_ints(offsets, 2) or offsets[0] > offsets[1]:
            raise CheckpointError(f"{at}: data_offsets must be two non-negative integers in order, "
                                  f"got {show(offsets)}")  # fmt: skip
        begin, end = offsets
        nbytes = span = DTYPES[dt].itemsize
        for s in shape:  # exact Python integers: a shape of 1e30 or one that wraps int64 cannot overflow
            nbytes *= s
            span *= max(s, 1)
        if end - begin != nbytes:
            raise CheckpointError(f"{at}: data_offsets {begin}..{end} do not match shape {tuple(shape)} of {dt}")
        if span >= 2**63:  # no element (a zero among the dims), yet numpy refuses the shape
            raise CheckpointError(f"{at}: shape {tuple(shape)} is too large for an array")
        if end > data_size:
            raise CheckpointError(f"{at}: data runs past the end of the file (data section is {data_size} "
                                  f"bytes, tensor ends at {end}; truncated?)")  # fmt: skip
        entries[name] = (DTYPES[dt], tuple(shape), begin, end)
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise CheckpointError(f"{where}: tensor {show(name)} overlaps tensor {show(prev)} in the data section")
        if begin > pos:
            raise CheckpointError(f"{where}: bytes {pos}..{begin} of the data section, before tensor {show(name)}, "
                                  f"belong to no tensor")  # fmt: skip
        pos, prev = end, name
    if pos != data_size:
        raise CheckpointError(f"{where}: the last {data_size - pos} bytes of the file belong to no tensor")
    return entries, meta


class SafetensorsFile:
    """Lazily reads tensors from one .safetensors file through a read-only memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = open_regular(self.path)
        try:
            size = os.fstat(fd).st_size
            head = read_exact(fd, 8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: bad safetensors header length {n} (file is {size} bytes)")
            raw = read_exact(fd, n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        finally:
            os.close(fd)
        self.entries, self.metadata = parse_header(raw, size - 8 - n, self.path)
        self.data_start = 8 + n
        self.size = size
        self._data = None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self.entries[name]
        return e - b

    def _map(self) -> np.ndarray:
        fd = open_regular(self.path)
        try:
            if os.fstat(fd).st_size != self.size:  # mapping past a shortened file would crash on access
                raise CheckpointError(f"{self.path}: changed size since its header was read")
            return np.frombuffer(mmap.mmap(fd, self.size, access=mmap.ACCESS_READ), dtype=np.uint8)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot map ({e.strerror or e})") from None
        finally:
            os.close(fd)

    def get(self, name: str) -> np.ndarray:
        """A read-only view on the mapped file (no copy); copy it if you need to keep it."""
        dtype, shape, begin, end = self.entries[name]
        if self._data is None:
            self._data = self._map()
        return self._data[self.data_start + begin : self.data_start + end].view(dtype).reshape(shape)

    def close(self):
        self._data = None


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Writes a safetensors file atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {arr.dtype}")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}  # fmt: skip
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(arr.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
