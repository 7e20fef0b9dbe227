"""Memory planning: per-device bytes of weights and KV cache for a config on a mesh, nothing allocated.

`plan(cfg, mesh_shape, context, batch)` walks the weight declarations (`weights.param_layout`: shapes, dtypes
and logical axes) and the cache's (`cache.cache_layout`), and asks the sharding rule table
(`sharding.param_spec`, `sharding.logical_spec`) what each device holds of every array. So the figures follow the same rules `load(...,
mesh=)` and `generate` place arrays by, including the replication fallback (a dimension that does not divide
by its mesh axis is held whole on every device). No device is needed: any mesh shape can be planned on a
laptop. `gptoss-jax info` is `add_info_arguments` + `run_info`.

Not counted: activations (a prefill chunk's residual stream and attention scores, logits of the last
position), experts dequantized on the fly during a step, and XLA's workspace. With the Pallas kernels they
are small next to 120b's weights but not zero, which is why `--device-memory` reports the headroom left
rather than a bare yes/no (the plain-XLA attention keeps up to `kernels.attention.SCORES_BUDGET` float32 scores, 1 GiB,
per query block: see docs/sharding.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import weights
from .cache import cache_bytes, cache_layout
from .config import Config
from .engine.paged import MEMORY_FRACTION, cpu_budget, pool_plan, sliding_peak
from .hub import config_for
from .sharding import (
    MESH_AXES,
    check_mesh_shape,
    logical_spec,
    param_rules,
    param_spec,
    parse_mesh,
    shard_shape,
)

GiB = 1 << 30
GROUPS = ("embedding", "attention", "router", "experts", "norms")


def _group(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("embedding", "unembedding"):
        return "embedding"
    if leaf == "scale":
        return "norms"
    if leaf.startswith("gate_"):
        return "router"
    if leaf.startswith(("mlp1_", "mlp2_")):
        return "experts"
    return "attention"


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def plan(cfg: Config, mesh_shape: Mapping[str, int] | str, context: int, batch: int = 1,
         max_seqs: int | None = None, page_size: int = 16, kv_memory: int | None = None,
         memory_fraction: float | None = None, device_memory: int | None = None) -> dict:  # fmt: skip
    """Per-device memory of `cfg` on a mesh of `mesh_shape` ({"expert": 8} or "expert=4,model=2").

    Returns a dict of plain numbers (bytes per device unless named otherwise):
      weights {group: bytes} for embedding (+unembedding), attention, router, experts, norms;
      weights_total, kv_cache, total (= weights_total + kv_cache);
      weights_all_devices (sum over the devices: replicated parts counted once per device),
      weights_one_copy (what `weights.param_bytes(cfg)` gives), params (as `weights.param_count(cfg)`),
      kv_cache_one_copy (`cache.cache_bytes`), replicated_fallback (parameters left whole although their
      rule names a mesh axis larger than 1, because a size does not divide), and the inputs.
    With `max_seqs`: engine, the serving engine's KV pool and the tokens it holds (`engine_plan`).
    """
    shape = parse_mesh(mesh_shape) if isinstance(mesh_shape, str) else check_mesh_shape(mesh_shape)
    for what, v in (("context", context), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if context > cfg.context_length:
        raise ValueError(f"context {context} exceeds the model's context length {cfg.context_length}")
    n_dev = math.prod(shape.values())

    per_group = dict.fromkeys(GROUPS, 0)
    all_devices = 0
    fallback: list[str] = []
    for name, (shp, dtype, _) in weights.param_layout(cfg).items():
        ps = param_spec(name, shp, shape, cfg)
        local = _nbytes(shard_shape(shp, ps, shape), dtype)
        per_group[_group(name)] += local
        all_devices += local * n_dev
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in fallback and _falls_back(name, shp, ps, shape, cfg):
            fallback.append(leaf)
    kv = sum(_nbytes(shard_shape(shp, logical_spec(axes, shp, shape), shape), dt)
             for shp, dt, axes in cache_layout(cfg, batch, context).values())  # fmt: skip

    total_w = sum(per_group.values())
    return {
        "mesh": shape,
        "devices": n_dev,
        "context": int(context),
        "batch": int(batch),
        "dtype": cfg.dtype,
        "expert_format": cfg.expert_format,
        "weights": per_group,
        "weights_total": total_w,
        "kv_cache": kv,
        "total": total_w + kv,
        "weights_all_devices": all_devices,
        "weights_one_copy": weights.param_bytes(cfg),
        "params": weights.param_count(cfg),
        "kv_cache_one_copy": cache_bytes(cfg, batch, context),
        "replicated_fallback": fallback,
    } | ({} if max_seqs is None else {"engine": engine_plan(
        cfg, shape, context, max_seqs, page_size, kv_memory=kv_memory, memory_fraction=memory_fraction,
        device_memory=device_memory, weights_per_device=total_w)})


# [serving] The serving engine's KV memory: one pool of pages for full and sliding layers (`engine.paged`),
# sized by a budget per device; its pages split over data (each shard a lane with its own pages), heads over
# model.
def engine_plan(cfg: Config, shape: Mapping[str, int], context: int, max_seqs: int, page_size: int, *,
                kv_memory: int | None = None, memory_fraction: float | None = None,
                device_memory: int | None = None, weights_per_device: int = 0) -> dict:  # fmt: skip
    """The pool `Engine` allocates for this budget (`engine.paged.pool_plan`) and the tokens it holds.

    The budget per device: `kv_memory`; else `memory_fraction` (default the engine's) of `device_memory`
    minus the weights (the engine also subtracts its largest step's working memory, measured when it
    starts: not here); else the engine's CPU default (`paged.cpu_budget`). Adds: budget_per_device, budget_source, data_shards,
    max_seqs, context, sliding_pages (what one sequence holds at most on sliding layers), tokens_one_sequence
    (the longest sequence the pages of one data shard hold), tokens_all_sequences (the tokens its pages hold
    with max_seqs sequences of one data shard running, each also holding its sliding pages: context and
    prefix cache together)."""
    data = shape.get("data", 1)
    if kv_memory is not None:
        budget, source = int(kv_memory), "kv memory"
    elif device_memory is not None:
        f = MEMORY_FRACTION if memory_fraction is None else memory_fraction
        budget = int(f * max(0, device_memory - weights_per_device))
        source = f"memory fraction {f:g} of the device memory left after the weights"
    else:
        if memory_fraction is not None:
            raise ValueError("--memory-fraction needs --device-memory (the memory of one device)")
        budget = cpu_budget(cfg, seqs_per_lane=-(-max_seqs // data), max_context=context, page_size=page_size,
                            mesh_shape=shape)  # fmt: skip
        source = "the CPU default: 2 GiB, at most what every sequence at full context needs"
    e = pool_plan(cfg, page_size=page_size, kv_memory=budget, lanes=data, mesh_shape=shape)
    kinds = set(cfg.layer_unit)
    sliding = sliding_peak(cfg, page_size=page_size, chunk=cfg.prefill_chunk) if True in kinds else 0
    per_lane, slots = e["pages_per_lane"], -(-max_seqs // data)
    per_token = 1 if False in kinds else 0  # full pages per page_size tokens
    if per_token:
        one = max(0, per_lane - sliding) * page_size
        together = max(0, per_lane - slots * sliding) * page_size
    else:  # sliding layers only: a sequence holds its window, whatever its length
        one = together = context if per_lane >= sliding else 0
    return e | {"budget_per_device": budget, "budget_source": source, "data_shards": data,
                "max_seqs": max_seqs, "context": context, "sliding_pages": sliding,
                "tokens_one_sequence": min(one, context), "tokens_all_sequences": together}  # fmt: skip


def _falls_back(name, shape, spec, mesh_shape, cfg) -> bool:
    # the rule table puts an axis of this parameter on a mesh axis > 1, but the spec left it whole
    rules = param_rules(cfg, mesh_shape)
    for ax, entry in zip(weights.axes_of(name, len(shape)), tuple(spec) + (None,) * len(shape), strict=False):
        rule = rules.get(ax)
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        if entry is None and any(mesh_shape.get(m, 1) > 1 for m in mesh_axes):
            return True
    return False


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _gib(b: int) -> str:
    return f"{b / GiB:8.2f} GiB"


def format_plan(p: dict, *, name: str = "", device_memory_gib: float | None = None) -> str:
    """The plan as the table `gptoss-jax info` prints."""
    mesh = ",".join(f"{a}={p['mesh'][a]}" for a in MESH_AXES)
    experts = "packed MXFP4" if p["expert_format"] == "mxfp4" else f"dequantized {p['dtype']}"
    head = f"{name + ' ' if name else ''}on mesh {mesh} ({p['devices']} device{'s' * (p['devices'] > 1)})"
    lines = [
        head,
        (
            f"  {_count(p['params'])} parameters, {p['dtype']} weights, experts {experts}; "
            f"context {p['context']} x batch {p['batch']}"
        ),
        "per device:",
    ]
    labels = {"embedding": "embedding + unembedding", "attention": "attention", "router": "router",
              "experts": f"experts ({experts})", "norms": "norms"}  # fmt: skip
    for g in GROUPS:
        lines.append(f"  {labels[g]:<34}{_gib(p['weights'][g])}")
    lines.append(f"  {'weights':<34}{_gib(p['weights_total'])}")
    lines.append(f"  {'KV cache':<34}{_gib(p['kv_cache'])}")
    lines.append(f"  {'total':<34}{_gib(p['total'])}")
    lines.append(f"all devices: weights {p['weights_all_devices'] / GiB:.2f} GiB "
                 f"(one copy {p['weights_one_copy'] / GiB:.2f} GiB), "
                 f"KV cache one copy {p['kv_cache_one_copy'] / GiB:.2f} GiB")  # fmt: skip
    if "engine" in p:  # [serving]
        e = p["engine"]
        lines.append(f"serving engine: one page pool for full and sliding layers, pages of {e['page_size']} "
                     f"tokens, {e['max_seqs']} sequences, context {e['context']}")  # fmt: skip
        lines.append(f"  {'KV budget':<34}{_gib(e['budget_per_device'])}  ({e['budget_source']})")
        lines.append(f"  {'page pool':<34}{_gib(e['bytes_per_device'])}  ({e['pages_per_lane']} pages per "
                     f"data shard)")  # fmt: skip
        n, shards = -(-e["max_seqs"] // e["data_shards"]), e["data_shards"]
        lines.append(f"  holds per data shard {e['tokens_all_sequences']} tokens over {n} sequences (each "
                     f"with up to {e['sliding_pages']} sliding pages), one sequence up to "
                     f"{e['tokens_one_sequence']}; {shards} data shard{'s' * (shards > 1)}")  # fmt: skip
    if "adapters" in p:  # serving LoRA adapters beside the base (engine.adapters)
        a = p["adapters"]
        lines.append(f"LoRA adapter pool: {a['max_adapters']} slots + 1 zero slot, rank {a['rank']}, targets "
                     f"{','.join(a['targets'])} (float32, one device)")  # fmt: skip
        lines.append(f"  {'per resident adapter':<34}{_gib(a['bytes_per_adapter'])}")
        lines.append(f"  {'pool':<34}{_gib(a['bytes_total'])}")
        for name, r in a["resident"].items():
            lines.append(f"  {name}: rank {r['rank']}, {','.join(r['targets'])} (its own arrays "
                         f"{_gib(r['own_bytes'])})")  # fmt: skip
    if p["replicated_fallback"]:
        lines.append(
            "replicated (size does not divide its mesh axis): " + ", ".join(p["replicated_fallback"])
        )
    if device_memory_gib is not None:
        cap = device_memory_gib * GiB
        left = cap - held(p)
        verdict = (f"fits, {left / GiB:.2f} GiB left for activations and XLA workspace" if left > 0
                   else f"does NOT fit: {-left / GiB:.2f} GiB over")  # fmt: skip
        lines.append(f"device memory {device_memory_gib:g} GiB: {verdict}")
    return "\n".join(lines)


def adapter_plan(cfg: Config, args) -> dict | None:
    """The LoRA adapter pool `gptoss-jax serve --adapters NAME=DIR ...` would allocate (`engine.adapters`):
    every slot is pool-shaped (max_adapters x the pool's rank and targets, float32), whatever it holds."""
    from .adapters import read_adapter_config
    from .engine.adapters import DEFAULT_RANK, bytes_per_adapter, pool_targets
    from .lora import TARGETS, LoraError

    given = getattr(args, "adapters", None) or []
    if not given and getattr(args, "max_adapters", None) in (None, 0):
        return None
    resident = {}
    for v in given:
        name, sep, folder = v.partition("=")
        if not sep or "/" in name or Path(v).expanduser().exists():
            name, folder = Path(v).name, v
        try:
            lcfg = read_adapter_config(Path(folder).expanduser())
        except LoraError as e:
            raise ValueError(f"--adapters {v}: {e}") from None
        resident[name] = {"rank": lcfg.rank, "targets": list(lcfg.targets),
                          "own_bytes": bytes_per_adapter(cfg, lcfg.rank, lcfg.targets)}  # fmt: skip
    slots = args.max_adapters if args.max_adapters is not None else len(resident)
    rank = args.max_lora_rank or max((r["rank"] for r in resident.values()), default=DEFAULT_RANK)
    if slots < len(resident) or slots < 1 or rank < 1:
        raise ValueError(f"--max-adapters ({slots}) must be at least 1 and the --adapters count "
                         f"({len(resident)}); --max-lora-rank at least 1")  # fmt: skip
    union = sorted({t for r in resident.values() for t in r["targets"]})
    targets = args.lora_targets or union or tuple(TARGETS)
    try:
        targets = pool_targets(targets)
    except LoraError as e:
        raise ValueError(f"--lora-targets: {e}") from None
    for name, r in resident.items():
        if r["rank"] > rank or not set(r["targets"]) <= set(targets):
            raise ValueError(f"--adapters {name}: rank {r['rank']} / targets {','.join(r['targets'])} do not "
                             f"fit the pool (rank {rank}, targets {','.join(targets)})")  # fmt: skip
    per = bytes_per_adapter(cfg, rank, targets)
    return {"max_adapters": slots, "rank": rank, "targets": list(targets), "bytes_per_adapter": per,
            "bytes_total": per * (slots + 1), "resident": resident}  # fmt: skip


def held(p: dict) -> int:
    """Bytes one device holds under a plan: the weights and the engine's page pool when the plan has one
    (`--serve`: `generate`'s cache is then not allocated), else the weights and `generate`'s cache."""
    pool = p["adapters"]["bytes_total"] if "adapters" in p else 0
    return pool + (p["weights_total"] + p["engine"]["bytes_per_device"] if "engine" in p else p["total"])


# ------------------------------------------------------------------------------------------------- CLI
def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `gptoss-jax info`."""
    parser.add_argument("model", nargs="?", default=None,
                        help="preset (gpt-oss-20b, gpt-oss-120b, tiny), checkpoint folder (safetensors or "
                        "Orbax) or Hugging Face model id such as openai/gpt-oss-20b (only its config.json is "
                        "fetched)")  # fmt: skip
    parser.add_argument(
        "--model", dest="model_opt", default=None, metavar="MODEL", help="same as the positional"
    )
    parser.add_argument("--mesh", default="data=1,expert=1,model=1",
                        help="mesh to plan for, e.g. expert=4,model=2 (axes data, expert, model; default one device)")  # fmt: skip
    parser.add_argument("--context", type=int, default=None,
                        help="KV cache length in tokens (default: the model's full context)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--expert-format", choices=("mxfp4", "dequantized"), default=None,
                        help="experts packed MXFP4 (default for presets) or dequantized to --dtype")  # fmt: skip
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="non-expert weights and KV cache dtype (default bfloat16, as load() uses)")  # fmt: skip
    parser.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                        help="memory of one device in GiB: say whether the plan fits")  # fmt: skip
    parser.add_argument("--serve", action="store_true",
                        help="also plan the serving engine's KV pool: how many tokens its budget holds")
    parser.add_argument("--max-seqs", type=int, default=None,
                        help="serving engine: sequences at once (default 16; implies --serve)")
    parser.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                        help="serving engine: KV budget per device in GiB (default: --memory-fraction of "
                        "--device-memory, else the CPU default of 2 GiB)")  # fmt: skip
    parser.add_argument("--memory-fraction", type=float, default=None, metavar="F",
                        help="serving engine: share of --device-memory left after the weights (default 0.9; implies "
                        "--serve)")
    parser.add_argument("--page-size", type=int, default=16,
                        help="serving engine: tokens per page (default 16)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--adapters", action="append", metavar="[NAME=]DIR",
                        help="plan the serving engine's LoRA adapter pool for these PEFT folders "
                        "(repeatable)")
    parser.add_argument("--max-adapters", type=int, default=None, metavar="N",
                        help="adapter pool slots (default: the --adapters count)")
    parser.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                        help="the pool's rank (default: the largest of --adapters, else 16)")
    parser.add_argument("--lora-targets", default=None, metavar="T[,T...]",
                        help="the pool's targets (default: the union of --adapters', else all)")


def run_info(args: argparse.Namespace) -> int:
    """`gptoss-jax info`: prints the plan; 0 on success, 2 on bad arguments (message on stderr)."""
    try:
        if args.model and args.model_opt and args.model != args.model_opt:
            raise ValueError(f"two models given: {args.model!r} and --model {args.model_opt!r}")
        model = args.model or args.model_opt
        if not model:
            raise ValueError(
                "no model: give a preset (gpt-oss-20b, gpt-oss-120b, tiny) or a checkpoint folder"
            )
        cfg = config_for(model)
        kw = {}
        if args.expert_format:
            kw["expert_format"] = args.expert_format
        kw["dtype"] = args.dtype or "bfloat16"  # what `load` uses unless told otherwise, whatever is stored
        cfg = cfg.replace(**kw)
        context = cfg.context_length if args.context is None else args.context
        if args.device_memory is not None and not args.device_memory > 0:
            raise ValueError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
        serve = args.serve or any(getattr(args, n) is not None for n in ("max_seqs", "kv_memory",
                                                                             "memory_fraction"))
        for name in ("kv_memory", "memory_fraction"):
            v = getattr(args, name)
            if v is not None and not (v > 0 and (name == "kv_memory" or v <= 1)):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number"
                                 f"{' of GiB' if name == 'kv_memory' else ' <= 1'}, got {v}")  # fmt: skip
        p = plan(cfg, parse_mesh(args.mesh), context, args.batch, (args.max_seqs or 16) if serve else None,
                 args.page_size, kv_memory=None if args.kv_memory is None else int(args.kv_memory * GiB),
                 memory_fraction=args.memory_fraction,
                 device_memory=None if args.device_memory is None
                 else int(args.device_memory * GiB))  # fmt: skip
        pool = adapter_plan(cfg, args)
        if pool is not None:
            p["adapters"] = pool
    except (ValueError, OSError) as e:  # bad input or unreadable checkpoint (CheckpointError: a ValueError)
        print(f"gptoss-jax info: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        if args.device_memory is not None:
            p["device_memory"] = int(args.device_memory * GiB)
            p["fits"] = held(p) <= p["device_memory"]
        print(json.dumps(p, indent=2))
    else:
        name = Path(model).name if Path(model).exists() else model
        print(format_plan(p, name=name, device_memory_gib=args.device_memory))
    return 0
