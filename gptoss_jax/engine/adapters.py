"""Many LoRA fine-tunes over one packed base in one engine: the adapter pool and its per-token forward.

    engine = Engine(model, adapters={"sql": "ft/sql", "chat": "ft/chat"}, max_adapters=4)
    engine.submit(prompt, adapter="sql")     # None: the base model
    engine.load_adapter("math", "ft/math"); engine.unload_adapter("chat")

The pool. Every adapter's arrays live in one fixed set of device arrays, one per (unit position, target,
A or B), with a slot axis: `blocks.{j}.attn.q_lora_a` (R, S, r, in), `..._lora_b` (R, S, out, r), the
experts' (R, S, E, r, in) and (R, S, E, out, r) (`lora.adapter_layout` with a slot axis after the
repeats). S = max_adapters + 1: slot 0 is all zeros and stands for "no adapter". r is the pool's rank
(`max_lora_rank`): an adapter of lower rank is padded with zeros (A's extra rows and B's extra columns
contribute exact zeros), and its scale alpha / r_adapter is folded into its B. The targets are the
pool's too (`lora_targets`, default the union of the first adapters'): an adapter without some target
holds zeros there. So the shapes never change while adapters come and go, and nothing recompiles: a load
writes one slot (`.at[:, slot].set`, a jitted update whose slot index is data), an unload frees it.

The forward. Each call carries one adapter slot per row (`a["adapter"]`), spread to its tokens; the pool
is a `model.Hooks` (`PoolHooks`) whose layer hooks add, per token, its own slot's low-rank product:
- q, k, v, o and the router (`LayerHooks.project`): x (A x) is computed for every slot at once, (T, S, r),
  each token keeps its own slot's (a one-hot over S: the others become exact zeros), then B maps back.
  The work per token grows with S x r: for a few adapters of rank 16, a few per cent of the projection.
- the experts (`moe.LORA_SLOT`): the pooled arrays ride along with the layer's expert parameters and each
  (token, expert) pair adds its slot's product for that expert (decode gathers the pair's (A, B); prefill
  tiles use the one-hot as above).
A call in which no token has an adapter skips all of it (`lax.cond`), and adding a slot-0 token's zeros
changes no bit, so base requests get the same tokens with or without adapters beside them. The layers get
the pool's whole stacks (R, S, ...) and slice their own repeat inside the adapted branch only (`LORA_REPEAT`
for the experts): scanned slices would be copied into every layer's conditionals, all slots of every target,
on base-only steps too.

Versus `adapters.apply_adapters` (one adapter merged into the weights, what `generate` runs): the same
products, unmerged; the logits agree to float32 rounding (the tests: the engine's tokens equal
`generate`'s with the adapter applied, and its logits PEFT's to 1e-5).

Prefix caching keys each sequence by its adapter's load (a number never reused: an adapter unloaded and
loaded again under the same name is a new key), so no KV computed under one adapter serves another.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..lora import EXPERT_TARGETS, TARGETS, LoraConfig, LoraError, adapter_layout, parse_targets, target_of
from ..model import Hooks, LayerHooks, unit_params
from ..moe import LORA_LEAVES, LORA_REPEAT, LORA_SLOT
from ..ops import F32

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_RANK = 16  # the pool's rank when no adapter is given at start-up


class AdapterError(ValueError):
    """A bad adapter, name or pool setting (one line, naming the adapter and the problem)."""


class AdapterPoolFull(AdapterError):
    """Every slot of the pool is taken (max_adapters)."""


class AdapterBusy(AdapterError):
    """The adapter has requests in flight (it cannot be unloaded now)."""


class UnknownAdapter(AdapterError):
    """No adapter of that name is loaded."""


@dataclasses.dataclass(frozen=True)
class Resident:
    """An adapter in the pool: its name, slot, LoRA config, where it came from, and its prefix-cache key
    (unique per load)."""

    name: str
    slot: int
    key: int
    lcfg: LoraConfig
    source: str | None


def pool_targets(targets) -> tuple[str, ...]:
    """The pool's targets: both expert targets when either is (the expert path reads all four leaves)."""
    t = set(parse_targets(targets))
    if t & set(EXPERT_TARGETS):
        t |= set(EXPERT_TARGETS)
    return tuple(n for n in TARGETS if n in t)


def pool_layout(cfg: Config, slots: int, rank: int, targets) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the pool's arrays: `lora.adapter_layout` with a slot axis after the repeats."""
    lay = adapter_layout(cfg, LoraConfig(rank=rank, alpha=1.0, targets=pool_targets(targets)))
    return {n: (s[0], slots, *s[1:]) for n, s in lay.items()}


