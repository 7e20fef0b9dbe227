"""`merge(BASE, ADAPTERS, OUT)`: a base model with its LoRA adapters folded in, written as a new checkpoint.

OUT is a Hugging Face layout folder in the released gpt-oss naming (`config.json`, `generation_config.json`
when the base has one, `model.safetensors` or shards with `model.safetensors.index.json`), read by our loader
and by transformers' `GptOssForCausalLM`. The base is loaded in float32 by `loading.load` (any layout, or a
converted checkpoint) and `adapters.apply_adapters` merges the dense targets (q, k, v, o, router) into it; each
expert gets W_e + scale * B_e A_e in float32 here. The experts are then written either
- re-quantized to MXFP4 ("mxfp4", the released `*_blocks` / `*_scales`; the default): the relative RMS error
  of each re-quantized tensor against its float32 merged value is reported (`merge_report.json`); or
- dequantized ("dequantized"): transformers' dense `gate_up_proj` (E, D, 2F) and `down_proj` (E, F, D), no
  `quantization_config`. Our loader reads them with `expert_format="dequantized"`.

Tensors are written in `dtype` (bfloat16 as released, or float32 to keep the merged weights unrounded).
Everything goes to a temporary folder beside OUT, renamed to OUT at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import mxfp4, weights
from ..adapters import apply_adapters, load_adapters
from ..checkpoint import keys
from ..checkpoint.safetensors import save_file
from ..hub import read_config, resolve_checkpoint
from ..loading import load
from ..model import model_params

EXPERTS = ("mxfp4", "dequantized")
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size
REPORT = "merge_report.json"


class MergeError(ValueError):
    """Bad input to `merge` (one line naming the argument or file)."""


@dataclass
class MergeReport:
    out: Path
    experts: str
    errors: dict[str, float] = field(default_factory=dict)  # re-quantized tensor -> relative RMS error

    def summary(self) -> str:
        if self.experts == "dequantized":
            return f"merged checkpoint in {self.out}; experts dequantized (no re-quantization error)"
        if not self.errors:
            return f"merged checkpoint in {self.out}; no expert adapters, experts copied as they were"
        e = list(self.errors.values())
        return (f"merged checkpoint in {self.out}; {len(e)} expert tensors re-quantized to MXFP4, "
                f"relative RMS "
                f"error max {max(e):.3e}, mean {float(np.mean(e)):.3e}")  # fmt: skip

    def to_json(self) -> dict:
        e = list(self.errors.values())
        stats = {"max": max(e), "mean": float(np.mean(e))} if e else {"max": None, "mean": None}
        return {"experts": self.experts, "metric": "||Q(W) - W|| / ||W|| per tensor, W the float32 merged "
                "weight", **stats, "tensors": self.errors}  # fmt: skip


def relative_rms_error(q: np.ndarray, w: np.ndarray) -> float:
    w = np.asarray(w, np.float64)
    return float(np.linalg.norm(np.asarray(q, np.float64) - w) / max(np.linalg.norm(w), 1e-30))


def _inverse(rule: keys.Rule, arr: np.ndarray, cache: dict) -> np.ndarray:
    """Our layout -> the released tensor: the rule's transform (a reshape/transpose) inverted on indices."""
    if rule.transform is keys.identity:
        return arr
    key = (rule.target.split(".", 2)[-1], rule.shapes[0])
    if key not in cache:
        n = int(np.prod(rule.shapes[0]))
        cache[key] = np.asarray(rule.transform(np.arange(n).reshape(rule.shapes[0]))).reshape(-1)
    out = np.empty(int(np.prod(rule.shapes[0])), arr.dtype)
    out[cache[key]] = arr.reshape(-1)
    return out.reshape(rule.shapes[0])


