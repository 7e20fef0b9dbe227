"""The KV cache: a typed pytree with a length per row, rings of exactly `sliding_window` slots on sliding layers.

Every row of a batch is its own sequence: row b holds `lengths[b]` tokens, at positions 0 .. lengths[b]-1,
and the next chunk it receives starts at position lengths[b]. Rows advance independently (a chunk may give
each row a different number of new tokens, padding the rest), and a row can be reset (`reset`) and refilled
while the others keep decoding. `generate` runs one prompt per row; the serving engine keeps its keys and
values in a page pool instead (`engine.paged.PagedKVCache`, the same protocol).

Layout (stacked like the parameters, see `weights.py`): for each position j of the layer unit, `k[j]` and
`v[j]` are (R, B, S_j, K, H) for the unit's R repeats. Full-attention layers have S_j = the cache length,
slot = position. Sliding layers have a ring of S_j = `sliding_window` slots, slot = position % window, so
their memory does not grow with the context. Which position each slot holds is the same for every layer of
a kind, so it is kept once: `full_pos` (B, S) and `ring_pos` (B, W), -1 for an empty slot. Attention masks
by these positions, never by slot order, so stale values in a reset row are never seen.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .config import Config
from .sharding import CACHE_KV_AXES, CACHE_POS_AXES, CACHE_ROW_AXES, cache_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per unit position: (R, B, S_j, K, H)
    v: tuple[jax.Array, ...]
    full_pos: jax.Array  # (B, S) position held by each full-layer slot, -1 = empty
    ring_pos: jax.Array  # (B, W) position held by each ring slot, -1 = empty (W = 0 without sliding layers)
    lengths: jax.Array  # (B,) int32 tokens held = the next position to write

    @classmethod
    def create(cls, cfg: Config, batch: int, length: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows of up to `length` tokens; under a mesh (`jax.set_mesh`) each
        array is created already split (rows over `data`, kv heads over `model`)."""
        return cls._of(cfg, {name: jnp.full(shape, 0 if name.startswith(("k.", "v.", "lengths")) else -1, dt,
                                            device=cache_sharding(axes, shape))
                             for name, (shape, dt, axes) in cache_layout(cfg, batch, length, dtype).items()})  # fmt: skip

    @classmethod
    def abstract(cls, cfg: Config, batch: int, length: int, dtype=None) -> KVCache:
        """The same cache with ShapeDtypeStruct leaves (nothing allocated): for `jit(...).lower`."""
        return cls._of(cfg, {name: jax.ShapeDtypeStruct(shape, dt)
                             for name, (shape, dt, _) in cache_layout(cfg, batch, length, dtype).items()})  # fmt: skip

    @classmethod
    def _of(cls, cfg: Config, a: dict) -> KVCache:
        n = len(cfg.layer_unit)
        return cls(k=tuple(a[f"k.{j}"] for j in range(n)), v=tuple(a[f"v.{j}"] for j in range(n)),
                   full_pos=a["full_pos"], ring_pos=a["ring_pos"], lengths=a["lengths"])  # fmt: skip

    @property
    def kv(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """The (k, v) buffers of each unit position, as the model's layer scan carries them."""
        return tuple(zip(self.k, self.v, strict=True))

    def with_kv(self, kv) -> KVCache:
        return dataclasses.replace(self, k=tuple(a for a, _ in kv), v=tuple(b for _, b in kv))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a row can hold (the full layers' slots)."""
        return self.full_pos.shape[1]

    def chunk_positions(self, n_new: jax.Array, T: int) -> jax.Array:
        """Positions (B, T) of a chunk giving row b its next n_new[b] tokens; -1 pads the rest of the row."""
        t = jnp.arange(T, dtype=jnp.int32)[None]
        return jnp.where(t < n_new[:, None], self.lengths[:, None] + t, -1)

    def reset(self, rows: jax.Array) -> KVCache:
        """Empties the rows where `rows` (B,) is True; the other rows are untouched."""
        return dataclasses.replace(
            self,
            full_pos=jnp.where(rows[:, None], -1, self.full_pos),
            ring_pos=jnp.where(rows[:, None], -1, self.ring_pos),
            lengths=jnp.where(rows, 0, self.lengths),
        )

    def begin(self, q_pos: jax.Array) -> tuple[KVCache, Step]:
        """Takes a chunk at positions q_pos (B, T) (each row's next positions, then -1 padding): returns the
        cache with the chunk's positions and lengths recorded, and the `Step` the layers use to write and
        attend. A ring keeps only the last `window` tokens of a row, so longer chunks write their tail."""
        B, T = q_pos.shape
        S, W = self.capacity, self.ring_pos.shape[1]
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
        valid = q_pos >= 0
        lengths = jnp.maximum(self.lengths, jnp.max(q_pos, axis=1) + 1)
        full_slots = jnp.where(valid & (q_pos < S), q_pos, S)  # out of range -> dropped by the scatters
        full_pos = self.full_pos.at[rows, full_slots].set(q_pos, mode="drop")
        if W:
            in_ring = valid & (q_pos >= lengths[:, None] - W)
            ring_slots = jnp.where(in_ring, q_pos % W, W)
            ring_pos = self.ring_pos.at[rows, ring_slots].set(q_pos, mode="drop")
        else:
            ring_slots, ring_pos = full_slots, self.ring_pos
        step = Step(rows=rows, full_slots=full_slots, ring_slots=ring_slots, full_pos=full_pos,
                    ring_pos_before=self.ring_pos)  # fmt: skip
        return dataclasses.replace(self, full_pos=full_pos, ring_pos=ring_pos, lengths=lengths), step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Step:
    """Where one chunk goes, shared by every layer of a forward pass (computed once in `KVCache.begin`)."""

    rows: jax.Array  # (B, T) row index of each chunk token
    full_slots: jax.Array  # (B, T) full-layer slot of each token (capacity = dropped)
    ring_slots: jax.Array  # (B, T) ring slot of each token (window = dropped: padding, or overwritten)
    full_pos: jax.Array  # (B, S) full-layer positions after the chunk is written
    ring_pos_before: jax.Array  # (B, W) ring positions before the chunk: what the chunk attends over

    def write(self, buf: jax.Array, r, new: jax.Array, *, ring: bool) -> jax.Array:
        """Writes a chunk's k or v (B, T, K, H) into repeat r of a stacked buffer (R, B, S, K, H)."""
        slots = self.ring_slots if ring else self.full_slots
        return buf.at[r, self.rows, slots].set(new.astype(buf.dtype), mode="drop")

    def attend(self, kv, r, q, k, v, q_pos, *, ring: bool, attention):
        """One layer's attention over the chunk and the cache: q (B, T, K, G, H), k/v (B, T, K, H), this unit
        position's stacked buffers `kv` at repeat r -> (attention output (B, T, K, G, H), new kv).

        `attention(q, keys, values, q_pos, k_pos, aligned)` is the layer's attention (`model.attention_layer`
        binds its sinks and window). A full layer writes the chunk first and attends over its whole buffer.
        A sliding layer attends over its ring as it was before the chunk plus the chunk itself (so a chunk
        longer than the window still sees every key it should; `aligned` says the chunk's keys come last,
        in order), then writes the chunk's tail into the ring.
        """
        kb, vb = kv
        if ring:
            keys = jnp.concatenate([kb[r], k.astype(kb.dtype)], axis=1)
            vals = jnp.concatenate([vb[r], v.astype(vb.dtype)], axis=1)
            k_pos = jnp.concatenate([self.ring_pos_before, q_pos], axis=1)
            out = attention(q, keys, vals, q_pos, k_pos, k.shape[1])
            return out, (self.write(kb, r, k, ring=True), self.write(vb, r, v, ring=True))
        kb, vb = self.write(kb, r, k, ring=False), self.write(vb, r, v, ring=False)
        return attention(q, kb[r], vb[r], q_pos, self.full_pos, 0), (kb, vb)


def cache_layout(cfg: Config, batch: int, length: int, dtype=None) -> dict[str, tuple]:
    """Every array of a cache of `batch` rows x `length` tokens: name -> (shape, dtype, logical axes). The one
    description that `KVCache.create`, `cache_bytes` and the planner's per-device figures all use."""
    dt = jnp.dtype(dtype or cfg.jax_dtype)
    R, K, H = cfg.layer_repeats, cfg.num_key_value_heads, cfg.head_dim
    W = cfg.sliding_window if any(cfg.layer_unit) else 0
    out = {}
    for kind in ("k", "v"):
        for j, sliding in enumerate(cfg.layer_unit):
            out[f"{kind}.{j}"] = ((R, batch, W if sliding else length, K, H), dt, CACHE_KV_AXES)
    out["full_pos"] = ((batch, length), jnp.dtype(jnp.int32), CACHE_POS_AXES)
    out["ring_pos"] = ((batch, W), jnp.dtype(jnp.int32), CACHE_POS_AXES)
    out["lengths"] = ((batch,), jnp.dtype(jnp.int32), CACHE_ROW_AXES)
    return out


def cache_bytes(cfg: Config, batch: int, length: int, dtype=None) -> int:
    """Bytes of a cache of `batch` rows x `length` tokens (one copy; the planner splits it per device)."""
    return sum(math.prod(s) * dt.itemsize for s, dt, _ in cache_layout(cfg, batch, length, dtype).values())
