"""Opening a released gpt-oss folder: layout detection, config, and a tensor-name -> file map.

Accepted:
  * the Hugging Face top level: `config.json` + `model.safetensors.index.json` + `model-*.safetensors`
    (or a single `model.safetensors`);
  * the `original/` layout: OpenAI's 16-key `config.json` + `model.safetensors` (20b) or
    `model--0000N-of-00007.safetensors` (120b);
  * a downloaded repo folder holding both: the top level is used (it has an index), and `layout_note`
    says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config
from . import keys
from .safetensors import NAMES, SafetensorsFile
from .untrusted import CheckpointError, allowed_roots, check_name, contained, read_json, show


@dataclass
class Source:
    root: Path
    layout: str  # "hf" | "original"
    config: Config
    files: dict[str, SafetensorsFile]  # tensor name -> open file
    layout_note: str = ""
    extra_json: dict = field(default_factory=dict)  # generation_config.json etc., when present
    checked: set[str] = field(default_factory=set, repr=False)  # float tensors already tested for NaN/Inf

    def available(self) -> dict[str, tuple[tuple[int, ...], str, str]]:
        return {n: (f.shape(n), NAMES[f.dtype(n)], str(f.path)) for n, f in self.files.items()}

    def total_bytes(self) -> int:
        return sum(f.nbytes(n) for n, f in self.files.items())

    @property
    def expert_storage(self) -> str:
        """"mxfp4" (packed, every release) or "dequantized" (dense HF `gate_up_proj`, e.g. a merged model)."""
        dense = self.layout == "hf" and "model.layers.0.mlp.experts.gate_up_proj" in self.files
        return "dequantized" if dense else "mxfp4"

    def rules(self, expert_format: str | None = None) -> list[keys.Rule]:
        stored = self.expert_storage
        if stored == "dequantized" and (expert_format or self.config.expert_format) != "dequantized":
            raise CheckpointError(f"{self.root}: holds dequantized experts (dense gate_up_proj, no MXFP4 blocks); "
                                  f"load it with expert_format='dequantized' (--expert-format dequantized)")  # fmt: skip
        r = keys.rules(self.config, self.layout, expert_format, stored)
        keys.check_sources(r, self.available(), where=str(self.root), config=str(self.root / "config.json"))
        return r

    def read(self, rule: keys.Rule, *, nonfinite: Callable[[str], None] | None = None) -> np.ndarray:
        """The rule's target array in our layout (a view or a fresh array; float dtypes not yet cast).

        Float sources are tested for NaN and Inf once each (`keys.check_finite`, one pass over data that
        is read anyway): CheckpointError naming the file and tensor, or, given `nonfinite`, that one-line
        message passed to it (a warning) and the array returned as it is.
        """
        arrays = [self.files[s].get(s) for s in rule.sources]
        for s, a in zip(rule.sources, arrays):
            if s not in self.checked and a.dtype in keys.FLOAT_NP:
                try:
                    keys.check_finite(a)
                except ValueError as e:
                    msg = f"{self.files[s].path}: tensor {s}: {e}"
                    if nonfinite is None:
                        raise CheckpointError(msg) from None
                    nonfinite(msg)
                self.checked.add(s)
        try:
            return rule.transform(*arrays)
        except ValueError as e:
            raise CheckpointError(f"{self.files[rule.sources[-1]].path}: tensor {rule.sources[-1]}: {e}") from None


class _Folder:
    """A checkpoint folder whose files may be read: names checked, symlinks kept inside (see untrusted.py)."""

    def __init__(self, root: Path):
        self.roots = allowed_roots(root)

    def file(self, path: Path) -> Path:
        return contained(path, self.roots)

    def json(self, path: Path) -> dict:
        return read_json(self.file(path))


def _config(folder: _Folder, path: Path, layout: str) -> Config:
    d = folder.json(path)
    try:
        return Config.from_hf_config(d) if layout == "hf" else Config.from_original_config(d)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _map_files(folder: _Folder, files: list[Path]) -> dict[str, SafetensorsFile]:
    out: dict[str, SafetensorsFile] = {}
    for p in files:
        f = SafetensorsFile(folder.file(p))
        for name in f.keys():
            if name in out:
                raise CheckpointError(f"{p}: duplicate tensor {show(name)} (also in {out[name].path})")
            out[name] = f
    return out


def _weight_map(folder: _Folder, index: Path) -> dict[str, str]:
    weight_map = folder.json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map object")
    for t, n in weight_map.items():
        check_name(n, f"{index}: tensor {show(t)}")
    return weight_map


# exists(), not is_file(): a config.json that is a FIFO or a folder is then named as such when it is read
def _is_hf(folder: _Folder, root: Path) -> bool:
    if not (root / "config.json").exists():
        return False
    if (root / "model.safetensors.index.json").exists():
        return True
    return bool(list(root.glob("model*.safetensors"))) and "model_type" in folder.json(root / "config.json")


def _is_original(root: Path) -> bool:
    return (root / "config.json").exists() and bool(list(root.glob("*.safetensors")))


def _looks_converted(root: Path) -> bool:
    return any((root / n).exists() for n in ("_CHECKPOINT_METADATA", "orbax.checkpoint", "state"))


def open_source(path: str | Path) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    folder = _Folder(root)
    note = ""
    if _is_hf(folder, root):
        layout, tdir = "hf", root
        if (root / "original").is_dir():
            note = f"{root} holds both layouts; using the Hugging Face top-level files"
    elif _is_original(root):
        layout, tdir = "original", root
    elif (root / "original").is_dir() and _is_original(root / "original"):
        layout, tdir = "original", root / "original"
        note = f"using the original/ layout in {tdir}"
    elif _looks_converted(root):
        raise CheckpointError(f"{root}: looks like a converted (Orbax) checkpoint, but its _CHECKPOINT_METADATA or "
                              f"state/_METADATA is missing or not a file: it is incomplete; convert again")  # fmt: skip
    else:
        raise CheckpointError(f"{root}: not a gpt-oss checkpoint folder (no config.json with *.safetensors, "
                              f"no original/ subfolder)")  # fmt: skip
    cfg = _config(folder, tdir / "config.json", layout)
    index = tdir / "model.safetensors.index.json"
    if layout == "hf" and index.exists():
        weight_map = _weight_map(folder, index)
        names = sorted(set(weight_map.values()))
        for n in names:
            if not (tdir / n).exists():
                raise CheckpointError(f"{index}: lists {show(n)}, which is missing")
        files = _map_files(folder, [tdir / n for n in names])
        for t, n in weight_map.items():
            if t not in files:
                raise CheckpointError(f"{tdir / n}: tensor {show(t)} listed in the index is not in the file")
            if files[t].path != tdir / n:
                raise CheckpointError(f"{index}: tensor {show(t)} is listed in {show(n)} but stored in "
                                      f"{files[t].path.name}")  # fmt: skip
    else:
        pattern = "model*.safetensors" if layout == "hf" else "*.safetensors"
        files = _map_files(folder, sorted(tdir.glob(pattern)))
    extra = {}
    gen = tdir / "generation_config.json"
    if gen.exists():
        extra["generation_config"] = folder.json(gen)
    src = Source(root=tdir, layout=layout, config=cfg, files=files, layout_note=note, extra_json=extra)
    if src.expert_storage == "dequantized":
        src.config = cfg.replace(expert_format="dequantized")
    return src