def bytes_per_adapter(cfg: Config, rank: int, targets) -> int:
    """Device bytes one slot of the pool takes (float32), whatever the adapter in it."""
    return sum(4 * int(np.prod(s)) // s[1] for s in pool_layout(cfg, 1, rank, targets).values())


def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 256 or any(c in name for c in "\n\r\0"):
        raise AdapterError(f"adapter name must be a non-empty one-line string, got {name!r}")
    return name


class AdapterPool:
    """The pool's device arrays and which adapter holds which slot (see the module docstring). Not
    thread-safe: the engine serializes its calls."""

    def __init__(self, cfg: Config, *, max_adapters: int, rank: int, targets):
        for what, v in (("max_adapters", max_adapters), ("max_lora_rank", rank)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise AdapterError(f"{what} must be a positive integer, got {v!r}")
        try:
            self.targets = pool_targets(targets)
        except LoraError as e:
            raise AdapterError(f"lora_targets: {e}") from None
        self.cfg, self.max_adapters, self.rank = cfg, int(max_adapters), int(rank)
        self.shapes = pool_layout(cfg, self.max_adapters + 1, self.rank, self.targets)
        # committed to the device, as the step's other inputs: the first step compiles once
        self.arrays = jax.device_put(
            {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}, jax.devices()[0]
        )
        self.bytes_per_adapter = bytes_per_adapter(cfg, self.rank, self.targets)
        self.resident: dict[str, Resident] = {}
        self._free = list(range(self.max_adapters, 0, -1))  # slots, taken from the end
        self._keys = itertools.count(1)

    # ------------------------------------------------------------------------------------- host side
    def prepare(self, name: str, source) -> tuple[dict[str, np.ndarray], LoraConfig, str | None]:
        """Reads and checks an adapter (a PEFT folder, or (our arrays, LoraConfig)) against the pool ->
        (its slot's arrays, padded and scaled; its config; its path). No device work: call it before
        taking the engine's lock. AdapterError naming the adapter and the problem."""
        from ..adapters import load_adapters

        check_name(name)
        path = None
        try:
            if isinstance(source, (str, os.PathLike)):
                path = os.fspath(source)
                arrays, lcfg = load_adapters(path, self.cfg)
            elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], LoraConfig):
                arrays, lcfg = source
            else:
                raise AdapterError(f"adapter {name!r}: give a PEFT folder or (arrays, LoraConfig), got "
                                   f"{type(source).__name__}")  # fmt: skip
        except LoraError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        if lcfg.rank > self.rank:
            raise AdapterError(f"adapter {name!r}: rank {lcfg.rank} is above the pool's rank {self.rank} "
                               f"(max_lora_rank, --max-lora-rank)")  # fmt: skip
        extra = [t for t in lcfg.targets if t not in self.targets]
        if extra:
            raise AdapterError(f"adapter {name!r}: targets {','.join(extra)} are not among the pool's "
                               f"({','.join(self.targets)}; lora_targets, --lora-targets)")  # fmt: skip
        layout = adapter_layout(self.cfg, lcfg)
        out = {}
        for n, shape in self.shapes.items():
            slot = np.zeros((shape[0], *shape[2:]), np.float32)
            if n in arrays:
                a = np.asarray(arrays[n], np.float32)
                if a.shape != layout[n]:
                    raise AdapterError(f"adapter {name!r}: {n} has shape {a.shape}, expected {layout[n]}")
                if n.endswith("_a"):  # (..., r, in): the first r rows
                    slot[..., : lcfg.rank, :] = a
                else:  # (..., out, r): the first r columns, the scale folded in
                    slot[..., : lcfg.rank] = a * np.float32(lcfg.scale)
            out[n] = slot
        return out, lcfg, path

    def add(self, name: str, prepared) -> Resident:
        """Writes a prepared adapter into a free slot (a device update; nothing recompiles)."""
        check_name(name)
        if name in self.resident:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first")
        if not self._free:
            raise AdapterPoolFull(f"adapter {name!r}: the adapter pool is full ({self.max_adapters} "
                                  f"adapters, max_adapters / --max-adapters); unload one first")  # fmt: skip
        arrays, lcfg, path = prepared
        slot = self._free.pop()
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), arrays)
        r = Resident(name, slot, next(self._keys), lcfg, path)
        self.resident[name] = r
        return r

    def remove(self, name: str) -> Resident:
        r = self.get(name)
        del self.resident[name]
        self._free.append(r.slot)  # its numbers stay until a load overwrites the whole slot
        return r

    def get(self, name: str) -> Resident:
        if name not in self.resident:
            have = ", ".join(sorted(self.resident)) or "none"
            raise UnknownAdapter(f"adapter {name!r} is not loaded (loaded: {have})")
        return self.resident[name]


