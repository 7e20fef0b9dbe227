"""The serving engine's KV memory: one pool of pages for every layer, sized by a memory budget.

`PagedKVCache` implements the protocol `model.forward` uses (`begin`, `kv`, `kv_slots`, `with_kv`, and its
step's `attend`, which runs the layer's attention), so the model's layer scan runs over it unchanged.

The pool. A page holds `page_size` tokens of one layer kind: the keys and values of every layer of that
kind at those positions, (R, page_size, K, H) per k and v (R = the repeats of the layer unit). Full-
attention and sliding-window layers draw their pages from the same pool, so memory goes wherever the
work is: a sequence holds a full page for every `page_size` of its tokens and sliding pages only for those
that cover its window (`paged_attention` reads no others), while pages that left a running sequence's
window, and every page of finished or preempted sequences, stay as the prefix cache's evictable pages
(`engine.scheduler`). The pool is one buffer per rank r of a unit position within its kind, (R, P,
page_size, K, H) per k and v: gpt-oss's unit (sliding, full) has one position of each kind, so ONE
buffer, shared by both kinds (`kv_slots` tells the layer scan that every unit position uses it); a page id
names the same slice of every buffer. With no rings and no per-slot memory, the pool is all of the KV
memory: a budget of B bytes holds B // page_bytes pages, and nothing else.

A call is one flat row of tokens per lane (`flat_layout`): the next token of every decoding sequence, one
row each, then one prefill chunk. The model's token-wise work (projections, router, experts) runs once over
the row; only attention is per row, on two dense layouts cut from the flat row without a gather: (decode
rows, 1) and (chunks, chunk tokens). Each layer first writes the call's keys and values into their pages,
then attends with `kernels.paged_attention` over each row's own pages: the full table for full layers, the
short window table for sliding ones.

Names: a call has `lanes` (data shards) x `per_lane` rows, of which `n_dec` decode and the last takes the
chunk; a lane's flat row holds `width` tokens. Axis letters in shapes keep their meaning from model.py
(K kv heads, G, H, R, ...); P is the pool's pages.

The page tables and every length live on the host (the scheduler owns them): each forward call carries,
per row, the tokens it held before the call (`start`), how many it feeds (`n_new`), its full page table
(`full_table`, (rows, NB) with NB = pages of max_context: data, not a shape that grows), and its sliding
window's pages (`slide_table` from page `slide_first` on). Copies for copy-on-write of a shared partial
page (`copy_src` -> `copy_dst`) run before the call's writes. Keys are valid iff their position is below
the row's length: attention masks by position, never by page contents, so stale pages are never seen.

On a mesh the pool's pages are split over `data` (each data shard is a lane of the scheduler, with its own
pages and prefix cache) and kv heads over `model`; the writes, copies and attention run per shard
(`shard_map`) on shard-local page ids, so no page ever crosses devices. Padding rows and tokens carry the
out-of-range page id (the local page count): their writes are dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..config import Config
from ..kernels.paged_attention import BlockSizes, paged_attention
from ..sharding import CACHE_KV_AXES, cache_sharding, current_mesh, logical_spec, shard_shape

POOL_AXES = CACHE_KV_AXES  # (layers, batch, cache_seq, kv_heads, head_dim): pages over `data`

# KV memory per device on CPU when no budget is given: the host's memory is shared with everything else, so
# a fixed, documented amount (never more than every slot at max_context needs) rather than a fraction.
CPU_KV_MEMORY = 2 << 30
# On GPU/TPU, the share of the device memory left after the weights and the largest step's working memory
# (measured when the engine starts) that the pool takes when no budget is given; the rest is slack for the
# allocator and for what the measurement does not see.
MEMORY_FRACTION = 0.9

# An index no buffer reaches: writes to it are dropped (padding tokens).
_DROP = jnp.iinfo(jnp.int32).max


def kind_ranks(cfg: Config) -> tuple[int, ...]:
    """Each unit position's rank among the unit positions of its kind: the pool buffer it uses."""
    seen = {True: 0, False: 0}
    out = []
    for sliding in cfg.layer_unit:
        out.append(seen[sliding])
        seen[sliding] += 1
    return tuple(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per buffer (kind rank): (R, P, page, K, H)
    v: tuple[jax.Array, ...]
    # one entry per row of the call, lane-major (lanes x rows per lane); page ids are shard-local
    start: jax.Array  # int32 tokens the row holds before this call
    n_new: jax.Array  # int32 tokens this call feeds the row (0: a padding row)
    full_table: jax.Array  # (rows, NB) int32 the row's full-layer pages, page i = positions i * page ...
    slide_table: jax.Array  # (rows, NS) int32 its sliding-layer pages from page slide_first on
    slide_first: jax.Array  # int32
    sliding: tuple[bool, ...] = dataclasses.field(metadata={"static": True}, default=())
    window: int = dataclasses.field(metadata={"static": True}, default=0)
    sm_scale: float = dataclasses.field(metadata={"static": True}, default=1.0)
    impl: str = dataclasses.field(metadata={"static": True}, default="xla")
    block_sizes: BlockSizes | None = dataclasses.field(metadata={"static": True}, default=None)

    @classmethod
    def create(cls, cfg: Config, *, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
        """An empty pool (zeros: nothing is valid until a call writes it); under a mesh (`jax.set_mesh`)
        each buffer is created already split."""
        layout = paged_layout(cfg, num_pages=num_pages, page_size=page_size, dtype=dtype)
        a = {n: jnp.zeros(s, dt, device=cache_sharding(ax, s)) for n, (s, dt, ax) in layout.items()}
        n = len(layout) // 2
        none = jnp.zeros((0,), jnp.int32)
        return cls.of(cfg, (tuple(a[f"k.{e}"] for e in range(n)), tuple(a[f"v.{e}"] for e in range(n))),
                      {"start": none, "n_new": none, "full_table": none.reshape(0, 0),
                       "slide_table": none.reshape(0, 0), "slide_first": none})  # fmt: skip

    @classmethod
    def of(cls, cfg: Config, kv, a: Mapping, block_sizes: BlockSizes | None = None) -> PagedKVCache:
        """The cache over buffers `kv` ((k buffers), (v buffers)) for a call's arrays `a`."""
        return cls(tuple(kv[0]), tuple(kv[1]), a["start"], a["n_new"], a["full_table"], a["slide_table"],
                   a["slide_first"], tuple(cfg.layer_unit), cfg.sliding_window if any(cfg.layer_unit) else 0,
                   cfg.sm_scale, cfg.attention_impl, block_sizes)  # fmt: skip

    @property
    def buffers(self):
        return self.k, self.v

    # ------------------------------------------------------------------------------- forward protocol
    @property
    def kv(self):
        return tuple(zip(self.k, self.v, strict=True))

    @property
    def kv_slots(self) -> tuple[int, ...]:
        """Unit position j -> the buffer of `kv` its layers use (its rank within its kind)."""
        seen = {True: 0, False: 0}
        out = []
        for s in self.sliding:
            out.append(seen[s])
            seen[s] += 1
        return tuple(out)

    def with_kv(self, kv) -> PagedKVCache:
        return dataclasses.replace(self, k=tuple(a for a, _ in kv), v=tuple(b for _, b in kv))

    def positions(self, lanes: int, width: int) -> jax.Array:
        """Positions (lanes, width) of a call's flat rows (`flat_layout`); -1 for padding."""
        tok_row, j = flat_layout(self.start.shape[0] // lanes, width)
        start, n = self.start.reshape(lanes, -1)[:, tok_row], self.n_new.reshape(lanes, -1)[:, tok_row]
        return jnp.where(j < n, start + j, -1)

    def last_token(self, lanes: int, width: int) -> jax.Array:
        """(lanes, rows per lane) index in the flat row of each row's last token (a padding row: its first
        slot)."""
        per_lane = self.start.shape[0] // lanes
        n_dec = per_lane - 1
        n = self.n_new.reshape(lanes, per_lane)
        return jnp.concatenate([jnp.broadcast_to(jnp.arange(n_dec, dtype=jnp.int32), (lanes, n_dec)),
                                n_dec + jnp.maximum(n[:, n_dec:] - 1, 0)], axis=1)  # fmt: skip

    def copy_pages(self, src: jax.Array, dst: jax.Array) -> PagedKVCache:
        """Copies page src[l, i] onto dst[l, i] in every buffer (lane-local ids, (lanes, C); a dst outside
        the pool is no copy): copy-on-write of a shared partial page, before the call writes anything."""

        def local(src, dst, *bufs):
            s, d = src.reshape(-1), dst.reshape(-1)
            return tuple(b.at[:, d].set(b.at[:, s].get(mode="clip"), mode="drop") for b in bufs)

        bufs = (*self.k, *self.v)
        mesh = current_mesh()
        if mesh is None:
            out = local(src, dst, *bufs)
        else:
            pool = logical_spec(POOL_AXES, bufs[0].shape, dict(mesh.shape))
            ids = P(pool[1], None)
            out = jax.shard_map(local, mesh=mesh, in_specs=(ids, ids) + (pool,) * len(bufs),
                                out_specs=(pool,) * len(bufs), check_vma=False)(src, dst, *bufs)  # fmt: skip
        n = len(self.k)
        return dataclasses.replace(self, k=tuple(out[:n]), v=tuple(out[n:]))

    def begin(self, q_pos: jax.Array) -> tuple[PagedKVCache, PagedStep]:
        """Where this call's tokens go and what each row attends over, computed once for all layers."""
        page = self.k[0].shape[2]
        lanes, width = q_pos.shape
        per_lane = self.start.shape[0] // lanes
        tok_row, _ = flat_layout(per_lane, width)
        row = jnp.arange(lanes)[:, None] * per_lane + tok_row[None]  # (lanes, width) each token's row
        valid = q_pos >= 0
        blk = jnp.maximum(q_pos, 0) // page

        def page_of(table, first):
            col = blk - first[row]
            ok = valid & (col >= 0) & (col < table.shape[1])
            return jnp.where(ok, table[row, jnp.clip(col, 0, table.shape[1] - 1)], _DROP)

        zeros = jnp.zeros_like(self.start)
        step = PagedStep(
            full_page=page_of(self.full_table, zeros),
            slide_page=page_of(self.slide_table, self.slide_first),
            offset=jnp.where(valid, q_pos % page, 0),
            full_table=self.full_table,
            slide_table=self.slide_table,
            slide_first=self.slide_first,
            kv_len=self.start + self.n_new,
            window=self.window,
            sm_scale=self.sm_scale,
            impl=self.impl,
            block_sizes=self.block_sizes,
        )
        return self, step


def flat_layout(per_lane: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The layout of a lane's flat row of `width` tokens over its `per_lane` rows: the first per_lane - 1 rows
    decode, one token each (tokens 0 .. per_lane - 2), and the last row is a prefill chunk (tokens
    per_lane - 1 .. width - 1, empty when width = per_lane - 1). -> (row of each token, index of each token
    within its row), static."""
    tok_row = np.minimum(np.arange(width), per_lane - 1)
    return tok_row, np.maximum(np.arange(width) - (per_lane - 1), 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedStep:
    """Where one call's tokens go, shared by every layer (computed once in `PagedKVCache.begin`). A call is
    one flat row of `width` tokens per lane over `per_lane` rows per lane (`flat_layout`); row arrays are
    lane-major, token arrays (lanes, width)."""

    full_page: jax.Array  # (lanes, width) page of each token on full layers (_DROP = padding)
    slide_page: jax.Array  # (lanes, width) on sliding layers
    offset: jax.Array  # (lanes, width) offset in its page
    full_table: jax.Array  # (rows, NB)
    slide_table: jax.Array  # (rows, NS)
    slide_first: jax.Array  # (rows,)
    kv_len: jax.Array  # (rows,) tokens held after the call
    window: int = dataclasses.field(metadata={"static": True}, default=0)
    sm_scale: float = dataclasses.field(metadata={"static": True}, default=1.0)
    impl: str = dataclasses.field(metadata={"static": True}, default="xla")
    block_sizes: BlockSizes | None = dataclasses.field(metadata={"static": True}, default=None)

    def attend(self, kv, r, q, k, v, q_pos, *, ring: bool, attention):
        """One layer's attention for the flat row: q (lanes, width, K, G, H), k/v (lanes, width, K, H), the
        pool buffers `kv` at repeat r -> (output (lanes, width, K, G, H), new kv), as `cache.Step.attend`.

        The call's keys and values are written into their pages first (every token, also on sliding layers:
        a later prefix hit needs them), then each row attends over its own pages (`paged_attention`, with
        the layer's sinks: `attention.sinks`), in two dense layouts cut from the flat row without a gather:
        the decode rows as (lanes * n_dec, 1) queries and the chunks as (lanes, width - n_dec).
        """
        kb, vb = kv
        lanes, width = q_pos.shape
        per_lane = self.kv_len.shape[0] // lanes
        window = self.window if ring else 0
        tok_page = self.slide_page if ring else self.full_page
        table = self.slide_table if ring else self.full_table
        first = self.slide_first if ring else jnp.zeros_like(self.slide_first)
        opts = dict(window=window, sm_scale=self.sm_scale, impl=self.impl, block_sizes=self.block_sizes)

        def local(kb, vb, r, q, k, v, q_pos, tok_page, offset, table, first, kv_len, sinks):
            kb = kb.at[r, tok_page, offset].set(k.astype(kb.dtype), mode="drop")
            vb = vb.at[r, tok_page, offset].set(v.astype(vb.dtype), mode="drop")
            n_lanes = q.shape[0]
            n_dec = per_lane - 1
            groups = [(q[:, :n_dec].reshape((n_lanes * n_dec, 1) + q.shape[2:]),
                       q_pos[:, :n_dec].reshape(n_lanes * n_dec, 1), slice(0, n_dec))]  # fmt: skip
            if width > n_dec:
                groups.append((q[:, n_dec:], q_pos[:, n_dec:], slice(n_dec, per_lane)))
            out = []
            for qg, pg, rows in groups:

                def by_row(a, rows=rows):  # (rows of the call, ...) -> this group's rows
                    return a.reshape((n_lanes, per_lane) + a.shape[1:])[:, rows].reshape((-1,) + a.shape[1:])

                o = paged_attention(qg, kb, vb, r, sinks, pg, by_row(table), by_row(kv_len),
                                    first=by_row(first), **opts)  # fmt: skip
                out.append(o.reshape((n_lanes, -1) + o.shape[2:]))
            return jnp.concatenate(out, axis=1), kb, vb

        args = (kb, vb, r, q, k, v, q_pos, tok_page, self.offset, table, first, self.kv_len, attention.sinks)
        mesh = current_mesh()
        if mesh is None:
            out, kb, vb = local(*args)
        else:
            pool = logical_spec(POOL_AXES, kb.shape, dict(mesh.shape))
            data, heads = pool[1], pool[3]
            tok, rows = P(data, None), P(data)
            specs = (pool, pool, P(), P(data, None, heads, None, None), P(data, None, heads, None),
                     P(data, None, heads, None), tok, tok, tok, tok, rows, rows, P(heads, None))  # fmt: skip
            out, kb, vb = jax.shard_map(local, mesh=mesh, in_specs=specs,
                                        out_specs=(P(data, None, heads, None, None), pool, pool),
                                        check_vma=False)(*args)  # fmt: skip
        return out, (kb, vb)


# ------------------------------------------------------------------------------------------------ sizing
def paged_layout(cfg: Config, *, num_pages: int, page_size: int, dtype=None) -> dict[str, tuple]:
    """Every buffer of the engine's KV memory: name -> (shape, dtype, logical axes). The one description that
    `PagedKVCache.create`, `pool_plan` and the planner (`memory.engine_plan`) use."""
    dt = jnp.dtype(dtype or cfg.jax_dtype)
    R, K, H = cfg.layer_repeats, cfg.num_key_value_heads, cfg.head_dim
    n = max(kind_ranks(cfg)) + 1
    return {f"{kind}.{e}": ((R, num_pages, page_size, K, H), dt, POOL_AXES) for kind in ("k", "v")
            for e in range(n)}  # fmt: skip


def page_bytes(cfg: Config, page_size: int, dtype=None, mesh_shape: Mapping[str, int] | None = None) -> int:
    """Bytes of one page (k and v in every buffer) on one device of a mesh of `mesh_shape` (default one
    device): kv heads split over `model` where they divide."""
    layout = paged_layout(cfg, num_pages=1, page_size=page_size, dtype=dtype)
    shape = dict(mesh_shape or {})
    total = 0
    for s, dt, ax in layout.values():
        local = s if not shape else shard_shape(s, logical_spec(ax, s, shape), shape)
        local = (local[0], 1) + tuple(local[2:])  # one page (pages are split over data: whole here)
        total += math.prod(local) * dt.itemsize
    return total


def pages_for(cfg: Config, tokens: int, *, page_size: int, chunk: int) -> int:
    """Pages one sequence of `tokens` tokens holds at most while it is computed alone: a full page per
    `page_size` tokens, and sliding pages for its window plus one prefill chunk."""
    blocks = -(-tokens // page_size)
    kinds = set(cfg.layer_unit)
    full = blocks if False in kinds else 0
    sliding = min(blocks, sliding_peak(cfg, page_size=page_size, chunk=chunk)) if True in kinds else 0
    return full + sliding


def sliding_peak(cfg: Config, *, page_size: int, chunk: int) -> int:
    """Sliding pages a sequence holds at most: those covering the window before a chunk and the chunk."""
    return -(-(cfg.sliding_window - 1 + chunk) // page_size) + 1


def pool_plan(cfg: Config, *, page_size: int = 16, num_pages: int | None = None, kv_memory: int | None = None,
              lanes: int = 1, mesh_shape: Mapping[str, int] | None = None, dtype=None) -> dict:  # fmt: skip
    """The engine's KV pool: `num_pages` pages, or as many as `kv_memory` bytes PER DEVICE hold (a mesh of
    `mesh_shape` splits pages over `lanes` data shards and kv heads over `model`). Returns plain numbers:
    num_pages (all lanes), pages_per_lane, page_size, tokens_per_lane (what the pages of one lane hold on
    one kind of layer), page_bytes (per device), bytes_per_device, total_bytes (one copy of the pool)."""
    for name, v in (("page_size", page_size), ("lanes", lanes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    per_device = page_bytes(cfg, page_size, dtype, mesh_shape)
    if num_pages is None:
        if kv_memory is None:
            raise ValueError("the KV pool needs num_pages or kv_memory")
        per_lane = int(kv_memory) // max(per_device, 1)
        if per_lane < 1:
            raise ValueError(f"kv memory of {int(kv_memory)} bytes per device holds no page of {page_size} "
                             f"tokens ({per_device} bytes per device)")  # fmt: skip
        num_pages = per_lane * lanes
    bad = isinstance(num_pages, bool) or not isinstance(num_pages, int)
    if bad or num_pages < lanes or num_pages % lanes:
        raise ValueError(f"num_pages must be a positive multiple of the data shards ({lanes}), got "
                         f"{num_pages!r}")  # fmt: skip
    one = page_bytes(cfg, page_size, dtype)
    return {"num_pages": num_pages, "pages_per_lane": num_pages // lanes, "page_size": page_size,
            "tokens_per_lane": num_pages // lanes * page_size, "page_bytes": per_device,
            "bytes_per_device": num_pages // lanes * per_device, "total_bytes": num_pages * one,
            "lanes": lanes}  # fmt: skip


def cpu_budget(cfg: Config, *, seqs_per_lane: int, max_context: int, page_size: int, dtype=None,
               mesh_shape: Mapping[str, int] | None = None) -> int:
    """The engine's KV bytes per device on CPU when no budget is given: CPU_KV_MEMORY, never more than
    `seqs_per_lane` sequences at max_context need on every kind of layer."""
    per_token = page_bytes(cfg, page_size, dtype, mesh_shape) * len(set(cfg.layer_unit)) / page_size
    return int(min(CPU_KV_MEMORY, seqs_per_lane * (max_context + page_size) * per_token))


def token_bytes(cfg: Config, dtype=None) -> tuple[int, int]:
    """Bytes one token takes (k and v over all layers of a kind): (full layers, sliding layers)."""
    per = 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype or cfg.jax_dtype).itemsize
    n_full = sum(not s for s in cfg.layer_unit) * cfg.layer_repeats
    return per * n_full, per * (cfg.num_hidden_layers - n_full)
