"""Building broken and hostile checkpoints, running the real CLIs on them, and judging what they print."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

from clitools import REPO, assert_error_line, cli_env, command
from conftest import assert_one_line

# A file outside every checkpoint: no byte of it may ever be printed (nor its first 8 bytes read as a
# safetensors header length, which is how the old reader leaked it).
SECRET = b"TOPSECRET-outside-the-checkpoint-".ljust(104_729, b"#")  # a size that cannot appear by chance
SECRET_LEAKS = (SECRET[:8].decode(), str(struct.unpack("<Q", SECRET[:8])[0]), str(len(SECRET)))
# Raw control characters (C0 but newline, DEL, C1, bidirectional overrides): none may reach the terminal.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
EVIL = "evil\x1b[2J\x1b]0;pwned\x07\u202e"  # clears the screen, sets the title, rings, reverses text
LIMIT_S = 30.0  # no case may take longer (a hang); the suite runs two test processes on two cores


def run(tool: str, *args, timeout: float = LIMIT_S, **env) -> subprocess.CompletedProcess:
    """`tool ARGS` in a subprocess that must finish within `timeout` seconds (a hang fails the test)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*command(tool), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                           env=cli_env(**env), timeout=timeout, errors="backslashreplace", check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{tool} {' '.join(map(str, args))}: no answer within {timeout} s (a hang?)"
        ) from None
    r.seconds = time.perf_counter() - t0
    return r


def assert_clean(text: str) -> None:
    """No raw control character and nothing of the secret file."""
    assert not RAW_CONTROL.search(text), f"raw control characters: {text!r}"
    for leak in SECRET_LEAKS:
        assert leak not in text, f"leaks the outside file ({leak!r}): {text!r}"


def assert_cli_error(r: subprocess.CompletedProcess, *needles, code: int = 2) -> str:
    """Exit `code`, one stderr line that is an error naming every needle, clean output."""
    line = assert_error_line(r, ": error: ", *needles, code=code)
    assert_clean(r.stderr + r.stdout)
    return line


def assert_api_error(excinfo, *needles) -> str:
    """A CheckpointError-style message: one line, clean, naming every needle."""
    assert_one_line(excinfo, *needles)
    assert_clean(str(excinfo.value))
    return str(excinfo.value)


@contextlib.contextmanager
def deadline(seconds: float = LIMIT_S):
    """Fails (TimeoutError) instead of hanging: the alarm interrupts even a blocked open()."""

    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------- builders
def raw_safetensors(path: Path, header, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file with exactly this header (a dict, or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def read_header(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def edit_header(path: Path, fn) -> None:
    """Rewrites the header of a safetensors file through fn(header) (edits in place), data unchanged."""
    header, data = read_header(path)
    fn(header)
    raw_safetensors(path, header, data)


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def shard_holding(folder: Path, tensor: str) -> Path:
    for p in sorted(folder.glob("*.safetensors")):
        if tensor in read_header(p)[0]:
            return p
    raise LookupError(tensor)


def single_file_hf(folder: Path) -> Path:
    """The multi-shard HF checkpoint `folder` turned into the single-file layout (no index)."""
    header, data = {}, b""
    for p in sorted(folder.glob("model-*.safetensors")):
        h, d = read_header(p)
        h.pop("__metadata__", None)
        for name, info in h.items():
            b, e = info["data_offsets"]
            header[name] = dict(info, data_offsets=[len(data) + b, len(data) + e])
        data += d
        p.unlink()
    (folder / "model.safetensors.index.json").unlink()
    raw_safetensors(folder / "model.safetensors", header, data)
    return folder


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, symlinks=True))


def nothing_left(tmp: Path, *keep: str) -> None:
    """No output that could pass for a result: only the inputs are in `tmp`."""
    assert sorted(p.name for p in tmp.iterdir()) == sorted(keep), sorted(p.name for p in tmp.iterdir())


def flip_array_bytes(ckpt: Path, n: int = 64) -> tuple[str, Path]:
    """Inverts `n` bytes inside the stored chunk of the largest array of a converted checkpoint (located
    through tensorstore's dump of the OCDBT B-tree). Returns the array's name and the data file."""
    import tensorstore as ts

    state = ckpt / "state"
    kv = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
    root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
    chunks = []
    for e in ts.ocdbt.dump(kv, root).result()["entries"]:
        ref, key = e.get("indirect_value", ""), e["key"].decode()
        if "/c/" in key and ref:
            where, offset, length = ref[len("value:") :].rsplit(":", 2)
            chunks.append((int(length), int(offset), key.split("/c/")[0], state / where.replace(":", "", 1)))
    length, offset, name, f = max(chunks)
    b = bytearray(f.read_bytes())
    b[offset + 16 : offset + 16 + n] = bytes(
        x ^ 0xFF for x in b[offset + 16 : offset + 16 + n]
    )  # chunk data comes first
    f.write_bytes(bytes(b))
    return name, f