class _ShardWriter:
    """Tensors into safetensors files of about `cap` bytes; `finish` names them and writes the index."""

    def __init__(self, folder: Path, cap: int):
        self.folder, self.cap = folder, cap
        self.pending: dict[str, np.ndarray] = {}
        self.size, self.total, self.files, self.weight_map = 0, 0, [], {}

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.pending and self.size + arr.nbytes > self.cap:
            self._flush()
        self.pending[name] = np.ascontiguousarray(arr)
        self.size += arr.nbytes

    def _flush(self) -> None:
        tmp = f".shard-{len(self.files)}.safetensors"
        save_file(self.pending, self.folder / tmp, metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.total += self.size
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        for j, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            self.weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _expert_weight(params: dict, name: str, r: int) -> np.ndarray:
    """Layer slot r of our `...mlp.mlp1` (name without suffix) as float32 (E, out, in), from either format."""
    if f"{name}_weight" in params:
        return np.asarray(params[f"{name}_weight"][r], np.float32)
    return mxfp4.dequantize_np(
        np.asarray(params[f"{name}_blocks"][r]), np.asarray(params[f"{name}_scales"][r])
    )


def _check_inputs(base, adapters, out: Path, experts: str, dtype: str) -> None:
    if experts not in EXPERTS:
        raise MergeError(f"experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise MergeError(f"{out}: already exists (merge writes a new folder)")
    if not Path(adapters).is_dir():
        raise MergeError(f"{adapters}: no such adapters folder")
    load_adapters(adapters, read_config(base))  # wrong model or damaged adapters: fail before loading BASE


def merge(base: str | os.PathLike, adapters: str | os.PathLike, out: str | os.PathLike, *,
          experts: str = "mxfp4", dtype: str = "bfloat16", quiet: bool = False,
          shard_bytes: int = SHARD_BYTES) -> MergeReport:  # fmt: skip
    """Writes BASE with the PEFT adapters of ADAPTERS merged to OUT (a new folder); see the module docstring.
    Bad input is a one-line ValueError (MergeError, LoraError, CheckpointError) before anything is written."""
    out = Path(out).expanduser()
    _check_inputs(base, adapters, out, experts, dtype)
    model = load(base, dtype="float32", quiet=quiet)
    arrays, lcfg = load_adapters(adapters, model.cfg)
    apply_adapters(model, arrays, lcfg)
    cfg, params = model.cfg, model_params(model)
    base_dir = resolve_checkpoint(base, quiet=True)
    report = MergeReport(out, experts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write(tmp, cfg, params, lcfg, experts, DTYPES[dtype], shard_bytes, report)
        hf = cfg.to_hf_config()
        if experts == "dequantized":
            del hf["quantization_config"]
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for gen in (base_dir / "generation_config.json", base_dir / "original" / "generation_config.json"):
            if gen.is_file():
                shutil.copyfile(gen, tmp / "generation_config.json")
                break
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(report.summary(), file=sys.stderr)
    return report


def _write(folder: Path, cfg, params: dict, lcfg, experts: str, dtype, shard_bytes: int, report) -> None:
    host: dict[str, np.ndarray] = {}

    def param(target: str):
        name, r = weights.storage_slot(target, cfg)
        if name not in host:
            host[name] = np.asarray(params[name])
        return host[name] if r is None else host[name][r]

    writer, cache = _ShardWriter(folder, shard_bytes), {}
    for rule in keys.rules(cfg, "hf", "mxfp4"):
        if rule.kind != "uint8":
            writer.add(rule.sources[0], _inverse(rule, np.asarray(param(rule.target)), cache).astype(dtype))
            continue
        if rule.target.endswith("_scales"):
            continue  # written with its blocks
        base = rule.target[: -len("_blocks")]  # layers.{i}.mlp.mlp1
        name, r = weights.storage_slot(base, cfg)
        t = base.rsplit(".", 1)[-1]
        w = _expert_weight(params, name, r)
        if t in lcfg.targets:
            a = np.asarray(params[f"{name}_lora_a"][r], np.float32)
            b = np.asarray(params[f"{name}_lora_b"][r], np.float32)  # apply_adapters scaled it
            w = w + np.matmul(b, a)
        src = rule.sources[0][: -len("_blocks")]  # model.layers.{i}.mlp.experts.gate_up_proj
        if experts == "dequantized":
            writer.add(src, w.transpose(0, 2, 1).astype(dtype))
            continue
        if t in lcfg.targets or f"{name}_blocks" not in params:
            blocks, scales = (np.stack(x) for x in zip(*map(mxfp4.quantize_np, w)))  # one expert at a time
            if t in lcfg.targets:
                report.errors[src] = relative_rms_error(mxfp4.dequantize_np(blocks, scales), w)
        else:  # untouched packed experts are copied as they are
            blocks, scales = np.asarray(params[f"{name}_blocks"][r]), np.asarray(params[f"{name}_scales"][r])
        writer.add(f"{src}_blocks", blocks)
        writer.add(f"{src}_scales", scales)
    writer.finish()