@partial(jax.jit, donate_argnums=0)
def _write_slot(arrays: dict, slot, new: dict) -> dict:
    return {n: a.at[:, slot].set(new[n]) for n, a in arrays.items()}


# ----------------------------------------------------------------------------------------- the forward
def pooled_delta(x, hot, a, b):
    """Each token's own slot's low-rank product: x (N, in), hot (N, S) one-hot slots, a (S, r, in), b (S,
    out, r) with the scale folded in -> (N, out) float32. Every slot's A x is computed, the others'
    zeroed: exact zeros through B."""
    u = jnp.einsum("NI,SRI->NSR", x.astype(F32), a, precision=HIGHEST) * hot[:, :, None]
    return jnp.einsum("NSR,SOR->NO", u, b, precision=HIGHEST)


class PoolHooks(Hooks):
    """The pool as the forward pass's hooks: arrays (the pool's, by name), slot (N,) int32 each flattened
    token's slot (B*T rows, row b*T + t)."""

    def __init__(self, arrays: dict, cfg: Config, slot):
        self.arrays, self.units = arrays, len(cfg.layer_unit)
        self.slot = slot.reshape(-1).astype(jnp.int32)
        S = next(iter(arrays.values())).shape[1]
        self.hot = jax.nn.one_hot(self.slot, S, dtype=F32)
        self.active = jnp.any(self.slot > 0)
        self.targets = sorted({target_of(n) for n in arrays})

    # Nothing is scanned: each layer gets the whole stacks (R, S, ...) of its unit position and takes its
    # own repeat's slice inside the branch that adds the products. Scanned slices would be copied in and
    # out of every layer's conditional, all slots of every target, on base-only steps too.
    def layer(self, j: int, r, xs, state) -> LayerHooks:
        return _PoolLayer(unit_params(self.arrays, j), r, self)


class _PoolLayer(LayerHooks):
    def __init__(self, stacks: dict, r, pool: PoolHooks):
        super().__init__()
        self.stacks, self.r, self.pool = stacks, r, pool

    def params(self, p: dict) -> dict:
        if not any(t in EXPERT_TARGETS for t in self.pool.targets):
            return p
        lora = {n: self.stacks["mlp"][n] for n in LORA_LEAVES}
        return p | {"mlp": dict(p["mlp"]) | lora | {LORA_SLOT: self.pool.slot, LORA_REPEAT: self.r}}

    def project(self, name: str, x, y):
        if name not in self.pool.targets:
            return y
        group = TARGETS[name][0]
        a, b = self.stacks[group][f"{name}_lora_a"], self.stacks[group][f"{name}_lora_b"]
        N = self.pool.slot.shape[0]

        def add():
            d = pooled_delta(x.reshape(N, -1), self.pool.hot, a[self.r], b[self.r])
            return (y.astype(F32) + d.reshape(y.shape)).astype(y.dtype)

        return jax.lax.cond(self.pool.active, add, lambda: y)


def initial_pool(cfg: Config, adapters: Mapping, max_adapters, rank, targets) -> AdapterPool | None:
    """The pool an engine starts with (None when it serves no adapters), its defaults from the first
    adapters' configs: max_adapters their number, the rank their largest, the targets their union."""
    from ..adapters import read_adapter_config

    if not adapters and max_adapters in (None, 0):
        return None
    lcfgs = []
    for name, src in adapters.items():
        check_name(name)
        if isinstance(src, (str, os.PathLike)):
            try:
                lcfgs.append(read_adapter_config(src))
            except LoraError as e:
                raise AdapterError(f"adapter {name!r}: {e}") from None
        elif isinstance(src, tuple) and len(src) == 2 and isinstance(src[1], LoraConfig):
            lcfgs.append(src[1])
        else:
            raise AdapterError(f"adapter {name!r}: give a PEFT folder or (arrays, LoraConfig), got "
                               f"{type(src).__name__}")  # fmt: skip
    if max_adapters is None:
        max_adapters = len(adapters)
    if isinstance(max_adapters, int) and len(adapters) > max_adapters:
        raise AdapterError(f"{len(adapters)} adapters given, more than max_adapters ({max_adapters})")
    if rank is None:
        rank = max((c.rank for c in lcfgs), default=DEFAULT_RANK)
    if targets is None:
        targets = sorted({t for c in lcfgs for t in c.targets}) or tuple(TARGETS)
    return AdapterPool(cfg, max_adapters=max_adapters, rank=rank, targets=targets)
