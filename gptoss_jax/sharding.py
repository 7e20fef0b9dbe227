"""Sharding in one place: logical axes, one rule table onto a (data, expert, model) mesh, expert parallelism.

Implemented:
- `parse_mesh` / `make_mesh`: "data=1,expert=4,model=2" -> a `jax.sharding.Mesh` with Auto axes (GSPMD
  propagates shardings from the parameters and the few constraints below).
- `as_model_mesh`: any user mesh (Explicit axes, JAX's default, or Auto) -> the Auto view the model runs on.
- `RULES`: logical axis -> mesh axis. The logical axes of every parameter are declared with it in
  `weights.TABLE`.
  `param_sharding(name, shape, mesh, cfg)` is where `loading.load` puts each parameter; `logical_spec` raises a ValueError
  when two logical axes of one array map onto the same mesh axis.
- Replication fallback: a dimension whose size does not divide by its mesh axis size is replicated. For
  parameters the choice is made once per logical axis from the config (`logical_sizes`), so all arrays that
  carry an axis agree: mlp1's 2F rows and mlp2's F/32 groups split at the same MXFP4 group boundary.
  Before that, `param_rules` moves the experts onto (expert, model) when their width cannot split over
  model but their number can (the real models' width is 90 groups: model=4 or 8 does not divide it).
- Activation constraints at block boundaries (`constrain`), the KV cache's layout (`cache_sharding`).
- Expert parallelism (`expert_parallel`, wrapping the model's expert function): inside `shard_map`, each
  device runs only its local experts
  (and, with `model` > 1, its slice of every expert's width) for the tokens routed to them; one psum over
  (expert, model) combines. See docs/sharding.md for why psum rather than an all-to-all dispatch.
- `map_attention`: runs an attention kernel per (batch, kv-head) shard (custom kernels cannot be
  partitioned by XLA).
- Multi-host: `maybe_initialize_distributed`, `to_host` (process_allgather when needed), and the model's
  mesh entered around calls (`with_model_mesh`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import MXFP4_BLOCK, Config
from .weights import LAYER_AXIS, axes_of, param_specs

MESH_AXES = ("data", "expert", "model")

# Logical axis -> mesh axis (or None: replicated). Parameters, cache and activations share one table.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "model",  # embedding and unembedding rows; logits come out vocab-sharded
    "embed": None,  # the residual stream D stays whole on every device
    "kv_heads": "model",  # attention is tensor parallel over kv heads (q heads follow their kv head)
    "q_per_kv": None,
    "head_dim": None,
    "router": None,  # the router is tiny; every device routes every token itself
    "expert": "expert",  # expert parallelism
    "expert_ffw": "model",  # each expert's width F (in MXFP4 groups of 32) is tensor parallel
    "embed_groups": None,  # mlp1's D/32 input groups
    "group_bytes": None,  # the 16 bytes of one packed group
    LAYER_AXIS: None,  # stacked layers: every device holds its share of every layer
    # activations and KV cache
    "batch": "data",
    "seq": None,
    "cache_seq": None,
}

# Logical axes of the KV cache arrays (see cache.KVCache): per-layer k/v stacked like the parameters.
CACHE_KV_AXES = (LAYER_AXIS, "batch", "cache_seq", "kv_heads", "head_dim")
CACHE_POS_AXES = ("batch", "cache_seq")
CACHE_ROW_AXES = ("batch",)


# ------------------------------------------------------------------------------------------------- mesh
def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=1,expert=4,model=2" -> {"data": 1, "expert": 4, "model": 2}; axes left out are 1."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a non-empty string like 'expert=4,model=2', got {spec!r}")
    out = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: bad entry {part.strip()!r}; use axis=size with axes "
                             f"{', '.join(MESH_AXES)}")  # fmt: skip
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(
                f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {value.strip()!r}"
            )
        out[name] = size
    return out


def check_mesh_shape(shape: Mapping[str, int]) -> dict[str, int]:
    """A {axis: size} mapping -> all three axes with sizes; ValueError on unknown axes or bad sizes."""
    bad = sorted(set(shape) - set(MESH_AXES))
    if bad:
        raise ValueError(f"mesh: unknown axis {bad[0]!r}; axes are {', '.join(MESH_AXES)}")
    out = dict.fromkeys(MESH_AXES, 1)
    for k, v in shape.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"mesh: size of {k!r} must be a positive integer, got {v!r}")
        out[k] = int(v)
    return out


def make_mesh(spec: str | Mapping[str, int] | None, devices: Sequence | None = None) -> Mesh | None:
    """A (data, expert, model) mesh over `devices` (default: all devices of all processes); None -> None.

    The product of the sizes must equal the number of devices. `model` is the innermost axis, so on a
    multi-host cluster its collectives stay within a host (or a TPU slice's fastest links) and `data`
    spans hosts.
    """
    if spec is None:
        return None
    shape = parse_mesh(spec) if isinstance(spec, str) else check_mesh_shape(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need != len(devices):
        desc = ",".join(f"{k}={v}" for k, v in shape.items())
        raise ValueError(f"mesh {desc} needs {need} devices, found {len(devices)}")
    sizes = tuple(shape[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from parameters and boundary constraints (Explicit axes would
    # demand an out_sharding on every einsum that contracts a sharded dimension).
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def as_model_mesh(mesh: Mesh | None) -> Mesh | None:
    """Any mesh a user passes -> the mesh the model runs on: the same devices and axis names, Auto axis types.

    JAX's own `jax.make_mesh` defaults to Explicit axes, under which every gather or contraction over a
    sharded dimension must name its output sharding; the model instead declares shardings at its
    boundaries (parameters, cache, block outputs) and lets XLA propagate them, so it runs Explicit and Auto
    meshes alike on an Auto view of the mesh. Axes must be named from (data, expert, model); ones left out
    count as size 1; an axis with another name is refused unless its size is 1. A mesh of one device is None;
    a string is a spec for `make_mesh`.
    """
    if mesh is None:
        return None
    if isinstance(mesh, str):  # "expert=4,model=2", as the CLI's --mesh
        mesh = make_mesh(mesh)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, a spec like 'expert=4,model=2' or None, got "
                         f"{type(mesh).__name__}")  # fmt: skip
    odd = [f"{n}={s}" for n, s in mesh.shape.items() if n not in MESH_AXES and s > 1]
    if odd:
        raise ValueError(f"mesh axis {odd[0]} is not one of {', '.join(MESH_AXES)}: name the mesh's axes "
                         f"data, expert and model (left-out axes count as size 1)")  # fmt: skip
    if mesh.size == 1:
        return None
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def current_mesh():
    """The mesh set by `jax.set_mesh` (abstract inside jit), or None when absent, of one device, or when
    every axis is already manual (inside our shard_map bodies, where code must run unsharded)."""
    m = jax.sharding.get_abstract_mesh()
    if m.empty or m.size == 1 or all(t == AxisType.Manual for t in m.axis_types):
        return None
    return m


# ------------------------------------------------------------------------------------------ rule table
def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def check_rules(rules: Mapping[str, object]) -> None:
    for logical, rule in rules.items():
        for ax in _mesh_axes(rule):
            if ax not in MESH_AXES:
                raise ValueError(
                    f"sharding rule {logical!r} -> {ax!r}: not a mesh axis ({', '.join(MESH_AXES)})"
                )


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                 rules: Mapping[str, object] | None = None, sizes: Mapping[str, int] | None = None) -> P:  # fmt: skip
    """Logical axes of one array -> PartitionSpec on a mesh of `mesh_shape`.

    ValueError when two logical axes of the array map onto one mesh axis (checked on the rules, whatever
    the mesh sizes, so a collision never hides behind a size-1 axis). A dimension is sharded only if its
    logical size (`sizes[axis]`, default the dimension itself) and the dimension both divide by the mesh
    axes' size; otherwise it is replicated.
    """
    rules = RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: dict[str, str] = {}
    spec = []
    for ax, dim in zip(axes, shape, strict=True):
        if ax is None:
            spec.append(None)
            continue
        if ax not in rules:
            raise ValueError(f"no sharding rule for logical axis {ax!r}")
        mesh_axes = _mesh_axes(rules[ax])
        for m in mesh_axes:
            if m in used:
                raise ValueError(f"sharding collision: logical axes {used[m]!r} and {ax!r} of one array "
                                 f"both map to mesh axis {m!r}")  # fmt: skip
            used[m] = ax
        live = tuple(m for m in mesh_axes if mesh_shape.get(m, 1) > 1)
        n = math.prod(mesh_shape[m] for m in live)
        size = dim if sizes is None else sizes.get(ax, dim)
        if not live or size % n or dim % n:
            spec.append(None)
        else:
            spec.append(live[0] if len(live) == 1 else live)
    return P(*spec)


def logical_sizes(cfg: Config) -> dict[str, int]:
    """The size that decides, once per logical axis, whether parameters are split along it."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return {"vocab": cfg.vocab_size, "embed": D, "kv_heads": cfg.num_key_value_heads, "q_per_kv": cfg.q_per_kv,
            "head_dim": cfg.head_dim, "router": cfg.num_experts, "expert": cfg.num_experts,
            # experts split their width at MXFP4 group boundaries: mlp1 rows 2F, mlp2 groups F/32 agree
            "expert_ffw": F // MXFP4_BLOCK, "embed_groups": D // MXFP4_BLOCK, "group_bytes": 16}  # fmt: skip


def param_rules(
    cfg: Config, mesh_shape: Mapping[str, int], rules: Mapping[str, object] | None = None
) -> dict:
    """The rule table for parameters of `cfg` on a mesh of `mesh_shape`.

    One substitution, decided once per config and mesh: when the experts' width cannot split over its
    mesh axes (20b/120b have F/32 = 90 MXFP4 groups, which model=4 or 8 does not divide) but the number
    of experts can also take those axes, the experts spread over both (`expert` -> (expert, model)) and
    each keeps its whole width. Otherwise 120b on model=8 would hold every expert on every device.
    """
    rules = dict(RULES if rules is None else rules)
    sizes = logical_sizes(cfg)
    e_axes, f_axes = _mesh_axes(rules.get("expert")), _mesh_axes(rules.get("expert_ffw"))
    f_live = tuple(m for m in f_axes if mesh_shape.get(m, 1) > 1 and m not in e_axes)
    n_f = math.prod(mesh_shape[m] for m in f_live)
    n_e = math.prod(mesh_shape.get(m, 1) for m in e_axes)
    if f_live and sizes["expert_ffw"] % n_f and sizes["expert"] % (n_e * n_f) == 0:
        rules["expert"] = e_axes + f_live
        rules["expert_ffw"] = None
    return rules


def param_spec(name: str, shape: Sequence[int], mesh_shape: Mapping[str, int], cfg: Config,
               rules: Mapping[str, object] | None = None) -> P:  # fmt: skip
    rules = param_rules(cfg, mesh_shape, rules)
    return logical_spec(axes_of(name, len(shape)), shape, mesh_shape, rules, logical_sizes(cfg))


def param_sharding(name: str, shape: Sequence[int], mesh: Mesh, cfg: Config,
                   rules: Mapping[str, object] | None = None) -> NamedSharding:  # fmt: skip
    """The NamedSharding parameter `name` gets on `mesh` (where `loading.load` puts it)."""
    return NamedSharding(mesh, param_spec(name, shape, dict(mesh.shape), cfg, rules))


def param_shardings(cfg: Config, mesh: Mesh) -> dict[str, NamedSharding]:
    """Every parameter of `cfg` -> its NamedSharding (from the declarations: nothing allocated)."""
    return {n: param_sharding(n, s.shape, mesh, cfg) for n, s in param_specs(cfg).items()}


def shard_shape(shape: Sequence[int], spec: P, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """The shape one device holds."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        out.append(dim // math.prod(mesh_shape.get(m, 1) for m in _mesh_axes(entry)))
    return tuple(out)


# ------------------------------------------------------------------------------ activations and cache
def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes under the current mesh; identity without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_spec(axes, x.shape, dict(mesh.shape)))
    )


def cache_sharding(axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding | None:
    """Where a new cache array of logical `axes` goes under the mesh set by `jax.set_mesh` (None: default)."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return NamedSharding(mesh, logical_spec(axes, shape, dict(mesh.shape)))


# ------------------------------------------------------------------------------------ expert parallelism
def expert_parallel(local_fn, x, idx, w, p: dict, cfg: Config):
    """Runs `local_fn(x, idx, w, p)` (the experts of one layer) with each device computing only its own
    experts. x (T,D), idx/w (T,X), p the layer's expert arrays by leaf name -> (T,D).

    Inside shard_map each device holds E/e experts (and, when `expert_ffw` is split, F/m of each one's
    width). Selections are shifted by the local expert offset; `local_fn` skips those outside [0, E/e), so
    no device computes a remote expert, and nothing is dense over all experts. The partial outputs are
    summed over the expert and model axes with one psum in float32 (the reference combines the top-k outputs
    in float32). Tokens stay split over `data` when their count divides. The model passes its own local
    function in: parallelism wraps the math, the math does not know about it.
    """
    mesh = current_mesh()
    mshape = dict(mesh.shape)
    specs = {n: param_spec(n, a.shape, mshape, cfg) for n, a in p.items()}
    e_axes = _mesh_axes(specs["mlp1_bias"][0])
    f_axes = _mesh_axes(specs["mlp1_bias"][1])
    tok = logical_spec(("batch", None), x.shape, mshape)
    tok_x = logical_spec(("batch", None), idx.shape, mshape)
    dtype = x.dtype

    def local(x, idx, w, p):
        p = dict(p)
        if e_axes:
            n_local = p["mlp1_bias"].shape[0]
            idx = idx - jax.lax.axis_index(e_axes) * n_local  # other devices' experts fall outside [0, n_local)
        if f_axes:
            # every width slice yields a partial sum; the output bias must be added by one of them only
            first = jax.lax.axis_index(f_axes) == 0
            p["mlp2_bias"] = jnp.where(first, p["mlp2_bias"], jnp.zeros_like(p["mlp2_bias"]))
        y = local_fn(x, idx, w, p)
        if e_axes + f_axes:
            y = jax.lax.psum(y.astype(jnp.float32), e_axes + f_axes).astype(dtype)
        return y

    # check_vma off: the local expert loops carry arrays whose varying-axes type changes inside the loop
    # (their values depend on device-local weights); the psum above is what makes the output replicated.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok_x, tok_x, specs), out_specs=tok, check_vma=False)
    return fn(x, idx, w, p)


def map_attention(fn, q, k, v, sinks, q_pos, k_pos):
    """Runs `fn(q, k, v, sinks, q_pos, k_pos)` per (batch, kv-head) shard: attention is independent across
    both, and a custom kernel (Pallas/Mosaic) is opaque to XLA's partitioner. Identity without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return fn(q, k, v, sinks, q_pos, k_pos)
    ms = dict(mesh.shape)
    bq, bk = logical_spec(("batch",), q.shape[:1], ms)[0], logical_spec(("batch",), k.shape[:1], ms)[0]
    kv = logical_spec(("kv_heads",), k.shape[2:3], ms)[0]
    if bq != bk:  # the batch dim of queries and keys must split alike
        bq = bk = None
    specs = (P(bq, None, kv, None, None), P(bk, None, kv, None), P(bk, None, kv, None), P(kv, None),
             P(bq, None), P(bk, None))  # fmt: skip
    fn = jax.shard_map(
        fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False
    )  # kernels carry no vma types
    return fn(q, k, v, sinks, q_pos, k_pos)


# ---------------------------------------------------------------------------------------- model's mesh
def mesh_of(model) -> Mesh | None:
    """The mesh the model's parameters live on (from its embedding), or None for one device."""
    try:
        sh = model.embedding[...].sharding
    except AttributeError:
        return None
    if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
        return sh.mesh
    return None


def with_model_mesh(fn):
    """Decorator for `fn(model, ...)`: runs it under `jax.set_mesh(mesh_of(model))`, so the constraints and
    shard_maps inside see the mesh (and jit caches sharded and unsharded traces apart)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kw):
        mesh = mesh_of(model)
        if mesh is None:
            return fn(model, *args, **kw)
        with jax.set_mesh(mesh):
            return fn(model, *args, **kw)

    return wrapper


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array -> numpy on this process, gathering other processes' shards."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------------------------- multi-host
_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit (with JAX_NUM_PROCESSES and JAX_PROCESS_ID)
    "SLURM_JOB_ID",  # Slurm (jax reads SLURM_NTASKS / SLURM_PROCID itself)
    "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
    "TPU_WORKER_HOSTNAMES",  # TPU VMs on GKE
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
)


def _tpu_pod_worker() -> bool:
    # A Cloud TPU VM host of a multi-host slice: jax's own cluster detection answers (it asks the metadata
    # server only on a TPU VM). Private API, so any failure means "not detected".
    try:
        from jax._src.clusters import cloud_tpu_cluster

        return (
            bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
            and cloud_tpu_cluster.GceTpuCluster.is_env_present()
        )
    except Exception:  # noqa: BLE001 - detection is best effort
        return False


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when this process is one of several (multi-host driver scripts).

    Initializes when JAX_COORDINATOR_ADDRESS is set (then JAX_NUM_PROCESSES and JAX_PROCESS_ID give the
    rest, or jax's cluster detection does), or under Slurm, Open MPI, or a Cloud TPU pod / GKE TPU job
    (jax detects coordinator, process count and id). Otherwise a no-op. Returns True when the process is
    part of an initialized distributed system. Must run before anything touches a device.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kw = {}
        for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if env.get(key):
                try:
                    kw[arg] = int(env[key])
                except ValueError:
                    raise ValueError(
                        f"environment variable {key} must be an integer, got {env[key]!r}"
                    ) from None
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], **kw)
        return True
    slurm_multi = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1
    if slurm_multi or any(k in env for k in _CLUSTER_ENV[2:]) or _tpu_pod_worker():
        jax.distributed.initialize()
        return True
    return False
