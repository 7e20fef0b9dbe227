"""Adapters in Hugging Face PEFT's format for `GptOssForCausalLM`, and adapters applied to a loaded model.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's names and shapes, so
`PeftModel.from_pretrained(GptOssForCausalLM..., DIR)` loads it (tests check logits and gradients against
transformers + PEFT):
- q, k, v, o: `target_modules` ["q_proj", ...]:
  `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in) and `lora_B.weight` (out, r),
  PEFT's `nn.Linear` LoRA.
- router and experts: `target_parameters` ["mlp.router.weight", "mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"], as in OpenAI's gpt-oss fine-tuning cookbook: PEFT's `ParamWrapper`, which wraps
  the parameter (the experts' (E, in, out) stacks: one rank-r pair per expert). For E experts, `lora_A.weight`
  is (E*r, in) with expert e's A in rows e*r..e*r+r-1 and `lora_B.weight` (out, r*E) with expert e's B in
  columns j*E + e (PEFT reshapes B to (out, r, E)). Two parameters of one module are nested wrappers: the
  first of the module's parameters targeted (gate_up_proj) sits under `experts.base_layer.`, the last
  directly under `experts.`.

Our arrays (`lora.py`) are the same numbers up to a reshape: no conversion loses anything.
`apply_adapters(model, DIR)` folds the dense targets into the model's weights (exactly the merge training's
forward pass makes per layer, `lora.merge_dense`) and attaches the expert adapters beside the packed experts,
so `model(tokens)`, `generate` and the server run the adapted model while the experts stay packed.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import flax.nnx as nnx
import jax
import numpy as np

from .checkpoint.safetensors import CheckpointError, SafetensorsFile, save_file
from .config import Config
from .lora import (
    EXPERT_TARGETS,
    TARGETS,
    LoraConfig,
    LoraError,
    adapter_layout,
    adapter_shardings,
    merge_dense,
    target_of,
)
from .sharding import mesh_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
PARAMETERS = {
    "router": "mlp.router.weight",
    "mlp1": "mlp.experts.gate_up_proj",
    "mlp2": "mlp.experts.down_proj",
}
# PEFT options that change the math of an adapter; we read only plain LoRA
UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
}


def _module_of(t: str, targets) -> str:
    """The PEFT module path of target t inside a layer (the experts' wrappers nest: see the docstring)."""
    if t in MODULES:
        return f"self_attn.{MODULES[t]}"
    if t == "router":
        return "mlp.router"
    later = [u for u in EXPERT_TARGETS if u in targets and EXPERT_TARGETS.index(u) > EXPERT_TARGETS.index(t)]
    return "mlp.experts" + ".base_layer" * len(later)


def peft_names(cfg: Config, lcfg: LoraConfig) -> dict[str, tuple[str, int, str]]:
    """PEFT tensor name -> (our adapter name, repeat index, "a" | "b")."""
    p = len(cfg.layer_unit)
    out = {}
    for i in range(cfg.num_hidden_layers):
        for t in lcfg.targets:
            ours = f"blocks.{i % p}.{TARGETS[t][0]}.{t}_lora"
            mod = f"{PREFIX}.{i}.{_module_of(t, lcfg.targets)}"
            out[f"{mod}.lora_A.weight"] = (f"{ours}_a", i // p, "a")
            out[f"{mod}.lora_B.weight"] = (f"{ours}_b", i // p, "b")
    return out


def _to_peft(arr: np.ndarray, expert: bool, which: str) -> np.ndarray:
    if not expert:
        return arr
    E, d0, d1 = arr.shape
    if which == "a":  # (E, r, in) -> (E*r, in)
        return arr.reshape(E * d0, d1)
    return arr.transpose(1, 2, 0).reshape(d0, d1 * E)  # (E, out, r) -> (out, r*E), column j*E + e


def _from_peft(arr: np.ndarray, expert: bool, which: str, E: int) -> np.ndarray:
    if not expert:
        return arr
    if which == "a":
        return arr.reshape(E, arr.shape[0] // E, arr.shape[1])
    out, rE = arr.shape
    return arr.reshape(out, rE // E, E).transpose(2, 0, 1)


def peft_config(lcfg: LoraConfig, base: str | None = None) -> dict:
    mods = [MODULES[t] for t in lcfg.targets if t in MODULES]
    params = [PARAMETERS[t] for t in lcfg.targets if t in PARAMETERS]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lcfg.rank,
        "lora_alpha": lcfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": mods or None,
        "target_parameters": params or None,
        **UNSUPPORTED,
    }


def save_adapters(
    path: str | os.PathLike, adapters: dict, cfg: Config, lcfg: LoraConfig, *, base: str | None = None
) -> Path:
    """Writes DIR/adapter_model.safetensors (float32), then DIR/adapter_config.json, in PEFT's format. Each
    file is written under a temporary name and renamed, and the config (which makes the folder an adapter)
    comes last: an interrupted save never leaves a folder that looks complete."""
    path = Path(path)
    host = {n: np.asarray(jax.device_get(a), np.float32) for n, a in adapters.items()}
    tensors = {}
    for name, (ours, r, which) in peft_names(cfg, lcfg).items():
        tensors[name] = _to_peft(host[ours][r], target_of(ours) in EXPERT_TARGETS, which)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).unlink(missing_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    tmp = path / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(peft_config(lcfg, base), indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def _targets_of(conf: dict, where: Path) -> tuple[str, ...]:
    mods = conf.get("target_modules") or []
    if isinstance(mods, str):
        if mods != "all-linear":
            raise LoraError(
                f"{where}: target_modules {mods!r} (a pattern) is not supported; list the modules"
            )
        mods = list(MODULES.values())
    out = []
    for m in mods:
        t = next((k for k, v in MODULES.items() if m == v or m.endswith("." + v)), None)
        if t is None:
            raise LoraError(f"{where}: target module {m!r} is not one of {', '.join(MODULES.values())}")
        out.append(t)
    for prm in conf.get("target_parameters") or []:
        t = next((k for k, v in PARAMETERS.items() if prm == v or prm.endswith(v.split(".", 1)[1])), None)
        if t is None:
            raise LoraError(
                f"{where}: target parameter {prm!r} is not one of {', '.join(PARAMETERS.values())}"
            )
        out.append(t)
    if not out:
        raise LoraError(f"{where}: no target_modules or target_parameters")
    return tuple(dict.fromkeys(out))


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """DIR/adapter_config.json -> LoraConfig; one-line LoraError for anything we would not apply exactly."""
    where = Path(path) / CONFIG_FILE
    try:
        conf = json.loads(where.read_text())
    except FileNotFoundError:
        raise LoraError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter folder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{where}: cannot read ({e})") from None
    got = conf.get("peft_type") if isinstance(conf, dict) else conf
    if got != "LORA":
        raise LoraError(f"{where}: peft_type must be 'LORA', got {got!r}")
    for key in UNSUPPORTED:
        if conf.get(key):  # every plain value is falsy (False, None, {})
            raise LoraError(f"{where}: {key}={conf[key]!r} is not supported (plain LoRA only)")
    if conf.get("bias", "none") != "none":
        raise LoraError(f"{where}: bias={conf['bias']!r} is not supported (plain LoRA only)")
    try:
        return LoraConfig(rank=conf.get("r"), alpha=conf.get("lora_alpha"), targets=_targets_of(conf, where))
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from None


def load_adapters(path: str | os.PathLike, cfg: Config) -> tuple[dict[str, np.ndarray], LoraConfig]:
    """A PEFT adapter folder -> (our adapter arrays on the host, float32; LoraConfig). Tensors must match
    `cfg` (names, shapes); a target's layers missing from the file get zeros (adapters trained on some layers
    only, as the cookbook's "7.mlp.experts..." targets). Errors are one line naming the file and tensor."""
    path = Path(path)
    lcfg = read_adapter_config(path)
    layout = adapter_layout(cfg, lcfg)
    out = {n: np.zeros(s, np.float32) for n, s in layout.items()}
    names = peft_names(cfg, lcfg)
    try:
        f = SafetensorsFile(path / WEIGHTS_FILE)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    found = set()
    for key in f.keys():
        # a name as saved by PEFT (no adapter name) or as held in memory ("...lora_A.default.weight")
        name = key.replace(".default.weight", ".weight")
        if name not in names:
            raise LoraError(
                f"{f.path}: unexpected tensor {key} (not an adapter of this model's config and {CONFIG_FILE})"
            )
        ours, r, which = names[name]
        expert = target_of(ours) in EXPERT_TARGETS
        shape = layout[ours][1:]
        want = _to_peft(np.zeros(shape, np.float32), expert, which).shape
        if f.shape(key) != want:
            raise LoraError(
                f"{f.path}: tensor {key} has shape {f.shape(key)}, expected {want} for r={lcfg.rank} "
                f"and this model"
            )
        out[ours][r] = _from_peft(np.asarray(f.get(key), np.float32), expert, which, cfg.num_experts)
        found.add(ours)
    missing = [t for t in lcfg.targets if t not in {target_of(n) for n in found}]
    if missing:
        raise LoraError(f"{f.path}: no tensors for target {missing[0]!r} although {CONFIG_FILE} names it")
    f.close()
    return out, lcfg


def apply_adapters(model, adapters, lcfg: LoraConfig | None = None):
    """Applies adapters to `model` in place and returns it: dense targets merged into the weights exactly as
    `lora.Adapters` merges them per layer, expert adapters attached beside the (still packed) experts.
    `adapters`: a PEFT folder, or our arrays with their `lcfg`."""
    cfg = model.cfg
    if not isinstance(adapters, dict):
        adapters, lcfg = load_adapters(adapters, cfg)
    if lcfg is None:
        raise LoraError("apply_adapters: give the LoraConfig of the adapter arrays")
    mesh = mesh_of(model)
    shapes = {n: tuple(np.shape(a)) for n, a in adapters.items()}
    shard = adapter_shardings(cfg, shapes, mesh) if mesh is not None else {}
    put = {n: jax.device_put(np.asarray(a, np.float32), shard.get(n)) for n, a in adapters.items()}
    for t in lcfg.targets:
        group, leaf = TARGETS[t]
        for j, block in enumerate(model.blocks):
            mod = getattr(block, group)
            a, b = put[f"blocks.{j}.{group}.{t}_lora_a"], put[f"blocks.{j}.{group}.{t}_lora_b"]
            if t in EXPERT_TARGETS:
                setattr(mod, f"{t}_lora_a", nnx.Param(a))
                setattr(mod, f"{t}_lora_b", nnx.Param(_scaled(b, lcfg.scale)))
            else:
                w = getattr(mod, leaf)
                w.set_value(_merge_stacked(w[...], a, b, lcfg.scale))
    return model


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _merge_stacked(w, a, b, scale):
    return jax.vmap(merge_dense, in_axes=(0, 0, 0, None))(w, a, b, scale)


@partial(jax.jit, static_argnums=1)
def _scaled(b, scale):
    return b * scale  # the same float32 product as `lora.merge_layer`, so the same bits
