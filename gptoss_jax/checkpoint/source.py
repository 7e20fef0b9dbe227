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

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config
from . import keys
from .safetensors import CheckpointError, SafetensorsFile


@dataclass
class Source:
    root: Path
    layout: str  # "hf" | "original"
    config: Config
    files: dict[str, SafetensorsFile]  # tensor name -> open file
    layout_note: str = ""
    extra_json: dict = field(default_factory=dict)  # generation_config.json etc., when present

    def available(self) -> dict[str, tuple[tuple[int, ...], str, str]]:
        from .safetensors import NAMES

        return {n: (f.shape(n), NAMES[f.dtype(n)], str(f.path)) for n, f in self.files.items()}

    def total_bytes(self) -> int:
        return sum(f.nbytes(n) for n, f in self.files.items())

    def rules(self, expert_format: str | None = None) -> list[keys.Rule]:
        r = keys.rules(self.config, self.layout, expert_format)
        keys.check_sources(r, self.available(), where=str(self.root), config=str(self.root / "config.json"))
        return r

    def read(self, rule: keys.Rule) -> np.ndarray:
        """The rule's target array in our layout (a view or a fresh array; float dtypes not yet cast)."""
        arrays = [self.files[s].get(s) for s in rule.sources]
        try:
            return rule.transform(*arrays)
        except ValueError as e:
            raise CheckpointError(f"{self.files[rule.sources[-1]].path}: tensor {rule.sources[-1]}: {e}") from None

    def iter_params(self, expert_format: str | None = None) -> Iterator[tuple[keys.Rule, np.ndarray]]:
        for r in self.rules(expert_format):
            yield r, self.read(r)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _config(path: Path, layout: str) -> Config:
    d = _read_json(path)
    try:
        return Config.from_hf_config(d) if layout == "hf" else Config.from_original_config(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _map_files(files: list[Path]) -> dict[str, SafetensorsFile]:
    out: dict[str, SafetensorsFile] = {}
    for p in files:
        f = SafetensorsFile(p)
        for name in f.keys():
            if name in out:
                raise CheckpointError(f"{p}: duplicate tensor {name} (also in {out[name].path})")
            out[name] = f
    return out


def _is_hf(root: Path) -> bool:
    if not (root / "config.json").is_file():
        return False
    if (root / "model.safetensors.index.json").is_file():
        return True
    return bool(list(root.glob("model*.safetensors"))) and "model_type" in _read_json(root / "config.json")


def _is_original(root: Path) -> bool:
    return (root / "config.json").is_file() and bool(list(root.glob("*.safetensors")))


def open_source(path: str | Path) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    note = ""
    if _is_hf(root):
        layout, tdir = "hf", root
        if (root / "original").is_dir():
            note = f"{root} holds both layouts; using the Hugging Face top-level files"
    elif _is_original(root):
        layout, tdir = "original", root
    elif (root / "original").is_dir() and _is_original(root / "original"):
        layout, tdir = "original", root / "original"
        note = f"using the original/ layout in {tdir}"
    else:
        raise CheckpointError(f"{root}: not a gpt-oss checkpoint folder (no config.json with *.safetensors, "
                              f"no original/ subfolder)")  # fmt: skip
    cfg = _config(tdir / "config.json", layout)
    index = tdir / "model.safetensors.index.json"
    if layout == "hf" and index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        for n in names:
            if not (tdir / n).is_file():
                raise CheckpointError(f"{index}: lists {n}, which is missing")
        files = _map_files([tdir / n for n in names])
        for t, n in weight_map.items():
            if t not in files:
                raise CheckpointError(f"{tdir / n}: tensor {t} listed in the index is not in the file")
            if files[t].path.name != n:
                raise CheckpointError(f"{index}: tensor {t} is listed in {n} but stored in {files[t].path.name}")
    else:
        pattern = "model*.safetensors" if layout == "hf" else "*.safetensors"
        files = _map_files(sorted(tdir.glob(pattern)))
    extra = {}
    gen = tdir / "generation_config.json"
    if gen.is_file():
        extra["generation_config"] = _read_json(gen)
    return Source(root=tdir, layout=layout, config=cfg, files=files, layout_note=note, extra_json=extra)
