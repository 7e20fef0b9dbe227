"""The training loop: optax, gradient accumulation, data parallelism, Orbax checkpoints that resume exactly.

`finetune(base, data, out, ...)` loads the base (experts packed unless `full=True`), renders and packs the
data (`training/data.py`), and runs `TrainConfig.steps` optimizer steps. Each step is one jitted call:
`grad_accum` micro-batches of `batch_size` rows scanned with their gradients summed, then the mean over the
step's trained tokens (so accumulating equals one big batch), global-norm clipping and AdamW with a warm-up
and cosine (or linear, constant) schedule. The batch is split over the mesh's `data` axis; the base stays
where `load(..., mesh=)` put it (experts over `expert` and `model`), expert adapters split with their experts.

OUT holds:
  adapter_config.json, adapter_model.safetensors   the adapters in PEFT's format (LoRA), when training ends
  checkpoints/                                     Orbax CheckpointManager: adapters (or weights), optimizer
                                                   state, step and the settings, every `save_every` steps
  loss.csv, loss.png                               the loss curve (step, loss, trained tokens, lr, ...)
A run started again with the same OUT resumes from its last checkpoint: the data order is a function of
(seed, step) (`data.Loader`), so the resumed run's adapters are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..adapters import save_adapters
from ..config import Config
from ..harmony import PromptSettings, resolve_date, write_prompt_settings
from ..loading import load
from ..lora import LoraConfig, adapter_shardings, init_adapters, trainable_specs
from ..model import model_params
from ..ops import F32
from ..sharding import as_model_mesh, current_mesh, mesh_of
from .data import Loader, Rows, pack, read_jsonl
from .loss import loss_sums

SCHEDULES = ("cosine", "linear", "constant")


class TrainError(ValueError):
    """A bad training setting or output folder (one line naming the argument or file)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 2e-4
    schedule: str = "cosine"  # after the warm-up: cosine or linear decay to 0, or constant
    warmup_steps: int = 0
    steps: int | None = None  # optimizer steps; default: `epochs` over the data
    epochs: float = 1.0
    batch_size: int = 4  # rows (of seq_len tokens) per micro-batch, over all devices
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 2048
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0  # adapter initialisation and data order
    save_every: int = 100  # checkpoint every so many steps (and at the end)
    pack: bool = True
    assistant_only: bool = True
    remat: bool = True
    full: bool = False  # full fine-tuning of every weight (experts must be dequantized)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "seq_len", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise TrainError(f"steps must be a positive integer, got {self.steps!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise TrainError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, n_rows: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n_rows / self.rows_per_step))


