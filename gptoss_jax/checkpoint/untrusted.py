"""The boundary: every file we read from a checkpoint folder is untrusted, and comes through here.

Checkpoints are downloaded from the internet and copied between machines, so a file may be damaged or
made to hurt us. What this module guarantees to its callers:

- only regular files are opened: `stat` before `open`, `O_NONBLOCK`, and the open descriptor checked
  again, so a FIFO, a device or a folder named `*.safetensors` gets one line instead of a hang;
- a file named by another file (an index's `weight_map`) stays inside the checkpoint folder: no absolute
  path, no `..`, no symlink out of it. A symlink may point inside the folder, or, in a Hugging Face cache
  snapshot (`.../snapshots/<rev>/`), into that repo's `blobs/` folder, where the cache keeps the files
  its snapshots link to. Nothing is read from a file before this check;
- JSON is read with a size cap, duplicate keys are refused, and nesting deeper than the parser can
  follow is reported as a damaged file, not a `RecursionError`;
- every error is a `CheckpointError`: one line, capped in length, with control characters (ESC, BEL,
  newlines, bidirectional overrides) escaped, so a tensor name cannot drive the terminal.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

MAX_JSON = 16 << 20  # config.json, the index, Orbax metadata: real ones are at most a few hundred KB
MAX_MESSAGE = 2000  # characters of one error message
MAX_NAME = 200  # characters of one name or value quoted in a message


class CheckpointError(ValueError):
    """A problem with checkpoint files; the message is one line naming the file and tensor or field."""

    def __init__(self, message):
        super().__init__(printable(str(message), MAX_MESSAGE))


def printable(text: str, limit: int = MAX_NAME) -> str:
    """`text` cut to `limit` characters, with every non-printable character written as an escape."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show(value) -> str:
    """An untrusted name or value, short and safe to print."""
    return printable(value if isinstance(value, str) else repr(value))


# ---------------------------------------------------------------------------------------- opening
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file `path` (symlinks followed); CheckpointError otherwise."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)})")
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open() returns instead of waiting
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file ({_kind(mode)})")
    return fd


def read_exact(fd: int, n: int) -> bytes:
    """Up to `n` bytes from `fd` (fewer only at the end of the file)."""
    parts, left = [], n
    while left:
        b = os.read(fd, min(left, 1 << 24))
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def read_bytes(path: Path, limit: int) -> bytes:
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit} this file may have")
        return read_exact(fd, size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- JSON
def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {show(k)}")
        out[k] = v
    return out


def parse_json(raw: bytes, where, what: str = "JSON") -> dict:
    """A JSON object from `raw`; CheckpointError naming `where` for anything else."""
    try:
        d = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4300 digits
        raise CheckpointError(f"{where}: corrupt {what} ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: {what} is not an object")
    return d


def read_json(path: Path, limit: int = MAX_JSON) -> dict:
    return parse_json(read_bytes(path, limit), path)


# ------------------------------------------------------------------------------------------ paths
def allowed_roots(root: Path) -> tuple[Path, ...]:
    """The folders the files of checkpoint folder `root` may resolve into (see the module docstring)."""
    root = root.resolve()
    out = [root]
    for snap in (root, root.parent):  # `root` may be a snapshot or its original/ subfolder
        if snap.parent.name == "snapshots" and (snap.parent.parent / "blobs").is_dir():
            out.append((snap.parent.parent / "blobs").resolve())
    return tuple(out)


def check_name(name, where) -> str:
    """A file name read from a file: a relative path that stays below its folder."""
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: file name must be a string, got {type(name).__name__} {show(name)}")
    p = PurePosixPath(name)
    if not name or "\0" in name or "\\" in name or p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{where}: file name {show(name)} leaves the checkpoint folder (absolute, '..' "
                              f"or not a plain relative path)")  # fmt: skip
    return name


def contained(path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` itself, after checking that it (its symlinks followed) lies inside one of `roots`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{path}: cannot resolve ({e})") from None
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{path}: links outside the checkpoint folder; refusing to read it")
    return path
