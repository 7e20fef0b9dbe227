"""The serving engine's KV cache: a page pool shared by all sequences on full-attention layers, a ring per
slot on sliding ones.

`PagedKVCache` implements the protocol `model.forward` uses (`begin`, `kv`, `with_kv`, and its step's
`attend`, which runs the layer's attention), so the model's layer scan runs over it unchanged.

A call is one flat row of tokens per lane (`flat_layout`): the next token of every decoding sequence, one
row each, then one prefill chunk. The model's token-wise work (projections, router, experts) runs once over
the row, so a step reads the weights once; only attention is per row, on two dense layouts cut from the
flat row without a gather: (decode rows, 1) and (chunks, chunk tokens).

Names: a call has `lanes` (data shards) x `per_lane` rows, of which `n_dec` decode and the last takes the
chunk; a lane's flat row holds `width` tokens; NP is the pages gathered per row. Axis letters in shapes keep
their meaning from model.py (K kv heads, G, H, R, ...), and W is the ring's length.

Layout (stacked over the R repeats of the layer unit, like the parameters):
- full-attention unit positions: a pool of pages (R, P, page_size, K, H) per k and v, shared by all
  sequences; a sequence's tokens 0, 1, ... sit in its pages in order (position p in page p // page_size,
  offset p % page_size). Pages are taken as a sequence grows and handed back when it ends, so memory follows
  the real lengths;
- sliding unit positions: a ring (R, S, W + slack, K, H) per slot (slot = position % ring size). The ring is
  `slack` tokens longer than the window so that a resident sequence can be rolled back by up to `slack`
  tokens and still hold every key its next token sees (conversation reuse, see `engine.scheduler`).

The page table and every length live on the host (the scheduler owns them): each forward call carries the
rows it works on (`rows`: slot ids), each row's pages in order (`pages`, padded to a bucketed count), the
tokens each row held before the call (`start`), how many it feeds (`n_new`) and the oldest position its
ring may still hold (`ring_lo`). A call computes only its own rows' tokens and writes straight into the
shared pool. Which position a ring slot holds follows from `start` and `ring_lo` (the newest position below
`start` in that residue class), and a full-layer key is valid iff its position is below the row's length:
attention masks by position, never by slot order, so stale pages and ring slots are never seen.

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
import numpy as np
from jax.sharding import PartitionSpec as P

from ..config import Config
from ..sharding import CACHE_KV_AXES, cache_sharding, current_mesh, logical_spec

POOL_AXES = CACHE_KV_AXES  # (layers, batch, cache_seq, kv_heads, head_dim): pages (or slots) over `data`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per unit position: full (R, P, page, K, H) pool, sliding (R, S, ring, K, H)
    v: tuple[jax.Array, ...]
    # one entry per row of the call, lane-major (lanes x rows per lane); ids are shard-local
    rows: jax.Array  # int32 slot of each row (the slot count = padding)
    pages: jax.Array  # (rows, NP) int32 each row's pages in order (the page count = no page)
    start: jax.Array  # int32 tokens the row holds before this call
    n_new: jax.Array  # int32 tokens this call feeds the row (0: a padding row)
    ring_lo: jax.Array  # int32 oldest position the row's ring may hold (> 0 after a rollback)
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
                   none.reshape(0, 0), none, none, none, tuple(cfg.layer_unit))  # fmt: skip

    def for_call(self, rows, pages, start, n_new, ring_lo) -> PagedKVCache:
        """This cache working on `rows` (see the fields for the meaning of each array)."""
        return dataclasses.replace(self, rows=rows, pages=pages, start=start, n_new=n_new, ring_lo=ring_lo)

    @property
    def kv(self):
        return tuple(zip(self.k, self.v, strict=True))

    def with_kv(self, kv) -> PagedKVCache:
        return dataclasses.replace(self, k=tuple(a for a, _ in kv), v=tuple(b for _, b in kv))

    def positions(self, lanes: int, width: int) -> jax.Array:
        """Positions (lanes, width) of a call's flat rows (`flat_layout`); -1 for padding."""
        tok_row, j = flat_layout(self.rows.shape[0] // lanes, width)
        start, n = self.start.reshape(lanes, -1)[:, tok_row], self.n_new.reshape(lanes, -1)[:, tok_row]
        return jnp.where(j < n, start + j, -1)

    def last_token(self, lanes: int, width: int) -> jax.Array:
        """(lanes, rows per lane) index in the flat row of each row's last token (a padding row: its first
        slot)."""
        per_lane = self.rows.shape[0] // lanes
        n_dec = per_lane - 1
        n = self.n_new.reshape(lanes, per_lane)
        return jnp.concatenate([jnp.broadcast_to(jnp.arange(n_dec, dtype=jnp.int32), (lanes, n_dec)),
                                n_dec + jnp.maximum(n[:, n_dec:] - 1, 0)], axis=1)  # fmt: skip

    def begin(self, q_pos: jax.Array) -> tuple[PagedKVCache, PagedStep]:
        """Where this call's tokens go and what each row attends over, computed once for all layers."""
        full = [k for k, s in zip(self.k, self.sliding, strict=True) if not s]
        ring = [k for k, s in zip(self.k, self.sliding, strict=True) if s]
        page = full[0].shape[2] if full else 1
        W = ring[0].shape[2] if ring else 1
        lanes, width = q_pos.shape
        NP = self.pages.shape[1]
        per_lane = self.rows.shape[0] // lanes
        tok_row, _ = flat_layout(per_lane, width)
        of_token = lambda a: a.reshape((lanes, per_lane) + a.shape[1:])[:, tok_row]  # noqa: E731 - row -> token
        valid = q_pos >= 0
        length = self.start + self.n_new  # tokens held after the call
        lane = jnp.arange(lanes)[:, None]
        page_of = self.pages.reshape(lanes, per_lane, NP)[lane, tok_row[None],
                                                           jnp.clip(q_pos // page, 0, NP - 1)]  # fmt: skip
        i = jnp.arange(NP * page, dtype=jnp.int32)[None]
        step = PagedStep(
            rows=self.rows,
            tok_slot=of_token(self.rows),
            tok_page=jnp.where(valid, page_of, _DROP),
            tok_offset=jnp.where(valid, q_pos % page, 0),
            pages=self.pages,
            full_pos=jnp.where(i < length[:, None], i, -1),
            ring_slots=jnp.where(valid & (q_pos >= of_token(length) - W), q_pos % W, _DROP),
            ring_pos_before=_ring_positions(self.start, self.ring_lo, W),
        )
        return self, step


def flat_layout(per_lane: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The layout of a lane's flat row of `width` tokens over its `per_lane` rows: the first per_lane - 1 rows
    decode, one token each (tokens 0 .. per_lane - 2), and the last row is a prefill chunk (tokens
    per_lane - 1 .. width - 1, empty when width = per_lane - 1). -> (row of each token, index of each token
    within its row), static."""
    tok_row = np.minimum(np.arange(width), per_lane - 1)
    return tok_row, np.maximum(np.arange(width) - (per_lane - 1), 0)


# An index no buffer reaches: writes to it are dropped (padding tokens, and ring writes a later token of the
# same call overwrites).
_DROP = jnp.iinfo(jnp.int32).max


def _ring_positions(start, ring_lo, W: int):
    """(rows, W) position held by each ring slot before the call: the newest position below `start` in the
    slot's residue class, or -1 when that is older than `ring_lo` (overwritten, or rolled back)."""
    s = jnp.arange(W, dtype=jnp.int32)[None]
    p = start[:, None] - 1 - jnp.mod(start[:, None] - 1 - s, W)
    return jnp.where(p >= ring_lo[:, None], p, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedStep:
    """Where one call's tokens go, shared by every layer (computed once in `PagedKVCache.begin`). A call is
    one flat row of `width` tokens per lane over `per_lane` rows per lane (`flat_layout`); row arrays are
    lane-major, token arrays (lanes, width)."""

    rows: jax.Array  # slot of each row
    tok_slot: jax.Array  # (lanes, width) slot of each token's row
    tok_page: jax.Array  # (lanes, width) page of each token (_DROP = padding)
    tok_offset: jax.Array  # (lanes, width) offset in its page
    pages: jax.Array  # (rows, NP) each row's pages
    full_pos: jax.Array  # (rows, NP * page) position of each gathered full-layer key, -1 = not (yet) valid
    ring_slots: jax.Array  # (lanes, width) ring slot of each token (_DROP: padding, or overwritten later)
    ring_pos_before: jax.Array  # (rows, W) ring positions before the call: what the call attends over

    def attend(self, kv, r, q, k, v, q_pos, *, ring: bool, attention):
        """One layer's attention for the flat row: q (lanes, width, K, G, H), k/v (lanes, width, K, H), this
        unit position's buffers `kv` at repeat r -> (output (lanes, width, K, G, H), new kv), as
        `cache.Step.attend`.

        Every token's k/v is written straight from the flat row (a full layer's into its page, before
        attending; a sliding layer's into its ring, after). Attention is per row, in two dense layouts cut
        from the flat row without a gather: the decode rows as (lanes * n_dec, 1) queries and the chunks as
        (lanes, width - n_dec). A full-layer row attends over its pages (gathered, NP * page keys, masked by
        position);
        a sliding-layer row over its ring as it was before the call plus its own tokens (`aligned`).
        """
        kb, vb = kv
        lanes, width = q_pos.shape
        per_lane = self.rows.shape[0] // lanes
        n_dec = per_lane - 1  # decode rows per lane
        n_groups = 1 + (width > n_dec)  # the chunk's row is a group of its own if there is a chunk

        def per_row(a):  # (rows, ...) -> [decode rows (lanes * n_dec, ...), chunk rows (lanes, ...)]
            a = a.reshape((lanes, per_lane) + a.shape[1:])
            return [a[:, :n_dec].reshape((lanes * n_dec,) + a.shape[2:]), a[:, n_dec]][:n_groups]

        def per_token(a):  # (lanes, width, ...) -> [decode tokens (lanes * n_dec, 1, ...), chunks]
            return [a[:, :n_dec].reshape((lanes * n_dec, 1) + a.shape[2:]), a[:, n_dec:]][:n_groups]

        groups = list(zip(per_token(q), per_token(k), per_token(v), per_token(q_pos), strict=True))
        if ring:

            def local(kb, vb, r, k, v, tok_slot, slots, *rows):
                old = [buf.at[r, rw].get(mode="fill", fill_value=0) for rw in rows for buf in (kb, vb)]
                kb = kb.at[r, tok_slot, slots].set(k.astype(kb.dtype), mode="drop")
                vb = vb.at[r, tok_slot, slots].set(v.astype(vb.dtype), mode="drop")
                return *old, kb, vb

            *old, kb, vb = _per_shard(local, 2 * n_groups, kb, vb, r, k, v, self.tok_slot, self.ring_slots,
                                      *per_row(self.rows))  # fmt: skip
            cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=1)  # noqa: E731
            out = []
            for i, before in enumerate(per_row(self.ring_pos_before)):
                qg, kg, vg, pg = groups[i]
                out.append(attention(qg, cat(old[2 * i], kg), cat(old[2 * i + 1], vg), pg, cat(before, pg),
                                     pg.shape[1]))  # fmt: skip
        else:

            def local(kb, vb, r, k, v, tok_page, tok_offset, *pages):
                kb = kb.at[r, tok_page, tok_offset].set(k.astype(kb.dtype), mode="drop")
                vb = vb.at[r, tok_page, tok_offset].set(v.astype(vb.dtype), mode="drop")
                # padding pages are clipped to a real one: their keys sit past the row's length (masked)
                keys = [buf.at[r, pg].get(mode="clip").reshape((pg.shape[0], -1) + buf.shape[3:])
                        for pg in pages for buf in (kb, vb)]  # fmt: skip
                return *keys, kb, vb

            *keys, kb, vb = _per_shard(local, 2 * n_groups, kb, vb, r, k, v, self.tok_page, self.tok_offset,
                                       *per_row(self.pages))  # fmt: skip
            out = [attention(groups[i][0], keys[2 * i], keys[2 * i + 1], groups[i][3], k_pos, 0)
                   for i, k_pos in enumerate(per_row(self.full_pos))]  # fmt: skip
        out[0] = out[0].reshape((lanes, n_dec) + out[0].shape[2:])
        return jnp.concatenate(out, axis=1), (kb, vb)


def _per_shard(fn, n_out: int, kb, vb, r, k, v, *rows):
    """fn(kb, vb, r, k, v, *row arrays) -> (n_out arrays of (rows, keys, K, H), kb, vb), per (data, kv-head)
    shard under a mesh: every index is shard-local (the scheduler keeps each sequence's slot and pages in
    its own data shard); identity without one."""
    mesh = current_mesh()
    if mesh is None:
        return fn(kb, vb, r, k, v, *rows)
    pool = logical_spec(POOL_AXES, kb.shape, dict(mesh.shape))
    data, heads = pool[1], pool[3]
    tok = P(data, None, heads, None)
    row_specs = tuple(P(data, *([None] * (a.ndim - 1))) for a in rows)
    out = (tok,) * n_out + (pool, pool)
    return jax.shard_map(fn, mesh=mesh, in_specs=(pool, pool, P(), tok, tok, *row_specs), out_specs=out,
                         check_vma=False)(kb, vb, r, k, v, *rows)  # fmt: skip


# ------------------------------------------------------------------------------------------------ sizing
def paged_layout(cfg: Config, *, num_pages: int, page_size: int, max_seqs: int, ring_slack: int = 0,
                 dtype=None) -> dict[str, tuple]:  # fmt: skip
    """Every buffer of the engine's KV memory: name -> (shape, dtype, logical axes). The one description that
    `PagedKVCache.create`, `pool_plan` and the planner (`memory.engine_plan`) use."""
    dt = jnp.dtype(dtype or cfg.jax_dtype)
    R, K, H = cfg.layer_repeats, cfg.num_key_value_heads, cfg.head_dim
    ring = ring_length(cfg, ring_slack)
    out = {}
    for kind in ("k", "v"):
        for j, sliding in enumerate(cfg.layer_unit):
            shape = (R, max_seqs, ring, K, H) if sliding else (R, num_pages, page_size, K, H)
            out[f"{kind}.{j}"] = (shape, dt, POOL_AXES)
    return out


def ring_length(cfg: Config, ring_slack: int) -> int:
    """Slots of each sequence's ring on sliding layers: the window plus `ring_slack` (0 without sliding
    layers)."""
    return cfg.sliding_window + ring_slack if any(cfg.layer_unit) else 0


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
    num_pages, page_size, pages_per_seq (at max_context), tokens (the pool's capacity), ring_slots and
    ring_slack (`ring_length`), page_bytes (all
    full layers, k and v), ring_bytes (all slots), pool_bytes, total_bytes (one copy; a mesh splits it).
    """
    for name, v in (("max_seqs", max_seqs), ("max_context", max_context), ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(ring_slack, bool) or not isinstance(ring_slack, int) or ring_slack < 0:
        raise ValueError(f"ring_slack must be an integer >= 0, got {ring_slack!r}")
    full_tok, ring_tok = token_bytes(cfg, dtype)
    per_seq = math.ceil(max_context / page_size)
    ring_len = ring_length(cfg, ring_slack)
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
            "ring_slots": ring_len, "ring_slack": ring_slack, "page_bytes": page_bytes,
            "ring_bytes": ring_bytes, "pool_bytes": int(num_pages) * page_bytes,
            "total_bytes": int(num_pages) * page_bytes + ring_bytes}  # fmt: skip