def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; the learning rate warms up linearly, then follows the schedule."""
    lr, w = tcfg.learning_rate, min(tcfg.warmup_steps, total_steps)
    decay = max(1, total_steps - w)
    after = {
        "cosine": optax.cosine_decay_schedule(lr, decay),
        "linear": optax.linear_schedule(lr, 0.0, decay),
        "constant": optax.constant_schedule(lr),
    }[tcfg.schedule]
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, w), after], [w]) if w else after
    parts = [optax.clip_by_global_norm(tcfg.max_grad_norm)] if tcfg.max_grad_norm else []
    parts.append(optax.adamw(sched, weight_decay=tcfg.weight_decay))
    return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------------ step
def split_params(params: dict, full: bool) -> tuple[dict, dict]:
    """(trainable, frozen) base weights: all floating-point ones for full fine-tuning, none for LoRA."""
    if not full:
        return {}, params
    train = {n: a for n, a in params.items() if jnp.issubdtype(a.dtype, jnp.floating)}
    return train, {n: a for n, a in params.items() if n not in train}


def make_step(cfg: Config, lcfg: LoraConfig | None, tcfg: TrainConfig, optimizer, sched):
    """The jitted optimizer step: (trainable, opt_state, frozen, batch (accum, B, L) arrays, step index) ->
    (trainable, opt_state, metrics). `trainable` is the adapters, or the weights when lcfg is None."""

    def sums(trainable, frozen, mb):
        if lcfg is None:
            return loss_sums(frozen | trainable, {}, mb, cfg, None, remat=tcfg.remat)
        return loss_sums(frozen, trainable, mb, cfg, lcfg, remat=tcfg.remat)

    grad = jax.value_and_grad(sums, has_aux=True)

    def step(trainable, opt_state, frozen, batch, step):
        def micro(carry, mb):
            g_acc, l_acc, n_acc = carry
            (loss, n), g = grad(trainable, frozen, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(F32), g_acc, g)
            return (g_acc, l_acc + loss, n_acc + n), None

        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, F32), trainable)
        (g, loss, n), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), F32), jnp.zeros((), F32)), batch)
        denom = jnp.maximum(n, 1.0)
        g = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, trainable)
        updates, opt_state = optimizer.update(g, opt_state, trainable)
        trainable, opt_state = keep_shardings((optax.apply_updates(trainable, updates), opt_state), g, cfg)
        metrics = {"loss": loss / denom, "tokens": n, "grad_norm": optax.tree.norm(g), "lr": sched(step)}
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def keep_shardings(tree, names_like: dict, cfg: Config):
    """Inside jit under a mesh: every dict of `tree` keyed like `names_like` (the adapters, Adam's moments)
    constrained to `trainable_specs`, so the step returns them as it got them (and does not compile again)."""
    mesh = current_mesh()
    if mesh is None:
        return tree
    specs = trainable_specs(cfg, {n: a.shape for n, a in names_like.items()}, mesh.shape)

    def fix(d):
        return {n: jax.lax.with_sharding_constraint(a, specs[n]) for n, a in d.items()}

    same = lambda x: isinstance(x, dict) and set(x) == set(specs)  # noqa: E731
    return jax.tree.map(lambda x: fix(x) if same(x) else x, tree, is_leaf=same)


def init_state(optimizer, trainable: dict, cfg: Config):
    """The optimizer state, its moments sharded like `trainable`."""
    return jax.jit(lambda t: keep_shardings(optimizer.init(t), t, cfg))(trainable)


@functools.lru_cache(maxsize=8)
def step_for(cfg: Config, lcfg: LoraConfig | None, tcfg: TrainConfig, total_steps: int):
    """(optimizer, jitted step) for these settings, kept: a second run in the same process (a notebook, a
    resumed run) reuses the compiled step."""
    optimizer, sched = make_optimizer(tcfg, total_steps)
    return optimizer, make_step(cfg, lcfg, tcfg, optimizer, sched)


def batch_arrays(rows: Rows, idx: np.ndarray, accum: int, mesh) -> dict[str, jax.Array]:
    """The rows of one step as (accum, B, L) device arrays; B split over `data` when it divides."""
    host = rows.batch(idx.reshape(accum, -1))
    if mesh is None:
        return {k: jax.device_put(v, _one_device()) for k, v in host.items()}
    d = dict(mesh.shape).get("data", 1)
    spec = P(None, "data", None) if d > 1 and host["tokens"].shape[1] % d == 0 else P()
    sh = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_callback(v.shape, sh, lambda i, v=v: v[i]) for k, v in host.items()}


# ------------------------------------------------------------------------------------------ checkpoints
def _settings(lcfg: LoraConfig | None, tcfg: TrainConfig, data_hash: str, cfg: Config) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "save_every"}
    lora = None if lcfg is None else {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets)}
    return {
        "train": train,
        "lora": lora,
        "data_sha256": data_hash,
        "dtype": cfg.dtype,
        "expert_format": cfg.expert_format,
    }


def _manager(path: Path, save_every: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=save_every, create=True)
    return ocp.CheckpointManager(path.absolute(), options=opts, item_names=("state", "meta"))


def _restore_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp

    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _restore(mngr, step: int, state: dict):
    """The saved state into the shardings and dtypes of `state` (the freshly initialised one)."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


def _save(mngr, step: int, state: dict, meta: dict, force: bool = False) -> None:
    import orbax.checkpoint as ocp

    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


# ----------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ("step", "loss", "tokens", "lr", "grad_norm", "seconds")


def _read_csv(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_plot(path: Path, rows: list[dict]) -> bool:
    """loss.png from the CSV rows; False without matplotlib (`pip install gptoss-jax[notebooks]` has it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class Result:
    out: Path
    steps: int
    losses: list[float]
    trainable: dict  # the final adapters (LoRA) or weights (full), device arrays
    model: object  # the base model the run used


def finetune(
    base,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    lora: LoraConfig | None = None,
    train: TrainConfig | None = None,
    mesh=None,
    dtype: str = "bfloat16",
    reasoning_effort: str = "medium",
    date: str | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    expert_format: str | None = None,
) -> Result:
    """Fine-tunes `base` (a checkpoint path, or a loaded model) on `data` (chat JSONL) into `out`.

    lora: the adapters (default LoraConfig()); ignored with `train.full`. mesh, dtype, expert_format: as for
    `gptoss_jax.load` (full fine-tuning loads the experts dequantized). stop_after: end after that many
    steps of this call (the run stays resumable), for tests and notebooks. Restarting with the same `out`
    and settings resumes from its last checkpoint. reasoning_effort, date: the prompts' settings (see
    `harmony.PromptSettings`), written beside the adapters for `serve`, `chat` and `generate` to use.
    """
    tcfg = train or TrainConfig()
    lcfg = None if tcfg.full else (lora or LoraConfig())
    out = Path(out)
    data = Path(data)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a folder")
    prompt, day = PromptSettings(reasoning_effort=reasoning_effort, date=date), resolve_date(date)
    rows = pack(
        read_jsonl(
            data, seq_len=tcfg.seq_len, reasoning_effort=reasoning_effort, date=day,
            assistant_only=tcfg.assistant_only,
        ),  # fmt: skip
        tcfg.seq_len,
        pack=tcfg.pack,
    )
    loaded = not isinstance(base, (str, os.PathLike))
    mesh = mesh_of(base) if loaded else as_model_mesh(mesh)
    n_data = dict(mesh.shape).get("data", 1) if mesh is not None else 1
    if tcfg.batch_size % n_data:
        raise TrainError(
            f"batch_size {tcfg.batch_size} must be a multiple of the mesh's data axis ({n_data})"
        )
    if loaded:
        model, base_name = base, None
    else:
        fmt = "dequantized" if tcfg.full else expert_format
        model, base_name = load(base, dtype=dtype, mesh=mesh, quiet=quiet, expert_format=fmt), str(base)
    cfg = model.cfg
    if tcfg.full and cfg.expert_format != "dequantized":
        raise TrainError(
            "full fine-tuning needs dequantized experts: load the base with "
            "expert_format='dequantized' (the packed MXFP4 experts have no gradient)"
        )

    total = tcfg.total_steps(len(rows))
    optimizer, step_fn = step_for(cfg, lcfg, tcfg, total)
    params = model_params(model)
    trainable, frozen = split_params(params, tcfg.full)
    if lcfg is not None:
        trainable = init_adapters(cfg, lcfg, tcfg.seed)
        if mesh is not None:
            sh = adapter_shardings(cfg, {n: a.shape for n, a in trainable.items()}, mesh)
            trainable = {n: jax.device_put(a, sh[n]) for n, a in trainable.items()}
    with _mesh_ctx(mesh):
        opt_state = init_state(optimizer, trainable, cfg)
    if mesh is None:  # committed like the step's outputs, so the second step does not compile again
        trainable, opt_state, frozen = jax.device_put((trainable, opt_state, frozen), _one_device())
    settings = _settings(lcfg, tcfg, _sha256(data), cfg) | {"prompt": [prompt.reasoning_effort, day]}

    mngr = _manager(out / "checkpoints", tcfg.save_every)
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        meta = _restore_meta(mngr, start)
        if meta.get("settings") != settings:
            diff = _first_difference(meta.get("settings") or {}, settings)
            raise TrainError(
                f"{out / 'checkpoints'}: holds a run with other settings ({diff}); resume with the "
                f"same settings or choose another --out"
            )
        with _mesh_ctx(mesh):
            state = _restore(mngr, start, {"trainable": trainable, "opt_state": opt_state})
        trainable, opt_state = state["trainable"], state["opt_state"]
        if not quiet:
            print(f"resuming {out} at step {start} of {total}", file=sys.stderr)
    loader = Loader(rows, tcfg.rows_per_step, tcfg.seed)
    csv_path = out / "loss.csv"
    log = _read_csv(csv_path, start)
    losses = [float(r["loss"]) for r in log]
    end = total if stop_after is None else min(total, start + stop_after)
    main = jax.process_index() == 0
    bar = _StepProgress(total, start, quiet=quiet or not main)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            idx = loader.indices(step)
            batch = batch_arrays(rows, idx, tcfg.grad_accum, mesh)
            with _mesh_ctx(mesh):
                trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, np.int32(step))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            seen = int(rows.lengths[idx].sum())
            log.append(
                {
                    "step": step + 1,
                    "loss": f"{m['loss']:.6f}",
                    "tokens": int(m["tokens"]),
                    "lr": f"{m['lr']:.6g}",
                    "grad_norm": f"{m['grad_norm']:.6g}",
                    "seconds": f"{dt:.4f}",
                }
            )
            losses.append(m["loss"])
            bar.step(m["loss"], seen / dt)
            done = step + 1
            if done % tcfg.save_every == 0 or done == end:
                _save(
                    mngr,
                    done,
                    {"trainable": trainable, "opt_state": opt_state},
                    {"settings": settings, "step": done, "rows_seen": done * tcfg.rows_per_step},
                    force=True,
                )
                if main:
                    _write_csv(csv_path, log)
        mngr.wait_until_finished()
    finally:
        bar.close()
        mngr.close()
    if main:
        _write_csv(csv_path, log)
        write_plot(out / "loss.png", log)
        if end == total and lcfg is not None:
            write_prompt_settings(out, prompt)  # before the config, which marks the folder complete
            save_adapters(out, trainable, cfg, lcfg, base=base_name)
    if lcfg is None:  # the step donated the model's own arrays: give the model the trained ones
        for name, arr in trainable.items():
            *parents, leaf = name.split(".")
            node = model
            for part in parents:
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            getattr(node, leaf).set_value(arr)
    return Result(out, end, losses, trainable, model)


class _StepProgress:
    """A tqdm bar with the loss and tokens/s on a terminal; elsewhere (a log, a notebook) one plain line every
    `interval` seconds and at the end, never tqdm's `\\r` redraws."""

    def __init__(self, total: int, start: int, *, quiet: bool, interval: float = 10.0):
        self.total, self.n, self.quiet, self.interval = total, start, quiet, interval
        self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if not quiet and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def step(self, loss: float, tok_s: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
            self.bar.update(1)
        elif not self.quiet and (time.monotonic() - self.last >= self.interval or self.n == self.total):
            self.last = time.monotonic()
            print(
                f"finetune: step {self.n}/{self.total}, loss {loss:.4f}, {tok_s:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k} was {json.dumps(va)}, now {json.dumps(vb)}"
    return ""


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


class _mesh_ctx:
    """`jax.set_mesh(mesh)` when there is one (the model's constraints and shard_maps read it)."""

    def __init__(self, mesh):
        self.ctx = jax.set_mesh(mesh) if mesh is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else None
