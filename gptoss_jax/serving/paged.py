"""The serving engine's KV cache: a page pool shared by all sequences on full-attention layers, a ring per
slot on sliding ones.

`PagedKVCache` implements the protocol `model.forward` uses (`begin`, `kv`, `with_kv`, and its step's
`attend`), so the model's layer scan runs over it unchanged.

Layout (stacked over the R repeats of the layer unit, like the parameters):
- full-attention unit positions: a pool of pages (R, P, page_size, K, H) per k and v, shared by all
  sequences; a sequence's tokens 0, 1, ... sit in its pages in order (position p in page p // page_size,
  offset p % page_size). Pages are taken as a sequence grows and handed back when it ends, so memory follows
  the real lengths;
- sliding unit positions: a ring (R, S, W + slack, K, H) per slot (slot = position % ring size). The ring is
  `slack` tokens longer than the window so that a resident sequence can be rolled back by up to `slack`
  tokens and still hold every key its next token sees (conversation reuse, see `serving.scheduler`).

The page table and every length live on the host (the scheduler owns them): each forward call carries the
rows it works on (`rows`: slot ids), each row's pages in order (`pages`, padded to a bucketed count), the
tokens each row held before the call (`start`) and the oldest position its ring may still hold (`ring_lo`).
A call computes only its own rows' tokens and writes straight into the shared pool. Which position a ring
slot holds follows from `start` and `ring_lo` (the newest position below `start` in that residue class),
and a full-layer key is valid iff its position is below the row's length: attention masks by position,
never by slot order, so stale pages and ring slots are never seen.

On a mesh the pool's pages and the rings' slots are split over `data` (each data shard is a lane of the
scheduler, with its own slots and pages) and kv heads over `model`; the writes and gathers run per shard
(`shard_map`) on shard-local page and slot ids, so no page ever crosses devices. Padding rows carry the
out-of-range id (local page count or slot count): their writes are dropped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..config import Config
from ..sharding import CACHE_KV_AXES, cache_sharding, current_mesh, logical_spec

POOL_AXES = CACHE_KV_AXES  # (layers, batch, cache_seq, kv_heads, head_dim): pages (or slots) over `data`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per unit position: full (R, P, page, K, H) pool, sliding (R, S, ring, K, H)
    v: tuple[jax.Array, ...]
    rows: jax.Array  # (B,) int32 slot of each row of this call (shard-local; the slot count = padding)
    pages: jax.Array  # (B, NP) int32 each row's pages in order (shard-local; the page count = no page)
    start: jax.Array  # (B,) int32 tokens the row holds before this call
    ring_lo: jax.Array  # (B,) int32 oldest position the row's ring may hold (> 0 after a rollback)
    sliding: tuple[bool, ...] = dataclasses.field(metadata={"static": True}, default=())

    @classmethod
    def create(cls, cfg: Config, *, num_pages: int, page_size: int, max_seqs: int, ring_slack: int = 0,
               dtype=None) -> PagedKVCache:  # fmt: skip
        """An empty pool (zeros: nothing is valid until a call writes it); under a mesh (`jax.set_mesh`)
        each buffer is created already split."""
        layout = paged_layout(cfg, num_pages=num_pages, page_size=page_size, max_seqs=max_seqs,
                              ring_slack=ring_slack, dtype=dtype)  # fmt: skip
        a = {n: jnp.zeros(s, dt, device=cache_sharding(ax, s)) for n, (s, dt, ax) in layout.items()}
        n = len(cfg.layer_unit)
        none = jnp.zeros((0,), jnp.int32)
        return cls(tuple(a[f"k.{j}"] for j in range(n)), tuple(a[f"v.{j}"] for j in range(n)), none,
                   none.reshape(0, 0), none, none, tuple(cfg.layer_unit))  # fmt: skip

    def for_call(self, rows, pages, start, ring_lo) -> PagedKVCache:
        """This cache working on `rows` (see the fields for the meaning of each array)."""
        return dataclasses.replace(self, rows=rows, pages=pages, start=start, ring_lo=ring_lo)

    @property
    def kv(self):
        return tuple(zip(self.k, self.v, strict=True))

    def with_kv(self, kv) -> PagedKVCache:
        return dataclasses.replace(self, k=tuple(a for a, _ in kv), v=tuple(b for _, b in kv))

    def chunk_positions(self, n_new: jax.Array, T: int) -> jax.Array:
        """Positions (B, T) of a call giving row b its next n_new[b] tokens; -1 pads the rest."""
        t = jnp.arange(T, dtype=jnp.int32)[None]
        return jnp.where(t < n_new[:, None], self.start[:, None] + t, -1)

    def begin(self, q_pos: jax.Array) -> tuple[PagedKVCache, PagedStep]:
        """Where this call's tokens go and what each row attends over, computed once for all layers."""
        full = [k for k, s in zip(self.k, self.sliding, strict=True) if not s]
        ring = [k for k, s in zip(self.k, self.sliding, strict=True) if s]
        page = full[0].shape[2] if full else 1
        W = ring[0].shape[2] if ring else 1
        NP = self.pages.shape[1]
        valid = q_pos >= 0
        length = jnp.maximum(self.start, jnp.max(q_pos, axis=1) + 1)  # tokens held after the call
        page_of = jnp.take_along_axis(self.pages, jnp.clip(q_pos // page, 0, NP - 1), axis=1)
        i = jnp.arange(NP * page, dtype=jnp.int32)[None]
        step = PagedStep(
            rows=self.rows,
            tok_page=jnp.where(valid, page_of, _DROP),
            tok_offset=jnp.where(valid, q_pos % page, 0),
            pages=self.pages,
            full_pos=jnp.where(i < length[:, None], i, -1),
            ring_slots=jnp.where(valid & (q_pos >= length[:, None] - W), q_pos % W, _DROP),
            ring_pos_before=_ring_positions(self.start, self.ring_lo, W),
        )
        return self, step


# An index no buffer reaches: writes to it are dropped (padding tokens, and ring writes a later token of the
# same call overwrites).
_DROP = jnp.iinfo(jnp.int32).max


def _ring_positions(start, ring_lo, W: int):
    """(B, W) position held by each ring slot before the call: the newest position below `start` in the
    slot's residue class, or -1 when that is older than `ring_lo` (overwritten, or rolled back)."""
    s = jnp.arange(W, dtype=jnp.int32)[None]
    p = start[:, None] - 1 - jnp.mod(start[:, None] - 1 - s, W)
    return jnp.where(p >= ring_lo[:, None], p, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedStep:
    """Where one call's tokens go, shared by every layer (computed once in `PagedKVCache.begin`)."""

    rows: jax.Array  # (B,) slot of each row
    tok_page: jax.Array  # (B, T) page of each token (_DROP = padding)
    tok_offset: jax.Array  # (B, T) offset in its page
    pages: jax.Array  # (B, NP) each row's pages
    full_pos: jax.Array  # (B, NP * page) position of each gathered full-layer key, -1 = not (yet) valid
    ring_slots: jax.Array  # (B, T) ring slot of each token (_DROP: padding, or overwritten within the call)
    ring_pos_before: jax.Array  # (B, W) ring positions before the call: what the call attends over

    def attend(self, kv, r, k, v, q_pos, *, ring: bool):
        """One layer's k/v (B, T, K, H) with this unit position's buffers `kv` at repeat r -> (keys, values,
        key positions, aligned, new kv), as `cache.Step.attend`.

        A full layer writes the call's tokens into their pages, then gathers each row's pages (B, NP * page
        keys). A sliding layer attends over its ring as it was before the call plus the call's own tokens
        (`aligned`: those come last, in order), then writes their tail into the ring.
        """
        kb, vb = kv
        T = k.shape[1]
        if ring:

            def local(kb, vb, r, k, v, rows, slots):
                old_k = kb.at[r, rows].get(mode="fill", fill_value=0)
                old_v = vb.at[r, rows].get(mode="fill", fill_value=0)
                keys = jnp.concatenate([old_k, k.astype(kb.dtype)], axis=1)
                vals = jnp.concatenate([old_v, v.astype(vb.dtype)], axis=1)
                kb = kb.at[r, rows[:, None], slots].set(k.astype(kb.dtype), mode="drop")
                vb = vb.at[r, rows[:, None], slots].set(v.astype(vb.dtype), mode="drop")
                return keys, vals, kb, vb

            keys, vals, kb, vb = _per_shard(local, kb, vb, r, k, v, self.rows, self.ring_slots)
            return keys, vals, jnp.concatenate([self.ring_pos_before, q_pos], axis=1), T, (kb, vb)

        def local(kb, vb, r, k, v, tok_page, tok_offset, pages):
            kb = kb.at[r, tok_page, tok_offset].set(k.astype(kb.dtype), mode="drop")
            vb = vb.at[r, tok_page, tok_offset].set(v.astype(vb.dtype), mode="drop")
            B, NP = pages.shape
            flat = (B, NP * kb.shape[2]) + kb.shape[3:]
            # padding pages are clipped to a real one: their keys sit past the row's length (masked)
            keys = kb.at[r, pages].get(mode="clip").reshape(flat)
            vals = vb.at[r, pages].get(mode="clip").reshape(flat)
            return keys, vals, kb, vb

        keys, vals, kb, vb = _per_shard(local, kb, vb, r, k, v, self.tok_page, self.tok_offset, self.pages)
        return keys, vals, self.full_pos, 0, (kb, vb)


def _per_shard(fn, kb, vb, r, k, v, *rows):
    """fn(kb, vb, r, k, v, *row arrays) per (data, kv-head) shard under a mesh: every index is shard-local
    (the scheduler keeps each sequence's slot and pages in its own data shard); identity without one."""
    mesh = current_mesh()
    if mesh is None:
        return fn(kb, vb, r, k, v, *rows)
    pool = logical_spec(POOL_AXES, kb.shape, dict(mesh.shape))
    data, heads = pool[1], pool[3]
    tok = P(data, None, heads, None)
    row_specs = tuple(P(data, *([None] * (a.ndim - 1))) for a in rows)
    out = (tok, tok, pool, pool)
    return jax.shard_map(fn, mesh=mesh, in_specs=(pool, pool, P(), tok, tok, *row_specs), out_specs=out,
                         check_vma=False)(kb, vb, r, k, v, *rows)  # fmt: skip


# ------------------------------------------------------------------------------------------------ sizing
def paged_layout(cfg: Config, *, num_pages: int, page_size: int, max_seqs: int, ring_slack: int = 0,
                 dtype=None) -> dict[str, tuple]:  # fmt: skip
    """Every buffer of the engine's KV memory: name -> (shape, dtype, logical axes). The one description that
    `PagedKVCache.create`, `pool_bytes` and the planner use."""
    dt = jnp.dtype(dtype or cfg.jax_dtype)
    R, K, H = cfg.layer_repeats, cfg.num_key_value_heads, cfg.head_dim
    ring = cfg.sliding_window + ring_slack
    out = {}
    for kind in ("k", "v"):
        for j, sliding in enumerate(cfg.layer_unit):
            shape = (R, max_seqs, ring, K, H) if sliding else (R, num_pages, page_size, K, H)
            out[f"{kind}.{j}"] = (shape, dt, POOL_AXES)
    return out


def token_bytes(cfg: Config, dtype=None) -> tuple[int, int]:
    """Bytes one token takes (k and v over all layers of a kind): (in full-layer pages, in rings)."""
    per = 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype or cfg.jax_dtype).itemsize
    n_full = sum(not s for s in cfg.layer_unit) * cfg.layer_repeats
    return per * n_full, per * (cfg.num_hidden_layers - n_full)


def pool_plan(cfg: Config, *, max_seqs: int, max_context: int, page_size: int = 16, ring_slack: int = 16,
              num_pages: int | None = None, kv_bytes: int | None = None, dtype=None) -> dict:  # fmt: skip
    """How the engine's KV memory is laid out for `max_seqs` sequences of up to `max_context` tokens.

    The pool holds `num_pages` pages; by default as many as `kv_bytes` allows after the rings, or (without a
    budget) enough for every slot at full context, which never waits or preempts. Returns plain numbers:
    num_pages, page_size, pages_per_seq (at max_context), tokens (the pool's capacity), page_bytes (all
    full layers, k and v), ring_bytes (all slots), pool_bytes, total_bytes (one copy; a mesh splits it).
    """
    for name, v in (("max_seqs", max_seqs), ("max_context", max_context), ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(ring_slack, bool) or not isinstance(ring_slack, int) or ring_slack < 0:
        raise ValueError(f"ring_slack must be an integer >= 0, got {ring_slack!r}")
    full_tok, ring_tok = token_bytes(cfg, dtype)
    per_seq = math.ceil(max_context / page_size)
    ring_len = cfg.sliding_window + ring_slack if ring_tok else 0
    ring_bytes = max_seqs * ring_len * ring_tok
    page_bytes = page_size * full_tok
    if num_pages is None:
        if kv_bytes is None:
            num_pages = max_seqs * per_seq
        else:
            num_pages = min(max_seqs * per_seq, max(0, kv_bytes - ring_bytes) // max(page_bytes, 1))
            if num_pages < per_seq:
                raise ValueError(f"kv memory of {kv_bytes} bytes holds {num_pages} pages of {page_size} "
                                 f"tokens after the rings: fewer than one sequence of {max_context} tokens "
                                 f"needs ({per_seq})")  # fmt: skip
    return {"max_seqs": max_seqs, "max_context": max_context, "num_pages": int(num_pages),
            "page_size": page_size, "pages_per_seq": per_seq, "tokens": int(num_pages) * page_size,
            "ring_slots": ring_len, "page_bytes": page_bytes, "ring_bytes": ring_bytes,
            "pool_bytes": int(num_pages) * page_bytes,
            "total_bytes": int(num_pages) * page_bytes + ring_bytes}  # fmt: skip
