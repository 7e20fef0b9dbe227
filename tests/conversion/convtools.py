"""Helpers shared by the conversion tests: running the CLI, tampering with checkpoints, reading outputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from clitools import REPO, cli_env, run  # noqa: F401 - cli_env: for the tests that start their own process

from gptoss_jax.checkpoint.orbax import flatten
from gptoss_jax.checkpoint.safetensors import SafetensorsFile, save_file


def run_convert(*args, env=None) -> subprocess.CompletedProcess:
    """`gptoss-convert ARGS` in a subprocess (the real exit code and stderr), run from the checkout."""
    return run("gptoss-convert", *args, env=env, cwd=REPO)


def read_all(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    f = SafetensorsFile(path)
    out = {n: np.array(f.get(n)) for n in f.keys()}
    meta = f.metadata
    f.close()
    return out, meta


def rewrite(path: Path, fn) -> None:
    """Rewrites one safetensors file with fn(tensors: dict) applied (fn edits the dict in place)."""
    tensors, meta = read_all(path)
    fn(tensors)
    save_file(tensors, path, metadata=meta or None)


def file_holding(folder: Path, tensor: str) -> Path:
    for p in sorted(folder.glob("*.safetensors")):
        if tensor in SafetensorsFile(p).keys():
            return p
    raise KeyError(tensor)


def update_index(folder: Path, fn) -> None:
    p = folder / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index["weight_map"])
    p.write_text(json.dumps(index))


def orbax_arrays(dst: Path) -> dict[str, np.ndarray]:
    """Every array of a converted checkpoint through a plain Orbax restore (nothing from gptoss_jax)."""
    import orbax.checkpoint as ocp

    return {
        k: np.asarray(v) for k, v in flatten(ocp.StandardCheckpointer().restore(Path(dst) / "state")).items()
    }


def gptoss_metadata(dst: Path) -> dict:
    return json.loads((Path(dst) / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]["gptoss"]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bit-identical arrays (names, dtypes, shapes, bytes) and identical gpt-oss metadata."""
    xa, xb = orbax_arrays(a), orbax_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert same_bytes(xa[k], xb[k]), k
    assert gptoss_metadata(a) == gptoss_metadata(b)


def same_bytes(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
